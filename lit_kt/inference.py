"""Inference for one student: the probability of answering each candidate next exercise correctly."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_kt.calibration import calibrated_probabilities


def _as_ids(values: int | Sequence[int] | Tensor, name: str) -> Tensor:
    if isinstance(values, int):
        values = [values]
    ids = torch.as_tensor(values).reshape(-1) if len(values) else torch.zeros(0, dtype=torch.long)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to hold integers but got dtype {ids.dtype}.")
    return ids.long()


def _check_questions(
    model: nn.Module, questions: object, candidate_questions: object, history: int, num_candidates: int
) -> tuple[Tensor, Tensor] | None:
    """The history's and the candidates' question ids as tensors after validation, or ``None`` without questions."""
    if questions is None and candidate_questions is None:
        return None
    if questions is None or candidate_questions is None:
        raise ValueError(
            "Expected both `questions` and `candidate_questions` (or neither) but got only "
            f"`{'questions' if questions is not None else 'candidate_questions'}`."
        )
    m = int(getattr(model, "num_questions", 0) or 0)
    if m == 0:
        raise ValueError(
            f"Expected a model that embeds question ids (num_questions > 0) for `questions` but got "
            f"{type(model).__name__} without them; leave `questions` out for a concept-level model."
        )
    q, cq = _as_ids(questions, "questions"), _as_ids(candidate_questions, "candidate_questions")
    for name, ids, n in (("questions", q, history), ("candidate_questions", cq, num_candidates)):
        if ids.numel() != n:
            other = "exercises" if name == "questions" else "candidates"
            raise ValueError(f"Expected `{name}` to have the length of `{other}` ({n}) but got {ids.numel()}.")
        bad = ((ids < 1) | (ids > m)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"Expected `{name}` ids between 1 and num_questions ({m}) but got {int(ids[i])} at position {i}."
            )
    return q, cq


@torch.no_grad()
def predict_next(
    model: nn.Module,
    exercises: Sequence[int] | Tensor,
    responses: Sequence[int] | Tensor,
    candidates: int | Sequence[int] | Tensor,
    temperature: float = 1.0,
    questions: Sequence[int] | Tensor | None = None,
    candidate_questions: int | Sequence[int] | Tensor | None = None,
    logit_shift: float = 0.0,
) -> Tensor:
    """Probability of a correct answer on each candidate next exercise, given one student's history.

    The history may have any length, including 0. A model with a finite ``max_len`` (SAKT) sees the most recent
    ``max_len - 1`` interactions, so that the candidate fits in the last position; a recurrent model (``max_len`` is
    ``None``) reads all of it. The model is put in eval mode for the call and restored afterwards.

    Args:
        model: A KT model (``forward(exercises, responses) -> logits``, attributes ``num_exercises``, ``max_len``).
        exercises: The student's past exercise ids, oldest first, each in 1..num_exercises.
        responses: Their 0/1 correctness, same length.
        candidates: One exercise id or several.
        temperature: The logits are divided by it before the sigmoid (post-hoc temperature scaling, see
            :mod:`lit_kt.calibration`; :meth:`lit_kt.KTModule.predict_next` passes the module's).
        questions: The question ids of the history (same length as ``exercises``, each in 1..num_questions), for a
            model that embeds questions (``num_questions > 0``, e.g. :class:`~lit_kt.AKT` with Rasch embeddings);
            give ``candidate_questions`` with it. ``None``: concept ids only.
        candidate_questions: The question id of each candidate (same length as ``candidates``).
        logit_shift: Added to the logits before the temperature divides them (the calibration's shift, see
            :mod:`lit_kt.calibration`; :meth:`lit_kt.KTModule.predict_next` passes the module's).

    Returns:
        (C,) probabilities, one per candidate, in the order given.

    Raises:
        ValueError: If lengths differ, a response is not 0/1 or an id is unknown (the message names the argument and
            the position), the temperature is not a positive number, or questions are given to a model that does
            not embed them (or only one of ``questions`` / ``candidate_questions`` is given).

    Example:
        >>> from lit_kt.models import SAKT
        >>> predict_next(SAKT(num_exercises=10, max_len=8), [3, 4, 3], [0, 1, 1], [3, 7]).shape
        torch.Size([2])
    """
    ex, resp, cand = _as_ids(exercises, "exercises"), _as_ids(responses, "responses"), _as_ids(candidates, "candidates")
    if ex.numel() != resp.numel():
        raise ValueError(
            f"Expected `exercises` and `responses` to have the same length but got {ex.numel()} and {resp.numel()}."
        )
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"Expected `temperature` to be a positive number but got {temperature!r}.")
    if not (isinstance(logit_shift, (int, float)) and math.isfinite(logit_shift)):
        raise ValueError(f"Expected `logit_shift` to be a finite number but got {logit_shift!r}.")
    if cand.numel() == 0:
        raise ValueError("Expected at least one id in `candidates` but got none.")
    n = model.num_exercises
    for name, ids in (("exercises", ex), ("candidates", cand)):
        bad = ((ids < 1) | (ids > n)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"Expected `{name}` ids between 1 and num_exercises ({n}) but got {int(ids[i])} at position {i}"
                " (an exercise the model was not trained on)."
            )
    bad = ((resp != 0) & (resp != 1)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"Expected `responses` to be 0 or 1 but got {int(resp[i])} at position {i}.")
    qs = _check_questions(model, questions, candidate_questions, ex.numel(), cand.numel())
    if model.max_len is not None:
        keep = model.max_len - 1
        if len(ex) > keep:
            ex, resp = ex[len(ex) - keep :], resp[len(resp) - keep :]
            qs = None if qs is None else (qs[0][len(qs[0]) - keep :], qs[1])
    device = next(model.parameters()).device
    C = cand.numel()
    batch_ex = torch.cat([ex.expand(C, -1), cand.unsqueeze(1)], dim=1).to(device)  # (C, h + 1)
    # The candidate's own response is never seen by its prediction (causality); 0 is a placeholder.
    batch_resp = torch.cat([resp.expand(C, -1), torch.zeros(C, 1, dtype=torch.long)], dim=1).to(device)
    was_training = model.training
    model.eval()
    try:
        if qs is None:
            logits = model(batch_ex, batch_resp)  # (C, h + 1)
        else:
            batch_q = torch.cat([qs[0].expand(C, -1), qs[1].unsqueeze(1)], dim=1).to(device)  # (C, h + 1)
            logits = model(batch_ex, batch_resp, questions=batch_q)
    finally:
        model.train(was_training)
    return calibrated_probabilities(logits[:, -1], temperature, logit_shift).cpu()
