"""Mastery over time: one student's predicted probability of answering each concept correctly after each step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lit_kt.inference import _as_ids, predict_next


def mastery(
    model: nn.Module,
    exercises: Sequence[int] | Tensor,
    responses: Sequence[int] | Tensor,
    concepts: Sequence[int] | Tensor | None = None,
    temperature: float | None = None,
    logit_shift: float | None = None,
) -> np.ndarray:
    """Predicted mastery of each concept after each interaction of one student's history.

    Row ``t`` holds the probability of answering each concept correctly right *after* interaction ``t``, i.e. given
    interactions ``0..t``: :func:`lit_kt.predict_next` on the history up to ``t`` with the concepts as candidates
    (one batched forward pass per step; a model with a finite ``max_len`` sees the most recent ``max_len - 1``
    interactions). With concept-level data the concept ids are the exercise ids ``1..num_exercises``.

    Args:
        model: A KT model (``forward(exercises, responses) -> logits``, attributes ``num_exercises``, ``max_len``)
            or a :class:`lit_kt.KTModule` (its ``model`` is used).
        exercises: The student's exercise ids, oldest first, each in 1..num_exercises.
        responses: Their 0/1 correctness, same length.
        concepts: The concept ids of the columns, in this order; ``None`` is all ids ``1..num_exercises``.
        temperature: The logits are divided by it before the sigmoid; ``None`` is the module's ``temperature``
            buffer for a :class:`lit_kt.KTModule` and 1 for a bare model.
        logit_shift: Added to the logits before the temperature (see :mod:`lit_kt.calibration`); ``None`` is the
            module's ``logit_shift`` buffer for a :class:`lit_kt.KTModule` and 0 for a bare model.

    Returns:
        (L, C) float array: L interactions, C concepts.

    Raises:
        ValueError: If lengths differ, a response is not 0/1, an id is unknown, ``concepts`` is empty or the
            temperature is not a positive number (as :func:`lit_kt.predict_next`, naming the argument).

    Example:
        >>> from lit_kt.models import SAKT
        >>> mastery(SAKT(num_exercises=10, max_len=8), [3, 4, 3], [0, 1, 1], concepts=[3, 7]).shape
        (3, 2)
    """
    if temperature is None:
        buffer = getattr(model, "temperature", None)
        temperature = float(buffer) if isinstance(buffer, Tensor) else 1.0
    if logit_shift is None:
        buffer = getattr(model, "logit_shift", None)
        logit_shift = float(buffer) if isinstance(buffer, Tensor) else 0.0
    if hasattr(model, "model") and isinstance(model.model, nn.Module) and hasattr(model.model, "num_exercises"):
        model = model.model  # a KTModule
    if not hasattr(model, "num_exercises"):
        raise TypeError(
            f"Expected `model` to be a KT model or a KTModule (with `num_exercises`) but got {type(model).__name__}."
        )
    ex, resp = _as_ids(exercises, "exercises"), _as_ids(responses, "responses")
    cand = torch.arange(1, model.num_exercises + 1) if concepts is None else _as_ids(concepts, "concepts")  # (C,)
    if cand.numel() == 0:
        raise ValueError("Expected at least one id in `concepts` but got none.")
    L, C = ex.numel(), cand.numel()
    out = np.empty((L, C), dtype=np.float32)
    if L == 0 or ex.numel() != resp.numel():
        # Validates everything (the message names the argument); with an empty history, nothing to fill.
        _predict(model, ex, resp, cand, temperature, logit_shift)
        return out
    # The last row first: it validates the whole history, so positions in error messages are the caller's.
    out[L - 1] = _predict(model, ex, resp, cand, temperature, logit_shift)
    for t in range(L - 1):
        out[t] = _predict(model, ex[: t + 1], resp[: t + 1], cand, temperature, logit_shift)  # given interactions 0..t
    return out


def _predict(
    model: nn.Module, ex: Tensor, resp: Tensor, cand: Tensor, temperature: float, logit_shift: float
) -> np.ndarray:
    try:
        return predict_next(model, ex, resp, cand, temperature, logit_shift=logit_shift).numpy()
    except ValueError as err:
        # predict_next calls them candidates; here they are the concepts.
        raise ValueError(str(err).replace("`candidates`", "`concepts`")) from None
