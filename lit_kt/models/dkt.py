"""DKT: Deep Knowledge Tracing (Piech et al., NeurIPS 2015), the recurrent baseline.

An LSTM reads the interaction sequence (exercise id and correctness as one embedded token, the learned-embedding
equivalent of the paper's one-hot input) and, at every step, outputs one logit per exercise; the prediction for
position ``t`` is the logit of ``exercises[:, t]``. The forward contract matches :class:`~lit_kt.models.SAKT`: the
LSTM input at position ``t`` is interaction ``t - 1`` (a learned start token at ``t = 0``), so ``logits[:, t]`` sees
``exercises[:, :t+1]`` and ``responses[:, :t]`` only. Right padding (id 0) cannot reach real positions because the
LSTM runs forward in time.

Three ways to run the LSTM over a right-padded batch, with the same outputs at the real positions:

* grouped (CPU, the default there): rows sorted by length and split into ``LSTM_GROUPS`` groups, each cut to its
  longest row, so that most of the trailing padding is skipped;
* packed (CUDA, the default there; ``packed=True`` anywhere): :func:`torch.nn.utils.rnn.pack_padded_sequence`, so
  that cuDNN skips all of the padding. Packing needs the lengths on the host: one copy of ``B`` integers from the
  device per forward (the grouped path needs more, the padded one none);
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

LSTM_GROUPS = 4  # row groups of similar length the CPU path runs the LSTM on (2 to 8 timed alike in a trial)


class DKT(nn.Module):
    """Deep Knowledge Tracing with an LSTM.

    Args:
        num_exercises: Number of exercise ids; ids run from 1 to ``num_exercises`` and 0 is padding.
        hidden_size: LSTM hidden width.
        num_layers: Stacked LSTM layers.
        embedding_dim: Width of the interaction embedding fed to the LSTM.
        dropout: Dropout on the LSTM output (and between LSTM layers when there are several).
        packed: Run the LSTM on packed sequences (see the module docstring): ``None`` for packed on CUDA and the
            grouped path on CPU, ``True`` for packed on any device (e.g. to test it on CPU, where its backward is
            far slower than the grouped path's), ``False`` never (grouped on CPU, padded elsewhere). It changes how
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
        past = self.interaction_emb(interactions[:, :-1])  # (B, L-1, E)
        x = torch.cat([self.start.expand(B, 1, -1), past], dim=1)  # (B, L, E)
        packed = exercises.device.type == "cuda" if self.packed is None else self.packed
        if packed and not torch.compiler.is_compiling():
            return self._packed_forward(x, exercises)
        if B > 1 and may_skip_padding(exercises):
            # Run the LSTM on groups of rows of similar length, each cut to its longest row, so that it skips most
            # of the trailing padding (elsewhere the padded path runs). PyTorch's packed sequences would skip all of
            # it, but their backward on CPU is far slower than this.
            positions = torch.arange(L, device=exercises.device)  # (L,)
            lengths = row_lengths(exercises)  # (B,) last real position + 1
            h = x.new_zeros(B, L, self.lstm.hidden_size)  # (B, L, H)
            for rows in torch.argsort(lengths, descending=True).tensor_split(min(B, LSTM_GROUPS)):
                n = int(lengths[rows[0]])
                if n > 0:
                    # .to: under CPU autocast the LSTM may return bfloat16 while h keeps x's float32.
                    h.index_put_((rows[:, None], positions[None, :n]), self.lstm(x[rows, :n])[0].to(h.dtype))
            real = positions < lengths[:, None]  # (B, L)
            logits = self._logits(h[real], exercises[real])  # (N,): dropout and head on the real positions only
            return x.new_zeros(B, L).index_put_((real,), logits)  # (B, L), 0 after each row's last real position
        h, _ = self.lstm(x)  # (B, L, H)
        return self._logits(h, exercises)

    def _packed_forward(self, x: Tensor, exercises: Tensor) -> Tensor:
        """(B, L) logits from the LSTM on packed sequences; 0 after each row's last real position, as grouped."""
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
