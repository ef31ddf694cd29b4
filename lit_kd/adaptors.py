"""Adaptors: how ``DistillationModule`` reads a model's outputs.

Contract: an adaptor is a callable ``adaptor(batch, outputs) -> ModelView``. ``batch`` is the part of the batch the
model was called with (for a batch with ``teacher``/``student`` parts, that model's part), ``outputs`` whatever the
model returned. The view names what the losses need; fields a model does not provide stay ``None``. Parameterise an
adaptor with ``functools.partial`` (it pickles, and LightningCLI accepts it as a callable).

How the module calls a model: with the batch's entries that the model's ``forward`` accepts (by name), plus, for a
``transformers`` model, ``output_hidden_states`` / ``output_attentions`` when a match needs them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ModelView:
    """What distillation reads from one forward pass.

    Attributes:
        logits: (N, C) class logits, (B, L, C) token logits, or (B, L) / (N,) binary logits (``kd_loss_type="bce"``).
        logits_mask: Bool mask over the logits' leading dims (e.g. (B, L) scored positions); ``None`` for all.
        labels: Gold labels for the hard-label loss and the metrics, shaped like ``logits`` without the class dim.
        hidden_states: Per-layer (B, L, D) features, index 0 usually the embeddings.
        attentions: Per-layer (B, H, L, L) attention maps.
        attention_scores: Whether ``attentions`` are raw scores (True) or probabilities (False, as ``transformers``).
        input_mask: (B, L) bool/0-1 mask of real tokens, used by the intermediate matches.
        losses: The model's own losses (e.g. ``outputs.loss``); summed as the hard-label loss when present.
    """

    logits: Tensor
    logits_mask: Tensor | None = None
    labels: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | list[Tensor] | None = None
    attentions: tuple[Tensor, ...] | list[Tensor] | None = None
    attention_scores: bool = False
    input_mask: Tensor | None = None
    losses: list[Tensor] = field(default_factory=list)


Adaptor = Callable[[Any, Any], ModelView]


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def default_adaptor(batch: Mapping[str, Any], outputs: Any) -> ModelView:
    """Reads ``transformers`` outputs, dicts with the same keys, or a bare logits tensor.

    ``logits``, ``hidden_states``, ``attentions`` and ``loss`` come from the outputs; ``labels`` and the input mask
    (``attention_mask``) from the batch.
    """
    if isinstance(outputs, Tensor):
        logits, loss = outputs, None
    else:
        logits, loss = _get(outputs, "logits"), _get(outputs, "loss")
        if logits is None:
            raise ValueError(
                f"Expected the model's outputs to have `logits` but got {type(outputs).__name__} without them; "
                "pass a `teacher_adaptor`/`student_adaptor` that reads your model's outputs."
            )
    return ModelView(
        logits=logits,
        labels=batch.get("labels") if isinstance(batch, Mapping) else None,
        hidden_states=None if isinstance(outputs, Tensor) else _get(outputs, "hidden_states"),
        attentions=None if isinstance(outputs, Tensor) else _get(outputs, "attentions"),
        input_mask=batch.get("attention_mask") if isinstance(batch, Mapping) else None,
        losses=[loss] if loss is not None else [],
    )


def kt_adaptor(batch: Mapping[str, Tensor], outputs: Tensor) -> ModelView:
    """Knowledge tracing (:mod:`lit_kt` batches and models): (B, L) binary logits over the scored positions.

    Use with ``kd_loss_type="bce"``: the teacher's soft targets are its probabilities of a correct answer.
    """
    return ModelView(logits=outputs, logits_mask=batch["mask"], labels=batch["responses"])


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (without importing transformers eagerly)."""
    return any(
        cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__
    )


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model alone: ``save_pretrained`` (a folder) for ``transformers`` models, else a state dict file."""
    path = Path(path)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def call_model(
    model: nn.Module, batch: Any, output_hidden_states: bool = False, output_attentions: bool = False
) -> Any:
    """Call ``model`` with the entries of ``batch`` its ``forward`` accepts (or the batch itself if not a dict)."""
    if not isinstance(batch, Mapping):
        return model(batch)
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in batch.items() if k in params or (takes_any and k not in ("index", "task"))}
    if is_transformers_model(model):
        kwargs["output_hidden_states"] = output_hidden_states
        kwargs["output_attentions"] = output_attentions
        kwargs.setdefault("return_dict", True)
    return model(**kwargs)
