"""Streaming SAKT inference: append one interaction, get next-exercise probabilities in O(L) work.

A full SAKT forward over a history of ``L`` interactions costs ``O(L * D**2 + L**2 * D)``. When one student's
history grows by one interaction at a time, almost all of that is repeated work: the keys and values of past
interactions do not change. :class:`SAKTStream` caches them. Because the key/value projection is affine,
``kv_proj(emb + pos) = W @ emb + (W @ pos + b)``, the cache keeps the two parts apart: ``W @ emb`` per interaction
(computed once, when it is appended) and ``W @ pos + b`` per position (computed once per model). When the history
is longer than the model's window, the oldest interaction drops out and every interaction moves one position
down: the keys are re-added from the two caches, ``O(L * D)``, with no matrix product over the history.

A prediction then costs one query per candidate against ``L`` cached keys per block: ``O(L * D + D**2)``. Results
equal :func:`lit_kt.predict_next` (a full forward over the most recent ``max_len - 1`` interactions) to float
rounding (tested to 1e-5).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from lit_kt.calibration import calibrated_probabilities
from lit_kt.models.sakt import SAKT


class SAKTStream:
    """One student's SAKT state, updated one interaction at a time.

    The stream caches keys and values computed from the model's weights when it is built (or last refreshed).
    Changing the weights afterwards (training, ``load_state_dict``) makes the cache stale: the next ``append`` or
    ``predict`` raises, and :meth:`refresh` recomputes the cache from the stored history.

    Args:
        model: A trained SAKT model, or a module holding one in ``.model`` (a :class:`~lit_kt.KTModule`); it is put
            in eval mode (the stream does not train).
        exercises: Optional history to start from (exercise ids, oldest first).
        responses: Its 0/1 responses.
        temperature: The logits are divided by it (see :mod:`lit_kt.calibration`); ``None`` takes the
            ``temperature`` of ``model`` (a KTModule's fitted one), or 1 for a bare SAKT.
        logit_shift: Added to the logits before the temperature; ``None`` takes the ``logit_shift`` of ``model`` (a
            KTModule's), or 0 for a bare SAKT.

    Example:
        >>> stream = SAKTStream(SAKT(num_exercises=10, max_len=8))
        >>> stream.append(3, 1)
        >>> stream.predict([3, 4]).shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: SAKT | torch.nn.Module,
        exercises: Sequence[int] = (),
        responses: Sequence[int] = (),
        temperature: float | None = None,
        logit_shift: float | None = None,
    ) -> None:
        if temperature is None:
            temperature = float(getattr(model, "temperature", 1.0))
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"Expected `temperature` to be a positive number but got {temperature!r}.")
        if logit_shift is None:
            logit_shift = float(getattr(model, "logit_shift", 0.0))
        if not (isinstance(logit_shift, (int, float)) and math.isfinite(logit_shift)):
            raise ValueError(f"Expected `logit_shift` to be a finite number but got {logit_shift!r}.")
        self.temperature = temperature
        self.logit_shift = logit_shift
        if not isinstance(model, SAKT) and isinstance(getattr(model, "model", None), SAKT):
            model = model.model  # a KTModule wrapping a SAKT
        if not isinstance(model, SAKT):
            raise TypeError(f"Expected `model` to be a SAKT model but got {type(model).__name__}.")
        if len(exercises) != len(responses):
            raise ValueError(
                f"Expected `exercises` and `responses` of the same length but got {len(exercises)} and "
                f"{len(responses)}."
            )
        self.model = model
        self.window = model.max_len - 1  # past interactions a prediction can see
        self._history: deque[tuple[int, int]] = deque(maxlen=max(self.window, 0))  # (exercise, response) in window
        self._build_cache()
        for e, r in zip(exercises, responses):
            self.append(e, r)

    def __len__(self) -> int:
        """Interactions in the window (at most ``max_len - 1``)."""
        return self._size

    def reset(self) -> None:
        """Forget the history."""
        self._begin = self._size = 0
        self._history.clear()

    def refresh(self) -> None:
        """Recompute the cache from the current weights and the stored history (call it after changing the weights).

        The model is put back in eval mode.
        """
        history = list(self._history)
        self._build_cache()
        for e, r in history:
            self.append(e, r)

    @torch.no_grad()
    def append(self, exercise: int, response: int) -> None:
        """Add one answered exercise to the history.

        Raises:
            TypeError: If ``exercise`` is not an integer.
            ValueError: If the id is not in 1..num_exercises or the response is not 0/1.
            RuntimeError: If the model's weights changed since the stream was built or refreshed.
        """
        exercise = self._check_ids([exercise], "exercise", scalar=True)[0]
        if response not in (0, 1):
            raise ValueError(f"Expected `response` to be 0 or 1 but got {response!r}.")
        self._check_weights()
        response = int(response)
        if self.window == 0:
            return
        m = self.model
        emb = m.interaction_emb.weight[exercise + m.num_exercises * response]  # (D,)
        if self._size == self.window:  # the oldest interaction leaves the window
            self._begin += 1
            self._size -= 1
        if self._begin + self._size == len(self._keys[0]):  # slide the window to the front of the buffers
            for buf in (*self._keys, *self._values):
                buf[: self._size] = buf[self._begin : self._begin + self._size].clone()
            self._begin = 0
        for block, keys, values in zip(m.blocks, self._keys, self._values):
            # Without the bias: it is in the position part of the cache.
            keys[self._begin + self._size], values[self._begin + self._size] = block.project_kv(emb, bias=False)
        self._size += 1
        self._history.append((exercise, response))

    @torch.no_grad()
    def predict(self, candidates: int | Sequence[int]) -> Tensor:
        """Probability of a correct answer on each candidate next exercise, given the history so far.

        Args:
            candidates: One exercise id or an iterable of them (integers in 1..num_exercises; NumPy integers and
                integer tensors are accepted).

        Returns:
            (C,) probabilities in the order given.

        Raises:
            TypeError: If a candidate is not an integer (``2.9`` is refused, not rounded).
            ValueError: If there is no candidate or an id is out of range.
            RuntimeError: If the model's weights changed since the stream was built or refreshed.
        """
        scalar = _is_integer(candidates) or not isinstance(candidates, Iterable) or getattr(candidates, "ndim", 1) == 0
        cand = self._check_ids([candidates] if scalar else list(candidates), "candidates", scalar=scalar)
        if not cand:
            raise ValueError("Expected at least one id in `candidates` but got none.")
        self._check_weights()
        m = self.model
        n = self._size
        x = m.exercise_emb.weight[torch.tensor(cand, device=m.start.device)]  # (C, D)
        for block, keys, values, (pos_k, pos_v), (start_k, start_v) in zip(
            m.blocks, self._keys, self._values, self._pos_kv, self._start_kv
        ):
            k = torch.cat([start_k[None], keys[self._begin : self._begin + n]]) + pos_k[: n + 1]  # (n + 1, D)
            v = torch.cat([start_v[None], values[self._begin : self._begin + n]]) + pos_v[: n + 1]  # (n + 1, D)
            # The candidates sit at position n: causality lets each see every key 0..n, so no mask is needed.
            attn, _ = block.attend(block.project_q(x), k, v, causal=False)  # (C, H, D/H)
            x = block.finish(x, attn)  # (C, D)
        return calibrated_probabilities(m.head(x).squeeze(-1), self.temperature, self.logit_shift).cpu()  # (C,)

    def step(self, exercise: int, response: int, candidates: int | Sequence[int]) -> Tensor:
        """``append(exercise, response)`` then ``predict(candidates)``."""
        self.append(exercise, response)
        return self.predict(candidates)

    @torch.no_grad()
    def _build_cache(self) -> None:
        """Compute the per-model parts of the cache, empty the history buffers and record the weights' versions."""
        m = self.model.eval()
        # Per block: W @ pos + b for every position, and W @ start for the start token.
        self._pos_kv = [block.project_kv(m.position_emb.weight) for block in m.blocks]  # each 2 x (max_len, D)
        self._start_kv = [block.project_kv(m.start, bias=False) for block in m.blocks]  # each 2 x (D,)
        # Buffers twice the window long: appending is a write; sliding is rare and amortised O(1) per append.
        rows, D = 2 * max(self.window, 1), m.start.shape[-1]
        self._keys = [m.start.new_zeros(rows, D) for _ in m.blocks]  # W_k @ emb per interaction
        self._values = [m.start.new_zeros(rows, D) for _ in m.blocks]  # W_v @ emb per interaction
        self._begin = self._size = 0
        self._history.clear()
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[tuple[int, int]]:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version; replacing a parameter changes
        # its id. Either makes the cache stale.
        return [(id(p), p._version) for p in self.model.parameters()]

    def _check_weights(self) -> None:
        if self.model.training or self._weight_versions() != self._versions:
            raise RuntimeError(
                "The model's weights changed (or it was put in training mode) after this SAKTStream was built; "
                "its cached keys and values are stale. Call `stream.refresh()` to recompute them from the history."
            )

    def _check_ids(self, ids: Sequence[object], name: str, scalar: bool = False) -> list[int]:
        n = self.model.num_exercises
        for i, e in enumerate(ids):
            where = "" if scalar else f" at position {i}"
            if not _is_integer(e):
                raise TypeError(f"Expected `{name}` to hold integer exercise ids but got {e!r}{where}.")
            if not 1 <= int(e) <= n:
                raise ValueError(f"Expected `{name}` ids between 1 and num_exercises ({n}) but got {e!r}{where}.")
        return [int(e) for e in ids]


def _is_integer(value: object) -> bool:
    """Whether ``value`` is one integer: a Python/NumPy integer or a one-element integer tensor (not a bool)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
