"""``CausalLMModule``: train a causal language model (e.g. the teacher of a distillation) on next-token prediction.

The model is any ``transformers`` causal LM (``GPT2LMHeadModel``, a :func:`lit_kd.lm_factories.gpt2_lm`) or any
module called as ``model(input_ids=..., attention_mask=...)`` returning (B, L, V) logits (a tensor, a dict with
``logits`` or an output object). The loss is the shifted cross-entropy: the logits at position ``t`` predict token
``t + 1``, over the positions whose next label is not -100 (padding; :class:`~lit_kd.lm_data.
LanguageModelingDataModule` writes -100 there), averaged over those tokens, i.e. ``transformers``' own causal-LM
loss, computed here so that every model trains on the same objective.

Logged: ``train/loss``; ``val/loss`` and ``val/ppl`` (``torchmetrics.text.Perplexity(ignore_index=-100)`` on the
shifted logits: ``exp`` of the mean cross-entropy over every scored token of the split), ``test/...`` likewise.

The checkpoint also keeps the model's ``transformers`` config (``checkpoint["lm_config"]``, a JSON string), so that
:func:`lit_kd.lm_factories.gpt2_from_checkpoint` rebuilds the model without being told its sizes.

Example:
    >>> model = gpt2_lm(n_layer=4, n_embd=256)  # doctest: +SKIP
    >>> module = CausalLMModule(model, optimizer=partial(torch.optim.AdamW, lr=1e-3))  # doctest: +SKIP
    >>> L.Trainer(max_steps=1000).fit(module, LanguageModelingDataModule("../shared/data/nlp/sst2"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

__all__ = ["LM_CONFIG_KEY", "CausalLMModule", "shifted_logits_and_labels"]

IGNORE_INDEX = -100
LM_CONFIG_KEY = "lm_config"
"""Checkpoint entry holding the model's ``transformers`` config as a JSON string (when the model has one)."""


def shifted_logits_and_labels(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The next-token pairs of a causal LM: ``logits[:, :-1]`` (B, L-1, V) and ``labels[:, 1:]`` (B, L-1).

    The labels are ``batch["labels"]``, or ``input_ids`` without them; either way -100 where ``attention_mask`` (when
    present) is 0, so padding is never predicted whatever its label.

    Raises:
        ValueError: If the shapes do not fit (logits (B, L, V), labels (B, L)).
    """
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected (B, L, V) logits and (B, L) labels of the same B and L but got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    return logits[:, :-1], labels[:, 1:]


class CausalLMModule(L.LightningModule):
    """Trains a causal language model with the shifted next-token cross-entropy and reports its perplexity.

    Args:
        model: The language model (see the module docstring); Lightning keeps the train/eval mode it is in when
            ``fit`` starts (``from_pretrained`` returns eval mode: call ``model.train()`` for dropout).
        optimizer: Builds the optimizer from the model's trainable parameters.
        lr_scheduler: Builds a learning-rate scheduler, stepped after every optimizer step; ``None`` for none.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module but got {type(model).__name__}.")
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        metrics = MetricCollection({"ppl": Perplexity(ignore_index=IGNORE_INDEX)})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The model's logits for ``batch`` (``input_ids`` and optionally ``attention_mask``): (B, L, V)."""
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"]
        out = self.model(**inputs)
        logits = out if isinstance(out, Tensor) else out["logits"] if isinstance(out, Mapping) else out.logits
        return logits.float()

    def loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy over the scored positions (see the module docstring)."""
        return self._shared_step(batch)[0]

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, labels = self._shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.model.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states made under inference mode; fresh ones avoid that.
        self.val_metrics.reset()
        self.test_metrics.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        config = getattr(self.model, "config", None)
        if config is not None and callable(getattr(config, "to_json_string", None)):
            checkpoint[LM_CONFIG_KEY] = config.to_json_string(use_diff=False)

    # ------------------------------------------------------------------ internals
    def _shared_step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits, labels = shifted_logits_and_labels(self(batch), batch)
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError(
                "Expected at least one scored next token in the batch (a sentence of >= 2 tokens) but every label "
                "after the first position is -100 or padding."
            )
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return loss, logits, labels

    def _eval_step(self, batch: Mapping[str, Tensor], stage: str, metrics: MetricCollection) -> None:
        loss, logits, labels = self._shared_step(batch)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, batch_size=labels.shape[0], sync_dist=True)
        self.log_dict(metrics, prog_bar=True, batch_size=labels.shape[0])
