"""Where a right-padded batch's rows end, and whether a model may skip the padding.

The KT models' CPU fast paths cut each row at its last real position. Cutting needs data-dependent shapes and the
lengths on the host: on an accelerator that would synchronise it with the host every step, and under
``torch.compile`` it would break the graph; there the models run on the padded tensors instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_lengths(ids: Tensor) -> Tensor:
    """(B,) one past each row's last non-zero id in ``ids`` (B, L); 0 for an all-padding row.

    Nothing after a row's last real position can reach a real position of a causal model, so it may be skipped;
    zeros inside a row stay part of it.
    """
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # (L,)
    return ((ids > 0) * positions).amax(dim=1)  # (B,)


def may_skip_padding(x: Tensor) -> bool:
    """Whether a fast path with data-dependent shapes may run on ``x``: on CPU, outside ``torch.compile``."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
