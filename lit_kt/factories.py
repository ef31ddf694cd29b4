"""Factories that build knowledge-tracing models for YAML configs, e.g. a trained model as a distillation teacher.

LightningCLI accepts a function as ``class_path`` when its return type fits the argument, so a ``lit-kd`` config can
say::

    teacher:
      class_path: lit_kt.model_from_checkpoint
      init_args: {checkpoint: runs/sakt_synthetic/checkpoints/best.ckpt}
"""

from __future__ import annotations

import os

from torch import nn

from lit_kt.module import KTModule

__all__ = ["model_from_checkpoint"]


def model_from_checkpoint(checkpoint: str) -> nn.Module:
    """The knowledge-tracing model (SAKT, DKT) of a ``lit-kt`` checkpoint, on the CPU.

    Args:
        checkpoint: A Lightning checkpoint of a :class:`~lit_kt.module.KTModule` (e.g. written by ``lit-kt fit``).

    Returns:
        The module's ``model`` (a :class:`~lit_kt.models.SAKT` or :class:`~lit_kt.models.DKT`), without Lightning.

    Raises:
        FileNotFoundError: If ``checkpoint`` is not a file.
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"Expected a lit-kt checkpoint at `checkpoint`={checkpoint!r} but it does not exist; train the model "
            "first (e.g. `lit-kt fit --config configs/sakt_synthetic.yaml`)."
        )
    return KTModule.load_from_checkpoint(checkpoint, map_location="cpu").model
