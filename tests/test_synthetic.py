"""Tests of the simulated students of lit_kt.synthetic."""

import itertools

import numpy as np
import pytest

from lit_kt.formats import StudentSequence
from lit_kt.synthetic import SyntheticStudents, generate_students, roc_auc


def _stack(data: SyntheticStudents) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    exercises = np.stack([s.exercises for s in data.sequences])
    responses = np.stack([s.responses for s in data.sequences])
    probabilities = np.stack(data.probabilities)
    return exercises, responses, probabilities


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: fraction of (positive, negative) pairs ranked right, ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    total = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


# ---------------------------------------------------------------- roc_auc


def test_roc_auc_hand_computed():
    # Pairs (pos, neg): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok -> 3/4.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 1, 0, 0])) == pytest.approx(0.0)


def test_roc_auc_ties_count_half():
    # One positive and one negative with the same score: a single tied pair.
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    # All scores equal: every pair tied.
    assert roc_auc(np.full(7, 0.3), np.array([0, 1, 1, 0, 1, 0, 0])) == pytest.approx(0.5)
    # Pairs: pos 0.5 vs neg 0.5 tie (0.5), pos 0.5 vs neg 0.2 (1), pos 0.9 vs both (2) -> 3.5 / 4.
    assert roc_auc(np.array([0.2, 0.5, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)


def test_roc_auc_matches_brute_force_on_random_data():
    rng = np.random.default_rng(123)
    for trial in range(20):
        n = int(rng.integers(2, 80))
        # Rounded scores so that ties are frequent.
        scores = np.round(rng.random(n), 1)
        labels = rng.integers(0, 2, size=n)
        labels[0], labels[1] = 0, 1  # both classes present
        assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12), trial


def test_roc_auc_accepts_bool_labels():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(scores, np.array([False, False, True, True])) == pytest.approx(0.75)


@pytest.mark.parametrize("labels", [np.zeros(4, dtype=np.int64), np.ones(4, dtype=np.int64)])
def test_roc_auc_single_class_raises(labels):
    with pytest.raises(ValueError, match="labels"):
        roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels)


def test_roc_auc_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="labels"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="scores"):
        roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))


# ---------------------------------------------------------------- generate_students


def test_determinism():
    a = generate_students(num_students=50, seed=7)
    b = generate_students(num_students=50, seed=7)
    c = generate_students(num_students=50, seed=8)
    for x, y in zip(_stack(a), _stack(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.exercise_concepts, b.exercise_concepts)
    np.testing.assert_array_equal(a.exercise_difficulty, b.exercise_difficulty)
    assert not np.array_equal(a.exercise_difficulty, c.exercise_difficulty)
    assert not np.array_equal(_stack(a)[0], _stack(c)[0])
    assert not np.array_equal(_stack(a)[2], _stack(c)[2])


@pytest.mark.parametrize("fixed_order", [False, True])
def test_shapes_types_and_ranges(fixed_order):
    n, e, k, length, guess = 30, 12, 4, 20, 0.2
    data = generate_students(
        num_students=n, num_exercises=e, num_concepts=k, seq_len=length, guess=guess, seed=1, fixed_order=fixed_order
    )
    assert isinstance(data, SyntheticStudents)
    assert len(data.sequences) == n and len(data.probabilities) == n
    assert data.exercise_concepts.shape == (e,) and data.exercise_difficulty.shape == (e,)
    assert set(data.exercise_concepts.tolist()) == set(range(k))
    for seq, prob in zip(data.sequences, data.probabilities):
        assert isinstance(seq, StudentSequence)
        assert seq.exercises.shape == (length,) and seq.exercises.dtype == np.int64
        assert seq.responses.shape == (length,) and seq.responses.dtype == np.int64
        assert prob.shape == (length,) and prob.dtype == np.float64
        assert seq.exercises.min() >= 1 and seq.exercises.max() <= e
        assert set(seq.responses.tolist()) <= {0, 1}
        assert np.all(prob >= guess) and np.all(prob <= 1.0)
    assert len({seq.student for seq in data.sequences}) == n


def test_every_concept_gets_an_exercise():
    for seed in range(20):
        data = generate_students(num_students=1, num_exercises=6, num_concepts=6, seed=seed)
        assert sorted(data.exercise_concepts.tolist()) == list(range(6))
        data = generate_students(num_students=1, num_exercises=7, num_concepts=5, seed=seed)
        assert set(data.exercise_concepts.tolist()) == set(range(5))


def test_fixed_order_cycles_through_exercises():
    data = generate_students(num_students=5, num_exercises=4, num_concepts=2, seq_len=10, fixed_order=True)
    expected = np.array([1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    for seq in data.sequences:
        np.testing.assert_array_equal(seq.exercises, expected)


def test_random_order_is_roughly_uniform():
    data = generate_students(num_students=2000, num_exercises=10, num_concepts=2, seq_len=20, seed=3)
    exercises = _stack(data)[0]
    counts = np.bincount(exercises.ravel(), minlength=11)[1:]
    expected = exercises.size / 10
    # Binomial std of a count is sqrt(n p (1 - p)) = sqrt(40000 * 0.1 * 0.9) = 60.
    assert np.all(np.abs(counts - expected) < 5 * 60)
    # Different students do different exercises.
    assert not np.all(exercises == exercises[0])


def test_probabilities_follow_irt_with_learning():
    """Invert p = c + (1 - c) sigmoid(alpha - beta) and check abilities grow by exactly eta per practice."""
    guess, eta = 0.25, 0.07
    data = generate_students(
        num_students=40, num_exercises=15, num_concepts=3, seq_len=30, learning_rate=eta, guess=guess, seed=5
    )
    for seq, prob in zip(data.sequences, data.probabilities):
        q = (prob - guess) / (1.0 - guess)
        ability = np.log(q / (1.0 - q)) + data.exercise_difficulty[seq.exercises - 1]
        concepts = data.exercise_concepts[seq.exercises - 1]
        for concept in np.unique(concepts):
            steps = np.flatnonzero(concepts == concept)
            np.testing.assert_allclose(np.diff(ability[steps]), eta, atol=1e-7)


def test_responses_are_drawn_from_probabilities():
    data = generate_students(num_students=4000, seed=11)
    _, responses, probabilities = _stack(data)
    r, p = responses.ravel().astype(np.float64), probabilities.ravel()
    # Overall: mean response vs mean probability, std of the mean of independent Bernoullis.
    std = np.sqrt(np.sum(p * (1 - p))) / p.size
    assert abs(r.mean() - p.mean()) < 4 * std
    # Calibration by bins of the true probability.
    edges = np.linspace(0.25, 1.0, 11)
    which = np.clip(np.digitize(p, edges) - 1, 0, 9)
    checked = 0
    for b in range(10):
        mask = which == b
        if mask.sum() < 500:
            continue
        pb = p[mask]
        std_b = np.sqrt(np.sum(pb * (1 - pb))) / mask.sum()
        assert abs(r[mask].mean() - pb.mean()) < 5 * std_b, b
        checked += 1
    assert checked >= 6


def test_learning_raises_probability():
    data = generate_students(num_students=4000, learning_rate=0.1, seed=2)
    probabilities = _stack(data)[2]
    first, last = probabilities[:, 0], probabilities[:, -1]
    std = np.sqrt(first.var() / first.size + last.var() / last.size)
    assert last.mean() - first.mean() > 10 * std


def test_no_learning_keeps_probability():
    data = generate_students(num_students=4000, learning_rate=0.0, seed=2)
    probabilities = _stack(data)[2]
    first, last = probabilities[:, 0], probabilities[:, -1]
    std = np.sqrt(first.var() / first.size + last.var() / last.size)
    assert abs(last.mean() - first.mean()) < 4 * std


def test_no_learning_same_exercise_same_probability():
    data = generate_students(
        num_students=20, num_exercises=5, num_concepts=2, seq_len=15, learning_rate=0.0, fixed_order=True, seed=4
    )
    probabilities = _stack(data)[2]
    np.testing.assert_array_equal(probabilities[:, :5], probabilities[:, 5:10])
    np.testing.assert_array_equal(probabilities[:, :5], probabilities[:, 10:15])


def test_guess_zero_and_floor():
    data = generate_students(num_students=500, guess=0.0, seed=6)
    p = np.stack(data.probabilities)
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert p.min() < 0.1  # without guessing, weak students on hard exercises go near 0
    data = generate_students(num_students=500, guess=0.5, seed=6)
    assert np.stack(data.probabilities).min() >= 0.5


def test_true_probability_auc_defaults():
    data = generate_students()
    auc = data.true_probability_auc()
    print(f"oracle AUC (defaults) = {auc:.4f}")
    assert 0.65 < auc < 1.0
    # The oracle equals roc_auc on the concatenated data.
    _, responses, probabilities = _stack(data)
    assert auc == pytest.approx(roc_auc(probabilities.ravel(), responses.ravel()))


def test_oracle_beats_shuffled_scores():
    data = generate_students(num_students=500, seed=9)
    _, responses, probabilities = _stack(data)
    shuffled = np.random.default_rng(0).permutation(probabilities.ravel())
    assert abs(roc_auc(shuffled, responses.ravel()) - 0.5) < 0.03
    assert data.true_probability_auc() > 0.6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_students": 0}, "num_students"),
        ({"num_exercises": 0}, "num_exercises"),
        ({"num_concepts": 0}, "num_concepts"),
        ({"num_concepts": 70}, "num_concepts"),
        ({"num_exercises": 3, "num_concepts": 4}, "num_concepts"),
        ({"seq_len": 0}, "seq_len"),
        ({"guess": -0.1}, "guess"),
        ({"guess": 1.0}, "guess"),
        ({"learning_rate": -0.01}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"num_students": 2.5}, "num_students"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        generate_students(**kwargs)


def test_num_concepts_message():
    with pytest.raises(ValueError) as info:
        generate_students(num_concepts=70)
    assert str(info.value) == "Expected `num_concepts` to be between 1 and num_exercises (50) but got 70."


# ---------------------------------------------------------------- Bayes-optimal predictions

# Fine quadrature grid of the initial ability, independent of the module's 401-point grid over [-6, 6].
_A = np.linspace(-12.0, 12.0, 24001)
_PHI = np.exp(-0.5 * _A**2) / np.sqrt(2.0 * np.pi)


def _irt(logit: np.ndarray, guess: float) -> np.ndarray:
    return guess + (1.0 - guess) / (1.0 + np.exp(-logit))


def _hand_made(
    histories: list[tuple[list[int], list[int]]],
    concepts: list[int],
    difficulty: list[float],
    learning_rate: float,
    guess: float,
) -> SyntheticStudents:
    sequences = [StudentSequence(exercises=np.array(e), responses=np.array(r)) for e, r in histories]
    return SyntheticStudents(
        sequences=sequences,
        probabilities=[np.zeros(len(e)) for e, _ in histories],  # not used by the Bayes predictions
        exercise_concepts=np.array(concepts, dtype=np.int64),
        exercise_difficulty=np.array(difficulty, dtype=np.float64),
        learning_rate=learning_rate,
        guess=guess,
    )


def _quadrature_predictions(
    exercises: list[int], responses: list[int], concepts: list[int], difficulty: list[float], eta: float, c: float
) -> np.ndarray:
    """Posterior predictive by direct integration over alpha_k(0) of the practised concept, step by step."""
    out = []
    for t, e in enumerate(exercises):
        k = concepts[e - 1]
        likelihood = np.ones_like(_A)
        attempts = 0
        for i in range(t):
            if concepts[exercises[i] - 1] != k:
                continue
            p_i = _irt(_A + eta * attempts - difficulty[exercises[i] - 1], c)
            likelihood *= p_i if responses[i] == 1 else 1.0 - p_i
            attempts += 1
        p_t = _irt(_A + eta * attempts - difficulty[e - 1], c)
        out.append(np.trapezoid(p_t * likelihood * _PHI, _A) / np.trapezoid(likelihood * _PHI, _A))
    return np.array(out)


def test_bayes_matches_quadrature_one_concept_no_learning():
    beta, c = 0.4, 0.2
    histories = [
        ([1] * 12, [1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0]),
        ([1] * 12, [0] * 12),
        ([1] * 12, [1] * 12),
        ([1] * 5, [0, 1, 0, 0, 1]),  # another length: its own group
    ]
    data = _hand_made(histories, [0], [beta], learning_rate=0.0, guess=c)
    bayes = data.oracle_probabilities()
    assert len(bayes) == len(histories)
    for (exercises, responses), predicted in zip(histories, bayes):
        assert predicted.shape == (len(exercises),) and predicted.dtype == np.float64
        expected = _quadrature_predictions(exercises, responses, [0], [beta], 0.0, c)
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-7)
    # Sanity of direction: wrong answers lower the prediction, right answers raise it.
    assert np.all(np.diff(bayes[1]) < 0) and np.all(np.diff(bayes[2]) > 0)


def test_bayes_matches_quadrature_two_concepts_with_learning():
    concepts, difficulty, eta = [0, 1, 0], [-0.3, 0.8, 1.1], 0.35
    histories = [
        ([1, 2, 3, 2, 1, 1, 3, 2, 2, 3], [0, 1, 1, 0, 1, 0, 1, 1, 1, 0]),
        ([2, 2, 2, 1, 3, 1, 2, 3, 1, 1], [1, 1, 0, 0, 0, 1, 1, 0, 1, 1]),
        ([3, 3], [1, 0]),
    ]
    for c in (0.0, 0.25):
        data = _hand_made(histories, concepts, difficulty, learning_rate=eta, guess=c)
        for (exercises, responses), predicted in zip(histories, data.oracle_probabilities()):
            expected = _quadrature_predictions(exercises, responses, concepts, difficulty, eta, c)
            np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-7)


def test_bayes_first_step_is_prior_predictive():
    data = generate_students(num_students=500, num_exercises=10, seed=3)
    exercises, _, _ = _stack(data)
    first = np.stack(data.oracle_probabilities())[:, 0]
    prior = np.array([np.trapezoid(_irt(_A - beta, data.guess) * _PHI, _A) for beta in data.exercise_difficulty])
    np.testing.assert_allclose(first, prior[exercises[:, 0] - 1], rtol=0, atol=1e-7)
    for e in np.unique(exercises[:, 0]):
        same = first[exercises[:, 0] == e]
        assert np.ptp(same) == 0.0


def test_bayes_stores_simulator_parameters():
    data = generate_students(num_students=3, learning_rate=0.07, guess=0.3)
    assert data.learning_rate == 0.07 and data.guess == 0.3


def test_bayes_empty_sequence_and_bad_inputs():
    data = _hand_made([([1, 1], [1, 0]), ([], [])], [0], [0.0], learning_rate=0.1, guess=0.25)
    bayes = data.oracle_probabilities()
    assert bayes[1].shape == (0,) and bayes[0].shape == (2,)
    bad = _hand_made([([1, 2], [1, 0])], [0], [0.0], learning_rate=0.1, guess=0.25)
    with pytest.raises(ValueError, match="exercise id"):
        bad.oracle_probabilities()
    with pytest.raises(ValueError, match="`grid_size`"):
        data.oracle_probabilities(grid_size=1)
    with pytest.raises(ValueError, match="`grid_limit`"):
        data.oracle_probabilities(grid_limit=0.0)


def test_bayes_calibrated_on_defaults():
    data = generate_students()
    _, responses, _ = _stack(data)
    q = np.stack(data.oracle_probabilities()).ravel()
    r = responses.ravel().astype(np.float64)
    assert np.all((q >= data.guess) & (q <= 1.0))
    # The prediction errors r - q have mean 0 and are uncorrelated given the history: std of their mean.
    std = np.sqrt(np.sum(q * (1 - q))) / q.size
    assert abs(r.mean() - q.mean()) < 4 * std
    edges = np.quantile(q, np.linspace(0, 1, 11))
    which = np.clip(np.digitize(q, edges) - 1, 0, 9)
    for b in range(10):
        qb = q[which == b]
        std_b = np.sqrt(np.sum(qb * (1 - qb))) / qb.size
        assert abs(r[which == b].mean() - qb.mean()) < 5 * std_b, b


def _history_free_predictions(data: SyntheticStudents) -> np.ndarray:
    """Per-exercise prior predictive with the learning offset: P(r_t = 1 | e_1..e_t), ignoring the responses."""
    exercises, _, _ = _stack(data)
    n, length = exercises.shape
    concept = data.exercise_concepts[exercises - 1]
    count = np.zeros((n, length), dtype=np.int64)
    for t in range(1, length):
        count[:, t] = (concept[:, :t] == concept[:, t : t + 1]).sum(axis=1)
    offset = data.learning_rate * count - data.exercise_difficulty[exercises - 1]
    values, inverse = np.unique(offset.ravel(), return_inverse=True)
    prior = np.array([np.trapezoid(_irt(_A + v, data.guess) * _PHI, _A) for v in values])
    return prior[inverse].reshape(n, length)


def test_oracle_auc_between_history_free_and_true_probabilities():
    data = generate_students()
    _, responses, probabilities = _stack(data)
    bayes = data.oracle_probabilities()
    true_auc = data.true_probability_auc()
    oracle_auc = data.oracle_auc()
    free_auc = roc_auc(_history_free_predictions(data).ravel(), responses.ravel())
    print(f"AUC (defaults): true probabilities {true_auc:.4f}, Bayes {oracle_auc:.4f}, history-free {free_auc:.4f}")
    assert oracle_auc == pytest.approx(roc_auc(np.concatenate(bayes), responses.ravel()))
    assert true_auc == pytest.approx(roc_auc(probabilities.ravel(), responses.ravel()))
    assert true_auc > oracle_auc > free_auc > 0.5
