"""``DistillationModule``: train a student to imitate one or several frozen teachers, the Lightning way.

Total loss per training step (``p`` is the training progress, ``global_step / estimated_stepping_batches``):

    ``loss = w_kd(p) * kd(z_s, z_t, T) + w_hard(p) * hard + sum_m weight_m * match_m``

``kd`` is ``config.kd_loss_type`` on the logits (scaled per sample by ``T**2`` when
``config.scale_by_temperature_squared``), ``hard`` is the sum of the student's own losses (``ModelView.losses``) or,
when it reports none, cross-entropy (binary cross-entropy for ``kd_loss_type="bce"``) on the gold labels, and each
``match_m`` an intermediate-layer loss (:class:`~lit_kd.config.IntermediateMatch`) on hidden states or attentions,
with a trainable projection of the student's feature when the widths differ.

TextBrewer's ``TrainingConfig``/``train()`` arguments map onto the Lightning Trainer:

=============================  ====================================================================
TextBrewer                     Lightning
=============================  ====================================================================
``num_steps``/``num_epochs``   ``Trainer(max_steps=...)`` / ``Trainer(max_epochs=...)``
``max_grad_norm``              ``Trainer(gradient_clip_val=...)``
``gradient_accumulation``      ``Trainer(accumulate_grad_batches=...)``
``fp16`` (Apex)                ``Trainer(precision="16-mixed"|"bf16-mixed")``
``scheduler_class/_args``      ``lr_scheduler=`` (an ``LRSchedulerCallable``; stepped every optimizer step)
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
parts; each model is called with its part (top-level ``labels``/``task`` are shared).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy

from lit_kd.adaptors import ModelView, call_model, default_adaptor, is_transformers_model, save_model
from lit_kd.cache import TeacherCache
from lit_kd.config import DistillationConfig, IntermediateMatch
from lit_kd.losses import shift_probability

DEFAULT_TASK = "default"
_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}


def _projection(kind: str, dim_s: int, dim_t: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_s, dim_t), _ACTIVATIONS[kind]())


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"Expected `{what}` to name at least one task but got an empty dict.")
        return dict(value)
    return {DEFAULT_TASK: value}


class DistillationModule(L.LightningModule):
    """Distils one or several frozen teachers into a trainable student.

    Args:
        teacher: The teacher, a list of teachers (an ensemble), or a dict ``{task: teacher or list}``.
        student: The student; the only model that trains.
        config: What to distil (losses, temperature, weights, intermediate matches); ``None`` for the defaults.
        teacher_adaptor: ``adaptor(batch, outputs) -> ModelView`` for the teachers (or a dict per task); ``None``
            for :func:`~lit_kd.adaptors.default_adaptor` (``transformers`` outputs, dicts, or a logits tensor).
        student_adaptor: The same for the student.
        optimizer: Builds the optimizer from parameter groups (student; projections).
        lr_scheduler: Builds a learning-rate scheduler, stepped after every optimizer step; ``None`` for none.
        projection_lr: Learning rate of the projection layers; ``None`` for the optimizer's.
        teacher_reduce: How several teachers' soft targets combine: mean of ``"logits"`` or of ``"probs"``.
        teacher_dtype: ``"float32"``, or ``"bfloat16"`` to halve the teachers' memory and time (outputs are cast
            back to float32 for the losses).
        save_teacher: Keep the teachers' weights in checkpoints. Default False: they are frozen, so the model
            that builds the module supplies them again; checkpoints stay small.
        metric_task: Validation/test metrics of the student: ``"multiclass"`` (accuracy) or ``"binary"`` (AUROC
            and accuracy of sigmoid outputs, e.g. knowledge tracing).
        num_labels: Classes for ``"multiclass"`` metrics.
        teacher_cache: A folder written by :meth:`lit_kd.cache.TeacherCache.build`: the teacher's logits (full or
            top-k) and the hidden states the matches read are taken from it by ``batch["index"]`` instead of running
            the teacher (one teacher; hidden-state matches need their teacher layers cached; no attention matches).
            It is checked against the teacher's weights and the config here and against every batch's inputs.
        compile: Compile the student's (and live teachers') forward with ``torch.compile`` when the trainer sets the
            module up (``nn.Module.compile``: in place, so checkpoints keep their keys).
        compile_backend: The ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` only traces).
    """

    def __init__(
        self,
        teacher: nn.Module | list[nn.Module] | dict[str, nn.Module],
        student: nn.Module,
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
        num_labels: int = 2,
        teacher_cache: str | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["teacher", "student", "teacher_adaptor", "student_adaptor", "optimizer", "lr_scheduler", "config"]
        )
        if teacher_reduce not in ("logits", "probs"):
            raise ValueError(f"Expected `teacher_reduce` to be 'logits' or 'probs' but got {teacher_reduce!r}.")
        if teacher_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Expected `teacher_dtype` to be 'float32' or 'bfloat16' but got {teacher_dtype!r}.")
        if metric_task not in ("multiclass", "binary"):
            raise ValueError(f"Expected `metric_task` to be 'multiclass' or 'binary' but got {metric_task!r}.")
        self.config = config if config is not None else DistillationConfig()
        teachers = _as_dict(teacher, "teacher")
        self.teachers = nn.ModuleDict(
            {
                task: nn.ModuleList(t if isinstance(t, (list, tuple, nn.ModuleList)) else [t])
                for task, t in teachers.items()
            }
        )
        self.student = student
        self.teacher_adaptors = _as_dict(teacher_adaptor, "teacher_adaptor")
        self.student_adaptors = _as_dict(student_adaptor, "student_adaptor")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.projections = nn.ModuleDict(
            {m.name: _projection(*m.projection) for m in self.config.intermediate_matches if m.projection}
        )
        # The teacher layers each feature's matches read; a feature with any is asked of both models.
        self._teacher_layers = {
            feature: frozenset(
                i
                for m in self.config.intermediate_matches
                if m.feature == feature
                for i in (m.layer_t if isinstance(m.layer_t, list) else [m.layer_t])
            )
            for feature in ("hidden", "attention")
        }
        self._needs = {feature: bool(layers) for feature, layers in self._teacher_layers.items()}
        for model in [*self.all_teachers(), self.student]:
            if self._needs["attention"] and is_transformers_model(model):
                # SDPA kernels return no attention maps: switch to eager attention only when a match needs them.
                model.set_attn_implementation("eager")
        for t in self.all_teachers():
            t.requires_grad_(False)
            t.eval()
            if teacher_dtype == "bfloat16":
                t.to(torch.bfloat16)
        self._checked_first_batch = False
        self._cache = None
        if teacher_cache is not None:
            if len(self.all_teachers()) != 1:
                raise ValueError(
                    f"Expected one teacher with `teacher_cache` but got {len(self.all_teachers())}; cache the "
                    "ensemble's combined logits with one wrapper model instead."
                )
            self._cache = TeacherCache(teacher_cache, teacher=self.all_teachers()[0])
            self._check_cache_covers_config(self._cache)
        if metric_task == "multiclass":
            metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_labels, average="micro")})
        else:
            metrics = MetricCollection({"auc": BinaryAUROC(), "acc": BinaryAccuracy()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Any) -> Any:
        """The student's outputs for ``batch`` (its ``student`` part if the batch has one)."""
        return call_model(self.student, self._part(batch, "student"))

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        task = self._task(batch)
        s_batch, t_batch = self._part(batch, "student"), self._part(batch, "teacher")
        if self._cache is not None:
            s_view = self._view(self.student, s_batch, self.student_adaptors, task)
            t_views = [self._cached_view(self._index(batch), t_batch, s_view)]
        else:
            # Teachers first, keeping only the features a match reads: the other layers' hidden states and attention
            # maps are freed before the student's forward instead of living through it (a smaller peak footprint).
            with torch.no_grad():
                t_views = [
                    self._matched_features(self._view(t, t_batch, self.teacher_adaptors, task))
                    for t in self.teachers[task]
                ]
            s_view = self._view(self.student, s_batch, self.student_adaptors, task)
        if not self._checked_first_batch:
            self._check_views(s_view, t_views)
            self._checked_first_batch = True
        terms = self.loss_terms(s_view, t_views, self._progress())
        n = s_view.logits.shape[0]
        for name, (value, weight) in terms.items():
            self.log(f"train/{name}", value, batch_size=n)
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
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ hooks
    def train(self, mode: bool = True) -> DistillationModule:
        """Sets train/eval mode on the student and projections; the teachers always stay in eval mode."""
        super().train(mode)
        for t in self.all_teachers():
            t.eval()
        return self

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for model in [self.student, *([] if self._cache is not None else self.all_teachers())]:
                model.compile(backend=self.hparams.compile_backend)
            self._compiled = True

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states made under inference mode; fresh ones avoid that.
        self.val_metrics.reset()
        self.test_metrics.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teachers.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if not any(k.startswith("teachers.") for k in state):
            # Saved without teachers: keep the ones this module was built with.
            state.update({f"teachers.{k}": v for k, v in self.teachers.state_dict().items()})

    # ------------------------------------------------------------------ public helpers
    def all_teachers(self) -> list[nn.Module]:
        """Every teacher of every task."""
        return [t for group in self.teachers.values() for t in group]

    def loss_terms(
        self, s_view: ModelView, t_views: list[ModelView], progress: float
    ) -> dict[str, tuple[Tensor, float]]:
        """The loss terms ``{name: (unweighted value, weight)}`` for one batch: ``kd``, ``hard``, ``match/<name>``."""
        cfg = self.config
        terms: dict[str, tuple[Tensor, float]] = {}
        w_kd = cfg.kd_loss_weight_at(progress)
        if w_kd > 0:
            logits_s = s_view.logits.float()
            logits_t = self._teacher_logits(t_views, cfg.temperature, binary=cfg.kd_loss_type == "bce")
            if cfg.probability_shift:
                logits_t = shift_probability(logits_t, s_view.labels)
            mask = s_view.logits_mask
            temperature = cfg.temperature_fn()(logits_s, logits_t, cfg.temperature, mask)
            self.log("train/temperature", temperature.float().mean(), batch_size=logits_s.shape[0])
            kd = cfg.kd_loss_fn()(logits_s, logits_t, temperature, mask, cfg.scale_by_temperature_squared)
            terms["kd"] = (kd, w_kd)
        w_hard = cfg.hard_label_weight_at(progress)
        if w_hard > 0:
            terms["hard"] = (self._hard_loss(s_view), w_hard)
        for match in cfg.intermediate_matches:
            if match.weight > 0:
                terms[f"match/{match.name}"] = (self._match_loss(match, s_view, t_views[0]), match.weight)
        if not terms:
            raise ValueError("Expected at least one loss term with a positive weight but all weights are 0.")
        return terms

    def export_student(self, path: str | os.PathLike) -> Path:
        """Write the student alone: ``save_pretrained`` for ``transformers`` models, else a state dict file.

        Args:
            path: A folder for ``transformers`` models; a file (e.g. ``student.pt``) otherwise.

        Returns:
            The path written.
        """
        return save_model(self.student, path)

    # ------------------------------------------------------------------ internals
    def _task(self, batch: Any) -> str:
        """The batch's task (``batch["task"]``, default ``"default"``), checked against the teachers' tasks."""
        task = batch.get("task", DEFAULT_TASK) if isinstance(batch, Mapping) else DEFAULT_TASK
        if task not in self.teachers:
            raise ValueError(f"Expected `batch['task']` to be one of {sorted(self.teachers)} but got {task!r}.")
        return task

    @staticmethod
    def _index(batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or "index" not in batch:
            raise ValueError("Expected batches with an `index` entry (sample indices) when `teacher_cache` is set.")
        return batch["index"]

    @staticmethod
    def _part(batch: Any, who: str) -> Any:
        if isinstance(batch, Mapping) and who in batch:
            part = dict(batch[who])
            for key in ("labels", "task", "index"):
                if key in batch and key not in part:
                    part[key] = batch[key]
            return part
        return batch

    def _adaptor(self, adaptors: dict[str, Callable | None], task: str) -> Callable:
        adaptor = adaptors.get(task, adaptors.get(DEFAULT_TASK))
        return adaptor if adaptor is not None else default_adaptor

    def _view(self, model: nn.Module, batch: Any, adaptors: dict, task: str) -> ModelView:
        outputs = call_model(model, batch, self._needs["hidden"], self._needs["attention"])
        return self._adaptor(adaptors, task)(batch, outputs)

    def _check_cache_covers_config(self, cache: TeacherCache) -> None:
        """Refuse a config that needs teacher outputs the cache does not hold."""
        matches = self.config.intermediate_matches
        if any(m.feature == "attention" for m in matches):
            raise ValueError(
                "Expected no attention matches with `teacher_cache` (the cache holds logits and hidden states, not "
                "attention maps) but the config has some."
            )
        missing = sorted(self._teacher_layers["hidden"] - set(cache.hidden_layers))
        if missing:
            raise ValueError(
                f"Expected the teacher cache in {cache.path} to hold the hidden states the matches read (layers "
                f"{sorted(self._teacher_layers['hidden'])}) but it lacks {missing}; build it with "
                f"`TeacherCache.build(..., hidden_layers={sorted(self._teacher_layers['hidden'])})`."
            )
        if cache.top_k is not None and self.config.kd_loss_type == "bce":
            raise ValueError(
                f"Expected full logits in the teacher cache for `kd_loss_type='bce'` but {cache.path} holds top-"
                f"{cache.top_k} logits (top-k needs a class dimension); rebuild it with top_k=None."
            )

    def _cached_view(self, index: Tensor, t_batch: Any, s_view: ModelView) -> ModelView:
        """The teacher's view of a batch from the cache: logits, and the hidden states the matches read."""
        logits = self._cache.lookup(index, t_batch, like=s_view.logits)  # also checks the inputs
        layers = self._teacher_layers["hidden"]
        if not layers:
            return ModelView(logits=logits)
        like = s_view.hidden_states[0] if s_view.hidden_states else s_view.logits
        hidden = [
            self._cache.hidden_state(index, i, like) if i in layers else None
            for i in range(self._cache.num_hidden_states or 0)
        ]
        return ModelView(logits=logits, hidden_states=hidden)

    def _matched_features(self, view: ModelView) -> ModelView:
        """``view`` with ``None`` in place of the teacher features no intermediate match reads (lengths kept)."""
        if not is_dataclass(view):
            return view

        def keep(features: Any, layers: frozenset[int]) -> Any:
            if not isinstance(features, (list, tuple)):
                return features
            return [f if i in layers else None for i, f in enumerate(features)]

        return replace(
            view,
            hidden_states=keep(view.hidden_states, self._teacher_layers["hidden"]),
            attentions=keep(view.attentions, self._teacher_layers["attention"]),
        )

    def _progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        return min(1.0, self.global_step / total) if total and total != float("inf") else 0.0

    def _check_views(self, s_view: ModelView, t_views: list[ModelView]) -> None:
        for i, t_view in enumerate(t_views):
            if tuple(t_view.logits.shape) != tuple(s_view.logits.shape):
                raise ValueError(
                    f"Expected the teacher's and the student's logits to have the same shape but got "
                    f"{tuple(t_view.logits.shape)} (teacher {i}) and {tuple(s_view.logits.shape)} (student) at the "
                    "first batch; check `num_labels` of both models."
                )
        t_view = t_views[0]
        count = lambda xs: None if xs is None else len(xs)  # noqa: E731
        if self.config.intermediate_matches:
            for who, view in (("teacher", t_view), ("student", s_view)):
                if self._needs["hidden"] and view.hidden_states is None:
                    raise ValueError(
                        f"Expected the {who} to return hidden states (an intermediate match uses them) but its "
                        "adaptor gives `hidden_states=None`."
                    )
                if self._needs["attention"] and view.attentions is None:
                    raise ValueError(
                        f"Expected the {who} to return attention maps (an attention match uses them) but its adaptor "
                        "gives `attentions=None`; `transformers` models return them with eager attention, which this "
                        "module switches on; other models need an adaptor that provides them."
                    )
            self.config.validate_layers(
                count(t_view.hidden_states),
                count(s_view.hidden_states),
                count(t_view.attentions),
                count(s_view.attentions),
            )

    def _teacher_logits(self, t_views: list[ModelView], temperature: float, binary: bool) -> Tensor:
        logits = [v.logits.float() for v in t_views]
        if len(logits) == 1:
            return logits[0]
        stacked = torch.stack(logits)  # (K, ...)
        if self.hparams.teacher_reduce == "logits":
            return stacked.mean(0)
        if binary:
            p = torch.sigmoid(stacked / temperature).mean(0).clamp(1e-7, 1 - 1e-7)
            return temperature * torch.logit(p)
        log_p = torch.log_softmax(stacked / temperature, dim=-1)  # (K, ..., C)
        return temperature * (torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits)))))

    def _hard_loss(self, view: ModelView) -> Tensor:
        if view.losses:
            return sum(view.losses)
        if view.labels is None:
            raise ValueError(
                "Expected labels for the hard-label loss (`hard_label_weight` > 0) but the student's adaptor gives "
                "`labels=None` and no `losses`."
            )
        logits = view.logits.float()
        if self.config.kd_loss_type == "bce":
            per = F.binary_cross_entropy_with_logits(logits, view.labels.to(logits.dtype), reduction="none")
        else:
            per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), view.labels.reshape(-1), reduction="none")
            per = per.reshape(view.labels.shape)
        if view.logits_mask is None:
            return per.mean()
        mask = view.logits_mask.to(per.dtype)
        return (per * mask).sum() / mask.sum().clamp_min(1.0)

    def _feature(self, view: ModelView, match: IntermediateMatch, layer: int) -> Tensor:
        features = view.hidden_states if match.feature == "hidden" else view.attentions
        return features[layer].float()

    def _match_loss(self, match: IntermediateMatch, s_view: ModelView, t_view: ModelView) -> Tensor:
        layers_s = match.layer_s if isinstance(match.layer_s, list) else [match.layer_s]
        layers_t = match.layer_t if isinstance(match.layer_t, list) else [match.layer_t]
        feats_s = [self._feature(s_view, match, i) for i in layers_s]
        feats_t = [self._feature(t_view, match, i) for i in layers_t]
        if match.projection is not None:
            feats_s = [self.projections[match.name](f) for f in feats_s]
        mask = s_view.input_mask
        mask = None if mask is None else mask.bool()
        fn = match.loss_fn()
        if match.feature == "attention":
            return fn(feats_s[0], feats_t[0], mask, scores=s_view.attention_scores)
        if match.two_layers:
            return fn(feats_s[0], feats_s[1], feats_t[0], feats_t[1], mask)
        return fn(feats_s[0], feats_t[0], mask)

    def _eval_step(self, batch: Any, metrics: MetricCollection) -> None:
        task = self._task(batch)
        s_batch = self._part(batch, "student")
        view = self._view(self.student, s_batch, self.student_adaptors, task)
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
