"""AKT: Context-Aware Attentive Knowledge Tracing (Ghosh, Heffernan & Lan, KDD 2020).

Three attention stacks, each of blocks "monotonic attention, residual + layer norm, feed-forward, residual + layer
norm":

* the *question encoder* contextualises the question embeddings ``x``: position ``t`` attends to questions
  ``<= t`` (it may see the question being predicted, never its response);
* the *interaction encoder* contextualises the interaction (question and response) embeddings ``y``: position
  ``t`` attends to interactions ``<= t``;
* the *knowledge retriever* has the encoded questions as queries and keys and the encoded interactions as values,
  and attends to *strictly* past positions (``< t``), so the response at ``t`` never reaches prediction ``t``.
  Position 0 has no past: its attention output is defined as zero (the paper pads that row with zeros), so its
  prediction comes from the question alone through the residual connection.

The prediction is an MLP over ``[retrieved knowledge; question embedding]``.

Monotonic attention (the paper's section 3.3): the scaled dot-product score of query ``t`` and key ``tau`` is
multiplied by ``exp(-theta * d(t, tau))``, with a learned decay ``theta >= 0`` per head (a softplus keeps it
non-negative) and the context-aware distance ``d(t, tau) = |t - tau| * sum_{tau < t' <= t} gamma_{t, t'}``, where
``gamma`` is the softmax of the undecayed scores over the keys the query may see; ``d`` is computed without gradient,
as in the paper. Because the decay multiplies the score, it shrinks a score towards 0 rather than to minus infinity:
past positions lose weight when their scores are positive (see :func:`monotonic_attention`).

Rasch embeddings (section 3.4), used when question ids are given: ``x_t = c_{c_t} + mu_{q_t} d_{c_t}`` and
``y_t = e_{(c_t, r_t)} + mu_{q_t} f_{(c_t, r_t)}``, with ``c_t`` the concept (here the "exercise" id of the KT
forward contract), ``q_t`` the question, ``mu`` a scalar difficulty per question and ``d``, ``f`` variation vectors
per concept and per (concept, response). ``mu`` starts at 0, where the model equals its concept-only form;
:meth:`AKT.regularization` gives the L2 penalty ``sum(mu^2)`` on it.

No position embedding: the decay already encodes how far apart two positions are, so sequences of any length are
accepted (``max_len`` is ``None``; memory grows as ``L^2`` per head).

Padding is id 0 at the end of each row (right padding). Every attention is causal, so padding never reaches a real
position; logits at padded positions are meaningless and must be masked out by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_kt.models.attention import additive_causal_mask
from lit_kt.models.dropout import FastDropout, fast_dropout, keep_mask, kept_scale, quantized_drop_probability
from lit_kt.models.padding import may_skip_padding, row_lengths

CACHE_BYTES = 1 << 20  # one (C, m, m) tensor of a piece of the chunked attention: the piece's few stay in L2 and L3


def monotonic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    strict: bool,
    dropout: float = 0.0,
    training: bool = False,
    sqrt_distance: bool = False,
) -> tuple[Tensor, Tensor]:
    """Causal scaled dot-product attention whose scores decay with the context-aware distance (AKT, eq. 2-3).

    Args:
        q: (B, H, L, Dh) queries.
        k: (B, H, L, Dh) keys.
        v: (B, H, L, Dh) values.
        theta: (H,) non-negative decay rate per head.
        strict: Attend to keys ``< t`` (the knowledge retriever) instead of ``<= t`` (the encoders). Query 0 then
            sees nothing: its weights and output are 0.
        dropout: Dropout on the attention weights.
        training: Whether dropout applies.
        sqrt_distance: Decay with the square root of the context-aware distance (see :class:`AKT`).

    Returns:
        The output (B, H, L, Dh) and the weights (B, H, L, L) before dropout (rows sum to 1, or are all 0).
    """
    L = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    blocked, gap = _blocked(L, strict, q.device), _constants(L, q.device, scores.dtype)[1]  # (L, L) each
    # The finite fill keeps a row with no allowed key (query 0 when strict) free of NaNs; it is zeroed below.
    fill = torch.finfo(scores.dtype).min
    with torch.no_grad():
        gamma = scores.masked_fill(blocked, fill).softmax(dim=-1).masked_fill_(blocked, 0.0)  # (B, H, L, L)
        # Mass strictly after tau up to the last allowed key: the row total minus the running sum up to tau
        # (in place; the clamp removes cumsum round-off below 0).
        total = gamma.sum(dim=-1, keepdim=True)  # (B, H, L, 1): 1, or 0 for a row with no allowed key
        distance = gamma.cumsum_(dim=-1).neg_().add_(total).mul_(gap).clamp_(min=0.0)  # (B, H, L, L)
        if sqrt_distance:
            distance.sqrt_()
    decay = torch.exp(-theta.view(-1, 1, 1) * distance)  # (B, H, L, L), in (0, 1], differentiable in theta
    weights = (scores * decay).masked_fill_(blocked, fill).softmax(dim=-1).masked_fill(blocked, 0.0)
    out = fast_dropout(weights, dropout, training) @ v  # (B, H, L, Dh)
    return out, weights


_BLOCKED: dict[tuple[torch.device, bool], Tensor] = {}


def _blocked(n: int, strict: bool, device: torch.device) -> Tensor:
    """(n, n) bool, ``True`` at the keys a query may not see (``> t``, or ``>= t`` when ``strict``); cached prefix."""
    key = (device, strict)
    if key not in _BLOCKED or _BLOCKED[key].shape[0] < n:
        size = max(n, 2 * _BLOCKED[key].shape[0] if key in _BLOCKED else 256)
        _BLOCKED[key] = torch.ones(size, size, dtype=torch.bool, device=device).triu_(0 if strict else 1)
    return _BLOCKED[key][:n, :n]


_GAPS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _constants(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The (n, n) additive causal mask (:func:`~lit_kt.models.attention.additive_causal_mask`) and ``|t - tau|``.

    The distances are a prefix of one cached matrix per device and dtype, grown when a longer sequence comes:
    building them anew for every attention was one more (L, L) pass per call.
    """
    key = (torch.device(device), dtype)
    gap = _GAPS.get(key)
    if gap is None or gap.shape[0] < n:
        size = max(n, 2 * gap.shape[0] if gap is not None else 256)
        positions = torch.arange(size, device=device)
        gap = _GAPS[key] = (positions[:, None] - positions[None, :]).abs().to(dtype)
    return additive_causal_mask(n, device, dtype), gap[:n, :n]


def length_chunks(lengths: list[int], num_heads: int, element_bytes: int) -> list[tuple[int, int, int]]:
    """``(i0, i1, m)`` pieces of a batch whose rows are sorted by length, longest first, for the chunked attention.

    Rows ``i0:i1`` run together, cut to their longest row ``m``: each piece's (rows, heads, m, m) tensors stay near
    :data:`CACHE_BYTES`, and a piece of short rows skips the padding that the batch's longest row would add.
    All-padding rows (length 0) are left out.
    """
    chunks = []
    i, B = 0, sum(1 for n in lengths if n > 0)
    while i < B:
        m = lengths[i]
        rows = max(1, CACHE_BYTES // (num_heads * m * m * element_bytes))
        chunks.append((i, min(i + rows, B), m))
        i += rows
    return chunks


def _piece(x: Tensor, i0: int, i1: int, t0: int, t1: int) -> Tensor:
    """Rows ``i0:i1``, positions ``t0:t1`` of ``x`` (B, H, n, Dh) as (rows * H, t1 - t0, Dh): a view, no copy."""
    return x[i0:i1, :, t0:t1].flatten(0, 1)


class ChunkedMonotonicAttention(torch.autograd.Function):
    """:func:`monotonic_attention` of a length-sorted batch, piece by piece, with a hand-written backward pass.

    Inputs ``q``, ``k``, ``v`` are (B, n, H, Dh) (positions before heads, as the projections give them), with rows
    sorted by length, longest first; ``theta`` is (H,); ``chunks`` come from :func:`length_chunks`; ``p`` is the
    attention dropout (0 when not training) and ``seed`` seeds its masks. Returns the output (B, n, H, Dh);
    positions after a row's length are unspecified (the queries there may see padding), and with ``strict`` row 0 is
    0. Same maths as :func:`monotonic_attention`, which stays the plain reference; what differs:

    * each piece is cut to its longest row, so short rows skip the batch's padding, and its (C, m, m) tensors
      (``C`` = rows x heads) are small enough to stay in cache between the passes;
    * strict attention (keys ``< t``) runs as non-strict attention of queries ``1..m-1`` over keys ``0..m-2`` with
      distances ``|t - tau| + 1``: every row then has an allowed key, so no row needs a fill-and-zero;
    * gamma's rows sum to 1, so the mass after ``tau`` is ``1 - cumsum``; the passes over (C, m, m) are few and
      in place where they can be (a cached additive causal mask, ``addcmul`` for the distance);
    * the backward pass is written out and keeps, per piece, the weights before and after dropout, the decay and
      ``scores * distance`` (for the gradient of ``theta``), instead of autograd's dozen (B, H, L, L) tensors;
    * the dropout mask is drawn as bools (:func:`~lit_kt.models.dropout.keep_mask`) and multiplied in; its scale
      ``1 / (1 - p)`` goes on the (m, Dh) values and their gradient rather than on the (m, m) weights, and the
      backward pass reuses the dropped weights rather than drawing the mask again.

    Backward, per piece with ``Z = S * decay`` the decayed scores, ``W`` the weights, ``K`` the kept mask and
    ``s = 1 / (1 - p)``: ``dV = (s W K)^T dOut``, ``dW = s (dOut V^T) K``, ``dZ = W (dW - rowsum(dOut * out))``,
    ``dS = dZ * decay``, ``dtheta_h = -sum(dS * S * distance)`` over the piece's rows of head ``h``,
    ``dq = dS k / sqrt(Dh)``, ``dk = dS^T q / sqrt(Dh)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, theta, chunks, strict, p, seed, sqrt_distance=False):
        B, n, H, Dh = q.shape
        scale = Dh**-0.5
        # Heads first, once: every piece below is then a view (B, H, n, Dh) -> (rows * H, m, Dh).
        q_h = q.transpose(1, 2).contiguous()
        k_h = q_h if k is q else k.transpose(1, 2).contiguous()
        v_h = v.transpose(1, 2).contiguous()
        q_scaled = q_h * scale  # (B, H, n, Dh): the scale on the small side of the product
        off = int(strict)  # strict: query t + 1 over keys <= t, at distance |t - tau| + 1
        mask, gap = _constants(max(n - off, 0), q.device, q.dtype)  # (n', n') each
        gap = gap + off if off else gap
        neg_theta = -theta.detach().view(H, 1, 1)  # (H, 1, 1)
        generator = None
        if p > 0:
            generator = torch.Generator(device=q.device)
            generator.manual_seed(seed)
        out = q_h.new_zeros(B, H, n, Dh)
        saved = []
        keep_for_backward = any(ctx.needs_input_grad[:4])
        for i0, i1, m in chunks:
            mq = m - off  # queries (and keys) in this piece
            if mq <= 0:
                saved.append(None)
                continue
            r = i1 - i0
            qc, kc, vc = _piece(q_scaled, i0, i1, off, m), _piece(k_h, i0, i1, 0, mq), _piece(v_h, i0, i1, 0, mq)
            scores = torch.bmm(qc, kc.transpose(1, 2)).add_(mask[:mq, :mq])  # (C, mq, mq), masked above the diagonal
            # Mass after tau: 1 - cumsum(gamma); distance = that times the gap, in one pass over the cumsum's buffer.
            cum = scores.softmax(dim=-1).cumsum_(dim=-1)  # (C, mq, mq); gamma has no gradient (the paper)
            g = gap[:mq, :mq]
            # At masked keys cum is 1 (up to round-off): distance ~0, decay ~1, and the score stays hugely negative.
            distance = torch.addcmul(g, cum, g, value=-1, out=cum).view(r, H, mq, mq)
            if sqrt_distance:  # round-off can leave -1e-7 where the mass after tau is 0
                distance.clamp_(min=0.0).sqrt_()
            decay = (distance * neg_theta).exp_()  # (r, H, mq, mq)
            scored_distance = scores.view(r, H, mq, mq) * distance if keep_for_backward else None
            weights = scores.view(r, H, mq, mq).mul_(decay).softmax(dim=-1).view(-1, mq, mq)  # (C, mq, mq)
            dropped = weights  # (C, mq, mq) the weights after dropout, without its scale (that goes on the values)
            if p > 0:
                keep = keep_mask(weights.shape, p, q.device, generator)
                # uint8 -> float, then multiply: several times faster on CPU than a float-times-bool product.
                dropped = keep.view(torch.uint8).to(weights.dtype).mul_(weights)
            attn = torch.bmm(dropped, vc * kept_scale(p) if p > 0 else vc)  # (C, mq, Dh)
            out[i0:i1, :, off:m] = attn.view(r, H, mq, Dh)
            if keep_for_backward:
                saved.append((weights, dropped, decay, scored_distance))
        ctx.save_for_backward(q_h, k_h, v_h, out)
        ctx.saved, ctx.chunks, ctx.off, ctx.p, ctx.same_qk = saved, chunks, off, p, k is q
        return out.transpose(1, 2)  # (B, n, H, Dh)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors  # (B, H, n, Dh) each
        B, H, n, Dh = q.shape
        scale, off, p = Dh**-0.5, ctx.off, ctx.p
        value_scale = kept_scale(p) if p > 0 else 1.0
        grad_out = grad_out.transpose(1, 2).contiguous()  # (B, H, n, Dh)
        row = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, n, 1) rowsum(dW * W) = rowsum(dOut * out)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_theta = q.new_zeros(H)
        for (i0, i1, m), piece in zip(ctx.chunks, ctx.saved, strict=True):
            if piece is None:
                continue
            weights, dropped, decay, scored_distance = piece
            mq, r = m - off, i1 - i0
            qc, kc, vc = _piece(q, i0, i1, off, m), _piece(k, i0, i1, 0, mq), _piece(v, i0, i1, 0, mq)
            go = _piece(grad_out, i0, i1, off, m)  # (C, mq, Dh)
            go = go * value_scale if p > 0 else go
            grad_vc = torch.bmm(dropped.transpose(1, 2), go)  # (C, mq, Dh)
            # dZ = W (s (dOut V^T) K - row) = s (dOut V^T) (W K) - W row: two passes, with W K kept from the forward.
            grad_z = torch.bmm(go, vc.transpose(1, 2)).mul_(dropped)  # (C, mq, mq)
            grad_z.addcmul_(weights, _piece(row, i0, i1, off, m), value=-1)
            grad_s = grad_z.mul_(decay.view(-1, mq, mq))  # (C, mq, mq)
            # dtheta_h = -sum(dS * S * distance): one dot product per (row, head), fused by bmm.
            dots = torch.bmm(grad_s.view(-1, 1, mq * mq), scored_distance.view(-1, mq * mq, 1))  # (C, 1, 1)
            grad_theta -= dots.view(r, H).sum(dim=0)
            grad_q[i0:i1, :, off:m] = torch.bmm(grad_s, kc).mul_(scale).view(r, H, mq, Dh)
            grad_k[i0:i1, :, :mq] = torch.bmm(grad_s.transpose(1, 2), qc).mul_(scale).view(r, H, mq, Dh)
            grad_v[i0:i1, :, :mq] = grad_vc.view(r, H, mq, Dh)
        if ctx.same_qk:  # q and k were one tensor: its gradient is the sum, returned once
            grad_q, grad_k = grad_q.add_(grad_k), None
        grad_k = None if grad_k is None else grad_k.transpose(1, 2)
        return grad_q.transpose(1, 2), grad_k, grad_v.transpose(1, 2), grad_theta, None, None, None, None, None


class AKTBlock(nn.Module):
    """Monotonic multi-head attention, residual + layer norm, feed-forward, residual + layer norm.

    Queries and keys share one projection: in every AKT attention they come from the same sequence (encoded
    questions, or encoded interactions), so the score is a learned similarity between positions.

    Args:
        d_model: Width of the inputs and outputs.
        num_heads: Attention heads; must divide ``d_model``.
        d_ff: Hidden width of the feed-forward layer.
        dropout: Dropout after each sub-layer and on the attention weights.
        strict: Attend to strictly past positions (the knowledge retriever) rather than to positions ``<= t``.
        sqrt_distance: Decay with the square root of the context-aware distance (see :class:`AKT`).
    """

    def __init__(
        self,
        d_model: int = 64,
        num_heads: int = 4,
        d_ff: int = 128,
        dropout: float = 0.1,
        strict: bool = False,
        sqrt_distance: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.strict = strict
        self.sqrt_distance = sqrt_distance
        self.qk_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # theta = softplus(raw); heads start on time scales from slow (0.01) to fast (1) so that some look far back.
        theta0 = torch.logspace(-2, 0, num_heads)  # (H,)
        self.theta_raw = nn.Parameter(torch.log(torch.expm1(theta0)))
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), FastDropout(dropout), nn.Linear(d_ff, d_model))
        self.ffn_norm = nn.LayerNorm(d_model)
        self.drop = FastDropout(dropout)

    @property
    def theta(self) -> Tensor:
        """(H,) the decay rate of each head, ``>= 0``."""
        return F.softplus(self.theta_raw)

    def forward(self, query: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` (B, L, D), which also gives the keys, to ``values`` (B, L, D).

        Returns:
            The output (B, L, D) and the attention weights (B, H, L, L).
        """
        B, L, D = query.shape
        H = self.num_heads
        qk = self.qk_proj(query).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        v = self.v_proj(values).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        attn, weights = monotonic_attention(
            qk, qk, v, self.theta, self.strict, self.dropout, self.training, self.sqrt_distance
        )
        return self._finish(query, attn.transpose(1, 2).reshape(B, L, D)), weights

    def forward_packed(self, query: Tensor, values: Tensor, real: Tensor, chunks: list[tuple[int, int, int]]) -> Tensor:
        """:meth:`forward` on the real positions of a length-sorted batch (the CPU fast path; same maths).

        The position-wise layers run on the real positions only, the attention is
        :class:`ChunkedMonotonicAttention` on the padded rows.

        Args:
            query: (N, D) rows of the (B, n, D) query at the ``True`` entries of ``real``, in row-major order.
            values: (N, D) the same for the values.
            real: (B, n) bool, ``True`` at each row's leading real positions; rows sorted by length, longest first.
            chunks: :func:`length_chunks` of the row lengths.

        Returns:
            (N, D), the rows of :meth:`forward`'s output at the real positions.
        """
        B, n = real.shape
        D = query.shape[-1]
        H = self.num_heads

        def padded(rows: Tensor) -> Tensor:  # (N, D) -> (B, n, H, D/H), 0 at padding
            # A view of a heads-first (B, H, n, D/H) tensor: the attention's layout, so it need not copy it again.
            heads_first = rows.new_zeros(B, H, n, D // H)
            return heads_first.transpose(1, 2).index_put_((real,), rows.view(-1, H, D // H))

        qk = padded(self.qk_proj(query))
        v = padded(self.v_proj(values))
        p = quantized_drop_probability(self.dropout) if self.training else 0.0
        if p == 1.0:  # every weight dropped: the attention output is 0
            return self._finish(query, torch.zeros_like(query))
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0  # from the global generator: manual_seed rules
        p = self.dropout if p > 0 else 0.0
        attn = ChunkedMonotonicAttention.apply(
            qk, qk, v, self.theta, chunks, self.strict, p, seed, self.sqrt_distance
        )  # (B, n, H, D/H)
        return self._finish(query, attn[real].flatten(1))  # (N, D)

    def _finish(self, query: Tensor, attn: Tensor) -> Tensor:
        """Output projection, residual + layer norm, feed-forward, residual + layer norm: (..., D) -> (..., D)."""
        attn = self.out_proj(attn)  # 0-weight rows give the bias only
        x = self.attn_norm(query + self.drop(attn))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class AKT(nn.Module):
    """Context-aware attentive knowledge tracing, with Rasch embeddings when question ids are given.

    Args:
        num_exercises: Number of concept ("exercise") ids; ids run from 1 to ``num_exercises`` and 0 is padding.
        num_questions: Number of question ids for the Rasch embeddings (1..num_questions, 0 padding); 0 for none
            (concept ids only, as in the three-line data sets).
        d_model: Embedding and hidden width (the paper: 256; 64 keeps a 2-core CPU epoch on ASSIST2009 short).
        num_heads: Attention heads; must divide ``d_model`` (the paper: 8).
        d_ff: Feed-forward hidden width in the blocks and the output MLP.
        num_encoder_layers: Blocks in each of the two encoders (the paper: 1).
        num_retriever_layers: Blocks in the knowledge retriever (the paper: 2).
        dropout: Dropout in the blocks, on the attention weights and in the output MLP (the paper: 0.05).
        sqrt_distance: Decay the scores by ``exp(-theta * sqrt(d(t, tau)))`` instead of the paper's
            ``exp(-theta * d(t, tau))``: the authors' published code (and pyKT's) takes the square root, so past
            positions fade more slowly with distance.

    Fast path (same maths; ``tests/test_akt_fast.py`` checks it against a plain reference, forward and backward): on
    CPU (outside ``torch.compile``) and without ``return_attention``, the rows are sorted by length, the
    position-wise layers run on the real positions only and the attention is :class:`ChunkedMonotonicAttention`
    (pieces of similar-length rows, each cut to its longest row, with a hand-written backward pass); the logits
    after each row's last real position are 0. Elsewhere the padded tensors go through :func:`monotonic_attention`.

    Example:
        >>> model = AKT(num_exercises=50, d_model=32, num_heads=4)
        >>> exercises = torch.randint(1, 51, (2, 20)); responses = torch.randint(0, 2, (2, 20))
        >>> model(exercises, responses).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        num_exercises: int,
        num_questions: int = 0,
        d_model: int = 64,
        num_heads: int = 4,
        d_ff: int = 128,
        num_encoder_layers: int = 1,
        num_retriever_layers: int = 2,
        dropout: float = 0.1,
        sqrt_distance: bool = False,
    ) -> None:
        super().__init__()
        if num_exercises < 1 or num_questions < 0:
            raise ValueError(
                f"Expected `num_exercises` >= 1 and `num_questions` >= 0 but got {num_exercises} and {num_questions}."
            )
        if d_model % num_heads != 0:
            raise ValueError(f"Expected `d_model` ({d_model}) to be divisible by `num_heads` but got {num_heads}.")
        if num_encoder_layers < 0 or num_retriever_layers < 1:
            raise ValueError(
                "Expected `num_encoder_layers` >= 0 and `num_retriever_layers` >= 1 but got "
                f"{num_encoder_layers} and {num_retriever_layers}."
            )
        self.config = dict(
            num_exercises=num_exercises,
            num_questions=num_questions,
            d_model=d_model,
            num_heads=num_heads,
            d_ff=d_ff,
            num_encoder_layers=num_encoder_layers,
            num_retriever_layers=num_retriever_layers,
            dropout=dropout,
            sqrt_distance=sqrt_distance,
        )
        self.num_exercises = num_exercises
        self.num_questions = num_questions
        self.max_len = None  # no position embedding: the decay encodes distance
        # Interaction id = concept + num_exercises * response, so 1..2E; id 0 (padding) gets a zero vector.
        self.concept_emb = nn.Embedding(num_exercises + 1, d_model, padding_idx=0)
        self.interaction_emb = nn.Embedding(2 * num_exercises + 1, d_model, padding_idx=0)
        if num_questions:
            self.difficulty = nn.Embedding(num_questions + 1, 1, padding_idx=0)  # mu, a scalar per question
            nn.init.zeros_(self.difficulty.weight)  # start at the concept-only model
            self.concept_var = nn.Embedding(num_exercises + 1, d_model, padding_idx=0)  # d_c
            self.interaction_var = nn.Embedding(2 * num_exercises + 1, d_model, padding_idx=0)  # f_(c, r)
        self.question_encoder = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout, sqrt_distance=sqrt_distance) for _ in range(num_encoder_layers)
        )
        self.interaction_encoder = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout, sqrt_distance=sqrt_distance) for _ in range(num_encoder_layers)
        )
        self.retriever = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout, strict=True, sqrt_distance=sqrt_distance)
            for _ in range(num_retriever_layers)
        )
        self.head = nn.Sequential(
            nn.Linear(2 * d_model, d_ff),
            nn.ReLU(),
            FastDropout(dropout),
            nn.Linear(d_ff, d_ff // 2),
            nn.ReLU(),
            FastDropout(dropout),
            nn.Linear(d_ff // 2, 1),
        )

    def regularization(self) -> Tensor:
        """The L2 penalty ``sum(mu^2)`` on the question difficulties (0 without questions); scale it by ``l2``."""
        if not self.num_questions:
            return self.concept_emb.weight.new_zeros(())
        return self.difficulty.weight.square().sum()

    def forward(
        self, exercises: Tensor, responses: Tensor, questions: Tensor | None = None, return_attention: bool = False
    ):
        """Predict the correctness of every position from the history before it.

        Args:
            exercises: (B, L) concept ids, 1..num_exercises, right-padded with 0.
            responses: (B, L) 0/1 correctness (values at padded positions are ignored).
            questions: (B, L) question ids, 1..num_questions, padded with 0, for the Rasch embeddings; ``None``
                for the concept-only embeddings (all ``mu = 0``).
            return_attention: Also return the knowledge retriever's attention weights, a list of (B, H, L, L)
                tensors, one per block (row 0 is all zeros).

        Returns:
            (B, L) logits, where ``logits[:, t]`` predicts ``responses[:, t]`` from ``exercises[:, :t+1]``,
            ``questions[:, :t+1]`` and ``responses[:, :t]``; with ``return_attention`` a tuple
            ``(logits, weights)``.
        """
        B, L = exercises.shape
        if questions is not None:
            if not self.num_questions:
                raise ValueError("Expected `questions` to be None for a model built with num_questions=0.")
            if questions.shape != exercises.shape:
                raise ValueError(
                    f"Expected `questions` of the shape of `exercises` {tuple(exercises.shape)} but got "
                    f"{tuple(questions.shape)}."
                )
        if may_skip_padding(exercises) and not return_attention:
            return self._forward_packed(exercises, responses, questions)
        interactions = exercises + self.num_exercises * responses * (exercises > 0)  # (B, L)
        x, y = self._embed(exercises, interactions, questions)  # (B, L, D) each
        q_enc, y_enc = x, y
        for block in self.question_encoder:
            q_enc, _ = block(q_enc, q_enc)
        for block in self.interaction_encoder:
            y_enc, _ = block(y_enc, y_enc)
        h = q_enc
        weights = []
        for block in self.retriever:
            h, w = block(h, y_enc)  # queries and keys: the questions so far; values: strictly past interactions
            weights.append(w)
        logits = self.head(torch.cat([h, x], dim=-1)).squeeze(-1)  # (B, L)
        return (logits, weights) if return_attention else logits

    def _embed(self, exercises: Tensor, interactions: Tensor, questions: Tensor | None) -> tuple[Tensor, Tensor]:
        """Question and interaction embeddings ``x``, ``y`` (..., D) of ids (...), Rasch-varied when questions given."""
        x = self.concept_emb(exercises)  # (..., D)
        y = self.interaction_emb(interactions)  # (..., D)
        if questions is not None:
            mu = self.difficulty(questions)  # (..., 1)
            x = x + mu * self.concept_var(exercises)
            y = y + mu * self.interaction_var(interactions)
        return x, y

    def _forward_packed(self, exercises: Tensor, responses: Tensor, questions: Tensor | None) -> Tensor:
        """The CPU fast path of :meth:`forward`: same logits at the real positions, 0 after each row's last one.

        Every attention is causal, so nothing after a row's last real position reaches a real position. The rows are
        sorted by length, longest first; the position-wise layers (embeddings, projections, feed-forward, layer
        norms, head) run on the real positions only, and the attention on pieces of similar-length rows, each cut to
        its longest row (:class:`ChunkedMonotonicAttention`).
        """
        B, L = exercises.shape
        lengths = row_lengths(exercises)  # (B,)
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,) longest row first
        sorted_lengths = lengths[order]
        n = int(sorted_lengths[0]) if B else 0
        if n == 0:
            return torch.zeros(B, L, dtype=self.concept_emb.weight.dtype, device=exercises.device)
        real = torch.arange(n, device=exercises.device) < sorted_lengths[:, None]  # (B, n)
        exercises = exercises[order, :n][real]  # (N,)
        responses = responses[order, :n][real]
        questions = None if questions is None else questions[order, :n][real]
        interactions = exercises + self.num_exercises * responses * (exercises > 0)  # (N,)
        x, y = self._embed(exercises, interactions, questions)  # (N, D) each
        chunks = length_chunks(sorted_lengths.tolist(), self.retriever[0].num_heads, x.element_size())
        q_enc, y_enc = x, y
        for block in self.question_encoder:
            q_enc = block.forward_packed(q_enc, q_enc, real, chunks)
        for block in self.interaction_encoder:
            y_enc = block.forward_packed(y_enc, y_enc, real, chunks)
        h = q_enc
        for block in self.retriever:
            h = block.forward_packed(h, y_enc, real, chunks)
        rows, cols = real.nonzero(as_tuple=True)  # (N,) each, row-major as the packed rows
        logits = self.head(torch.cat([h, x], dim=-1)).squeeze(-1)  # (N,)
        return logits.new_zeros(B, L).index_put_((order[rows], cols), logits)  # (B, L), 0 after each row's end
