"""Loss math for knowledge tracing, as pure functions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_bce_with_logits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean binary cross-entropy over the positions where ``mask`` is True.

    ``loss = sum_i mask_i * -(y_i log sigmoid(z_i) + (1 - y_i) log(1 - sigmoid(z_i))) / sum_i mask_i``

    Args:
        logits: (B, L) logits ``z``.
        targets: (B, L) 0/1 targets ``y`` (any dtype; cast to the logits' dtype).
        mask: (B, L) bool, True where the position counts.

    Returns:
        A scalar; 0 (with a gradient path) when the mask is empty.
    """
    per_position = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")  # (B, L)
    weights = mask.to(logits.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)
