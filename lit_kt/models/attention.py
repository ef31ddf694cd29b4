"""Causal attention with dropout on the attention weights, fast on CPU.

On CUDA, ``F.scaled_dot_product_attention`` applies attention dropout inside its fused kernels. On CPU its fused
kernel has no dropout, so PyTorch falls back to a composite that writes and re-reads several (B, H, L, L) tensors
(scores, weights, dropout mask, dropped weights) through main memory and keeps them for the backward pass; for
SAKT those passes are most of a training step. :class:`ChunkedCausalAttention` computes the same thing a few
(batch, head) slices at a time, so each slice's (L, L) tensors stay in the CPU cache, and, as FlashAttention does,
keeps only ``q``, ``k``, ``v`` and the output for the backward pass, recomputing the weights there (the dropout
masks come again from a generator seeded once per call). Memory for the backward pass is O(L) per head instead of
O(L^2).

Maths, per (batch, head) slice with ``q`` already scaled by ``1/sqrt(d)`` and ``M`` the dropout mask (0, or the
kept scale ``1/(1-p)``): ``P = softmax(q k^T + causal)``, ``out = (P * M) v``. Backward: ``dV = (P*M)^T dOut``,
``dP = (dOut v^T) * M``, ``dS = P * (dP - rowsum(dOut * out))``, ``dq = dS k``, ``dk = dS^T q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_kt.models.dropout import dropout_mask, keep_mask, kept_scale, quantized_drop_probability
from lit_kt.models.padding import may_skip_padding

CACHE_BYTES = 1 << 20  # per-chunk (L, L) working set that stays in a core's L2 cache


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _chunks(lengths: list[int], num_heads: int, element_bytes: int):
    """``(b, h0, h1, n)`` pieces: heads ``h0:h1`` of sample ``b`` cut to its ``n`` real positions, cache-sized."""
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        step = max(1, min(num_heads, CACHE_BYTES // (n * n * element_bytes)))
        for h0 in range(0, num_heads, step):
            yield b, h0, min(h0 + step, num_heads), n


def _weights(q: Tensor, k: Tensor) -> Tensor:
    """Causal softmax attention weights of one piece: (C, n, D) x (C, n, D) -> (C, n, n)."""
    n = q.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    return torch.matmul(q, k.transpose(1, 2)).masked_fill_(causal, float("-inf")).softmax(dim=-1)


class ChunkedCausalAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T / sqrt(d) + causal)) v``, one cache-sized piece of one sample at a time.

    Inputs ``q``, ``k``, ``v`` are (B, H, L, D); ``lengths`` the number of real (leading) positions of each sample:
    positions at and after it are right padding, cut away (their outputs are 0; with right padding a real query never
    attends to them); ``p`` the attention-dropout probability (the mask is
    :func:`~lit_kt.models.dropout.dropout_mask`'s, drawn from a generator seeded with ``seed``, piece by piece).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lengths: list[int], p: float, seed: int) -> Tensor:
        D = q.shape[-1]
        q = (q * D**-0.5).contiguous()  # (B, H, L, D)
        k, v = k.contiguous(), v.contiguous()
        generator = _generator(seed, q.device)
        out = torch.zeros_like(v)  # (B, H, L, D)
        for b, h0, h1, n in _chunks(lengths, q.shape[1], q.element_size()):
            weights = _weights(q[b, h0:h1, :n], k[b, h0:h1, :n])  # (C, n, n)
            if p > 0:
                weights.mul_(dropout_mask(weights.shape, p, weights.dtype, weights.device, generator))
            out[b, h0:h1, :n] = torch.matmul(weights, v[b, h0:h1, :n])
        ctx.save_for_backward(q, k, v, out)
        ctx.lengths, ctx.p, ctx.seed = lengths, p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out = ctx.saved_tensors
        D = q.shape[-1]
        generator = _generator(ctx.seed, q.device)
        row = (grad_out * out).sum(dim=-1, keepdim=True)  # (B, H, L, 1) = rowsum(dP * P)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, h0, h1, n in _chunks(ctx.lengths, q.shape[1], q.element_size()):
            piece = (b, slice(h0, h1), slice(0, n))
            weights = _weights(q[piece], k[piece])  # (C, n, n)
            grad_dropped = torch.matmul(grad_out[piece], v[piece].transpose(1, 2))  # (C, n, n)
            if ctx.p > 0:
                mask = dropout_mask(weights.shape, ctx.p, weights.dtype, weights.device, generator)
                grad_dropped.mul_(mask)
                grad_v[piece] = torch.matmul((weights * mask).transpose(1, 2), grad_out[piece])
            else:
                grad_v[piece] = torch.matmul(weights.transpose(1, 2), grad_out[piece])
            grad_scores = grad_dropped.sub_(row[piece]).mul_(weights)  # (C, n, n)
            grad_q[piece] = torch.matmul(grad_scores, k[piece])
            grad_k[piece] = torch.matmul(grad_scores.transpose(1, 2), q[piece])
        grad_q.mul_(D**-0.5)
        return grad_q, grad_k, grad_v, None, None, None


_CAUSAL_MASKS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def additive_causal_mask(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (n, n) additive causal mask: 0 for keys ``<= t``, a large negative number above the diagonal.

    A prefix view of one cached mask per device and dtype, grown when a longer sequence comes (building it anew for
    every attention piece was one more (n, n) pass). The value is finite (half the dtype's lowest), so that a masked
    score times a factor near 1 stays finite and ``0 * score`` is 0 (AKT's decay); softmax gives it weight 0 exactly,
    as it would ``-inf``.
    """
    key = (torch.device(device), dtype)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None or mask.shape[0] < n:
        size = max(n, 2 * mask.shape[0] if mask is not None else 256)
        mask = torch.zeros(size, size, dtype=dtype, device=device)
        mask.masked_fill_(torch.ones(size, size, dtype=torch.bool, device=device).triu_(1), torch.finfo(dtype).min / 2)
        _CAUSAL_MASKS[key] = mask
    return mask[:n, :n]


class PackedCausalAttention(torch.autograd.Function):
    """Causal multi-head attention with dropout over *packed* rows: no padded tensor is ever built.

    Inputs ``q``, ``k``, ``v`` are (N, D): the real positions of a right-padded (B, L) batch in row-major order, so
    sample ``b`` holds rows ``offsets[b]:offsets[b] + lengths[b]`` (``lengths`` as a list; ``sum(lengths) == N``).
    ``num_heads`` splits D. Same maths as :class:`ChunkedCausalAttention` on the padded (B, H, L, D/H) tensors, and the
    same dropout masks for the same ``seed`` (drawn piece by piece in the same order, by the same cache-sized
    pieces), but laid out heads-first over the packed rows, (H, N, D/H): each piece is a view, so the padded copies of
    q, k, v, their gradients and the zero-filled outputs of the padded path are gone. The dropout scale goes on the
    values (the (n, D/H) side), and the backward pass reuses the weights kept from the forward pass (per piece, before
    and after dropout) instead of drawing the masks again: memory O(sum of H n^2) over the samples, small at
    knowledge-tracing lengths (at most 2 x 4 x 8 x 200^2 bytes per 200-long sample with 8 heads, float32).

    Backward, per piece, with ``W`` the weights, ``K`` the kept mask, ``Dr = W K`` and ``s`` the kept scale:
    ``out = Dr (s v)``, ``dV = s Dr^T dOut``, ``dDr = dOut (s v)^T``, ``dS = Dr dDr - W rowsum(dOut * out)``
    (``W K dDr = Dr dDr``), ``dq = dS k / sqrt(d)``, ``dk = dS^T q / sqrt(d)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lengths: list[int], num_heads: int, p: float, seed: int):
        N, D = q.shape
        H, Dh = num_heads, D // num_heads
        scale = kept_scale(p) if p > 0 else 1.0

        def heads_first(x: Tensor, factor: float = 1.0) -> Tensor:  # (N, D) -> (H, N, D/H), times factor: one pass
            heads = x.reshape(N, H, Dh).transpose(0, 1)
            return heads.contiguous() if factor == 1.0 else torch.mul(heads, factor, out=x.new_empty(H, N, Dh))

        q_h = heads_first(q, Dh**-0.5)
        k_h = heads_first(k)
        v_h = heads_first(v, scale)  # the kept scale on the small side of the product
        out = torch.empty_like(q_h)  # (H, N, D/H): every row belongs to a sample, so every piece writes it
        generator = _generator(seed, q.device) if p > 0 else None
        keep_for_backward = any(ctx.needs_input_grad[:3])
        saved = []
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        for b, h0, h1, n in _chunks(lengths, H, q.element_size()):
            rows = slice(offsets[b], offsets[b] + n)
            scores = torch.bmm(q_h[h0:h1, rows], k_h[h0:h1, rows].transpose(1, 2))  # (C, n, n)
            weights = scores.add_(additive_causal_mask(n, q.device, q.dtype)).softmax(dim=-1)  # (C, n, n)
            dropped = weights
            if p > 0:
                # uint8 -> float, then multiply: faster on CPU than a float-times-bool product.
                keep = keep_mask(weights.shape, p, q.device, generator)
                dropped = keep.view(torch.uint8).to(weights.dtype).mul_(weights)
            out[h0:h1, rows] = torch.bmm(dropped, v_h[h0:h1, rows])
            if keep_for_backward:
                saved.append((weights, dropped))
        ctx.save_for_backward(q_h, k_h, v_h, out)
        ctx.saved, ctx.lengths, ctx.offsets, ctx.scale = saved, lengths, offsets, scale
        return out.transpose(0, 1).reshape(N, D)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_h, k_h, v_h, out = ctx.saved_tensors  # (H, N, D/H) each; q scaled by 1/sqrt(d), v by the kept scale
        H, N, Dh = q_h.shape
        grad_out = grad_out.reshape(N, H, Dh).transpose(0, 1).contiguous()  # (H, N, D/H)
        row = (grad_out * out).sum(dim=-1, keepdim=True)  # (H, N, 1) rowsum(dDr * Dr) = rowsum(dOut * out)
        grad_q, grad_k, grad_v = torch.empty_like(q_h), torch.empty_like(k_h), torch.empty_like(v_h)
        pieces = _chunks(ctx.lengths, H, q_h.element_size())
        for (b, h0, h1, n), (weights, dropped) in zip(pieces, ctx.saved, strict=True):
            rows = slice(ctx.offsets[b], ctx.offsets[b] + n)
            go = grad_out[h0:h1, rows]  # (C, n, D/H)
            grad_v[h0:h1, rows] = torch.bmm(dropped.transpose(1, 2), go)
            grad_scores = torch.bmm(go, v_h[h0:h1, rows].transpose(1, 2))  # (C, n, n) dDr
            grad_scores.mul_(dropped).addcmul_(weights, row[h0:h1, rows], value=-1)  # dS
            grad_q[h0:h1, rows] = torch.bmm(grad_scores, k_h[h0:h1, rows])
            grad_k[h0:h1, rows] = torch.bmm(grad_scores.transpose(1, 2), q_h[h0:h1, rows])

        def rows_first(x: Tensor, factor: float = 1.0) -> Tensor:  # (H, N, D/H) -> (N, D), times factor: one pass
            rows = x.transpose(0, 1)
            if factor == 1.0:
                return rows.reshape(N, H * Dh)
            return torch.mul(rows, factor, out=x.new_empty(N, H, Dh)).view(N, H * Dh)

        return rows_first(grad_q, Dh**-0.5), rows_first(grad_k), rows_first(grad_v, ctx.scale), None, None, None, None


def packed_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, lengths: list[int], num_heads: int, dropout_p: float = 0.0, training: bool = False
) -> Tensor:
    """Causal multi-head attention with attention dropout over packed rows (the CPU fast path's layout).

    Args:
        q: (N, D) queries of the real positions of a right-padded batch, row-major (not yet scaled).
        k: (N, D) keys, the same rows.
        v: (N, D) values, the same rows.
        lengths: Real positions of each sample, summing to N (a list: the pieces are cut on the host).
        num_heads: Heads; must divide D.
        dropout_p: Dropout on the attention weights while ``training`` (rounded to a multiple of 1/65536).
        training: Whether to drop.

    Returns:
        (N, D), heads merged: :class:`PackedCausalAttention`, whose masks come from a seed drawn from torch's global
        generator (so ``torch.manual_seed`` rules).
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"Expected `dropout_p` in [0, 1] but got {dropout_p}.")
    if num_heads < 1 or q.shape[-1] % num_heads:
        raise ValueError(f"Expected `num_heads` to divide the width {q.shape[-1]} but got {num_heads}.")
    if sum(lengths) != q.shape[0]:
        raise ValueError(f"Expected `lengths` to sum to the {q.shape[0]} packed rows but got {sum(lengths)}.")
    p = quantized_drop_probability(dropout_p) if training else 0.0
    if p == 1.0:  # every weight dropped
        return torch.zeros_like(v)
    seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0
    return PackedCausalAttention.apply(q, k, v, lengths, num_heads, dropout_p if p > 0 else 0.0, seed)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
) -> Tensor:
    """Causal multi-head attention with attention dropout, on the fastest path for the device.

    Args:
        q: (B, H, L, D) queries (not yet scaled).
        k: (B, H, L, D) keys.
        v: (B, H, L, D) values.
        dropout_p: Dropout on the attention weights while ``training``.
        training: Whether to drop.
        lengths: (B,) real positions of each sample when rows are right-padded; the padded positions' outputs are
            then unspecified (0 on the CPU dropout path, which skips them). ``None``: every position is real.

    Returns:
        (B, H, L, D): ``dropout(softmax(q k^T / sqrt(D) + causal)) v``. Without dropout, on a non-CPU device or under
        ``torch.compile``, this is ``F.scaled_dot_product_attention`` (its fused kernels); with dropout on CPU,
        :class:`ChunkedCausalAttention`, whose drop probability is ``dropout_p`` rounded to a multiple of 1/65536.
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"Expected `dropout_p` in [0, 1] but got {dropout_p}.")
    fast = training and may_skip_padding(q)
    if not fast or quantized_drop_probability(dropout_p) in (0.0, 1.0):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0, is_causal=True)
    B, H, L, D = q.shape
    lengths = [L] * B if lengths is None else lengths.tolist()  # CPU only: no device synchronisation
    seed = int(torch.randint(0, 2**62, ()))  # from the global generator: torch.manual_seed rules
    return ChunkedCausalAttention.apply(q, k, v, lengths, dropout_p, seed)
