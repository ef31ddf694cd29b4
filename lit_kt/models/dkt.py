"""DKT: Deep Knowledge Tracing (Piech et al., NeurIPS 2015), the recurrent baseline.

An LSTM reads the interaction sequence (exercise id and correctness as one embedded token, the learned-embedding
equivalent of the paper's one-hot input) and, at every step, outputs one logit per exercise; the prediction for
position ``t`` is the logit of ``exercises[:, t]``. The forward contract matches :class:`~lit_kt.models.SAKT`: the
LSTM input at position ``t`` is interaction ``t - 1`` (a learned start token at ``t = 0``), so ``logits[:, t]`` sees
``exercises[:, :t+1]`` and ``responses[:, :t]`` only. Right padding (id 0) cannot reach real positions because the
LSTM runs forward in time.

Three ways to run the LSTM over a right-padded batch, with the same outputs at the real positions:

* staged (CPU, the default there): rows sorted by length, the time axis cut into stages (:func:`stage_ends`), each
  stage run over the rows still real at its start from the state the previous stage left them in, so that most of
  the trailing padding is skipped and each step multiplies as many rows as it can (:meth:`DKT._staged_forward`);
* packed (CUDA, the default there; ``packed=True`` anywhere): :func:`torch.nn.utils.rnn.pack_padded_sequence`, so
  that cuDNN skips all of the padding. Packing needs the lengths on the host: one copy of ``B`` integers from the
  device per forward (the staged path needs more, the padded one none);
* padded: the LSTM over the whole (B, L) tensor (elsewhere, and under ``torch.compile``, whose graphs cannot hold
  the data-dependent shapes of the other two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lit_kt.models.dropout import FastDropout
from lit_kt.models.padding import may_skip_padding, row_lengths
from lit_kt.models.shift import previous_interactions

# A stage's fixed cost (one LSTM call, forward and backward) in LSTM row-steps. In a trial on the CPU of
# docs/benchmarks.md (one thread, width 200) a call cost about 0.5 ms and a row-step about 13 us; on ASSIST2009
# batches 20 and 40 trained alike, 80 slower.
STAGE_COST = 40


def stage_ends(lengths: list[int], stage_cost: float = STAGE_COST) -> list[int]:
    """Where the staged LSTM's stages end, for rows of ``lengths``: the cheapest plan in row-steps.

    A stage ``[t0, t1)`` runs the rows longer than ``t0`` for ``t1 - t0`` steps; each stage also costs
    ``stage_cost`` row-steps (a call into the LSTM). Dynamic programme over the distinct lengths (ends are always
    lengths: moving an end down to the next length only removes padding). Ascending; the last is the longest length.
    """
    ends = sorted({n for n in lengths if n > 0})
    starts = [0] + ends
    running = [sum(n > t for n in lengths) for t in starts]  # rows still real at each candidate start
    best = [0.0] + [float("inf")] * len(ends)  # cheapest plan covering up to starts[j]
    previous = [0] * (len(ends) + 1)
    for j in range(1, len(starts)):
        for i in range(j):
            cost = best[i] + running[i] * (starts[j] - starts[i]) + stage_cost
            if cost < best[j]:
                best[j], previous[j] = cost, i
    plan, j = [], len(ends)
    while j > 0:
        plan.append(starts[j])
        j = previous[j]
    return plan[::-1]


class DKT(nn.Module):
    """Deep Knowledge Tracing with an LSTM.

    Args:
        num_exercises: Number of exercise ids; ids run from 1 to ``num_exercises`` and 0 is padding.
        hidden_size: LSTM hidden width.
        num_layers: Stacked LSTM layers.
        embedding_dim: Width of the interaction embedding fed to the LSTM.
        dropout: Dropout on the LSTM output (and between LSTM layers when there are several).
        packed: Run the LSTM on packed sequences (see the module docstring): ``None`` for packed on CUDA and the
            staged path on CPU, ``True`` for packed on any device (e.g. to test it on CPU, where its backward is
            far slower than the staged path's), ``False`` never (staged on CPU, padded elsewhere). It changes how
            the padding is skipped, not the outputs at real positions, the parameters or the state-dict keys.

    Example:
        >>> model = DKT(num_exercises=50, hidden_size=32)
        >>> model(torch.randint(1, 51, (2, 7)), torch.randint(0, 2, (2, 7))).shape
        torch.Size([2, 7])
    """

    def __init__(
        self,
        num_exercises: int,
        hidden_size: int = 200,
        num_layers: int = 1,
        embedding_dim: int = 200,
        dropout: float = 0.2,
        packed: bool | None = None,
    ) -> None:
        super().__init__()
        if num_exercises < 1:
            raise ValueError(f"Expected `num_exercises` to be >= 1 but got {num_exercises}.")
        self.config = dict(
            num_exercises=num_exercises,
            hidden_size=hidden_size,
            num_layers=num_layers,
            embedding_dim=embedding_dim,
            dropout=dropout,
            packed=packed,
        )
        self.packed = packed
        self.num_exercises = num_exercises
        self.max_len = None  # recurrent: no limit on the history it can read
        self.interaction_emb = nn.Embedding(2 * num_exercises + 1, embedding_dim, padding_idx=0)
        self.start = nn.Parameter(torch.randn(embedding_dim) * 0.02)
        self.lstm = nn.LSTM(
            embedding_dim, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.drop = FastDropout(dropout)
        self.head = nn.Linear(hidden_size, num_exercises + 1)

    def forward(self, exercises: Tensor, responses: Tensor) -> Tensor:
        """Predict the correctness of every position from the history before it.

        Args:
            exercises: (B, L) exercise ids, 1..num_exercises, right-padded with 0.
            responses: (B, L) 0/1 correctness (values at padded positions are ignored).

        Returns:
            (B, L) logits, where ``logits[:, t]`` predicts ``responses[:, t]``.
        """
        B, L = exercises.shape
        interactions = exercises + self.num_exercises * responses * (exercises > 0)  # (B, L)
        packed = exercises.device.type == "cuda" if self.packed is None else self.packed
        if not packed and B > 1 and may_skip_padding(exercises):
            return self._staged_forward(exercises, interactions)
        past = self.interaction_emb(interactions[:, :-1])  # (B, L-1, E)
        x = torch.cat([self.start.expand(B, 1, -1), past], dim=1)  # (B, L, E)
        if packed and not torch.compiler.is_compiling():
            return self._packed_forward(x, exercises)
        h, _ = self.lstm(x)  # (B, L, H)
        return self._logits(h, exercises)

    def _staged_forward(self, exercises: Tensor, interactions: Tensor) -> Tensor:
        """(B, L) logits from the LSTM run in time stages over the rows still real; 0 after each row's end (CPU).

        The time axis is cut into stages (:func:`stage_ends`); stage ``[t0, t1)`` runs the LSTM over the rows longer
        than ``t0`` (a prefix of the rows sorted longest first), from the state the previous stage left them in. A
        row runs past its end only to the end of its stage, every step multiplies all the rows still running, and
        the steps run in sequence are the longest row's length (length groups, each run on its own, take the sum of
        the groups' longest). The inputs come straight from the ids; the outputs at the real positions are gathered
        in row-major order, so dropout draws the masks ``h[real]`` would get.
        """
        B, L = exercises.shape
        lengths = row_lengths(exercises)  # (B,) last real position + 1
        order = torch.argsort(lengths, descending=True)  # (B,)
        sorted_lengths = lengths[order].tolist()  # CPU: no device synchronisation
        ends = stage_ends(sorted_lengths, STAGE_COST)
        if not ends:  # every row is padding
            return exercises.new_zeros(B, L, dtype=self.head.weight.dtype)
        ids, table = previous_interactions(interactions, self.interaction_emb, self.start)  # (B, L), (2E + 2, E)
        ids = ids[order]  # longest row first
        outputs, state, t0, m = [], None, 0, B
        for t1 in ends:
            while sorted_lengths[m - 1] <= t0:  # rows still real at t0: a prefix of the sorted rows
                m -= 1
            if state is not None:
                state = tuple(s[:, :m] for s in state)  # (layers, m, H) each
            x = F.embedding(ids[:m, t0:t1], table, padding_idx=0)  # (m, T, E); padding_idx: no gradient to id 0
            h, state = self.lstm(x, state)  # (m, T, H)
            outputs.append(h.reshape(-1, h.shape[-1]))
            t0 = t1
        # Row of (b, t) among the stage outputs: stage s holds rows 0..m_s-1 of the sorted order, times [t0_s, t1_s).
        bounds = torch.tensor([0] + ends)  # (S + 1,)
        steps = bounds[1:] - bounds[:-1]  # (S,)
        offsets = F.pad(torch.tensor([o.shape[0] for o in outputs]).cumsum(0)[:-1], (1, 0))  # (S,)
        positions = torch.arange(L)  # (L,)
        stage = torch.bucketize(positions, bounds[1:], right=True).clamp_max(len(ends) - 1)  # (L,) past the end: unused
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(B))  # (B,) place of each row in the order
        real = positions < lengths[:, None]  # (B, L)
        index = offsets[stage] + rank[:, None] * steps[stage] + positions - bounds[stage]  # (B, L)
        h = torch.cat(outputs).index_select(0, index[real])  # (N, H) real positions, row-major
        # .to: under CPU autocast the LSTM may return bfloat16.
        logits = self._logits(h.to(table.dtype), exercises[real])  # (N,): dropout and head on the real positions
        return exercises.new_zeros(B, L, dtype=logits.dtype).index_put_((real,), logits)  # (B, L)

    def _packed_forward(self, x: Tensor, exercises: Tensor) -> Tensor:
        """(B, L) logits from the LSTM on packed sequences; 0 after each row's last real position, as staged."""
        B, L = exercises.shape
        lengths = row_lengths(exercises)  # (B,) last real position + 1
        # pack_padded_sequence wants host lengths >= 1: an all-padding row runs one step (its start token), unscored.
        packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=L)  # (B, L, H)
        real = torch.arange(L, device=exercises.device) < lengths[:, None]  # (B, L)
        # torch.where rather than indexing h[real]: no data-dependent shape, so no further wait for the device.
        return torch.where(real, self._logits(h, exercises), 0.0)  # (B, L)

    def _logits(self, h: Tensor, exercises: Tensor) -> Tensor:
        """Logit of each position's own exercise: ``h`` (..., H) and ``exercises`` (...) -> (...)."""
        # One row of the head per position, not all of them; F.embedding's backward is a fast index-add.
        weight = F.embedding(exercises, self.head.weight)  # (..., H)
        return (self.drop(h) * weight).sum(dim=-1) + self.head.bias[exercises]
