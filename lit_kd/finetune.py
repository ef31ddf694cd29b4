"""``ClassifierModule``: supervised fine-tuning of any classifier on gold labels (TextBrewer's ``BasicTrainer`` role).

Use it to fine-tune a teacher before distilling it, or to train a student without distillation as a baseline. The
model is called like :class:`~lit_kd.module.DistillationModule` calls its models
(:func:`~lit_kd.adaptors.call_model`: the batch entries its ``forward`` accepts) and read with
:func:`~lit_kd.adaptors.default_adaptor`, so ``transformers`` classifiers, :class:`~lit_kd.students.BiGRUClassifier`
and models returning a bare logits tensor all work; ``inputs`` says which batch entries feed which ``forward``
argument when the names differ. The loss is cross-entropy of the logits against ``batch[label_key]``, computed
here rather than taken from the model's own ``loss``, so every model trains on the same objective.

Lightning keeps the train/eval mode the model is in when ``fit`` starts, and ``from_pretrained`` returns models in
eval mode: call ``model.train()`` first to fine-tune with dropout.

Logged: ``train/loss``; ``val/loss`` and ``val/acc`` (``test/...`` likewise), accuracy being a torchmetrics object.

Example:
    >>> from functools import partial
    >>> teacher = load_teacher(minilm_path(), num_labels=2).train()  # doctest: +SKIP
    >>> module = ClassifierModule(teacher, optimizer=partial(torch.optim.AdamW, lr=5e-5))  # doctest: +SKIP
    >>> L.Trainer(max_steps=300).fit(module, datamodule)  # doctest: +SKIP
    >>> module.export_model("runs/teacher")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lit_kd.adaptors import Inputs, call_model, check_inputs, default_adaptor, model_num_labels
from lit_kd.export import save_model

__all__ = ["ClassifierModule"]


class ClassifierModule(L.LightningModule):
    """Trains a classifier with cross-entropy on the gold labels and reports its accuracy.

    Args:
        model: The classifier; called with the batch entries its ``forward`` accepts and read with
            :func:`~lit_kd.adaptors.default_adaptor` (``transformers`` output, dict with ``logits``, or a tensor).
        num_labels: Number of classes, for the accuracy metric and the shape check; ``None`` for the model's own
            (``config.num_labels``); ``lit-kd`` links it from the data.
        optimizer: Builds the optimizer from the model's trainable parameters.
        lr_scheduler: Builds a learning-rate scheduler, stepped after every optimizer step; ``None`` for none.
        label_key: The batch entry holding the class ids (B,).
        inputs: Which batch entries feed the model's ``forward``: ``None`` (the entries named like its parameters,
            except ``label_key``), a key map ``{parameter: batch_key}`` or a function ``inputs(batch)`` (see
            :func:`~lit_kd.adaptors.call_model`).

    Raises:
        ValueError: If ``num_labels`` is < 2, or None while the model does not say its class count.
    """

    def __init__(
        self,
        model: nn.Module,
        num_labels: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_key: str = "labels",
        inputs: Inputs = None,
    ) -> None:
        super().__init__()
        if num_labels is None:
            num_labels = model_num_labels(model)
            if num_labels is None:
                raise ValueError(
                    "Expected `num_labels` (the number of classes) but got None and the model does not say its class "
                    f"count ({type(model).__name__} has no `config.num_labels` or `num_labels`)."
                )
        if num_labels < 2:
            raise ValueError(f"Expected `num_labels` to be >= 2 but got {num_labels}.")
        check_inputs(inputs, "inputs")
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler", "inputs"])
        self.hparams.num_labels = num_labels
        self.inputs = inputs
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_labels, average="micro")})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Any) -> Tensor:
        """The model's logits for ``batch``: (B, C)."""
        return self._logits(batch)[0]

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, labels = self._shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.numel())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class ids, (B,)."""
        return self._logits(batch)[0].argmax(-1)

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

    # ------------------------------------------------------------------ public helpers
    def loss(self, batch: Any) -> Tensor:
        """Mean cross-entropy of the model's logits (B, C) against ``batch[label_key]`` (B,)."""
        return self._shared_step(batch)[0]

    def export_model(self, path: str | os.PathLike) -> Path:
        """Write the model alone: ``save_pretrained`` for ``transformers`` models, else a state dict file.

        Args:
            path: A folder for ``transformers`` models; a file (e.g. ``model.pt``) otherwise.

        Returns:
            The path written.
        """
        return save_model(self.model, path)

    # ------------------------------------------------------------------ internals
    def _logits(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        # Without the labels the model computes no loss of its own: the loss is this module's cross-entropy.
        key = self.hparams.label_key
        inputs = {k: v for k, v in batch.items() if k != key} if isinstance(batch, Mapping) else batch
        outputs = call_model(self.model, batch if self.inputs is not None else inputs, inputs=self.inputs)
        view = default_adaptor(batch, outputs, labels_key=key)
        return view.logits.float(), view.labels  # (B, C), (B,)

    def _shared_step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        logits, labels = self._logits(batch)
        if labels is None:
            raise ValueError(
                f"Expected the batch to hold `{self.hparams.label_key}` (class ids, (B,); `label_key`) but it has none."
            )
        if logits.dim() != 2 or logits.shape[-1] != self.hparams.num_labels:
            raise ValueError(
                f"Expected the model's logits to have shape (B, {self.hparams.num_labels}) (`num_labels`) but got "
                f"{tuple(logits.shape)}."
            )
        return F.cross_entropy(logits, labels), logits, labels

    def _eval_step(self, batch: Any, stage: str, metrics: MetricCollection) -> None:
        loss, logits, labels = self._shared_step(batch)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, batch_size=labels.numel(), sync_dist=True)  # one reduction, at epoch end
        self.log_dict(metrics, prog_bar=True, batch_size=labels.numel())
