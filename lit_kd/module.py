"""``DistillationModule``: train a student to imitate one or several frozen teachers, the Lightning way.

The maths live in :class:`~lit_kd.distiller.Distiller` (Lightning-free, shared with
:class:`~lit_kd.callback.DistillationCallback`); this module adds the student, the optimizer, logging, metrics and the
checkpoint policy. Total loss per training step (``p`` is the training progress,
``global_step / estimated_stepping_batches``):

    ``loss = w_kd(p) * kd(z_s, z_t, T) + w_hard(p) * hard + sum_m weight_m * match_m``

``kd`` is ``config.kd_loss_type`` on the logits (built-in losses scaled per sample by ``T**2`` when
``config.scale_by_temperature_squared``), ``hard`` is ``config.hard_label_loss`` or, by default, the sum of the
student's own losses (``ModelView.losses``) or, when it reports none, cross-entropy (binary cross-entropy for
``kd_loss_type="bce"``) on the gold labels, and each ``match_m`` an intermediate-layer loss
(:class:`~lit_kd.config.IntermediateMatch`) on hidden states, attentions or named modules' outputs, with a
trainable projection of the student's feature when the widths differ.

Already a LightningModule of your own? Add :class:`~lit_kd.callback.DistillationCallback` to its Trainer instead.

TextBrewer's ``TrainingConfig``/``train()`` arguments map onto the Lightning Trainer:

=============================  ====================================================================
TextBrewer                     Lightning
=============================  ====================================================================
``num_steps``/``num_epochs``   ``Trainer(max_steps=...)`` / ``Trainer(max_epochs=...)``
``max_grad_norm``              ``Trainer(gradient_clip_val=...)``
``gradient_accumulation``      ``Trainer(accumulate_grad_batches=...)``
``fp16`` (Apex)                ``Trainer(precision="16-mixed"|"bf16-mixed")``
``scheduler_class/_args``      ``lr_scheduler=`` (an ``LRSchedulerCallable``; ``lr_scheduler_interval``)
``callback``                   ``validation_step`` metrics, or any ``lightning.Callback``
``batch_postprocessor``        ``LightningDataModule.on_after_batch_transfer`` or the collate function
``ckpt_frequency``             ``ModelCheckpoint(every_n_train_steps=...)``; resume with ``ckpt_path=``
=============================  ====================================================================

Teachers: frozen (``requires_grad_(False)``), kept in eval mode for the whole fit (also after validation), run under
``torch.no_grad()`` before the student in each training step (their views keep only the hidden states and attention
maps an intermediate match reads, ``None`` in place of the others, so the rest is freed before the student's forward),
never in the optimizer, optionally cast to bfloat16, and left out of checkpoints unless
``save_teacher=True`` (they are rebuilt from their own weights when the module is constructed again).

Several teachers: ``teacher`` is a list; their soft targets are averaged as logits (``teacher_reduce="logits"``) or
as probabilities (``"probs"``; implemented as the logits ``T * log(mean_i softmax(z_i / T))``, whose tempered
softmax is the mean distribution).

Several tasks: ``teacher`` (and the adaptors) may be dicts keyed by task name; each batch names its task in
``batch["task"]`` (a string). How tasks are sampled is the data's business: e.g. Lightning's
``CombinedLoader({...}, mode="max_size_cycle")`` after tagging each loader's batches with their task, or a sampler
that draws a task per batch with probabilities proportional to the dataset sizes (TextBrewer's default).

Different inputs for teacher and student (e.g. different tokenizers): a batch may carry ``teacher`` and ``student``
parts; each model is called with its part (top-level ``labels``/``task`` are shared). Which entries feed which
``forward`` argument: by name by default, or ``teacher_inputs``/``student_inputs`` (a key map or a function).

Inference: ``teacher`` may be ``None`` (``DistillationModule.load_from_checkpoint(ckpt, student=MyStudent())``
needs no teacher); only training needs one. For the student alone, ``lit_kd.export.load_student(ckpt)`` rebuilds
a ``transformers`` student from the checkpoint itself (or loads the weights into yours), reading no teacher.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy

from lit_kd.adaptors import Inputs, ModelView, model_num_labels
from lit_kd.config import DistillationConfig
from lit_kd.distiller import DEFAULT_TASK, Distiller
from lit_kd.export import STUDENT_RECORD_KEY, save_model, student_record

__all__ = ["DEFAULT_TASK", "DistillationModule", "training_progress"]


def training_progress(trainer: L.Trainer | None, global_step: int) -> float:
    """``global_step / estimated_stepping_batches`` in [0, 1]; 0 when the length of training is unknown."""
    total = trainer.estimated_stepping_batches if trainer is not None else float("inf")
    return min(1.0, global_step / total) if total and total != float("inf") else 0.0


class DistillationModule(L.LightningModule):
    """Distils one or several frozen teachers into a trainable student.

    Args:
        teacher: The teacher, a list of teachers (an ensemble), a dict ``{task: teacher or list}``, or ``None`` for
            a module used for inference only (e.g. loaded from a checkpoint without its teacher).
        student: The student; the only model that trains.
        config: What to distil (losses, temperature, weights, intermediate matches); ``None`` for the defaults.
        teacher_adaptor: ``adaptor(batch, outputs) -> ModelView`` for the teachers (or a dict per task); ``None``
            for :func:`~lit_kd.adaptors.default_adaptor` (``transformers`` outputs, dicts, or a logits tensor).
        student_adaptor: The same for the student.
        optimizer: Builds the optimizer from parameter groups (student; projections).
        lr_scheduler: Builds a learning-rate scheduler; ``None`` for none.
        lr_scheduler_interval: Step the scheduler after every optimizer ``"step"`` or every ``"epoch"``.
        projection_lr: Learning rate of the projection layers; ``None`` for the optimizer's.
        teacher_reduce: How several teachers' soft targets combine: mean of ``"logits"`` or of ``"probs"``.
        teacher_dtype: ``"float32"``, or ``"bfloat16"`` to halve the teachers' memory and time (outputs are cast
            back to float32 for the losses).
        save_teacher: Keep the teachers' weights in checkpoints. Default False: they are frozen, so the model
            that builds the module supplies them again; checkpoints stay small.
        metric_task: Validation/test metrics of the student: ``"multiclass"`` (accuracy) or ``"binary"`` (AUROC
            and accuracy of sigmoid outputs, e.g. knowledge tracing).
        num_labels: Classes for ``"multiclass"`` metrics; ``None`` for the student's own (``config.num_labels``
            of a ``transformers`` model, or its ``num_labels`` attribute). ``lit-kd`` links it from the data.
        teacher_cache: A folder written by :meth:`lit_kd.cache.TeacherCache.build`: the teacher's logits (full or
            top-k) and the hidden states the matches read are taken from it by ``batch["index"]`` instead of running
            the teacher (one teacher; hidden-state matches need their teacher layers cached; no attention matches).
            It is checked against the teacher's weights and the config here and against every batch's inputs.
        compile: Compile the student's (and live teachers') forward with ``torch.compile`` when the trainer sets the
            module up (``nn.Module.compile``: in place, so checkpoints keep their keys).
        compile_backend: The ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` only traces).
        teacher_inputs: Which batch entries feed the teachers' ``forward``: ``None`` (entries named like its
            parameters), a key map ``{parameter: batch_key}`` or a function ``inputs(batch)`` returning keyword
            (dict) or positional (tuple) arguments.
        student_inputs: The same for the student.

    Raises:
        ValueError: If ``num_labels`` is None for ``"multiclass"`` metrics and the student does not say its class
            count, or an argument is out of its range.
    """

    def __init__(
        self,
        teacher: nn.Module | list[nn.Module] | dict[str, nn.Module] | None = None,
        student: nn.Module | None = None,
        config: DistillationConfig | None = None,
        teacher_adaptor: Callable | dict[str, Callable] | None = None,
        student_adaptor: Callable | dict[str, Callable] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        projection_lr: float | None = None,
        teacher_reduce: Literal["logits", "probs"] = "logits",
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        save_teacher: bool = False,
        metric_task: Literal["multiclass", "binary"] = "multiclass",
        num_labels: int | None = None,
        teacher_cache: str | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        teacher_inputs: Inputs = None,
        student_inputs: Inputs = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        if student is None:
            raise ValueError("Expected `student` to be an nn.Module (the model that trains) but got None.")
        if metric_task not in ("multiclass", "binary"):
            raise ValueError(f"Expected `metric_task` to be 'multiclass' or 'binary' but got {metric_task!r}.")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"Expected `lr_scheduler_interval` to be 'step' or 'epoch' but got {lr_scheduler_interval!r}."
            )
        if num_labels is None and metric_task == "multiclass":
            num_labels = model_num_labels(student)
            if num_labels is None:
                raise ValueError(
                    "Expected `num_labels` (the classes of the metrics) but got None and the student does not say "
                    f"its class count ({type(student).__name__} has no `config.num_labels` or `num_labels`)."
                )
        self.save_hyperparameters(
            ignore=[
                "teacher",
                "student",
                "teacher_adaptor",
                "student_adaptor",
                "optimizer",
                "lr_scheduler",
                "config",
                "teacher_inputs",
                "student_inputs",
            ]
        )
        self.hparams.num_labels = num_labels
        distiller = Distiller(
            teacher,
            config,
            teacher_adaptor=teacher_adaptor,
            student_adaptor=student_adaptor,
            teacher_inputs=teacher_inputs,
            student_inputs=student_inputs,
            teacher_reduce=teacher_reduce,
            teacher_dtype=teacher_dtype,
            teacher_cache=teacher_cache,
        )
        # The distiller's modules are registered here under their historical names (`teachers.*`, `projections.*`
        # in checkpoints); the distiller itself is kept unregistered so that they are not registered twice.
        self.__dict__["distiller"] = distiller
        self.teachers = distiller.teachers
        self.projections = distiller.projections
        self.config = distiller.config
        self.student = student
        distiller.prepare_student(student)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        if metric_task == "multiclass":
            metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_labels, average="micro")})
        else:
            metrics = MetricCollection({"auc": BinaryAUROC(), "acc": BinaryAccuracy()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Any) -> Any:
        """The student's outputs for ``batch`` (its ``student`` part if the batch has one)."""
        return self.distiller.call_student(self.student, batch)[0]

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        d = self.distiller
        if d.cache is None:
            # Teachers first, keeping only the features a match reads: the other layers' hidden states and attention
            # maps are freed before the student's forward instead of living through it (a smaller peak footprint).
            t_views = d.teacher_views(batch)
            s_view = d.student_view(batch, *d.call_student(self.student, batch))
        else:
            s_view = d.student_view(batch, *d.call_student(self.student, batch))
            t_views = d.teacher_views(batch, s_view)
        stats: dict[str, Tensor] = {}
        terms = d.loss_terms(s_view, t_views, training_progress(self._trainer, self.global_step), stats)
        n = s_view.logits.shape[0]
        if "temperature" in stats:
            self.log("train/temperature", stats["temperature"], batch_size=n)
        for name, (value, weight) in terms.items():
            self.log(f"train/{name}", value, batch_size=n)
            if name.count("/") and not name.startswith("match/"):
                continue  # `kd/<fn>`, `hard/<fn>`: the user loss's own name, logged once
            self.log(f"train/{name}_weighted", value * weight, batch_size=n)
            if name in ("kd", "hard"):
                self.log(f"train/{name}_weight", weight, batch_size=n)
        loss = sum(value * weight for value, weight in terms.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad]}]
        projection_params = list(self.projections.parameters())
        if projection_params:
            group = {"params": projection_params}
            if self.hparams.projection_lr is not None:
                group["lr"] = self.hparams.projection_lr
            groups.append(group)
        optimizer = self.optimizer(groups)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": self.hparams.lr_scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ hooks
    def train(self, mode: bool = True) -> DistillationModule:
        """Sets train/eval mode on the student and projections; the teachers always stay in eval mode."""
        super().train(mode)
        for t in self.all_teachers():
            t.eval()
        return self

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for model in [self.student, *([] if self.distiller.cache is not None else self.all_teachers())]:
                model.compile(backend=self.hparams.compile_backend)
            self._compiled = True

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states made under inference mode; fresh ones avoid that.
        self.val_metrics.reset()
        self.test_metrics.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What rebuilds the student without any teacher (`lit-kd export`, `lit_kd.export.load_student`).
        checkpoint[STUDENT_RECORD_KEY] = student_record(self.student)
        if not self.hparams.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teachers.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        saved_teachers = [k for k in state if k.startswith("teachers.")]
        if not self.teachers:
            for key in saved_teachers:  # built without a teacher (inference): the saved one is not needed
                del state[key]
        elif not saved_teachers:
            # Saved without teachers: keep the ones this module was built with.
            state.update({f"teachers.{k}": v for k, v in self.teachers.state_dict().items()})

    # ------------------------------------------------------------------ public helpers
    def all_teachers(self) -> list[nn.Module]:
        """Every teacher of every task."""
        return self.distiller.all_teachers()

    def loss_terms(
        self, s_view: ModelView, t_views: list[ModelView], progress: float
    ) -> dict[str, tuple[Tensor, float]]:
        """The loss terms ``{name: (unweighted value, weight)}`` for one batch: ``kd``, ``hard``, ``match/<name>``."""
        return self.distiller.loss_terms(s_view, t_views, progress)

    def export_student(self, path: str | os.PathLike) -> Path:
        """Write the student alone: ``save_pretrained`` for ``transformers`` models, else a state dict file.

        Args:
            path: A folder for ``transformers`` models; a file (e.g. ``student.pt``) otherwise.

        Returns:
            The path written.
        """
        return save_model(self.student, path)

    # ------------------------------------------------------------------ internals
    def _eval_step(self, batch: Any, metrics: MetricCollection) -> None:
        d = self.distiller
        view = d.student_view(batch, *d.call_student(self.student, batch))
        if view.labels is None:
            raise ValueError("Expected labels in validation/test batches (the adaptor gives `labels=None`).")
        logits, labels = view.logits.float(), view.labels
        if view.logits_mask is not None:
            logits, labels = logits[view.logits_mask], labels[view.logits_mask]
        if self.hparams.metric_task == "binary":
            metrics.update(torch.sigmoid(logits.reshape(-1)), labels.reshape(-1))
        else:
            metrics.update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.log_dict(metrics, prog_bar=True, batch_size=labels.numel())
