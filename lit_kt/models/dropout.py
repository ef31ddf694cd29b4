"""Dropout whose random mask is cheap to draw on CPU.

``torch.nn.functional.dropout`` on CPU draws one Bernoulli variate per element; for SAKT's (B, H, L, L) attention
weights that draw alone was a quarter of a training step. :func:`fast_dropout` draws 64 random bits per *four*
elements instead (one ``int64`` viewed as four ``int16``) and keeps an element when its 16 bits are at or above a
threshold. The drop probability is therefore ``p`` rounded to a multiple of 1/65536 (0.2 becomes 13107/65536 =
0.19999695); kept elements are scaled by ``1 / (1 - p_used)`` with that same probability, so the output's
expectation is exactly the input, as with ``nn.Dropout``. Randomness comes from torch's default generator:
``torch.manual_seed`` makes it reproducible (masks differ from ``nn.Dropout``'s for the same seed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_LEVELS = 65536  # 16 random bits per element


def quantized_drop_probability(p: float) -> float:
    """The drop probability :func:`fast_dropout` really uses for ``p``: ``round(p * 65536) / 65536``."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A bool mask of ``shape``, ``True`` (kept) with probability ``1 - p_used`` (``p_used``: see above).

    The mask :func:`dropout_mask` scales; a caller that multiplies by it in place (``x.mul_(keep)``, one byte read per
    element instead of four) applies :func:`kept_scale` to a smaller tensor, e.g. the values of an attention.
    ``generator`` (default: torch's global one) lets a caller draw the same masks again, e.g. in a backward pass.
    """
    threshold = round(p * _LEVELS)
    numel = 1
    for size in shape:
        numel *= size
    # Uniform 64-bit words without torch.randint(-2**63, 2**63 - 1, ...)'s 64-bit modulo per word: the full-range
    # draw returns the generator's raw words. On CPU randint's words are those with the top bit flipped, flipped back
    # here, so the masks are the ones randint gave (other devices may consume their generator differently).
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    words.bitwise_xor_(-(2**63))
    bits = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    return bits >= threshold - _LEVELS // 2  # P(keep) = 1 - threshold / 65536


def kept_scale(p: float) -> float:
    """``1 / (1 - p_used)``, the factor inverted dropout gives kept elements (``p_used`` < 1: see above)."""
    threshold = round(p * _LEVELS)
    return _LEVELS / (_LEVELS - threshold)


def dropout_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A mask of ``shape`` holding ``1 / (1 - p_used)`` where kept and 0 where dropped (``p_used``: see above).

    ``generator`` (default: torch's global one) lets a caller draw the same masks again, e.g. in a backward pass.
    """
    keep = keep_mask(shape, p, device, generator)
    # uint8 -> float converts faster than bool -> float on CPU; the bytes are the same.
    return keep.view(torch.uint8).to(dtype).mul_(kept_scale(p))


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of ``x`` with a 16-bit-resolution drop probability (see the module docstring).

    Args:
        x: Any floating tensor.
        p: Drop probability in [0, 1].
        training: Identity when ``False`` (as ``F.dropout``).

    Returns:
        ``x`` times a random mask (a new tensor), or ``x`` itself when not training or ``p`` rounds to 0.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected dropout probability `p` in [0, 1] but got {p}.")
    threshold = round(p * _LEVELS)
    if not training or threshold == 0:
        return x
    if threshold == _LEVELS:
        return torch.zeros_like(x)
    return x * dropout_mask(x.shape, p, x.dtype, x.device)


class FastDropout(nn.Module):
    """``nn.Dropout`` drawing its mask with :func:`fast_dropout` (drop probability rounded to a multiple of 1/65536).

    Args:
        p: Drop probability in [0, 1].
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Expected dropout probability `p` in [0, 1] but got {p}.")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
