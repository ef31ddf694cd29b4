"""``Distiller``: the Lightning-free core of distillation (frozen teachers, loss terms, projections).

It owns what every way of distilling shares, and nothing about the training loop: no ``self.log``, no trainer, no
optimizer. :class:`~lit_kd.module.DistillationModule` and :class:`~lit_kd.callback.DistillationCallback` are thin
shells around it; from plain PyTorch::

    distiller = Distiller(teacher, DistillationConfig(temperature=2.0))
    t_views = distiller.teacher_views(batch)                       # frozen teachers, under no_grad
    s_view = distiller.student_view(batch, distiller.call_student(student, batch))
    terms = distiller.loss_terms(s_view, t_views, progress=step / total_steps)
    loss = sum(value * weight for value, weight in terms.values())

Loss per batch (``p`` is the training progress in [0, 1]):

    ``loss = w_kd(p) * kd(z_s, z_t, T) + w_hard(p) * hard + sum_m weight_m * match_m``

``kd`` is ``config.kd_loss_type`` on the logits (built-in losses scaled per sample by ``T**2`` when
``config.scale_by_temperature_squared``), ``hard`` the student's loss on the gold labels (its own ``losses``, or
``config.hard_label_loss``), ``match_m`` each intermediate match on hidden states, attention maps or named modules'
outputs, with a trainable projection of the student's feature when the widths differ.

Teachers: frozen (``requires_grad_(False)``), always in eval mode (:meth:`Distiller.train` keeps them there), run
under ``torch.no_grad()``; their views keep only the hidden states and attention maps a match reads (``None`` in
place of the others), so the rest is freed before the student's forward. Several teachers (a list) have their soft
targets averaged as logits (``teacher_reduce="logits"``) or as probabilities (``"probs"``: the logits
``T * log(mean_i softmax(z_i / T))``, whose tempered softmax is the mean distribution). Several tasks: ``teacher``
(and the adaptors) may be dicts keyed by task name; a batch is one task's (named by ``batch["task"]``) or, as
Lightning's ``CombinedLoader({task: loader})`` gives it, ``{task: batch of that task}`` (see
:meth:`Distiller.task_batches`). Different inputs for teacher and student: a batch may carry ``teacher`` and
``student`` parts; each model is called with its part (top-level ``labels``/``task``/``index`` are shared).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import is_dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_kd.adaptors import (
    TASK_ADAPTORS,
    Inputs,
    ModelView,
    TaskType,
    as_view,
    call_model,
    check_inputs,
    check_task_type,
    is_transformers_model,
)
from lit_kd.cache import TeacherCache
from lit_kd.config import DistillationConfig, IntermediateMatch, loss_name
from lit_kd.features import FeatureCapture
from lit_kd.losses import shift_probability

__all__ = ["DEFAULT_TASK", "Distiller", "batch_task", "split_tasks"]

DEFAULT_TASK = "default"
_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}


def _projection(kind: str, dim_s: int, dim_t: int, init: str = "pytorch") -> nn.Module:
    """``Linear(dim_s, dim_t)`` and the activation ``kind``; ``init="textbrewer"`` draws the weights as TextBrewer does
    (after ``nn.Linear``'s own initialisation, normal(0, 0.02) weights and zero biases: the same random draws, so the
    same weights under the same seed)."""
    projection = nn.Sequential(nn.Linear(dim_s, dim_t), _ACTIVATIONS[kind]())
    if init == "textbrewer":
        with torch.no_grad():
            projection[0].weight.normal_(mean=0.0, std=0.02)
            projection[0].bias.zero_()
    return projection


def _same_mask(a: Tensor, b: Tensor | None) -> bool:
    """Whether a teacher's ``logits_mask`` is the student's (the same tensor, or equal values)."""
    return a is b or (b is not None and a.shape == b.shape and bool(torch.equal(a.bool(), b.bool())))


def _select(values: Tensor, mask: Tensor | None, binary: bool) -> Tensor:
    """The positions of ``values`` where ``mask`` is True, (N, C) (or (N,) for ``binary`` logits); every position,
    flattened the same way, without a mask."""
    if mask is not None:
        return values[mask.bool()]
    return values.reshape(-1) if binary or values.dim() < 2 else values.reshape(-1, values.shape[-1])


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"Expected `{what}` to name at least one task but got an empty dict.")
        return dict(value)
    return {DEFAULT_TASK: value}


def batch_task(batch: Any) -> str | None:
    """The task a batch names in ``batch["task"]`` (a string, or a collated list of one repeated string), or None.

    Raises:
        ValueError: If ``batch["task"]`` is not a string, or names several tasks.
    """
    if not isinstance(batch, Mapping) or "task" not in batch:
        return None
    task = batch["task"]
    if isinstance(task, (list, tuple)) and task and all(isinstance(t, str) for t in task):
        if len(set(task)) != 1:
            raise ValueError(f"Expected one task per batch in `batch['task']` but got {sorted(set(task))}.")
        task = task[0]
    if not isinstance(task, str):
        raise ValueError(f"Expected `batch['task']` to be a task name (a string) but got {type(task).__name__}.")
    return task


def split_tasks(batch: Any, tasks: Collection[str]) -> dict[str, Any] | None:
    """``{task: batch of that task}`` when ``batch`` holds several tasks' batches, else ``None``.

    A batch of several tasks is a non-empty mapping whose keys are all names in ``tasks``: what Lightning's
    ``CombinedLoader({task: loader, ...})`` yields in its ``max_size_cycle``, ``min_size`` and ``max_size`` modes (a
    plain dict of loaders given to ``Trainer.fit`` is wrapped in one). Entries that are ``None`` (a loader exhausted in
    ``max_size`` mode) are left out. Any other batch, e.g. a dict of tensors, is one task's.

    Example:
        >>> split_tasks({"a": {"x": 1}, "b": None}, ["a", "b"])
        {'a': {'x': 1}}
        >>> split_tasks({"input_ids": 1, "labels": 2}, ["a", "b"]) is None
        True
    """
    if not isinstance(batch, Mapping) or not batch or not all(isinstance(k, str) and k in tasks for k in batch):
        return None
    return {task: part for task, part in batch.items() if part is not None}


class Distiller(nn.Module):
    """Frozen teachers, trainable projections and the distillation loss terms, without Lightning.

    Args:
        teacher: The teacher, a list of teachers (an ensemble), a dict ``{task: teacher or list}``, or ``None`` (no
            teacher: nothing to distil, e.g. a module loaded for inference).
        config: What to distil (losses, temperature, weights, intermediate matches); ``None`` for the defaults.
        teacher_adaptor: ``adaptor(batch, outputs) -> ModelView`` (or a mapping of its fields) for the teachers, or a
            dict per task; ``None`` for the adaptor of ``task_type``.
        student_adaptor: The same for the student.
        teacher_inputs: Which batch entries feed the teachers' ``forward``: ``None`` (by parameter name), a key map
            ``{parameter: batch_key}`` or a function ``inputs(batch)`` (see :func:`~lit_kd.adaptors.call_model`).
        student_inputs: The same for the student (when this core calls it).
        teacher_reduce: How several teachers' soft targets combine: mean of ``"logits"`` or of ``"probs"``.
        teacher_dtype: ``"float32"``, or ``"bfloat16"`` to halve the teachers' memory and time (outputs are cast
            back to float32 for the losses).
        teacher_cache: A folder written by :meth:`lit_kd.cache.TeacherCache.build` to read the teacher's logits (and
            cached hidden states) from instead of running it (one teacher; no attention or named-module matches).
        teacher_cache_verify: Check the cache files' SHA-256 checksums when the cache is opened (about 1 s per GB);
            False skips only that (shapes, dtypes and the teacher's fingerprint are always checked).
        task_type: What the logits predict, which picks the adaptor of a model whose adaptor is ``None``:
            ``"sequence"`` (one prediction per sample, or logits as they are: :func:`~lit_kd.adaptors.default_adaptor`),
            ``"causal_lm"`` (next-token logits, shifted by one: :func:`~lit_kd.adaptors.causal_lm_adaptor`) or
            ``"token"`` (per-token logits without a shift, masked LMs and token classification:
            :func:`~lit_kd.adaptors.token_adaptor`). Token adaptors mask padding and label -100 out of the KD term
            and the hard-label loss.
    """

    def __init__(
        self,
        teacher: nn.Module | list[nn.Module] | dict[str, nn.Module] | None,
        config: DistillationConfig | None = None,
        teacher_adaptor: Callable | dict[str, Callable] | None = None,
        student_adaptor: Callable | dict[str, Callable] | None = None,
        teacher_inputs: Inputs = None,
        student_inputs: Inputs = None,
        teacher_reduce: Literal["logits", "probs"] = "logits",
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        teacher_cache: str | None = None,
        teacher_cache_verify: bool = True,
        task_type: TaskType = "sequence",
    ) -> None:
        super().__init__()
        check_task_type(task_type)
        self.task_type = task_type
        if teacher_reduce not in ("logits", "probs"):
            raise ValueError(f"Expected `teacher_reduce` to be 'logits' or 'probs' but got {teacher_reduce!r}.")
        if teacher_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Expected `teacher_dtype` to be 'float32' or 'bfloat16' but got {teacher_dtype!r}.")
        check_inputs(teacher_inputs, "teacher_inputs")
        check_inputs(student_inputs, "student_inputs")
        self.config = config if config is not None else DistillationConfig()
        self.teacher_reduce = teacher_reduce
        self.teacher_inputs = teacher_inputs
        self.student_inputs = student_inputs
        teachers = {} if teacher is None else _as_dict(teacher, "teacher")
        self.teachers = nn.ModuleDict(
            {
                task: nn.ModuleList(t if isinstance(t, (list, tuple, nn.ModuleList)) else [t])
                for task, t in teachers.items()
            }
        )
        self.teacher_adaptors = _as_dict(teacher_adaptor, "teacher_adaptor")
        self.student_adaptors = _as_dict(student_adaptor, "student_adaptor")
        self.projections = nn.ModuleDict(
            {
                m.name: _projection(*m.projection, init=self.config.projection_init)
                for m in self.config.intermediate_matches
                if m.projection
            }
        )
        matches = self.config.intermediate_matches
        # The teacher layers each feature's matches read (indices into hidden_states / attentions); a feature with
        # any is asked of both models. Named modules are captured by hooks instead.
        self.teacher_layers = {
            feature: frozenset(i for m in matches if m.feature == feature for i in m.layers_t if not isinstance(i, str))
            for feature in ("hidden", "attention")
        }
        self.needs = {
            feature: any(not isinstance(i, str) for m in matches if m.feature == feature for i in m.layers_s)
            or bool(self.teacher_layers[feature])
            for feature in ("hidden", "attention")
        }
        self.teacher_modules = sorted({i for m in matches for i in m.layers_t if isinstance(i, str)})
        self.student_modules = sorted({i for m in matches for i in m.layers_s if isinstance(i, str)})
        for t in self.all_teachers():
            FeatureCapture(t, self.teacher_modules, "teacher")  # checks the names now rather than at the first step
            if self.needs["attention"] and is_transformers_model(t):
                # SDPA kernels return no attention maps: switch to eager attention only when a match needs them.
                t.set_attn_implementation("eager")
            t.requires_grad_(False)
            t.eval()
            if teacher_dtype == "bfloat16":
                t.to(torch.bfloat16)
        self.cache = None
        if teacher_cache is not None:
            if len(self.all_teachers()) != 1:
                raise ValueError(
                    f"Expected one teacher with `teacher_cache` but got {len(self.all_teachers())}; cache the "
                    "ensemble's combined logits with one wrapper model instead."
                )
            self.cache = TeacherCache(teacher_cache, teacher=self.all_teachers()[0], verify=teacher_cache_verify)
            self._check_cache_covers_config(self.cache)
        self.checked_first_batch = False
        self._started_tasks: set[str] = set()
        self._warned_unmasked = False

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Distiller:
        """Sets train/eval mode on the projections; the teachers always stay in eval mode."""
        super().train(mode)
        for t in self.all_teachers():
            t.eval()
        return self

    def projection_param_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """The projections' optimizer parameter groups: one for every projection without ``projection_options`` (with
        ``lr`` when given), then one per projection with options (TextBrewer's ``proj[3]``: its options override ``lr``
        and the optimizer's defaults). Empty without projections."""
        shared: list[nn.Parameter] = []
        own: list[dict[str, Any]] = []
        for match in self.config.intermediate_matches:
            if match.name not in self.projections:
                continue
            params = list(self.projections[match.name].parameters())
            if match.projection_options:
                own.append({"params": params, **({"lr": lr} if lr is not None else {}), **match.projection_options})
            else:
                shared.extend(params)
        groups = [{"params": shared, **({"lr": lr} if lr is not None else {})}] if shared else []
        return groups + own

    def prepare_student(self, student: nn.Module) -> None:
        """Ask a ``transformers`` student for eager attention when an attention match needs its maps."""
        if self.needs["attention"] and is_transformers_model(student):
            student.set_attn_implementation("eager")

    # ------------------------------------------------------------------ batches
    def all_teachers(self) -> list[nn.Module]:
        """Every teacher of every task."""
        return [t for group in self.teachers.values() for t in group]

    def task(self, batch: Any, task: str | None = None) -> str:
        """The task of one task's batch, checked against the teachers' tasks.

        Args:
            batch: One task's batch.
            task: Its task when known otherwise (the key of its loader); ``batch["task"]``, when present, must agree.
                ``None``: ``batch["task"]``, else ``"default"``.

        Raises:
            ValueError: If the task is not one of the teachers', the two names disagree, or ``batch`` holds several
                tasks' batches (split it with :meth:`task_batches`).
        """
        tagged = batch_task(batch)
        if task is not None and tagged is not None and tagged != task:
            raise ValueError(f"Expected `batch['task']` to be {task!r} (the task of its loader) but got {tagged!r}.")
        if task is None and tagged is None and self.teachers and split_tasks(batch, self.teachers) is not None:
            raise ValueError(
                f"Expected one task's batch but got a batch of several tasks {sorted(batch)} (a CombinedLoader's "
                "`{task: batch}`): DistillationModule splits it (`Distiller.task_batches`); DistillationCallback needs "
                "one task per batch (tag it with `batch['task']`)."
            )
        name = task if task is not None else tagged if tagged is not None else DEFAULT_TASK
        if not self.teachers or name in self.teachers:
            return name
        hint = ""
        if task is None and tagged is None:
            hint = (
                " (the batch has no `task` entry: tag each task's batches, or give Lightning a dict of loaders keyed "
                "by task, whose batches come as `{task: batch}`)"
            )
        raise ValueError(f"Expected `batch['task']` to be one of {sorted(self.teachers)} but got {name!r}{hint}.")

    def task_batches(self, batch: Any) -> list[tuple[str, Any]]:
        """The ``(task, batch of that task)`` pairs of a training batch.

        A batch of several tasks (keys all teacher task names: a ``CombinedLoader``'s ``{task: batch}``, see
        :func:`split_tasks`) gives one pair per task present, in its order; any other batch gives
        ``[(task(batch), batch)]``.
        """
        parts = split_tasks(batch, self.teachers) if self.teachers else None
        if parts is None:
            return [(self.task(batch), batch)]
        if not parts:
            raise ValueError(f"Expected a batch for at least one of the tasks {sorted(batch)} but every entry is None.")
        return [(self.task(part, task), part) for task, part in parts.items()]

    def start_task(self, task: str) -> None:
        """Say that the next :meth:`loss_terms` is for ``task``: the first batch of every task has its views checked."""
        if task not in self._started_tasks:
            self._started_tasks.add(task)
            self.checked_first_batch = False

    @staticmethod
    def part(batch: Any, who: str) -> Any:
        """The ``teacher``/``student`` part of a batch (with the shared ``labels``/``task``/``index``), or the batch."""
        if isinstance(batch, Mapping) and who in batch:
            part = dict(batch[who])
            for key in ("labels", "task", "index"):
                if key in batch and key not in part:
                    part[key] = batch[key]
            return part
        return batch

    def _adaptor(self, adaptors: dict[str, Callable | None], task: str) -> Callable:
        adaptor = adaptors.get(task, adaptors.get(DEFAULT_TASK))
        return adaptor if adaptor is not None else TASK_ADAPTORS[self.task_type]

    # ------------------------------------------------------------------ views
    def call_student(self, student: nn.Module, batch: Any) -> tuple[Any, dict[str, Tensor] | None]:
        """Run the student on its part of ``batch``: ``(outputs, named-module features or None)``."""
        s_batch = self.part(batch, "student")
        capture = FeatureCapture(student, self.student_modules, "student") if self.student_modules else None
        with capture if capture is not None else contextlib.nullcontext():
            outputs = call_model(
                student, s_batch, self.needs["hidden"], self.needs["attention"], self.student_inputs, "student"
            )
        return outputs, None if capture is None else capture.collected()

    def student_view(
        self, batch: Any, outputs: Any, features: dict[str, Tensor] | None = None, task: str | None = None
    ) -> ModelView:
        """The student's :class:`ModelView` of ``outputs`` on one task's ``batch`` (read by the task's adaptor)."""
        adaptor = self._adaptor(self.student_adaptors, self.task(batch, task))
        view = as_view(adaptor(self.part(batch, "student"), outputs))
        return replace(view, features=features) if features is not None else view

    @torch.no_grad()
    def teacher_views(self, batch: Any, s_view: ModelView | None = None, task: str | None = None) -> list[ModelView]:
        """The views of one task's ``batch`` by that task's teachers, keeping only the features a match reads.

        With a teacher cache the view comes from the cache and ``s_view`` (the student's view of the same batch) is
        needed for the shapes; live teachers run first, before the student, so their other features are freed.
        ``task``: as in :meth:`task`.
        """
        if not self.teachers:
            raise RuntimeError("Expected a teacher to distil from but this module was built with `teacher=None`.")
        task = self.task(batch, task)
        t_batch = self.part(batch, "teacher")
        if self.cache is not None:
            if s_view is None:
                raise ValueError("Expected the student's view to read the teacher cache (its shapes) but got None.")
            return [self._cached_view(batch, t_batch, s_view)]
        views = []
        adaptor = self._adaptor(self.teacher_adaptors, task)
        for t in self.teachers[task]:
            t.eval()
            capture = FeatureCapture(t, self.teacher_modules, "teacher")
            with capture:
                outputs = call_model(
                    t, t_batch, self.needs["hidden"], self.needs["attention"], self.teacher_inputs, "teacher"
                )
            view = self._matched_features(as_view(adaptor(t_batch, outputs), "teacher"))
            if self.teacher_modules:
                view = replace(view, features=capture.collected())
            views.append(view)
        return views

    # ------------------------------------------------------------------ loss
    def loss_terms(
        self, s_view: ModelView, t_views: list[ModelView], progress: float, stats: dict[str, Tensor] | None = None
    ) -> dict[str, tuple[Tensor, float]]:
        """The loss terms ``{name: (unweighted value, weight)}`` for one batch: ``kd``, ``hard``, ``match/<name>``.

        Args:
            s_view: The student's view.
            t_views: The teachers' views (one per teacher of the batch's task).
            progress: Training progress in [0, 1], for the weight schedules.
            stats: When given, filled with ``temperature`` (the mean temperature over the batch's scored items).

        Returns:
            The terms whose *configured* weight is positive, with their weight at ``progress`` (which a schedule may
            make 0 at some steps: the term is still computed, so the loss keeps its graph and its logs); user losses
            also under ``kd/<name>`` and ``hard/<name>``.

        Raises:
            ValueError: If every configured weight is 0.
        """
        cfg = self.config
        if not (
            cfg.kd_loss_weight > 0 or cfg.hard_label_weight > 0 or any(m.weight > 0 for m in cfg.intermediate_matches)
        ):
            raise ValueError(
                "Expected at least one loss term with a positive weight (`kd_loss_weight`, `hard_label_weight` or a "
                "match's `weight`) but all weights are 0."
            )
        if not self.checked_first_batch:
            self.check_views(s_view, t_views)
            self.checked_first_batch = True
        terms: dict[str, tuple[Tensor, float]] = {}
        if cfg.kd_loss_weight > 0:
            w_kd = cfg.kd_loss_weight_at(progress)
            logits_s, t_views_kd, mask, labels = self._kd_inputs(s_view, t_views)
            logits_t = self._teacher_logits(t_views_kd, cfg.temperature, binary=cfg.binary)
            if cfg.probability_shift:
                logits_t = shift_probability(logits_t, labels)
            if cfg.binary:  # one temperature per element: sigmoid outputs have no class dimension
                temperature = logits_s.new_full(logits_s.shape, float(cfg.temperature))
            else:
                temperature = cfg.temperature_fn()(logits_s, logits_t, cfg.temperature, mask=mask)
            if stats is not None:  # the mean over the items the KD term reads (not padding)
                t = temperature.detach().float()
                valid = mask.to(t.dtype) if mask is not None and mask.shape == t.shape else torch.ones_like(t)
                stats["temperature"] = (t * valid).sum() / valid.sum().clamp_min(1.0)
            kd = cfg.kd_loss(logits_s, logits_t, temperature, mask)
            terms["kd"] = (kd, w_kd)
            if cfg.user_kd_loss is not None:
                terms[f"kd/{loss_name(cfg.user_kd_loss)}"] = (kd.detach(), 0.0)
        if cfg.hard_label_weight > 0:
            terms["hard"] = (self.hard_loss(s_view), cfg.hard_label_weight_at(progress))
            if cfg.user_hard_loss is not None:
                terms[f"hard/{loss_name(cfg.user_hard_loss)}"] = (terms["hard"][0].detach(), 0.0)
        for match in cfg.intermediate_matches:
            if match.weight > 0:
                weight = cfg.match_weight_at(match, progress)
                terms[f"match/{match.name}"] = (self.match_loss(match, s_view, t_views[0]), weight)
        return terms

    def hard_loss(self, view: ModelView) -> Tensor:
        """The student's loss on the gold labels (see ``DistillationConfig.hard_label_loss``); rows labelled < 0
        (transfer-set rows, ``-100``) are left out, as are positions outside ``logits_mask``."""
        cfg = self.config
        if cfg.hard_label_loss is None and view.losses:
            return sum(view.losses)
        if view.labels is None:
            raise ValueError(
                "Expected labels for the hard-label loss (`hard_label_weight` > 0) but the student's adaptor gives "
                "`labels=None` and no `losses`."
            )
        logits = view.logits.float()
        mask = None if view.logits_mask is None else view.logits_mask.bool()
        labelled = view.labels >= 0  # transfer-set rows (label -100): the KD term reads them, this term never does
        if cfg.user_hard_loss is not None:
            if not labelled.all():  # the user's loss sees `mask=None` when every row counts
                mask = labelled if mask is None else mask & labelled
            return cfg.user_hard_loss(logits, view.labels, mask)
        # Built-in losses: the labelled rows enter the masked mean directly, with no host sync to ask whether any
        # row is unlabelled (the mean over all rows when every row is labelled and nothing else is masked).
        mask = labelled if mask is None else mask & labelled
        labels = view.labels.clamp_min(0)  # masked out below; a valid index for the per-item loss
        binary = cfg.hard_label_loss == "bce" or (cfg.hard_label_loss is None and cfg.binary)
        if binary:
            per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        else:
            per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            per = per.reshape(view.labels.shape)
        # torch.where rather than a product: a padded position's logits may be inf/nan, and nan * 0 = nan.
        return torch.where(mask, per, 0.0).sum() / mask.sum().clamp_min(1).to(per.dtype)

    def match_loss(self, match: IntermediateMatch, s_view: ModelView, t_view: ModelView) -> Tensor:
        """One intermediate match's loss (the student's features projected when the match has a projection)."""
        feats_s = [self._feature(s_view, match, i, "student") for i in match.layers_s]
        feats_t = [self._feature(t_view, match, i, "teacher") for i in match.layers_t]
        if match.projection is not None:
            self._check_projection_widths(match, feats_s, feats_t)
            projection = self.projections[match.name]
            dtype = projection[0].weight.dtype  # float32, or the module's under `*-true` precision
            feats_s = [projection(f.to(dtype)).float() for f in feats_s]
        mask = s_view.input_mask
        mask = None if mask is None else mask.bool()
        fn = match.loss_fn()
        if match.user_loss is not None:
            return fn(feats_s[0], feats_t[0], mask)
        if match.takes_scores:
            return fn(feats_s[0], feats_t[0], mask, scores=s_view.attention_scores)
        if match.feature == "attention":
            return fn(feats_s[0], feats_t[0], mask)
        if match.two_layers:
            return fn(feats_s[0], feats_s[1], feats_t[0], feats_t[1], mask)
        return fn(feats_s[0], feats_t[0], mask)

    # ------------------------------------------------------------------ checks
    def check_views(self, s_view: ModelView, t_views: list[ModelView]) -> None:
        """First-batch checks: logits shapes agree (when the KD term reads them), and the models return the features
        the matches read.

        Teacher and student logits are compared only when ``kd_loss_weight`` > 0: distilling only intermediate matches
        (e.g. between headless encoders whose adaptors give other widths as ``logits``) does not read the teacher's
        logits. A teacher view with its own ``logits_mask`` needs only the same class dimension (its positions are
        counted at every step).

        Warns (a ``UserWarning``, once) when the student's logits are (B, L, C) and come without a ``logits_mask``:
        every position, padding included, then counts in the KD term.
        """
        if (
            self.config.kd_loss_weight > 0
            and not self.config.binary
            and s_view.logits.dim() == 3
            and s_view.logits_mask is None
            and not self._warned_unmasked
        ):
            self._warned_unmasked = True
            warnings.warn(
                f"Got (B, L, C) student logits of shape {tuple(s_view.logits.shape)} without a `logits_mask`: every "
                "position, padding included, counts in the KD loss. For token-level models set "
                "`task_type='causal_lm'` or `'token'` (or the adaptors `lit_kd.adaptors.causal_lm_adaptor` / "
                "`token_adaptor`), give the batch an `attention_mask` or `labels` with -100 at ignored positions, or "
                "give the view a `logits_mask`.",
                UserWarning,
                stacklevel=3,
            )
        for i, t_view in enumerate(t_views if self.config.kd_loss_weight > 0 else []):
            if t_view.logits_mask is not None and not _same_mask(t_view.logits_mask, s_view.logits_mask):
                if not self.config.binary and t_view.logits.shape[-1] != s_view.logits.shape[-1]:
                    raise ValueError(
                        f"Expected the teacher's and the student's logits to have the same number of classes but got "
                        f"{t_view.logits.shape[-1]} (teacher {i}) and {s_view.logits.shape[-1]} (student) at the first "
                        "batch; check `num_labels` of both models."
                    )
                continue
            if tuple(t_view.logits.shape) != tuple(s_view.logits.shape):
                raise ValueError(
                    f"Expected the teacher's and the student's logits to have the same shape but got "
                    f"{tuple(t_view.logits.shape)} (teacher {i}) and {tuple(s_view.logits.shape)} (student) at the "
                    "first batch; check `num_labels` of both models."
                )
        t_view = t_views[0]
        count = lambda xs: None if xs is None else len(xs)  # noqa: E731
        if not self.config.intermediate_matches:
            return
        for who, view in (("teacher", t_view), ("student", s_view)):
            layers = self.teacher_layers if who == "teacher" else None
            for feature, attr in (("hidden", "hidden_states"), ("attention", "attentions")):
                indexed = (
                    bool(layers[feature])
                    if layers is not None
                    else any(
                        not isinstance(i, str)
                        for m in self.config.intermediate_matches
                        if m.feature == feature
                        for i in m.layers_s
                    )
                )
                if indexed and getattr(view, attr) is None:
                    hint = (
                        "; `transformers` models return them with eager attention, which is switched on; other "
                        "models need an adaptor that provides them, or name the layer by module path"
                        if feature == "attention"
                        else "; name the layer by module path (e.g. `layer_s: encoder.1`) or use an adaptor"
                    )
                    raise ValueError(
                        f"Expected the {who} to return {'hidden states' if feature == 'hidden' else 'attention maps'}"
                        f" (an intermediate match uses them) but its adaptor gives `{attr}=None`{hint}."
                    )
        self.config.validate_layers(
            count(t_view.hidden_states) or 0,
            count(s_view.hidden_states) or 0,
            count(t_view.attentions),
            count(s_view.attentions),
        )

    def _check_cache_covers_config(self, cache: TeacherCache) -> None:
        """Refuse a config that needs teacher outputs the cache does not hold."""
        matches = self.config.intermediate_matches
        if any(m.feature == "attention" for m in matches) or self.teacher_modules:
            raise ValueError(
                "Expected no attention matches (nor matches of named modules) with `teacher_cache` (the cache holds "
                "logits and hidden states, not attention maps or module outputs) but the config has some."
            )
        missing = sorted(self.teacher_layers["hidden"] - set(cache.hidden_layers))
        if missing:
            raise ValueError(
                f"Expected the teacher cache in {cache.path} to hold the hidden states the matches read (layers "
                f"{sorted(self.teacher_layers['hidden'])}) but it lacks {missing}; build it with "
                f"`TeacherCache.build(..., hidden_layers={sorted(self.teacher_layers['hidden'])})`."
            )
        if cache.top_k is not None and self.config.binary:
            raise ValueError(
                f"Expected full logits in the teacher cache for `kd_loss_type='bce'` but {cache.path} holds top-"
                f"{cache.top_k} logits (top-k needs a class dimension); rebuild it with top_k=None."
            )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _index(batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or "index" not in batch:
            raise ValueError("Expected batches with an `index` entry (sample indices) when `teacher_cache` is set.")
        return batch["index"]

    def _cached_view(self, batch: Any, t_batch: Any, s_view: ModelView) -> ModelView:
        """The teacher's view of a batch from the cache: logits, and the hidden states the matches read."""
        index = self._index(batch)
        logits = self.cache.lookup(  # also checks the inputs, the shapes and the class count
            index, t_batch, like=s_view.logits, mask=s_view.logits_mask, classes=not self.config.binary
        )
        layers = self.teacher_layers["hidden"]
        if not layers:
            return ModelView(logits=logits)
        like = s_view.hidden_states[0] if s_view.hidden_states else s_view.logits
        hidden = [
            self.cache.hidden_state(index, i, like) if i in layers else None
            for i in range(self.cache.num_hidden_states or 0)
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
            hidden_states=keep(view.hidden_states, self.teacher_layers["hidden"]),
            attentions=keep(view.attentions, self.teacher_layers["attention"]),
        )

    def _kd_inputs(
        self, s_view: ModelView, t_views: list[ModelView]
    ) -> tuple[Tensor, list[ModelView], Tensor | None, Tensor | None]:
        """The student's logits, the teachers' views, the mask and the labels the KD term reads.

        As they are, unless a teacher view has a ``logits_mask`` of its own that differs from the student's
        (TextBrewer's separate ``logits_mask`` of ``adaptor_T``, e.g. another tokenizer's positions): then each model's
        positions are selected by its own mask (the student's, or all positions without one), in order, and the KD
        term compares the selected (N, C) logits pairwise, without a mask.

        Raises:
            ValueError: If a teacher's mask selects another number of positions than the student's.
        """
        s_mask = s_view.logits_mask
        if all(v.logits_mask is None or _same_mask(v.logits_mask, s_mask) for v in t_views):
            return s_view.logits.float(), t_views, s_mask, s_view.labels
        logits_s = _select(s_view.logits.float(), s_mask, self.config.binary)
        labels = None if s_view.labels is None else _select(s_view.labels, s_mask, binary=True)
        selected = []
        for i, view in enumerate(t_views):
            t_mask = view.logits_mask if view.logits_mask is not None else s_mask
            logits_t = _select(view.logits.float(), t_mask, self.config.binary)
            if logits_t.shape != logits_s.shape:
                raise ValueError(
                    f"Expected the teacher's `logits_mask` to select as many positions as the student's but got "
                    f"{tuple(logits_t.shape)} (teacher {i}) and {tuple(logits_s.shape)} (student)."
                )
            selected.append(replace(view, logits=logits_t, logits_mask=None))
        return logits_s, selected, None, labels

    def _check_projection_widths(self, match: IntermediateMatch, feats_s: list[Tensor], feats_t: list[Tensor]) -> None:
        """A projection's widths against the features, with an error about the projection (not a hint to add one)."""
        _, dim_s, dim_t = match.projection
        for who, feats, dim, side in (("student", feats_s, dim_s, "dim_s"), ("teacher", feats_t, dim_t, "dim_t")):
            for f in feats:
                if f.shape[-1] != dim:
                    raise ValueError(
                        f"Expected the {who}'s features of match `{match.name}` to have width {side}={dim} (its "
                        f"projection={tuple(match.projection)!r}) but got shape {tuple(f.shape)}; fix the projection's "
                        "widths."
                    )

    def _teacher_logits(self, t_views: list[ModelView], temperature: float, binary: bool) -> Tensor:
        logits = [v.logits.float() for v in t_views]
        if len(logits) == 1:
            return logits[0]
        stacked = torch.stack(logits)  # (K, ...)
        if self.teacher_reduce == "logits":
            return stacked.mean(0)
        if binary:
            p = torch.sigmoid(stacked / temperature).mean(0).clamp(1e-7, 1 - 1e-7)
            return temperature * torch.logit(p)
        log_p = torch.log_softmax(stacked / temperature, dim=-1)  # (K, ..., C)
        return temperature * (torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits)))))

    @staticmethod
    def _feature(view: ModelView, match: IntermediateMatch, layer: int | str, who: str) -> Tensor:
        if isinstance(layer, str):
            if view.features is None or layer not in view.features:
                raise ValueError(
                    f"Expected the {who}'s output of module {layer!r} (match `{match.name}`) but got none."
                )
            return view.features[layer].float()
        features = view.hidden_states if match.feature == "hidden" else view.attentions
        return features[layer].float()
