"""Token-level LM distillation from the student's last hidden states, without the student's full logits.

:func:`fused_linear_divergence` computes a divergence of :mod:`lit_kd.losses` (``"jsd"``, ``"forward_kl"``,
``"reverse_kl"``, ``"tvd"``) from the student's hidden states ``h_s`` (N, D) and LM-head weight ``W_s`` (V, D), a
chunk of tokens at a time: the logits ``h_s[chunk] @ W_s.T`` of one chunk exist at once, never the (N, V) logits
(as Liger-Kernel's fused linear JSD). The teacher side is either its logits (N, V) or, also chunked, its hidden states
and LM-head weight.

Why it saves memory: for B = 8, L = 1024, V = 32000 the student's float32 logits alone are 1 GiB, and autograd keeps
several such tensors (log-probabilities, the mixture, their gradients); here the peak holds one chunk's (c, V)
float32 intermediates plus the gradients of the inputs, which are the inputs' size ((N, D) and (V, D)).

Gradients: the gradients of ``h_s``, ``W_s`` and ``b_s`` are computed chunk by chunk *in the forward pass*, when
any of them requires a gradient (from each chunk's closed-form logits gradient,
:func:`lit_kd.losses.per_token_divergence_grad`), and the backward pass only scales them by the incoming gradient.
Unlike the chunked-logits path (:func:`lit_kd.losses.generalized_jsd` with ``chunk_size``), whose stored gradient
would be (N, V), these stored gradients are small, and computing them in the forward pass saves recomputing every
chunk's logits (three (c, V, D) matmuls per chunk instead of four). The teacher's inputs get no gradient (compute
them under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_kd.losses import (
    Divergence,
    _divergence_from_log_probs,
    _grad_from_log_probs,
    _log_mixture,
    _log_probs,
    _row_temperature,
    _shape,
    _valid_rows,
    check_divergence_args,
    compute_dtype,
)


class _FusedLinearDivergence(torch.autograd.Function):
    """Mean over the given rows of a divergence between ``F.linear(h_s, W_s, b_s)`` and the teacher's logits."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden_s: Tensor,
        weight_s: Tensor,
        bias_s: Tensor | None,
        teacher: tuple[Tensor, Tensor | None, Tensor | None],
        rows: Tensor,
        temperature: Tensor | None,
        scalar_temperature: float,
        divergence: str,
        beta: float,
        chunk_size: int,
        grad_enabled: bool,
    ) -> Tensor:
        # hidden_s: (N, D); weight_s: (V, D); bias_s: (V,) or None; teacher: (logits (N, V), None, None) or
        # (hidden (N, D_t), weight (V, D_t), bias (V,) or None); rows: (N_valid,); temperature: (N, 1) or None.
        dtype = compute_dtype(hidden_s.dtype)
        # Under torch.no_grad (evaluation) nothing will call backward: skip the gradients.
        need = [n and grad_enabled for n in ctx.needs_input_grad[:3]]
        grads_wanted = any(need)
        grad_h = torch.zeros_like(hidden_s) if need[0] else None  # (N, D)
        # The weight's and bias's gradients sum over every chunk: accumulate them in the compute dtype.
        grad_w = torch.zeros_like(weight_s, dtype=dtype) if need[1] else None  # (V, D)
        grad_b = torch.zeros_like(bias_s, dtype=dtype) if need[2] else None  # (V,)
        scale = 1.0 / max(rows.numel(), 1)
        total = hidden_s.new_zeros((), dtype=dtype)
        for idx in rows.split(chunk_size):  # (c,) row indices, c <= chunk_size
            h = hidden_s.index_select(0, idx)  # (c, D)
            z_t = _teacher_logits(teacher, idx).to(dtype)  # (c, V)
            t = scalar_temperature if temperature is None else temperature.index_select(0, idx).to(dtype)  # (c, 1)
            # The matmul runs in the inputs' dtype (bf16 on a GPU), its (c, V) result is upcast.
            z_s = F.linear(h, weight_s, bias_s).to(dtype)  # (c, V)
            log_p_s, log_p_t = _log_probs(z_s, z_t, t)  # (c, V) each
            del z_s, z_t  # one chunk's logits fewer at the peak
            # The JSD's log-mixture serves both the value and the gradient: computed once.
            mixed = divergence == "jsd" and 0 < beta < 1
            log_m = _log_mixture(log_p_s, log_p_t, beta) if mixed else None  # (c, V) or None
            total = total + _divergence_from_log_probs(log_p_s, log_p_t, divergence, beta, log_m).sum() * scale
            if grads_wanted:
                g = _grad_from_log_probs(log_p_s, log_p_t, divergence, beta, t, log_m).mul_(scale)  # (c, V)
                if need[0]:
                    grad_h.index_copy_(0, idx, (g.to(weight_s.dtype) @ weight_s).to(grad_h.dtype))  # (c, D)
                if need[1]:
                    grad_w.addmm_(g.T, h.to(dtype))  # (V, D) += (V, c) @ (c, D)
                if need[2]:
                    grad_b.add_(g.sum(dim=0))  # (V,)
                del g
            del log_p_s, log_p_t, log_m  # freed before the next chunk's are made
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight_s.dtype),
            None if grad_b is None else grad_b.to(bias_s.dtype),
        )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None, None)


def _teacher_logits(teacher: tuple[Tensor, Tensor | None, Tensor | None], idx: Tensor) -> Tensor:
    """The teacher's logits of the rows ``idx``, (c, V): read from its logits, or computed from hidden @ weight.T."""
    first, weight_t, bias_t = teacher
    rows = first.index_select(0, idx)  # (c, V) logits or (c, D_t) hidden states
    return rows if weight_t is None else F.linear(rows, weight_t, bias_t)


def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, side: str) -> None:
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"Expected `hidden_{side}` (..., D) and `weight_{side}` (V, D) with the same D but got "
            f"{_shape(hidden)} and {_shape(weight)}."
        )
    if bias is not None and _shape(bias) != (weight.shape[0],):
        raise ValueError(
            f"Expected `bias_{side}` to have shape ({weight.shape[0]},) (the rows of `weight_{side}`) but got "
            f"{_shape(bias)}."
        )


def fused_linear_divergence(
    hidden_s: Tensor,
    weight_s: Tensor,
    logits_t: Tensor | None = None,
    hidden_t: Tensor | None = None,
    weight_t: Tensor | None = None,
    mask: Tensor | None = None,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    chunk_size: int = 1024,
    bias_s: Tensor | None = None,
    bias_t: Tensor | None = None,
) -> Tensor:
    """A token-level divergence between the student's LM head applied to its hidden states and the teacher, chunked.

    Equals ``losses.generalized_jsd(F.linear(hidden_s, weight_s, bias_s), logits_t, mask, beta, temperature)`` (or
    :func:`~lit_kd.losses.forward_kl`, :func:`~lit_kd.losses.reverse_kl`, :func:`~lit_kd.losses.total_variation`
    for the other ``divergence`` names), value and gradients, without ever holding the (N, V) student logits.

    Args:
        hidden_s: Student last hidden states, (B, L, D) or (N, D).
        weight_s: Student LM-head weight, (V, D) (``lm_head.weight``).
        logits_t: Teacher logits, (B, L, V) or (N, V); or give ``hidden_t`` and ``weight_t`` instead.
        hidden_t: Teacher last hidden states, (B, L, D_t) or (N, D_t), with ``weight_t``.
        weight_t: Teacher LM-head weight, (V, D_t).
        mask: Which tokens count: (B, L) or (N,), True where a token counts; ``None`` for all. Masked tokens are
            skipped: their logits are never computed.
        divergence: ``"jsd"``, ``"forward_kl"``, ``"reverse_kl"`` or ``"tvd"`` (see
            :func:`lit_kd.losses.per_token_divergence`).
        beta: The JSD's mixture weight of the teacher, in [0, 1]; ignored by the other divergences.
        temperature: A float, or per-token temperatures (N,) / (N, 1), or (B,), (B, L), (B, L, 1); no gradient.
        chunk_size: Tokens per chunk; the peak memory grows with ``chunk_size * V``.
        bias_s: Student LM-head bias, (V,), or ``None``.
        bias_t: Teacher LM-head bias, (V,), or ``None``.

    Returns:
        A scalar: the mean over valid tokens of the divergence summed over the vocabulary (float32 for half and
        bfloat16 inputs); 0 with a gradient path when no token is valid. Gradients reach ``hidden_s``, ``weight_s``
        and ``bias_s``; the teacher's inputs get none.

    Raises:
        ValueError: For inconsistent shapes (naming both), both or neither teacher form, or a bad scalar argument.
    """
    if chunk_size is None:
        raise ValueError("Expected `chunk_size` to be an integer > 0 but got None.")
    check_divergence_args(divergence, beta, temperature, chunk_size)
    _check_linear(hidden_s, weight_s, bias_s, "s")
    lead, vocab = _shape(hidden_s)[:-1], weight_s.shape[0]
    if (logits_t is None) == (hidden_t is None and weight_t is None):
        raise ValueError(
            "Expected either `logits_t` or both `hidden_t` and `weight_t` for the teacher but got "
            f"{'both' if logits_t is not None else 'neither'}."
        )
    if logits_t is not None:
        if _shape(logits_t) != (*lead, vocab):
            raise ValueError(
                f"Expected `logits_t` to have shape {(*lead, vocab)} (`hidden_s` without D, then V of `weight_s`) but "
                f"got {_shape(logits_t)}."
            )
        teacher = (logits_t.detach().reshape(-1, vocab), None, None)
    else:
        if hidden_t is None or weight_t is None:
            raise ValueError("Expected both `hidden_t` and `weight_t` for the teacher but got only one of them.")
        _check_linear(hidden_t, weight_t, bias_t, "t")
        if _shape(hidden_t)[:-1] != lead or weight_t.shape[0] != vocab:
            raise ValueError(
                f"Expected `hidden_t` and `weight_t` to give logits of the student's shape {(*lead, vocab)} but got "
                f"{_shape(hidden_t)} and {_shape(weight_t)}."
            )
        detached_bias = None if bias_t is None else bias_t.detach()
        teacher = (hidden_t.detach().reshape(-1, hidden_t.shape[-1]), weight_t.detach(), detached_bias)
    if mask is not None and _shape(mask) != lead:
        raise ValueError(f"Expected `mask` to have shape {lead} (`hidden_s` without D) but got {_shape(mask)}.")
    # _row_temperature reads only the logits' shape: an expanded 0-d tensor stands in for them without allocating.
    t = _row_temperature(temperature, hidden_s.new_empty(()).expand(*lead, vocab))
    tensor_t = t if isinstance(t, Tensor) and t.dim() > 0 else None
    scalar_t = float(t) if tensor_t is None else 1.0
    flat = hidden_s.reshape(-1, hidden_s.shape[-1])  # (N, D)
    rows = _valid_rows(None if mask is None else mask.bool(), flat.shape[0], flat.device)  # (N_valid,)
    return _FusedLinearDivergence.apply(
        flat, weight_s, bias_s, teacher, rows, tensor_t, scalar_t, divergence, beta, chunk_size, torch.is_grad_enabled()
    )
