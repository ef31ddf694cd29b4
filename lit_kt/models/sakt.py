"""SAKT: Self-Attentive Knowledge Tracing (Pandey & Karypis, EDM 2019).

The model predicts whether a student answers exercise ``e_t`` correctly from the exercises and responses before it.
Each block is one multi-head attention whose *query* is the exercise being predicted and whose *keys and values*
are the past interactions (exercise id and correctness, one embedding per pair) plus a learned position embedding,
under a causal mask; then residual + layer norm, a position-wise feed-forward layer, residual + layer norm. Stacked
blocks feed the previous block's output in as the next query and keep attending to the same interactions.

Alignment (why there is a start token): the prediction at position ``t`` may see ``exercises[:, :t+1]`` and
``responses[:, :t]``. The key/value sequence is therefore the interaction sequence shifted right by one, with a
learned start embedding at position 0, so position 0 gets a prediction too (from the exercise id alone). With a
causal mask (query ``t`` attends to key positions ``<= t``), key ``t`` holds interaction ``t - 1``.

Padding is id 0 and must sit at the *end* of each row (right padding): causal attention then never lets a real
position see a padded one, so padding cannot change real predictions. Logits at padded positions are meaningless
and must be masked out by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_kt.models.attention import causal_attention, packed_causal_attention
from lit_kt.models.dropout import FastDropout, fast_dropout
from lit_kt.models.linear import FastLinear, fast_linear
from lit_kt.models.padding import may_skip_padding, row_lengths
from lit_kt.models.shift import previous_interactions


class SAKTBlock(nn.Module):
    """One SAKT attention block: causal multi-head attention of exercises over interactions, then a feed-forward.

    Args:
        d_model: Width of every embedding and hidden state.
        num_heads: Attention heads; must divide ``d_model``.
        dropout: Dropout after each sub-layer.
        attention_dropout: Dropout on the attention weights (``None``: ``dropout``).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, attention_dropout: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        if not 0.0 <= self.attention_dropout <= 1.0:
            raise ValueError(f"Expected `attention_dropout` in [0, 1] but got {self.attention_dropout}.")
        # FastLinear: nn.Linear whose float32 CPU products run on oneDNN (see lit_kt.models.linear).
        self.q_proj = FastLinear(d_model, d_model)
        self.kv_proj = FastLinear(d_model, 2 * d_model)
        self.out_proj = FastLinear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            FastLinear(d_model, d_model), nn.ReLU(), FastDropout(dropout), FastLinear(d_model, d_model)
        )
        self.ffn_norm = nn.LayerNorm(d_model)
        self.drop = FastDropout(dropout)

    def project_q(self, query: Tensor) -> Tensor:
        """Project hidden states (..., D) to attention queries (..., D), heads not yet split."""
        return self.q_proj(query)

    def project_kv(self, interactions: Tensor, bias: bool = True) -> tuple[Tensor, Tensor]:
        """Project interaction embeddings (..., D) to keys and values, each (..., D), heads not yet split.

        One ``kv_proj`` product (one matrix multiply, not one per half); keys and values are views of its two halves
        (strided: callers that need contiguous rows copy them anyway, e.g. the packed path's scatter).

        Args:
            interactions: (..., D) interaction plus position embeddings.
            bias: Add the projection's bias. The projection is affine, so a caller may project the parts of a sum
                on their own (:class:`~lit_kt.streaming.SAKTStream` caches interactions and positions apart) and
                add the bias with one part only.
        """
        kv = fast_linear(interactions, self.kv_proj.weight, self.kv_proj.bias if bias else None)  # (..., 2D)
        k, v = kv.chunk(2, dim=-1)  # 2 x (..., D)
        return k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = True,
        need_weights: bool = False,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Multi-head attention of projected queries over projected keys and values, before ``out_proj``.

        Args:
            q: (..., Lq, D) from :meth:`project_q`.
            k: (..., Lk, D) from :meth:`project_kv`.
            v: (..., Lk, D) likewise.
            causal: Query ``t`` sees keys ``<= t`` only (needs ``Lq == Lk``); ``False``: every query sees every key.
            need_weights: Also return the attention weights, (..., H, Lq, Lk).
            lengths: (B,) with ``causal``: positions from ``lengths[b]`` on are padding that no earlier position
                needs; the attention may skip them (their outputs are then unspecified).

        Returns:
            The attention output (..., Lq, H, D/H), heads not yet merged (a caller may select rows before the merge
            copies them), and the weights or ``None``.
        """
        D = q.shape[-1]
        H = self.num_heads
        q, k, v = (t.unflatten(-1, (H, D // H)).transpose(-3, -2) for t in (q, k, v))  # (..., H, L, D/H)
        weights = None
        explicit = need_weights or (not causal and self.training and self.attention_dropout > 0)
        if explicit:
            # The explicit path exposes the weights (and keeps dropout masks from fast_dropout); training with the
            # causal mask uses causal_attention's fast paths.
            scores = (q * (D // H) ** -0.5) @ k.transpose(-2, -1)  # (..., H, Lq, Lk)
            if causal:
                L = scores.shape[-1]
                scores = scores.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1), -torch.inf)
            weights = scores.softmax(dim=-1)  # (..., H, Lq, Lk)
            attn = fast_dropout(weights, self.attention_dropout, self.training) @ v  # (..., H, Lq, D/H)
        elif causal:
            attn = causal_attention(q, k, v, self.attention_dropout, self.training, lengths)  # (..., H, Lq, D/H)
        else:
            attn = F.scaled_dot_product_attention(q, k, v)  # (..., H, Lq, D/H)
        return attn.transpose(-3, -2), (weights if need_weights else None)  # (..., Lq, H, D/H)

    def finish(self, query: Tensor, attended: Tensor) -> Tensor:
        """Output projection, residual + layer norm, feed-forward, residual + layer norm.

        Args:
            query: (..., D) the block's input hidden states.
            attended: (..., H, D/H) the rows of :meth:`attend`'s output for the same positions.

        Returns:
            (..., D) the block's output.
        """
        x = self.attn_norm(query + self.drop(self.out_proj(attended.flatten(-2))))  # (..., D)
        return self.ffn_norm(x + self.drop(self.ffn(x)))  # (..., D)

    def forward(
        self, query: Tensor, interactions: Tensor, need_weights: bool = False, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` (B, L, D) to ``interactions`` (B, L, D); returns the output and, if asked, weights.

        ``lengths`` (B,): positions from ``lengths[b]`` on are padding that no earlier position needs; the attention
        may skip them (their outputs are then unspecified). Weights are (B, H, L, L).
        """
        k, v = self.project_kv(interactions)  # 2 x (B, L, D)
        attn, weights = self.attend(self.project_q(query), k, v, need_weights=need_weights, lengths=lengths)
        return self.finish(query, attn), weights  # (B, L, D)

    def forward_packed(self, query: Tensor, interactions: Tensor, lengths: list[int]) -> Tensor:
        """:meth:`forward` on the real positions only: no padded tensor is built.

        Args:
            query: (N, D) rows of the (B, L, D) query at each row's leading real positions, in row-major order.
            interactions: (N, D) the same for the interactions.
            lengths: Per row, one past its last real position (summing to N).

        Returns:
            (N, D), the rows of :meth:`forward`'s output at the real positions.
        """
        N, D = query.shape
        k, v = self.project_kv(interactions)  # 2 x (N, D)
        attn = packed_causal_attention(
            self.project_q(query), k, v, lengths, self.num_heads, self.attention_dropout, self.training
        )  # (N, D)
        return self.finish(query, attn.view(N, self.num_heads, D // self.num_heads))  # (N, D)


class SAKT(nn.Module):
    """Self-Attentive Knowledge Tracing.

    Args:
        num_exercises: Number of exercise ids; ids run from 1 to ``num_exercises`` and 0 is padding.
        d_model: Embedding and hidden width.
        num_heads: Attention heads; must divide ``d_model``.
        num_layers: Attention blocks stacked (the paper uses 1).
        max_len: Longest sequence the position embedding covers.
        dropout: Dropout rate inside the blocks and on the embeddings.
        attention_dropout: Dropout on the attention weights; ``None`` for ``dropout``.

    Fast paths (same maths; tested against the plain path): on CPU the position-wise layers (embeddings, projections,
    feed-forward, layer norms, head) run on the real positions only, and so does the attention
    (:class:`~lit_kt.models.attention.PackedCausalAttention`, sample by sample over the packed rows); elsewhere (other
    devices, and under ``torch.compile``, whose graphs need static shapes) the padded tensors go through
    ``F.scaled_dot_product_attention``. Dropout masks come from :func:`~lit_kt.models.dropout.fast_dropout` (drop
    probability rounded to a multiple of 1/65536). Logits after a row's last real position are 0 on the CPU path
    (unspecified in general).

    Example:
        >>> model = SAKT(num_exercises=50, d_model=32, num_heads=4, max_len=20)
        >>> exercises = torch.randint(1, 51, (2, 20)); responses = torch.randint(0, 2, (2, 20))
        >>> model(exercises, responses).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        num_exercises: int,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 1,
        max_len: int = 100,
        dropout: float = 0.2,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if num_exercises < 1:
            raise ValueError(f"Expected `num_exercises` to be >= 1 but got {num_exercises}.")
        if d_model % num_heads != 0:
            raise ValueError(f"Expected `d_model` ({d_model}) to be divisible by `num_heads` but got {num_heads}.")
        if num_layers < 1 or max_len < 1:
            raise ValueError(f"Expected `num_layers` and `max_len` to be >= 1 but got {num_layers} and {max_len}.")
        self.config = dict(
            num_exercises=num_exercises,
            d_model=d_model,
            num_heads=num_heads,
            num_layers=num_layers,
            max_len=max_len,
            dropout=dropout,
            attention_dropout=attention_dropout,
        )
        self.num_exercises = num_exercises
        self.max_len = max_len
        # Interaction id = exercise + num_exercises * response, so 1..2E; id 0 (padding) gets a zero vector.
        self.interaction_emb = nn.Embedding(2 * num_exercises + 1, d_model, padding_idx=0)
        self.exercise_emb = nn.Embedding(num_exercises + 1, d_model, padding_idx=0)
        self.position_emb = nn.Embedding(max_len, d_model)
        self.start = nn.Parameter(torch.randn(d_model) * 0.02)
        self.emb_drop = FastDropout(dropout)
        self.blocks = nn.ModuleList(
            SAKTBlock(d_model, num_heads, dropout, attention_dropout) for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, 1)

    def forward(self, exercises: Tensor, responses: Tensor, return_attention: bool = False):
        """Predict the correctness of every position from the history before it.

        Args:
            exercises: (B, L) exercise ids, 1..num_exercises, right-padded with 0.
            responses: (B, L) 0/1 correctness (values at padded positions are ignored).
            return_attention: Also return each block's attention weights, a list of (B, H, L, L) tensors where
                key ``j`` is the start token (``j = 0``) or interaction ``j - 1``.

        Returns:
            (B, L) logits, where ``logits[:, t]`` predicts ``responses[:, t]``; with ``return_attention`` a tuple
            ``(logits, weights)``.
        """
        B, L = exercises.shape
        if L > self.max_len:
            raise ValueError(f"Expected sequences of length <= max_len ({self.max_len}) but got length {L}.")
        interactions = exercises + self.num_exercises * responses * (exercises > 0)  # (B, L)
        # Causal attention: nothing after a row's last real position can reach a real one, so it may be skipped.
        lengths = row_lengths(exercises)  # (B,) last real position + 1
        if may_skip_padding(exercises) and not return_attention:
            # Run the position-wise layers on the real positions only (elsewhere the padded path runs).
            positions = torch.arange(L, device=exercises.device)  # (L,)
            real = positions < lengths[:, None]  # (B, L)
            # Key t holds interaction t - 1; key 0 the start token (a row of the table).
            key_ids, table = previous_interactions(interactions, self.interaction_emb, self.start)  # (B, L), (2E+2, D)
            key_pos = positions.expand(B, L)[real]  # (N,)
            kv = F.embedding(key_ids[real], table, padding_idx=0)  # (N, D); padding_idx: no gradient to id 0
            kv = self.emb_drop(kv.add_(self.position_emb(key_pos)))
            x = self.emb_drop(self.exercise_emb(exercises[real]))  # (N, D)
            row_ends = lengths.tolist()  # CPU: no device synchronisation
            for block in self.blocks:
                x = block.forward_packed(x, kv, row_ends)
            logits = self.head(x).squeeze(-1)  # (N,); under autocast the head's dtype, not x's
            return logits.new_zeros(B, L).index_put_((real,), logits)  # (B, L), 0 at padding
        past = self.interaction_emb(interactions[:, :-1])  # (B, L-1, D)
        kv = torch.cat([self.start.expand(B, 1, -1), past], dim=1)  # (B, L, D)
        kv = self.emb_drop(kv + self.position_emb.weight[:L])
        x = self.emb_drop(self.exercise_emb(exercises))  # (B, L, D)
        weights = []
        for block in self.blocks:
            x, w = block(x, kv, need_weights=return_attention, lengths=lengths)
            weights.append(w)
        logits = self.head(x).squeeze(-1)  # (B, L)
        return (logits, weights) if return_attention else logits
