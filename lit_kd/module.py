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

Several tasks: ``teacher`` (and the adaptors) may be dicts keyed by task name. A training batch is one task's, named
by ``batch["task"]`` (a string, or a collated list of one repeated string), or several tasks' at once,
``{task: batch of that task}``: what Lightning passes to ``training_step`` for a dict of loaders
(``trainer.fit(module, {"a": loader_a, "b": loader_b})``, i.e. ``CombinedLoader({...}, mode="max_size_cycle")``, or
the modes ``"min_size"`` and ``"max_size"``; Lightning refuses ``"sequential"`` in training). A batch counts as several
tasks' only when its keys are all task names (a dict of tensors never does). Each task's terms are computed with its
own teachers and adaptors and the step's loss is the **sum** of the tasks' losses (a loader exhausted in ``"max_size"``
mode, ``None``, is skipped). Logged per task, ``train/<task>/<term>``, ``train/<task>/loss`` and
``train/<task>/temperature``, and in total, ``train/<term>`` and ``train/loss`` (sums over the tasks) and
``train/temperature`` (the mean over the samples). Sampling one task per batch instead (TextBrewer's
``MultiTaskDistiller``: a task drawn per batch in proportion to the data sizes) works with tagged batches.

Metrics of several tasks: ``num_labels`` and ``metric_task`` may be dicts by task (``num_labels={"a": 3, "b": 5}``);
each task gets its own metric collection per stage, logged as ``val/<task>/acc`` (``val/acc`` for the single default
task). A validation/test batch finds its task (1) by its keys when it holds several tasks' batches (a
``CombinedLoader`` in a non-sequential mode); else (2) from ``batch["task"]``, (3) from its loader,
``eval_tasks[dataloader_idx]`` when set, else the loader's key in a dict of loaders (a plain dict or
``CombinedLoader({...}, mode="sequential")``) when that key is a task name, or (4) as the only task. When (2) and (3)
both name a task they must agree. Give each task one loader; ``"max_size_cycle"`` repeats the batches of the shorter
loaders, which would count twice in the metrics, so validate with ``"sequential"`` (or ``"max_size"``).

Different inputs for teacher and student (e.g. different tokenizers): a batch may carry ``teacher`` and ``student``
parts; each model is called with its part (top-level ``labels``/``task`` are shared). Which entries feed which
``forward`` argument: by name by default, or ``teacher_inputs``/``student_inputs`` (a key map or a function).

Token-level tasks: ``task_type="causal_lm"`` (decoder LMs: the logits at position ``t`` predict token ``t + 1``) or
``"token"`` (masked LMs, token classification: no shift) reads both models with
:func:`~lit_kd.adaptors.causal_lm_adaptor` / :func:`~lit_kd.adaptors.token_adaptor` (unless an adaptor is given).
Only the positions whose label is not -100 and whose tokens are real (``attention_mask``) count, whatever the pad
token ids: in the KD term, in the hard-label loss (cross-entropy over those positions) and in the metrics, logged as
``val/ppl`` (``torchmetrics.text.Perplexity``) and ``val/acc`` (micro accuracy over the vocabulary: next-token
accuracy for a causal LM), and ``test/...``. A (B, L, C) student logits tensor without a ``logits_mask`` makes a
``UserWarning`` (every position would count). In YAML::

    model:
      class_path: lit_kd.DistillationModule
      init_args:
        task_type: causal_lm              # or token; adaptors may still be given: lit_kd.adaptors.causal_lm_adaptor

On-policy and sequence-level data (GKD, as TRL's ``GKDTrainer``; ``task_type="causal_lm"`` only): for a fraction
``on_policy_fraction`` of the training batches (TRL's ``lmbda``; drawn per batch from ``on_policy_seed`` and the batch
number, so reproducible) the student samples up to ``max_new_tokens`` tokens after each prompt (``generate`` under
``torch.no_grad()``, in eval mode, then back to train mode) and the KD term is computed on the student's own sequences,
scored by the teacher; with ``seq_kd`` the (first) teacher samples the continuations of the other batches. Batches
carry their prompts left-padded as ``prompt_input_ids``/``prompt_attention_mask`` (see :mod:`lit_kd.generation`);
only completion tokens count (labels -100 on the prompt and after a row's first end-of-sequence token). As TRL, a
generated batch trains on the divergence only: the hard-label term is left out (its sampled tokens are no gold labels);
intermediate matches, computed on the same sequence, stay. Logged: ``train/on_policy`` (1.0 for a batch the student
generated), ``train/seq_kd`` (1.0 for one the teacher generated, with ``seq_kd``), and the running mean time of a whole
training step (generation, forward, backward, optimizer) by kind, ``train/step_s_on_policy``, ``train/step_s_seq_kd``
and ``train/step_s_off_policy`` (also :attr:`DistillationModule.step_seconds`). In YAML::

    model:
      init_args:
        task_type: causal_lm
        on_policy_fraction: 0.5           # TRL's lmbda
        max_new_tokens: 64

Inference: ``teacher`` may be ``None`` (``DistillationModule.load_from_checkpoint(ckpt, student=MyStudent())``
needs no teacher); only training needs one. For the student alone, ``lit_kd.export.load_student(ckpt)`` rebuilds
a ``transformers`` student from the checkpoint itself (or loads the weights into yours), reading no teacher.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy
from torchmetrics.text import Perplexity

from lit_kd.adaptors import IGNORE_INDEX, Inputs, ModelView, TaskType, check_task_type, model_num_labels
from lit_kd.config import DistillationConfig
from lit_kd.distiller import DEFAULT_TASK, Distiller, batch_task, split_tasks
from lit_kd.export import STUDENT_RECORD_KEY, save_model, student_record
from lit_kd.generation import GenerationSource, batch_source, check_generation_args, generated_batch

__all__ = ["DEFAULT_TASK", "DistillationModule", "training_progress"]


def training_progress(trainer: L.Trainer | None, global_step: int) -> float:
    """``global_step / estimated_stepping_batches`` in [0, 1]; 0 when the length of training is unknown."""
    total = trainer.estimated_stepping_batches if trainer is not None else float("inf")
    return min(1.0, global_step / total) if total and total != float("inf") else 0.0


def _vocab_size(model: nn.Module) -> int | None:
    """The class count of a token-level model's logits: its output embeddings' size (a language model's vocabulary,
    ``get_output_embeddings()`` of ``transformers``), else its ``num_labels`` (token classification)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return model_num_labels(model)


def _metric_plan(
    teacher_tasks: list[str], metric_task: Any, num_labels: Any, student: nn.Module, task_type: str = "sequence"
) -> dict[str, tuple[str, int | None]]:
    """``{task: (metric kind, num_labels)}`` of every task with metrics (see ``DistillationModule``'s arguments); the
    kind is ``metric_task``, or ``"token"`` (perplexity and accuracy over scored tokens) for token ``task_type``s."""
    named = (("metric_task", metric_task), ("num_labels", num_labels))
    dicts = {arg: value for arg, value in named if isinstance(value, Mapping)}
    tasks = teacher_tasks or list(dict.fromkeys(task for value in dicts.values() for task in value)) or [DEFAULT_TASK]
    for arg, value in dicts.items():
        unknown = [task for task in value if task not in tasks]
        if unknown:
            raise ValueError(
                f"Expected `{arg}` to name only the teachers' tasks {tasks} but got {unknown} too"
                + ("; give `teacher` as a dict by task." if teacher_tasks == [DEFAULT_TASK] else ".")
            )
    plan = {}
    for task in tasks:
        by_task = isinstance(metric_task, Mapping)
        kind = metric_task.get(task) if by_task else metric_task
        if kind not in ("multiclass", "binary"):
            arg = f"metric_task[{task!r}]" if by_task else "metric_task"
            raise ValueError(f"Expected `{arg}` to be 'multiclass' or 'binary' but got {kind!r}.")
        n = num_labels.get(task) if isinstance(num_labels, Mapping) else num_labels
        if task_type != "sequence":
            if kind != "multiclass":
                raise ValueError(
                    f"Expected `metric_task` to be 'multiclass' with task_type={task_type!r} (token metrics: "
                    f"perplexity and accuracy over the vocabulary) but got {kind!r}."
                )
            n = n if n is not None else _vocab_size(student)
            if n is None:
                raise ValueError(
                    f"Expected `num_labels` (the vocabulary size V of the token metrics, task_type={task_type!r}) but "
                    f"got None and the student does not say it ({type(student).__name__} has no output embeddings, "
                    "`config.num_labels` or `num_labels`)."
                )
            plan[task] = ("token", n)
            continue
        if kind == "multiclass" and n is None:
            if isinstance(num_labels, Mapping):
                raise ValueError(
                    f"Expected `num_labels` to give the classes of task {task!r} (its metrics are multiclass) but it "
                    f"names only {list(num_labels)}."
                )
            n = model_num_labels(student)
            if n is None:
                raise ValueError(
                    "Expected `num_labels` (the classes of the metrics) but got None and the student does not say "
                    f"its class count ({type(student).__name__} has no `config.num_labels` or `num_labels`)."
                )
        plan[task] = (kind, n)
    return plan


def _metrics(kind: str, num_labels: int | None, stage: str, task: str) -> MetricCollection:
    """One stage's metric collection for one task, prefixed ``<stage>/`` (default task) or ``<stage>/<task>/``."""
    if kind == "token":
        # Updated one by one (perplexity reads (B, L, V), accuracy (N, V)), so no compute groups.
        metrics = MetricCollection(
            {
                "ppl": Perplexity(ignore_index=IGNORE_INDEX),
                "acc": MulticlassAccuracy(num_classes=num_labels, ignore_index=IGNORE_INDEX, average="micro"),
            },
            compute_groups=False,
        )
    elif kind == "multiclass":
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_labels, average="micro")})
    else:
        metrics = MetricCollection({"auc": BinaryAUROC(), "acc": BinaryAccuracy()})
    return metrics.clone(prefix=f"{stage}/" if task == DEFAULT_TASK else f"{stage}/{task}/")


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
        projection_lr: Learning rate of the projection layers; ``None`` for the optimizer's. A match's
            ``projection_options`` (e.g. ``{"lr": 1e-3}``) give its projection a parameter group of its own.
        teacher_reduce: How several teachers' soft targets combine: mean of ``"logits"`` or of ``"probs"``.
        teacher_dtype: ``"float32"``, or ``"bfloat16"`` to halve the teachers' memory and time (outputs are cast
            back to float32 for the losses).
        save_teacher: Keep the teachers' weights in checkpoints. Default False: they are frozen, so the model
            that builds the module supplies them again; checkpoints stay small.
        metric_task: Validation/test metrics of the student: ``"multiclass"`` (accuracy) or ``"binary"`` (AUROC
            and accuracy of sigmoid outputs, e.g. knowledge tracing), or a dict giving each task's.
        num_labels: Classes for ``"multiclass"`` metrics, or a dict giving each multiclass task's
            (``{"a": 3, "b": 5}``); ``None`` for the student's own (``config.num_labels`` of a ``transformers``
            model, or its ``num_labels`` attribute). ``lit-kd`` links it from the data. The tasks with metrics are
            the teachers' (when ``teacher`` is a dict), else those these dicts name, else the single default task.
        teacher_cache: A folder written by :meth:`lit_kd.cache.TeacherCache.build`: the teacher's logits (full or
            top-k) and the hidden states the matches read are taken from it by ``batch["index"]`` instead of running
            the teacher (one teacher; hidden-state matches need their teacher layers cached; no attention matches).
            It is checked against the teacher's weights and the config here and against every batch's inputs.
        teacher_cache_verify: Check the cache files' checksums when opening it (about 1 s per GB); False skips only
            that.
        compile: Compile the student's (and live teachers') forward with ``torch.compile`` when the trainer sets the
            module up (``nn.Module.compile``: in place, so checkpoints keep their keys).
        compile_backend: The ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` only traces).
        teacher_inputs: Which batch entries feed the teachers' ``forward``: ``None`` (entries named like its
            parameters), a key map ``{parameter: batch_key}`` or a function ``inputs(batch)`` returning keyword
            (dict) or positional (tuple) arguments.
        student_inputs: The same for the student.
        eval_tasks: The task of each validation/test loader, by ``dataloader_idx`` (``["a", "b"]`` for
            ``val_dataloaders=[loader_a, loader_b]``); ``None`` to take it from ``batch["task"]``, from the key of a
            dict of loaders, or as the only task (see "Metrics of several tasks" in this module's docstring).
        task_type: What the logits predict (see "Token-level tasks" in this module's docstring): ``"sequence"``
            (one prediction per sample: :func:`~lit_kd.adaptors.default_adaptor`, ``metric_task`` metrics),
            ``"causal_lm"`` (next-token logits: :func:`~lit_kd.adaptors.causal_lm_adaptor` shifts them by one) or
            ``"token"`` (masked LMs, token classification: :func:`~lit_kd.adaptors.token_adaptor`). It picks the
            adaptor of each model whose adaptor is ``None``; for the token types the metrics are ``ppl`` and ``acc``
            over the scored positions (``num_labels``: the vocabulary size, by default the student's). In YAML:
            ``task_type: causal_lm``.
        on_policy_fraction: The fraction of training batches, in [0, 1], whose continuations the student generates
            (on-policy distillation; TRL's ``lmbda``). 0: none. Needs ``task_type="causal_lm"``, prompts in the
            batches (see "On-policy and sequence-level data" in this module's docstring) and ``kd_loss_weight`` > 0.
        seq_kd: The teacher (the first of the batch's task) generates the continuations of the batches the student
            does not generate (sequence-level KD; TRL's ``seq_kd``). Same needs as ``on_policy_fraction``.
        max_new_tokens: The most tokens generated after each prompt (>= 1).
        generation_temperature: The sampling temperature of generation (> 0; 1: the model's distribution).
        generation_top_k: Sample among the ``generation_top_k`` most likely tokens; ``None`` for all.
        on_policy_seed: Seeds the draw of which batches are generated (one draw per training batch number: the
            same batches for the same seed, on every rank and after a resume).

    Raises:
        ValueError: If ``num_labels`` is None for ``"multiclass"`` metrics and the student does not say its class
            count, a dict names a task without a teacher or misses a task, or an argument is out of its range.
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
        metric_task: Literal["multiclass", "binary"] | dict[str, Literal["multiclass", "binary"]] = "multiclass",
        num_labels: int | dict[str, int] | None = None,
        teacher_cache: str | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        teacher_inputs: Inputs = None,
        student_inputs: Inputs = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        eval_tasks: list[str] | None = None,
        teacher_cache_verify: bool = True,
        task_type: TaskType = "sequence",
        on_policy_fraction: float = 0.0,
        seq_kd: bool = False,
        max_new_tokens: int = 32,
        generation_temperature: float = 1.0,
        generation_top_k: int | None = None,
        on_policy_seed: int = 0,
    ) -> None:
        super().__init__()
        if student is None:
            raise ValueError("Expected `student` to be an nn.Module (the model that trains) but got None.")
        check_task_type(task_type)
        if task_type == "sequence" and type(student).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            warnings.warn(
                f"The student {type(student).__name__} looks like a causal language model but task_type='sequence': "
                "its logits are not shifted and padding may count in the metrics; pass task_type='causal_lm'.",
                UserWarning,
                stacklevel=2,
            )
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"Expected `lr_scheduler_interval` to be 'step' or 'epoch' but got {lr_scheduler_interval!r}."
            )
        teacher_tasks = list(teacher) if isinstance(teacher, Mapping) else [] if teacher is None else [DEFAULT_TASK]
        plan = _metric_plan(teacher_tasks, metric_task, num_labels, student, task_type)
        if eval_tasks is not None:
            unknown = [task for task in eval_tasks if task not in plan]
            if unknown:
                raise ValueError(f"Expected `eval_tasks` to name tasks among {list(plan)} but got {unknown}.")
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
        if not isinstance(num_labels, Mapping):  # the class count found (the student's when None)
            num_labels = next((n for _, n in plan.values() if n is not None), None)
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
            teacher_cache_verify=teacher_cache_verify,
            task_type=task_type,
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
        # One metric collection per task and stage: `val/acc` for the single default task, else `val/<task>/acc`.
        self.metric_tasks = {task: kind for task, (kind, _) in plan.items()}
        self.val_metrics = nn.ModuleDict({task: _metrics(*plan[task], "val", task) for task in plan})
        self.test_metrics = nn.ModuleDict({task: _metrics(*plan[task], "test", task) for task in plan})
        check_generation_args(
            on_policy_fraction, seq_kd, max_new_tokens, generation_temperature, generation_top_k, on_policy_seed
        )
        self.generates = on_policy_fraction > 0 or seq_kd
        if self.generates:
            self._check_generation(teacher, student, on_policy_fraction, seq_kd, task_type, teacher_cache)
        self._batch_source: GenerationSource | None = None
        self._batch_count = 0  # training batches seen outside a Trainer (which counts them itself)
        self._step_start: float | None = None
        self._step_times: dict[str, tuple[float, int]] = {}  # {kind: (seconds, steps)}

    # ------------------------------------------------------------------ inference
    def forward(self, batch: Any) -> Any:
        """The student's outputs for ``batch`` (its ``student`` part if the batch has one)."""
        return self.distiller.call_student(self.student, batch)[0]

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        progress = training_progress(self._trainer, self.global_step)
        pairs = self.distiller.task_batches(batch)  # one pair, or one per task of a CombinedLoader's batch
        per_task = len(pairs) > 1 or pairs[0][0] != DEFAULT_TASK
        totals: dict[str, tuple[Tensor, float]] = {}
        temperature_sum, n_total = None, 0
        source = self._batch_source = self._draw_source() if self.generates else None
        for task, task_batch in pairs:
            if source is not None:
                task_batch = self._generated_batch(source, task, task_batch)
            terms, stats, n = self._task_terms(task, task_batch, progress)
            if source is not None:  # as TRL: the divergence only on generated sequences (no gold labels)
                terms = {name: term for name, term in terms.items() if name != "hard" and not name.startswith("hard/")}
            if per_task:
                self._log_terms(f"train/{task}/", terms, stats, n)
            for name, (value, weight) in terms.items():  # same config, so the same weight in every task
                totals[name] = (totals[name][0] + value if name in totals else value, weight)
            if "temperature" in stats:
                part = stats["temperature"] * n
                temperature_sum = part if temperature_sum is None else temperature_sum + part
            n_total += n
        stats = {} if temperature_sum is None else {"temperature": temperature_sum / n_total}
        if self.generates:
            self.log("train/on_policy", float(source == "student"), batch_size=n_total)
            if self.hparams.seq_kd:
                self.log("train/seq_kd", float(source == "teacher"), batch_size=n_total)
        return self._log_terms("train/", totals, stats, n_total)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad]}]
        # The projections: `projection_lr`, or a match's own `projection_options` (TextBrewer's `proj[3]`).
        groups += self.distiller.projection_param_groups(self.hparams.projection_lr)
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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter() if self.generates else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: the time of the whole step, by kind (on-policy, seq_kd, off-policy).
        if self._step_start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._step_start
        self._step_start = None
        kind = {"student": "on_policy", "teacher": "seq_kd", None: "off_policy"}[self._batch_source]
        total, count = self._step_times.get(kind, (0.0, 0))
        self._step_times[kind] = (total + seconds, count + 1)
        self.log(f"train/step_s_{kind}", (total + seconds) / (count + 1), batch_size=1)

    @property
    def step_seconds(self) -> dict[str, float]:
        """The mean time in seconds of a training step (batch start to after the optimizer step) by kind of batch:
        ``on_policy`` (the student generated it), ``seq_kd`` (the teacher did) and ``off_policy`` (the data's), over
        the steps of this process with generation on (``on_policy_fraction`` > 0 or ``seq_kd``); empty otherwise."""
        return {kind: total / count for kind, (total, count) in self._step_times.items()}

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states made under inference mode; fresh ones avoid that.
        for metrics in (*self.val_metrics.values(), *self.test_metrics.values()):
            metrics.reset()

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
    def _check_generation(
        self,
        teacher: Any,
        student: nn.Module,
        on_policy_fraction: float,
        seq_kd: bool,
        task_type: str,
        teacher_cache: str | None,
    ) -> None:
        """What on-policy / seq_kd generation needs, checked at construction."""
        which = f"on_policy_fraction={on_policy_fraction}" if on_policy_fraction > 0 else "seq_kd=True"
        if task_type != "causal_lm":
            raise ValueError(
                f"Expected task_type='causal_lm' with {which} (generation continues prompts of a causal language "
                f"model) but got task_type={task_type!r}."
            )
        if teacher_cache is not None:
            raise ValueError(
                f"Expected no `teacher_cache` with {which}: the teacher must score the sequences generated during "
                "training, which no cache holds."
            )
        if self.config.kd_loss_weight <= 0:
            raise ValueError(
                f"Expected `kd_loss_weight` > 0 with {which} (generated batches train on the KD term only) but got "
                f"{self.config.kd_loss_weight}."
            )
        models = [("student", student)] if on_policy_fraction > 0 else []
        models += [("teacher", t) for t in self.all_teachers()] if seq_kd else []
        for who, model in models:
            if not callable(getattr(model, "generate", None)):
                raise ValueError(
                    f"Expected the {who} to have `generate` (a `transformers` language model) with {which} but got "
                    f"{type(model).__name__}."
                )

    def _draw_source(self) -> GenerationSource | None:
        """Who generates this training batch (see :func:`lit_kd.generation.batch_source`), by the batch's number
        across epochs (the Trainer's, restored on resume; a count of calls outside a Trainer)."""
        if self._trainer is not None:
            index = self._trainer.fit_loop.epoch_loop.total_batch_idx
        else:
            index, self._batch_count = self._batch_count, self._batch_count + 1
        hp = self.hparams
        return batch_source(hp.on_policy_seed, index, hp.on_policy_fraction, hp.seq_kd)

    def _generated_batch(self, source: GenerationSource, task: str, batch: Any) -> dict[str, Any]:
        """``batch`` with its prompts' continuations by the student or the task's first teacher."""
        if source == "teacher" and task not in self.distiller.teachers:
            raise RuntimeError(f"Expected a teacher of task {task!r} to generate with `seq_kd=True` but got none.")
        model = self.student if source == "student" else self.distiller.teachers[task][0]
        hp = self.hparams
        return generated_batch(model, batch, hp.max_new_tokens, hp.generation_temperature, hp.generation_top_k)

    def _task_terms(
        self, task: str, batch: Any, progress: float
    ) -> tuple[dict[str, tuple[Tensor, float]], dict[str, Tensor], int]:
        """One task's loss terms, statistics (the mean temperature) and batch size."""
        d = self.distiller
        d.start_task(task)
        if d.cache is None:
            # Teachers first, keeping only the features a match reads: the other layers' hidden states and attention
            # maps are freed before the student's forward instead of living through it (a smaller peak footprint).
            t_views = d.teacher_views(batch, task=task)
            s_view = d.student_view(batch, *d.call_student(self.student, batch), task=task)
        else:
            s_view = d.student_view(batch, *d.call_student(self.student, batch), task=task)
            t_views = d.teacher_views(batch, s_view, task=task)
        stats: dict[str, Tensor] = {}
        terms = d.loss_terms(s_view, t_views, progress, stats)
        return terms, stats, s_view.logits.shape[0]

    def _log_terms(
        self, prefix: str, terms: dict[str, tuple[Tensor, float]], stats: dict[str, Tensor], n: int
    ) -> Tensor:
        """Log the terms under ``prefix`` (``train/`` or ``train/<task>/``) and return their weighted sum."""
        if "temperature" in stats:
            self.log(f"{prefix}temperature", stats["temperature"], batch_size=n)
        for name, (value, weight) in terms.items():
            self.log(f"{prefix}{name}", value, batch_size=n)
            if name.count("/") and not name.startswith("match/"):
                continue  # `kd/<fn>`, `hard/<fn>`: the user loss's own name, logged once
            self.log(f"{prefix}{name}_weighted", value * weight, batch_size=n)
            if name in ("kd", "hard") and prefix == "train/":
                self.log(f"{prefix}{name}_weight", weight, batch_size=n)
        loss = sum(value * weight for value, weight in terms.values())
        self.log(f"{prefix}loss", loss, prog_bar=prefix == "train/", batch_size=n)
        return loss

    def _eval_step(self, batch: Any, stage: Literal["val", "test"], dataloader_idx: int) -> None:
        d = self.distiller
        collections = self.val_metrics if stage == "val" else self.test_metrics
        for task, task_batch in self._eval_batches(batch, stage, dataloader_idx):
            view = d.student_view(task_batch, *d.call_student(self.student, task_batch), task=task)
            if view.labels is None:
                raise ValueError("Expected labels in validation/test batches (the adaptor gives `labels=None`).")
            metrics = collections[task]
            if self.metric_tasks[task] == "token":
                self._update_token_metrics(metrics, view)
                self.log_dict(metrics, prog_bar=True, batch_size=view.labels.shape[0], add_dataloader_idx=False)
                continue
            logits, labels = view.logits.float(), view.labels
            if view.logits_mask is not None:
                logits, labels = logits[view.logits_mask], labels[view.logits_mask]
            if self.metric_tasks[task] == "binary":
                metrics.update(torch.sigmoid(logits.reshape(-1)), labels.reshape(-1))
            else:
                metrics.update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            # The names carry the task, so no `/dataloader_idx_<i>` suffix when there are several loaders.
            self.log_dict(metrics, prog_bar=True, batch_size=labels.numel(), add_dataloader_idx=False)

    @staticmethod
    def _update_token_metrics(metrics: MetricCollection, view: ModelView) -> None:
        """Perplexity and accuracy over the positions the view scores (label not -100, inside ``logits_mask``)."""
        logits, labels = view.logits.float(), view.labels  # (B, L, V), (B, L)
        if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"Expected (B, L, V) token logits and (B, L) labels for the token metrics (task_type "
                f"'causal_lm'/'token') but got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
            )
        if view.logits_mask is not None:
            labels = labels.masked_fill(~view.logits_mask.bool(), IGNORE_INDEX)  # (B, L)
        prefix = metrics.prefix or ""
        metrics[f"{prefix}ppl"].update(logits, labels)
        metrics[f"{prefix}acc"].update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def _eval_batches(self, batch: Any, stage: str, dataloader_idx: int) -> list[tuple[str, Any]]:
        """The ``(task, batch of that task)`` pairs of a validation/test batch (see "Metrics of several tasks")."""
        tasks = list(self.metric_tasks)
        parts = split_tasks(batch, tasks)
        if parts is not None:
            return list(parts.items())
        tagged, loader = batch_task(batch), self._loader_task(stage, dataloader_idx)
        if tagged is not None and loader is not None and tagged != loader:
            raise ValueError(
                f"Expected `batch['task']` to be {loader!r} (the task of {stage} loader {dataloader_idx}) but got "
                f"{tagged!r}."
            )
        task = tagged if tagged is not None else loader if loader is not None else tasks[0] if len(tasks) == 1 else None
        if task is None:
            raise ValueError(
                f"Expected to know the task of {stage} loader {dataloader_idx} (one of {tasks}) but got none: tag its "
                "batches with `batch['task']`, give a dict of loaders keyed by task, or set `eval_tasks`."
            )
        if task not in self.metric_tasks:
            raise ValueError(f"Expected the task of a {stage} batch to be one of {tasks} but got {task!r}.")
        return [(task, batch)]

    def _loader_task(self, stage: str, dataloader_idx: int) -> str | None:
        """The task of a validation/test loader: ``eval_tasks[dataloader_idx]``, or its key if that is a task."""
        eval_tasks = self.hparams.eval_tasks
        if eval_tasks is not None:
            if dataloader_idx >= len(eval_tasks):
                raise ValueError(
                    f"Expected `eval_tasks` to give the task of {stage} loader {dataloader_idx} but it names "
                    f"{len(eval_tasks)} loaders: {eval_tasks}."
                )
            return eval_tasks[dataloader_idx]
        if self._trainer is None:
            return None
        loaders = self._trainer.val_dataloaders if stage == "val" else self._trainer.test_dataloaders
        # A flat dict of loaders (a plain dict, or a CombinedLoader's in "sequential" mode): `dataloader_idx` counts
        # its entries in order.
        if not isinstance(loaders, Mapping) or any(isinstance(v, (Mapping, list, tuple)) for v in loaders.values()):
            return None
        keys = list(loaders)
        key = keys[dataloader_idx] if dataloader_idx < len(keys) else None
        return key if key in self.metric_tasks else None
