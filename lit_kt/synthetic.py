"""Simulated students for knowledge tracing, after the synthetic data of the DKT paper.

Piech et al. (2015), "Deep Knowledge Tracing", evaluate on simulated students who answer exercises
that each exercise one of a few latent concepts. This module implements a small, fully documented
variant of that simulator, so that models can be checked against a known ground truth. Two reference
AUCs come with the data:

* :meth:`SyntheticStudents.oracle_auc` is the ROC AUC of the Bayes-optimal prediction: the posterior
  predictive ``P(r_t = 1 | e_1..e_t, r_1..r_{t-1})`` of the true generating process, with the
  exercises' concepts and difficulties, the guessing floor and the learning rate known, and each
  student's abilities inferred from their own earlier answers only (see
  :meth:`SyntheticStudents.oracle_probabilities`). This is the best a model can reach in expectation
  from the history, the right target for a learned model (which does not even know the exercise
  parameters, so it should stay a little below).
* :meth:`SyntheticStudents.true_probability_auc` is the ROC AUC of the true probabilities themselves, returned
  alongside the responses. It is an upper bound that no model reaches: it knows every student's
  abilities before they answer anything.

Model
-----
With ``E = num_exercises``, ``K = num_concepts``, ``N = num_students``, ``L = seq_len``,
``c = guess`` and ``eta = learning_rate``:

* Exercises. Exercise id ``e`` in ``1..E`` belongs to concept ``k_e`` in ``0..K-1`` and has difficulty
  ``beta_e ~ N(0, 1)``. Concepts are assigned so that every concept gets at least one exercise: the
  first ``K`` slots hold each concept once, the other ``E - K`` slots draw a concept uniformly at
  random, then the slots are shuffled over the exercise ids.
* Students. Student ``s`` starts with one ability per concept, ``alpha_{s,k}(0) ~ N(0, 1)``.
* Exercise order. With ``fixed_order=True`` every student does the same exercises in the same order,
  as in the DKT paper: ``e_t = (t mod E) + 1`` for ``t = 0..L-1`` (ids ``1..E`` cycling when
  ``L > E``). With ``fixed_order=False`` each student draws ``e_t`` uniformly from ``1..E`` at every
  step, independently.
* Responses (item response theory with guessing). At step ``t``, with ``k = k_{e_t}``::

      p_{s,t} = c + (1 - c) * sigmoid(alpha_{s,k}(t) - beta_{e_t}),   sigmoid(x) = 1 / (1 + exp(-x))
      r_{s,t} ~ Bernoulli(p_{s,t})

  so ``p`` lies in ``[c, 1]``: a student who knows nothing still guesses right with probability ``c``.
* Learning. After answering, the practised concept improves by a constant gain, whatever the
  response (practice makes progress)::

      alpha_{s,k}(t + 1) = alpha_{s,k}(t) + eta,   other concepts unchanged.

  With ``eta = 0`` the students do not learn and a student's probability on an exercise is the same
  every time they meet it.

Questions (``num_questions = Q > 0``; ``Q = 0``, the default, is the model above, draw for draw)
--------------------------------------------------------------------------------------------------
A question level inside the exercises, for question-level models such as AKT with Rasch embeddings
(``docs/kt_question_level.md``):

* Question id ``q`` in ``1..Q`` belongs to exercise ``e_q`` (drawn as the exercises' concepts are: every
  exercise gets at least one question) and has the Rasch difficulty
  ``beta_q = beta_{e_q} + sigma * z_q`` with ``z_q ~ N(0, 1)`` and ``sigma = question_spread``.
* Students draw questions instead of exercises (uniformly from ``1..Q``, or ``q_t = (t mod Q) + 1``
  with ``fixed_order``); the sequence's ``exercises`` are ``e_{q_t}`` and its ``questions`` are ``q_t``.
* Responses use the question's difficulty, ``p = c + (1 - c) sigmoid(alpha_{s,k}(t) - beta_{q_t})``
  with ``k`` the concept of ``e_{q_t}``; learning is unchanged (per concept).

The oracle then knows the questions' difficulties, so it stays the Bayes-optimal ceiling;
``oracle_probabilities(use_questions=False)`` gives the question-blind reference that knows only the
exercises' ``beta_e``.

All randomness comes from ``np.random.default_rng(seed)``, drawn in a fixed order (concepts,
difficulties, with questions their exercises and offsets, abilities, exercise or question ids, uniforms
for the responses), so a seed gives identical data.
The draws are vectorised over students; only the ``L`` steps are a Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lit_kt.formats import StudentSequence

__all__ = ["SyntheticStudents", "generate_students", "roc_auc"]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, by the Mann-Whitney rank formula.

    Scores are ranked in ascending order with tied scores given the average of their ranks, so a
    (positive, negative) pair with equal scores counts one half. With ``R+`` the sum of the ranks of
    the positives, ``n+`` positives and ``n-`` negatives::

        AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-)

    which is the fraction of (positive, negative) pairs in which the positive scores higher.

    Args:
        scores: 1-D array of real scores, higher meaning "more likely positive".
        labels: 1-D array of the same length with values 0 or 1 (or booleans).

    Returns:
        The ROC AUC, a float in ``[0, 1]``.

    Raises:
        ValueError: If the arrays are not 1-D of the same non-zero length, if a score is not finite, if
            a label is not 0 or 1, or if the labels are all of one class.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"Expected `scores` and `labels` to be 1-D arrays of the same length but got shapes "
            f"{scores.shape} and {labels.shape}."
        )
    if scores.size == 0:
        raise ValueError("Expected `scores` and `labels` to be non-empty.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Expected `scores` to be finite but got NaN or infinite values.")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("Expected `labels` to contain only 0 and 1.")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Expected `labels` to contain both classes (0 and 1) but got a single class.")

    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Tie groups of the sorted scores: group g covers sorted positions starts[g] .. ends[g] - 1.
    new_group = np.empty(scores.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], scores.size)
    # 1-based ranks start+1 .. end average to (start + 1 + end) / 2.
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)

    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass(frozen=True)
class SyntheticStudents:
    """Simulated students together with the ground truth they were drawn from.

    Attributes:
        sequences: One :class:`~lit_kt.formats.StudentSequence` per student, exercise ids in
            ``1..num_exercises`` and responses in ``{0, 1}``.
        probabilities: Per student, a ``(L,)`` float64 array of the true probability of a correct
            answer from which each response was drawn.
        exercise_concepts: ``(num_exercises,)`` int64, the concept (``0..num_concepts-1``) of exercise
            id ``e`` at index ``e - 1``.
        exercise_difficulty: ``(num_exercises,)`` float64, the difficulty ``beta`` of exercise id ``e``
            at index ``e - 1``.
        learning_rate: The ability gain ``eta`` per practice of a concept.
        guess: The guessing probability ``c``, the floor of ``P(correct)``.
        question_exercises: ``(num_questions,)`` int64, the exercise id (``1..num_exercises``) of question
            id ``q`` at index ``q - 1``; ``None`` without questions.
        question_difficulty: ``(num_questions,)`` float64, the Rasch difficulty ``beta_q`` of question id
            ``q`` at index ``q - 1``; ``None`` without questions.
    """

    sequences: list[StudentSequence]
    probabilities: list[np.ndarray]
    exercise_concepts: np.ndarray
    exercise_difficulty: np.ndarray
    learning_rate: float
    guess: float
    question_exercises: np.ndarray | None = None
    question_difficulty: np.ndarray | None = None

    def true_probability_auc(self) -> float:
        """ROC AUC of the true probabilities against the drawn responses, over all steps of all students.

        This is an upper bound that no model reaches, not even one that knows the simulator's parameters:
        the true probabilities use each student's abilities ``alpha_{s,k}(0)``, known here before the
        student has answered anything. A model can only infer them from the answers it has seen; the best
        it can do in expectation is :meth:`oracle_auc`, the right target for a learned model.

        Returns:
            The ROC AUC, a float in ``[0, 1]``.

        Raises:
            ValueError: If all drawn responses are of one class.
        """
        scores = np.concatenate(self.probabilities)
        labels = np.concatenate([sequence.responses for sequence in self.sequences])
        return roc_auc(scores, labels)

    def oracle_probabilities(
        self, grid_size: int = 401, grid_limit: float = 6.0, use_questions: bool = True
    ) -> list[np.ndarray]:
        """Bayes-optimal predictions: the posterior predictive probability of every response given the history.

        For student ``s`` at step ``t`` this is ``P(r_t = 1 | e_1..e_t, r_1..r_{t-1})`` under the true
        generating process, with the exercises' concepts and difficulties, ``guess`` and ``learning_rate``
        known and the abilities unknown (prior ``N(0, 1)``). The concepts are independent a priori and
        learning is deterministic, ``alpha_k(t) = alpha_k(0) + eta * n_k(t)`` with ``n_k(t)`` the number of
        earlier attempts on concept ``k``, so the posterior factorises over concepts and each factor is a
        one-dimensional distribution of ``alpha_k(0)``. It is discretised on ``grid_size`` equally spaced
        points over ``[-grid_limit, grid_limit]``, with prior weights proportional to the ``N(0, 1)``
        density. At each step the prediction is the posterior mean of
        ``p = c + (1 - c) sigmoid(alpha_k(0) + eta * n_k(t) - beta_e)`` for the concept ``k`` practised,
        then that concept's log-posterior adds the log-likelihood of the observed response.

        The computation is vectorised over the students of each sequence length (the simulator gives all
        students the same length); only the steps are a Python loop.

        With questions (``num_questions > 0``) the difficulty is the question's ``beta_q``: the oracle stays
        Bayes-optimal. ``use_questions=False`` gives a question-blind reference instead, which uses the
        exercise's ``beta_e`` for every question of the exercise.

        Args:
            grid_size: Number of grid points of ``alpha(0)``, at least 2.
            grid_limit: Half-width of the grid, positive.
            use_questions: Use the questions' difficulties when the students have questions.

        Returns:
            Per student, a ``(L,)`` float64 array of predicted probabilities, in the order of
            :attr:`sequences`.

        Raises:
            ValueError: If the grid arguments are out of range, or an exercise id of a sequence has no
                concept and difficulty (``> num_exercises``).
        """
        _check_int("grid_size", grid_size, 2)
        if not (math.isfinite(grid_limit) and grid_limit > 0.0):
            raise ValueError(f"Expected `grid_limit` to be a finite number > 0 but got {grid_limit!r}.")
        questions = use_questions and self.question_difficulty is not None
        if questions:
            concepts = self.exercise_concepts[self.question_exercises - 1]  # (Q,) concept of each question
            difficulty, what = self.question_difficulty, "question"
        else:
            concepts, difficulty, what = self.exercise_concepts, self.exercise_difficulty, "exercise"
        ids = [sequence.questions if questions else sequence.exercises for sequence in self.sequences]
        for index, sequence_ids in enumerate(ids):
            if sequence_ids.size and sequence_ids.max() > concepts.shape[0]:
                raise ValueError(
                    f"Expected {what} ids in 1..{concepts.shape[0]} but student {index} has {what} id "
                    f"{int(sequence_ids.max())}."
                )
        grid = np.linspace(-grid_limit, grid_limit, int(grid_size))
        lengths = np.array([sequence.exercises.size for sequence in self.sequences], dtype=np.int64)
        result = [np.empty(0, dtype=np.float64) for _ in self.sequences]
        for length in np.unique(lengths):
            members = np.flatnonzero(lengths == length)
            if length == 0:
                continue
            exercises = np.stack([ids[i] for i in members])
            responses = np.stack([self.sequences[i].responses for i in members])
            predictions = _bayes_predictions(
                exercises,
                responses,
                concepts,
                difficulty,
                float(self.learning_rate),
                float(self.guess),
                grid,
            )
            for row, i in enumerate(members):
                result[i] = predictions[row].copy()
        return result

    def oracle_auc(self) -> float:
        """ROC AUC of the Bayes-optimal predictions (:meth:`oracle_probabilities`) over all steps of all students.

        This is the best a model that knows the simulator's exercise parameters (concepts, difficulties,
        guessing floor, learning rate) can reach in expectation from each student's history, and so the
        right target for a learned model; :meth:`true_probability_auc` is higher, as it knows the abilities too.

        Returns:
            The ROC AUC, a float in ``[0, 1]``.

        Raises:
            ValueError: If all drawn responses are of one class.
        """
        scores = np.concatenate(self.oracle_probabilities())
        labels = np.concatenate([sequence.responses for sequence in self.sequences])
        return roc_auc(scores, labels)


def _bayes_predictions(
    exercises: np.ndarray,
    responses: np.ndarray,
    concepts: np.ndarray,
    difficulty: np.ndarray,
    learning_rate: float,
    guess: float,
    grid: np.ndarray,
) -> np.ndarray:
    """Posterior predictive probabilities for ``(N, L)`` exercises and responses of equal-length students."""
    n, length = exercises.shape
    num_concepts = int(concepts.max()) + 1
    rows = np.arange(n)
    exercise = exercises - 1
    concept = concepts[exercise]  # (n, length)

    # Earlier attempts n_k(t) on the practised concept: they depend on the exercises only, not on the responses.
    count = np.empty((n, length), dtype=np.int64)
    practice = np.zeros((n, num_concepts), dtype=np.int64)
    for t in range(length):
        count[:, t] = practice[rows, concept[:, t]]
        practice[rows, concept[:, t]] += 1

    # p and the log-likelihood of the response on the grid depend on (student, step) only through the triple
    # (exercise, count, response): compute them once per distinct triple (at most 2 E L), then look them up.
    key = (exercise * length + count) * 2 + responses
    unique_key, inverse = np.unique(key.ravel(), return_inverse=True)
    inverse = inverse.reshape(n, length)
    unique_correct = (unique_key % 2)[:, None] == 1
    offset = learning_rate * ((unique_key // 2) % length) - difficulty[unique_key // (2 * length)]
    logit = grid[None, :] + offset[:, None]  # (distinct, grid)
    # sigmoid(x) = (1 + tanh(x / 2)) / 2, which does not overflow for large |x|.
    p = guess + (1.0 - guess) * 0.5 * (1.0 + np.tanh(0.5 * logit))
    # Log-likelihood of the response, without cancellation or underflow:
    # log P(r=0) = log(1 - c) + log sigmoid(-x) = log(1 - c) - log(1 + e^x),
    # log P(r=1) = log(c + (1 - c) sigmoid(x)) = logaddexp(log c, log(1 - c) - log(1 + e^-x)).
    log_lik = math.log1p(-guess) - np.logaddexp(0.0, np.where(unique_correct, -logit, logit))
    if guess > 0.0:
        log_lik = np.where(unique_correct, np.logaddexp(math.log(guess), log_lik), log_lik)

    # Log-posterior of alpha_{s,k}(0) on the grid, up to a constant per (s, k); starts at the N(0, 1) log-prior.
    log_posterior = np.broadcast_to(-0.5 * grid**2, (n, num_concepts, grid.size)).copy()
    predictions = np.empty((n, length), dtype=np.float64)
    for t in range(length):
        k = concept[:, t]
        log_post = log_posterior[rows, k]  # (n, grid), a copy
        log_post -= log_post.max(axis=1, keepdims=True)
        weights = np.exp(log_post)
        predictions[:, t] = np.einsum("ng,ng->n", weights, p[inverse[:, t]]) / weights.sum(axis=1)
        log_post += log_lik[inverse[:, t]]
        log_posterior[rows, k] = log_post
    # A posterior mean of values in [c, 1] lies in [c, 1]; clip the last-bit rounding of the division.
    return np.clip(predictions, guess, 1.0)


def _check_int(name: str, value: int, low: int, high: int | None = None, high_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"Expected `{name}` to be an integer but got {value!r}.")
    if high is None:
        if value < low:
            raise ValueError(f"Expected `{name}` to be at least {low} but got {value}.")
    elif not low <= value <= high:
        raise ValueError(f"Expected `{name}` to be between {low} and {high_name} ({high}) but got {value}.")


def generate_students(
    num_students: int = 4000,
    num_exercises: int = 50,
    num_concepts: int = 5,
    seq_len: int = 50,
    learning_rate: float = 0.1,
    guess: float = 0.25,
    seed: int = 0,
    fixed_order: bool = False,
    num_questions: int = 0,
    question_spread: float = 1.0,
) -> SyntheticStudents:
    """Simulate students answering exercises, as described in the module docstring.

    Args:
        num_students: Number of students ``N`` (sequences), at least 1.
        num_exercises: Number of exercises ``E``; ids are ``1..E`` (0 is left for padding). At least 1.
        num_concepts: Number of latent concepts ``K``, between 1 and ``num_exercises``.
        seq_len: Number of steps ``L`` per student, at least 1.
        learning_rate: Ability gain ``eta`` on the practised concept after each step, at least 0.
        guess: Guessing probability ``c``, the floor of ``P(correct)``, in ``[0, 1)``.
        seed: Seed of ``np.random.default_rng``; the same seed gives the same data.
        fixed_order: If True, every student does exercises ``1, 2, ..., E, 1, 2, ...`` in this order
            (the DKT paper's setting); if False, each step's exercise is drawn uniformly per student. With
            questions, the same holds for question ids.
        num_questions: Number of questions ``Q`` (ids ``1..Q``) inside the exercises, each with its own
            Rasch difficulty (see the module docstring), at least ``num_exercises``; 0 for none (the
            sequences then have no ``questions``, and the data are those of earlier versions).
        question_spread: Standard deviation ``sigma`` of a question's difficulty around its exercise's,
            at least 0.

    Returns:
        The simulated sequences, the true probabilities behind every response, the exercises'
        concepts and difficulties, the learning rate and guessing floor, and with questions their
        exercises and difficulties.

    Raises:
        ValueError: If an argument is out of range; the message names the argument.
    """
    _check_int("num_students", num_students, 1)
    _check_int("num_exercises", num_exercises, 1)
    _check_int("num_concepts", num_concepts, 1, num_exercises, "num_exercises")
    _check_int("seq_len", seq_len, 1)
    if not (isinstance(guess, (int, float, np.floating)) and 0.0 <= guess < 1.0):
        raise ValueError(f"Expected `guess` to be in [0, 1) but got {guess!r}.")
    if not (
        isinstance(learning_rate, (int, float, np.floating)) and math.isfinite(learning_rate) and learning_rate >= 0.0
    ):
        raise ValueError(f"Expected `learning_rate` to be a finite number >= 0 but got {learning_rate!r}.")

    if num_questions != 0:
        _check_int("num_questions", num_questions, num_exercises)
    if not (
        isinstance(question_spread, (int, float, np.floating))
        and math.isfinite(question_spread)
        and question_spread >= 0.0
    ):
        raise ValueError(f"Expected `question_spread` to be a finite number >= 0 but got {question_spread!r}.")

    rng = np.random.default_rng(seed)
    n, e, k, length, nq = int(num_students), int(num_exercises), int(num_concepts), int(seq_len), int(num_questions)

    # Exercises: every concept at least once, the rest uniform, shuffled over the ids.
    concepts = np.concatenate([np.arange(k), rng.integers(0, k, size=e - k)]).astype(np.int64)
    rng.shuffle(concepts)
    difficulty = rng.standard_normal(e)
    # Questions (only when asked for, so that nq = 0 draws exactly what earlier versions drew): every exercise at
    # least once, the rest uniform, shuffled; difficulty = the exercise's + sigma * N(0, 1).
    item_exercise = np.arange(e, dtype=np.int64)  # (items,) 0-based exercise of each item the students draw
    item_difficulty = difficulty
    if nq:
        item_exercise = np.concatenate([np.arange(e), rng.integers(0, e, size=nq - e)]).astype(np.int64)
        rng.shuffle(item_exercise)
        item_difficulty = difficulty[item_exercise] + question_spread * rng.standard_normal(nq)
    items = item_exercise.shape[0]

    # Students: initial abilities, exercise (or question) ids, and uniforms deciding the responses.
    ability = rng.standard_normal((n, k))
    if fixed_order:
        drawn = np.broadcast_to(np.arange(length, dtype=np.int64) % items + 1, (n, length)).copy()
    else:
        drawn = rng.integers(1, items + 1, size=(n, length), dtype=np.int64)
    uniforms = rng.random((n, length))
    exercises = item_exercise[drawn - 1] + 1 if nq else drawn  # (n, length)

    probabilities = np.empty((n, length), dtype=np.float64)
    rows = np.arange(n)
    for t in range(length):
        item = drawn[:, t] - 1
        concept = concepts[item_exercise[item]]
        logit = ability[rows, concept] - item_difficulty[item]
        # sigmoid(x) = (1 + tanh(x / 2)) / 2, which does not overflow for large |x|.
        probabilities[:, t] = guess + (1.0 - guess) * 0.5 * (1.0 + np.tanh(0.5 * logit))
        ability[rows, concept] += learning_rate
    responses = (uniforms < probabilities).astype(np.int64)

    sequences = [
        StudentSequence(
            exercises=exercises[s].copy(),
            responses=responses[s].copy(),
            student=f"synthetic-{s}",
            questions=drawn[s].copy() if nq else None,
        )
        for s in range(n)
    ]
    return SyntheticStudents(
        sequences=sequences,
        probabilities=[probabilities[s].copy() for s in range(n)],
        exercise_concepts=concepts,
        exercise_difficulty=difficulty,
        learning_rate=float(learning_rate),
        guess=float(guess),
        question_exercises=item_exercise + 1 if nq else None,
        question_difficulty=item_difficulty if nq else None,
    )
