"""The causal KT models' input at position ``t``: interaction ``t - 1``, and a learned start token at ``t = 0``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def previous_interactions(interactions: Tensor, embedding: nn.Embedding, start: Tensor) -> tuple[Tensor, Tensor]:
    """Ids of the interaction before each position, and the table to look them up in.

    The start token is appended to the embedding table as one more row, so a caller gathers every position, the
    first included, in one ``F.embedding(ids, table, padding_idx=0)`` (no ``torch.where`` over the rows and its
    backward); ``padding_idx=0`` keeps padding's row 0 out of the gradient, as ``embedding``'s own lookup does.

    Args:
        interactions: (B, L) interaction ids, 0 for padding.
        embedding: The interaction embedding, ``num_embeddings`` rows of width E.
        start: (E,) the learned start token.

    Returns:
        ``ids`` (B, L), ``ids[:, 0]`` the start token's row and ``ids[:, t]`` = ``interactions[:, t - 1]``; and
        ``table`` (num_embeddings + 1, E).
    """
    ids = torch.nn.functional.pad(interactions[:, :-1], (1, 0), value=embedding.num_embeddings)  # (B, L)
    return ids, torch.cat([embedding.weight, start[None]])
