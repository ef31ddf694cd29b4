"""Factories that build knowledge-tracing models for YAML configs, e.g. a trained model as a distillation teacher.

LightningCLI accepts a function as ``class_path`` when its return type fits the argument, so a ``lit-kd`` config can
say::

    teacher:
      class_path: lit_kt.model_from_checkpoint
      init_args: {checkpoint: runs/sakt_synthetic/checkpoints/best.ckpt}
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_kt.module import KTModule, _model_class

__all__ = ["model_from_checkpoint"]


def model_from_checkpoint(checkpoint: str) -> nn.Module:
    """The knowledge-tracing model (SAKT, DKT) of a ``lit-kt`` checkpoint, on the CPU.

    Args:
        checkpoint: A Lightning checkpoint of a :class:`~lit_kt.module.KTModule` (e.g. written by ``lit-kt fit``).

    Returns:
        The module's ``model`` (a :class:`~lit_kt.models.SAKT` or :class:`~lit_kt.models.DKT`), without Lightning.

    The checkpoint is read with ``torch.load(..., weights_only=True)``, and its model's ``class_path`` is checked
    before anything is imported: it must name an ``nn.Module`` subclass in a trusted module
    (:func:`lit_kt.module.allow_model_modules`).

    Raises:
        FileNotFoundError: If ``checkpoint`` is not a file.
        ValueError: If the file is empty, truncated or not a ``lit-kt`` checkpoint (no ``state_dict``, no model
            ``class_path``), if it holds pickled objects that ``weights_only=True`` refuses (a function, a class), or
            if its ``class_path`` is outside the trusted modules.
        TypeError: If its ``class_path`` names something else than an ``nn.Module`` subclass.
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"Expected a lit-kt checkpoint at `checkpoint`={checkpoint!r} but it does not exist; train the model "
            "first (e.g. `lit-kt fit --config configs/sakt_synthetic.yaml`)."
        )
    hyper_parameters = _read_checkpoint(checkpoint).get("hyper_parameters")
    spec = hyper_parameters.get("model") if isinstance(hyper_parameters, Mapping) else None
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            f"Expected `checkpoint` to be a lit-kt checkpoint whose `hyper_parameters.model` holds the model's "
            f"`class_path` but {checkpoint} holds {spec!r}."
        )
    _model_class(spec["class_path"], f"the checkpoint {checkpoint}")  # refused here, naming the file, if untrusted
    return KTModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).model


def _read_checkpoint(checkpoint: str) -> dict[str, Any]:
    """The checkpoint loaded with ``weights_only=True``; a ``ValueError`` naming it if it is not a checkpoint."""
    path = Path(checkpoint)
    head = f"Expected `checkpoint` to be a Lightning checkpoint that loads with `weights_only=True` but {path}"
    if path.stat().st_size == 0:
        raise ValueError(f"{head} is empty (0 bytes).")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:", 1)[-1].strip().split("\n", 1)[0].split(". Please", 1)[0]
        raise ValueError(
            f"{head} holds pickled objects other than tensors and plain containers, which are refused since loading "
            f"them could run code: {reason}"
        ) from e
    except (MemoryError, PermissionError):
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for files it cannot parse
        first = str(e).strip().split("\n", 1)[0]
        raise ValueError(
            f"{head} is not a readable torch file (truncated, or another kind of file): {type(e).__name__}: {first}"
        ) from e
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("state_dict"), Mapping):
        got = f"keys {sorted(map(str, loaded))[:5]}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"Expected `checkpoint` to be a Lightning checkpoint (a dict with a `state_dict`) but {path} holds {got}."
        )
    return dict(loaded)
