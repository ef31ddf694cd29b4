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

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_kt.models.sakt import SAKT


class SAKTStream:
    """One student's SAKT state, updated one interaction at a time.

    Args:
        model: A trained SAKT model, or a module holding one in ``.model`` (a :class:`~lit_kt.KTModule`); it is put
            in eval mode (the stream does not train).
        exercises: Optional history to start from (exercise ids, oldest first).
        responses: Its 0/1 responses.
        temperature: The logits are divided by it (see :mod:`lit_kt.calibration`); ``None`` takes the
            ``temperature`` of ``model`` (a KTModule's fitted one), or 1 for a bare SAKT.

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
    ) -> None:
        if temperature is None:
            temperature = float(getattr(model, "temperature", 1.0))
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"Expected `temperature` to be a positive number but got {temperature!r}.")
        self.temperature = temperature
        if not isinstance(model, SAKT) and isinstance(getattr(model, "model", None), SAKT):
            model = model.model  # a KTModule wrapping a SAKT
        if not isinstance(model, SAKT):
            raise TypeError(f"Expected `model` to be a SAKT model but got {type(model).__name__}.")
        if len(exercises) != len(responses):
            raise ValueError(
                f"Expected `exercises` and `responses` of the same length but got {len(exercises)} and "
                f"{len(responses)}."
            )
        self.model = model.eval()
        self.window = model.max_len - 1  # past interactions a prediction can see
        p = next(model.parameters())
        with torch.no_grad():
            pos = model.position_emb.weight  # (max_len, D)
            # Per block: W @ pos + b for every position, and W @ start for the start token.
            self._pos_kv = [block.kv_proj(pos) for block in model.blocks]  # each (max_len, 2D)
            self._start_kv = [model.start @ block.kv_proj.weight.T for block in model.blocks]  # each (2D,)
        # A buffer twice the window long: appending is a write; sliding is rare and amortised O(1) per append.
        self._buffer = [
            p.new_zeros(2 * max(self.window, 1), 2 * model.blocks[0].q_proj.in_features) for _ in model.blocks
        ]
        self._begin = 0
        self._size = 0
        for e, r in zip(exercises, responses):
            self.append(e, r)

    def __len__(self) -> int:
        """Interactions in the window (at most ``max_len - 1``)."""
        return self._size

    def reset(self) -> None:
        """Forget the history."""
        self._begin = self._size = 0

    @torch.no_grad()
    def append(self, exercise: int, response: int) -> None:
        """Add one answered exercise to the history.

        Raises:
            ValueError: If the id is not in 1..num_exercises or the response is not 0/1.
        """
        self._check_ids([exercise], "exercise")
        if response not in (0, 1):
            raise ValueError(f"Expected `response` to be 0 or 1 but got {response!r}.")
        if self.window == 0:
            return
        m = self.model
        emb = m.interaction_emb.weight[int(exercise) + m.num_exercises * int(response)]  # (D,)
        if self._size == self.window:  # the oldest interaction leaves the window
            self._begin += 1
            self._size -= 1
        if self._begin + self._size == len(self._buffer[0]):  # slide the window to the front of the buffer
            for buf in self._buffer:
                buf[: self._size] = buf[self._begin : self._begin + self._size].clone()
            self._begin = 0
        for block, buf in zip(m.blocks, self._buffer):
            buf[self._begin + self._size] = emb @ block.kv_proj.weight.T  # (2D,) without bias: it is in _pos_kv
        self._size += 1

    @torch.no_grad()
    def predict(self, candidates: int | Sequence[int]) -> Tensor:
        """Probability of a correct answer on each candidate next exercise, given the history so far.

        Returns:
            (C,) probabilities in the order given.
        """
        cand = [candidates] if isinstance(candidates, numbers.Integral) else [int(c) for c in candidates]
        if not cand:
            raise ValueError("Expected at least one id in `candidates` but got none.")
        self._check_ids(cand, "candidates")
        m = self.model
        n = self._size
        x = m.exercise_emb.weight[torch.tensor(cand, device=m.start.device)]  # (C, D)
        C, D = x.shape
        for block, buf, pos_kv, start_kv in zip(m.blocks, self._buffer, self._pos_kv, self._start_kv):
            H = block.num_heads
            past = buf[self._begin : self._begin + n]  # (n, 2D)
            kv = torch.cat([start_kv.unsqueeze(0), past], dim=0) + pos_kv[: n + 1]  # (n + 1, 2D)
            k, v = kv.view(n + 1, 2, H, D // H).permute(1, 2, 0, 3)  # 2 x (H, n + 1, D/H)
            q = block.q_proj(x).view(C, H, D // H).transpose(0, 1)  # (H, C, D/H)
            # The candidate sits at position n: causality lets it see every key 0..n, so no mask is needed.
            attn = F.scaled_dot_product_attention(q, k, v)  # (H, C, D/H)
            attn = block.out_proj(attn.transpose(0, 1).reshape(C, D))  # (C, D)
            x = block.attn_norm(x + attn)
            x = block.ffn_norm(x + block.ffn(x))
        return torch.sigmoid(m.head(x).squeeze(-1).float() / self.temperature).cpu()  # (C,)

    def step(self, exercise: int, response: int, candidates: int | Sequence[int]) -> Tensor:
        """``append(exercise, response)`` then ``predict(candidates)``."""
        self.append(exercise, response)
        return self.predict(candidates)

    def _check_ids(self, ids: Sequence[int], name: str) -> None:
        n = self.model.num_exercises
        for i, e in enumerate(ids):
            if not isinstance(e, numbers.Integral) or isinstance(e, bool) or not 1 <= e <= n:
                raise ValueError(
                    f"Expected `{name}` ids between 1 and num_exercises ({n}) but got {e!r} at position {i}."
                )
