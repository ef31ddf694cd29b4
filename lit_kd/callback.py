"""``DistillationCallback``: distillation added to a LightningModule of your own, by a Trainer callback.

::

    distil = DistillationCallback(teacher, config=DistillationConfig(temperature=2.0), student_module="net")
    trainer = L.Trainer(callbacks=[distil])
    trainer.fit(MyModule(), datamodule)

Your module keeps its ``training_step``, metrics, optimizer, scheduler and checkpoint format. For each training batch
the callback runs the frozen teacher first (under ``torch.no_grad()``), then your ``training_step``; a forward hook
on ``student_module`` records the student's outputs as your code computes them (its forward is not run twice), and
the loss your ``training_step`` returns (the hard-label role) becomes

    ``loss + kd_loss_weight(p) * KD + sum_m weight_m * match_m``

before backward (``config.hard_label_weight`` does not apply: your loss is the hard-label term). The added terms are
logged as ``train/kd`` and ``train/match/<name>`` (user losses also under ``train/kd/<fn name>``), with
``train/temperature``.

The teacher is frozen, in eval mode at every step, moved to the module's device (and dtype under ``*-true``
precision) when fitting starts, not in any optimizer, not in your module's ``hparams`` and not in its checkpoint:
``MyModule.load_from_checkpoint(ckpt)`` works as without the callback. Projections (intermediate matches between
features of different widths) are trainable: they join your optimizer as one more parameter group (optimizer
``optimizer_index``, learning rate ``projection_lr`` or the optimizer's; schedulers that keep per-group
``base_lrs``, such as ``StepLR``, ``LambdaLR`` or ``CosineAnnealingLR``, drive it too) and are saved in and
restored from the checkpoint's callback state, so a resumed run continues exactly. Under DDP the teacher is not
wrapped and the projections' gradients are averaged over processes by the strategy before each optimizer step.

Requirements: automatic optimization, and a ``training_step`` that calls ``student_module`` once per batch and
returns its loss as a tensor or in a dict under ``"loss"`` (``None`` skips the batch, as in Lightning).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lit_kd.adaptors import Inputs, TaskType
from lit_kd.config import DistillationConfig
from lit_kd.distiller import Distiller
from lit_kd.features import FeatureCapture, submodule
from lit_kd.module import training_progress

__all__ = ["DistillationCallback"]


class DistillationCallback(L.Callback):
    """Adds distillation from frozen teachers to the training loss of an existing LightningModule.

    Args:
        teacher: The teacher, a list of teachers (an ensemble), or a dict ``{task: teacher or list}`` (each batch
            names its task in ``batch["task"]``; a batch of several tasks, a ``CombinedLoader``'s ``{task: batch}``,
            is refused with an error: your ``training_step`` would run the student once per task).
        config: What to distil (KD loss, temperature and its schedule, weights, intermediate matches);
            ``hard_label_weight`` must stay 0 (your ``training_step``'s loss is the hard-label term). ``None`` for
            the defaults.
        student_module: Dotted name of the submodule of your LightningModule whose outputs are the student's
            (``"net"``, ``"model.backbone"``); ``None`` for the LightningModule itself (its ``forward``, called as
            ``self(...)``). Intermediate matches' student module names are relative to it.
        teacher_adaptor: ``adaptor(batch, outputs) -> ModelView`` for the teachers (or a dict per task); ``None``
            for :func:`~lit_kd.adaptors.default_adaptor`.
        student_adaptor: The same for the student's outputs; e.g. ``functools.partial(default_adaptor,
            labels_key="y", mask_key="attn")`` for batches ``{"ids", "attn", "y"}``.
        teacher_inputs: Which batch entries feed the teacher's ``forward``: ``None`` (by parameter name), a key map
            ``{parameter: batch_key}`` (``{"input_ids": "ids", "attention_mask": "attn"}``) or a function
            ``inputs(batch)``.
        teacher_reduce: How several teachers' soft targets combine: mean of ``"logits"`` or of ``"probs"``.
        teacher_dtype: ``"float32"``, or ``"bfloat16"`` for the teachers' weights.
        projection_lr: Learning rate of the projections' parameter group; ``None`` for the optimizer's. A match's
            ``projection_options`` give its projection a group of its own (they override this).
        optimizer_index: Which of your optimizers (``trainer.optimizers``) takes the projections.
        task_type: What the logits predict, which picks the adaptor of a model whose adaptor is ``None``:
            ``"sequence"`` (:func:`~lit_kd.adaptors.default_adaptor`), ``"causal_lm"`` (next-token logits shifted by
            one, padding and label -100 masked out of the KD term: :func:`~lit_kd.adaptors.causal_lm_adaptor`) or
            ``"token"`` (per-token logits without a shift: :func:`~lit_kd.adaptors.token_adaptor`).

    Raises:
        ValueError: If ``config.hard_label_weight`` is not 0 or an argument is out of range.
    """

    def __init__(
        self,
        teacher: nn.Module | list[nn.Module] | dict[str, nn.Module],
        config: DistillationConfig | None = None,
        student_module: str | None = None,
        teacher_adaptor: Callable | dict[str, Callable] | None = None,
        student_adaptor: Callable | dict[str, Callable] | None = None,
        teacher_inputs: Inputs = None,
        teacher_reduce: Literal["logits", "probs"] = "logits",
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        projection_lr: float | None = None,
        optimizer_index: int = 0,
        task_type: TaskType = "sequence",
    ) -> None:
        super().__init__()
        if teacher is None:
            raise ValueError("Expected `teacher` to be an nn.Module, a list or a dict of them but got None.")
        config = config if config is not None else DistillationConfig()
        if config.hard_label_weight != 0:
            raise ValueError(
                f"Expected `config.hard_label_weight` to be 0 with DistillationCallback (the loss your training_step "
                f"returns is the hard-label term) but got {config.hard_label_weight}."
            )
        if projection_lr is not None and not projection_lr > 0:
            raise ValueError(f"Expected `projection_lr` to be > 0 or None but got {projection_lr!r}.")
        if not (isinstance(optimizer_index, int) and optimizer_index >= 0):
            raise ValueError(f"Expected `optimizer_index` to be an integer >= 0 but got {optimizer_index!r}.")
        self.distiller = Distiller(
            teacher,
            config,
            teacher_adaptor=teacher_adaptor,
            student_adaptor=student_adaptor,
            teacher_inputs=teacher_inputs,
            teacher_reduce=teacher_reduce,
            teacher_dtype=teacher_dtype,
            task_type=task_type,
        )
        self.student_module = student_module
        self.projection_lr = projection_lr
        self.optimizer_index = optimizer_index
        self._student: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._warned_calls = False

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "Expected a LightningModule with automatic optimization for DistillationCallback (it adds to the "
                "loss training_step returns) but `automatic_optimization` is False."
            )
        self._student = (
            pl_module if self.student_module is None else submodule(pl_module, self.student_module, "LightningModule")
        )
        FeatureCapture(self._student, self.distiller.student_modules, "student")  # checks the names now
        self.distiller.prepare_student(self._student)
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distilled_step(trainer, pl_module, original, args, kwargs)

        # An instance attribute shadows the class's method for this fit only (removed in `teardown`); the user's
        # class and its other instances are untouched.
        pl_module.training_step = training_step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dtype = next((p.dtype for p in self._student.parameters() if p.is_floating_point()), torch.float32)
        self.distiller.to(device=pl_module.device)
        if dtype != torch.float32:  # `*-true` precision converted the module: follow it
            self.distiller.to(dtype=dtype)
        self.distiller.train(pl_module.training)
        self._add_projections_to_optimizer(trainer)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.world_size <= 1 or optimizer is not self._optimizer:
            return
        grads = [p.grad for p in self.distiller.projections.parameters() if p.grad is not None]
        if grads:
            # The projections are not inside DDP: average their gradients as DDP does for the module's.
            flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.__dict__.pop("training_step", None)

    def state_dict(self) -> dict[str, Any]:
        """The projections' weights (the teacher is frozen and never saved)."""
        return {"projections": self.distiller.projections.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.distiller.projections.load_state_dict(state_dict["projections"])

    # ------------------------------------------------------------------ internals
    def _add_projections_to_optimizer(self, trainer: L.Trainer) -> None:
        params = list(self.distiller.projections.parameters())
        self._optimizer = None
        if not params:
            return
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"Expected `optimizer_index` to be < {len(trainer.optimizers)} (the module's optimizers) but got "
                f"{self.optimizer_index}."
            )
        optimizer = trainer.optimizers[self.optimizer_index]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not held & {id(p) for p in params}:
            # One group for the projections (`projection_lr`), one more per match with `projection_options`.
            for group in self.distiller.projection_param_groups(self.projection_lr):
                optimizer.add_param_group(group)
                added = optimizer.param_groups[-1]
                for config in trainer.lr_scheduler_configs:
                    scheduler = config.scheduler
                    if getattr(scheduler, "optimizer", None) is not optimizer or not hasattr(scheduler, "base_lrs"):
                        continue
                    added.setdefault("initial_lr", added["lr"])
                    scheduler.base_lrs.append(added["initial_lr"])
                    if hasattr(scheduler, "_last_lr"):
                        scheduler._last_lr.append(added["lr"])
                    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR, MultiplicativeLR: the first group's factor
                        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        self._optimizer = optimizer

    def _distilled_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, original: Callable, args: tuple, kwargs: dict
    ) -> Any:
        batch = args[0] if args else kwargs["batch"]
        d = self.distiller
        d.start_task(d.task(batch))  # one task per batch; the first batch of each has its views checked
        t_views = d.teacher_views(batch)  # teachers first: their unmatched features are freed before the student's
        outputs: list[Any] = []
        hook = self._student.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        capture = (
            FeatureCapture(self._student, d.student_modules, "student")
            if d.student_modules
            else contextlib.nullcontext()
        )
        try:
            with capture:
                result = original(*args, **kwargs)
        finally:
            hook.remove()
        if result is None:
            return None
        loss = result["loss"] if isinstance(result, Mapping) else result
        if not isinstance(loss, Tensor):
            raise ValueError(
                "Expected training_step to return a loss tensor, a dict with 'loss', or None but got "
                f"{type(result).__name__}."
            )
        if not outputs:
            where = "the LightningModule (called as self(...))" if self.student_module is None else self.student_module
            raise ValueError(
                f"Expected training_step to call the student module {where} but it did not run; set "
                "`student_module` to the submodule that computes the student's outputs."
            )
        if len(outputs) > 1 and not self._warned_calls:
            warnings.warn(
                f"The student module ran {len(outputs)} times in one training_step; distilling its first outputs.",
                stacklevel=2,
            )
            self._warned_calls = True
        features = capture.collected() if isinstance(capture, FeatureCapture) else None
        s_view = d.student_view(batch, outputs[0], features)
        stats: dict[str, Tensor] = {}
        terms = d.loss_terms(s_view, t_views, training_progress(trainer, pl_module.global_step), stats)
        n = s_view.logits.shape[0]
        if "temperature" in stats:
            pl_module.log("train/temperature", stats["temperature"], batch_size=n)
        for name, (value, _) in terms.items():
            pl_module.log(f"train/{name}", value, batch_size=n)
        total = loss + sum(value * weight for value, weight in terms.values())
        if isinstance(result, Mapping):
            return {**result, "loss": total}
        return total
