"""Distilling knowledge-tracing models: the adaptor that tells a distiller what a KT model's outputs mean.

``lit_kt`` does not depend on any distillation package: the adaptor returns a plain dict of the fields a distiller
reads (the field names of ``lit_kd.ModelView``), so a ``lit-kd`` config names it directly::

    teacher_adaptor: lit_kt.kt_adaptor
    student_adaptor: lit_kt.kt_adaptor
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["kt_adaptor"]


def kt_adaptor(batch: Mapping[str, Tensor], outputs: Tensor) -> dict[str, Tensor]:
    """Reads a KT model's outputs on a :mod:`lit_kt` batch: (B, L) binary logits over the scored positions.

    Use with a binary KD loss (``kd_loss_type="bce"``): the teacher's soft targets are its probabilities of a
    correct answer.

    Args:
        batch: A batch of :func:`~lit_kt.data.collate_kt`; ``mask`` (B, L) marks the scored positions and
            ``responses`` (B, L) holds the answers (0/1).
        outputs: The model's (B, L) logits of a correct answer.

    Returns:
        ``{"logits": outputs, "logits_mask": batch["mask"], "labels": batch["responses"]}``.

    Example:
        >>> import torch
        >>> batch = {"mask": torch.tensor([[True, False]]), "responses": torch.tensor([[1, 0]])}
        >>> sorted(kt_adaptor(batch, torch.zeros(1, 2)))
        ['labels', 'logits', 'logits_mask']
    """
    return {"logits": outputs, "logits_mask": batch["mask"], "labels": batch["responses"]}
