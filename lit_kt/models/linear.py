"""A linear layer whose float32 products run on oneDNN on CPU, forward and backward.

PyTorch's CPU ``F.linear`` and ``torch.mm`` call MKL's ``sgemm``, which on AMD processors runs its AVX2 kernels
even where the core has AVX-512: measured on a 2-core AMD EPYC (Zen 5) with torch 2.13, one thread, (4400, 256) x
(256, 256) and (256, 512): 80-87 GFLOP/s. PyTorch also ships oneDNN, which picks its kernels from the instruction
set alone; its linear primitive (``torch.ops.mkldnn._linear_pointwise``, the op of ``torch.compile``'s CPU oneDNN
linear fusions) ran the same products at about 2.2 times that rate, the input gradient too, the weight gradient at
1.4-1.7 times (``python scripts/bench_kt_linear.py``; figures in ``docs/benchmarks.md``).
:func:`fast_linear` runs all three on it, in float32 (no reduced precision: results agree with ``F.linear`` to
float32 rounding, about 1e-6 relative). Where that op cannot serve (another device, another dtype, CPU autocast,
``torch.compile``, a PyTorch built without oneDNN) it is ``F.linear``; so is a call with mismatched shapes, so that
the error is ``F.linear``'s, naming both shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = _onednn_linear_available()


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` on oneDNN: x (N, K), weight (M, K) (strided views accepted) -> (N, M)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _grad_weight(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out.T @ x`` on oneDNN: grad_out (N, M), x (N, K) -> (M, K) contiguous.

    Computed as ``(x.T @ grad_out).T``: oneDNN ran that order faster than ``grad_out.T @ x`` at SAKT's shapes.
    """
    return _mm(x.t(), grad_out.t()).t().contiguous()


class OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with every product on oneDNN: ``dx = dy @ weight``, ``dweight = dy.T @ x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()  # (N, K)
        ctx.save_for_backward(x, weight)
        ctx.shape, ctx.has_bias = shape, bias is not None
        return _mm(x, weight, bias).view(*shape[:-1], weight.shape[0])  # (..., M)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors  # (N, K), (M, K)
        grad_out = grad_out.reshape(-1, weight.shape[0]).contiguous()  # (N, M)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad_out, weight.t()).view(ctx.shape)  # (..., K) = dy @ W
        if ctx.needs_input_grad[1]:
            grad_weight = _grad_weight(grad_out, x)  # (M, K) = dy^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=0)  # (M,)
        return grad_x, grad_weight, grad_bias


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for float32 CPU tensors (see the module docstring).

    Args:
        x: (..., K) input.
        weight: (M, K).
        bias: (M,) or ``None``.

    Returns:
        (..., M).
    """
    if (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        # Mismatched shapes go to F.linear, whose error names them (oneDNN's does not).
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == (weight.shape[0],))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and initialisation) computed by :func:`fast_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_linear(x, self.weight, self.bias)
