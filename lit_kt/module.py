"""Lightning systems for knowledge tracing: one ``KTModule`` for any model with the KT forward contract.

A KT model is an ``nn.Module`` whose ``forward(exercises, responses)`` maps (B, L) ids and 0/1 responses to (B, L)
logits, where ``logits[:, t]`` sees ``exercises[:, :t+1]`` and ``responses[:, :t]`` only (:class:`~lit_kt.models.SAKT`,
:class:`~lit_kt.models.DKT`). It also exposes ``num_exercises``, ``max_len`` (``None`` when unbounded) and ``config``
(its constructor arguments, so a checkpoint can rebuild it).

Question-level data (``docs/kt_question_level.md``): when a batch carries ``questions``, ``KTModule`` passes them as
``forward(exercises, responses, questions=...)`` to a model whose ``forward`` takes a ``questions`` argument and whose
``num_questions`` (if it has one) is not 0 (:class:`~lit_kt.models.AKT` with Rasch embeddings); other models (SAKT,
DKT, AKT built with ``num_questions=0``) get the concepts only. When a batch carries ``group_offset`` (multi-concept
questions expanded into one row per concept), the logits come from :func:`leak_free_logits` and the metrics from
:func:`fuse_questions`: each question is scored once, by the mean probability of its rows.

Checkpoint policy: ``save_hyperparameters`` stores the model as ``{"class_path", "init_args"}`` (built from the
model's ``config``), so ``KTModule.load_from_checkpoint(path)`` rebuilds it with no arguments, whether the module
was made in Python or by ``lit-kt``. Optimizer and scheduler callables are not stored: pass them again (or keep
them in the YAML) when resuming training.

A checkpoint's ``class_path`` is imported only from a trusted module: ``lit_kt``, ``torch.nn``, those named with
:func:`allow_model_modules` or, comma separated, in ``$LIT_KT_ALLOWED_MODULES``; any other is refused before it is
imported (importing a module runs its code), and it must name an ``nn.Module`` subclass.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryCalibrationError

from lit_kt.calibration import calibrated_probabilities
from lit_kt.inference import predict_next
from lit_kt.losses import masked_bce_with_logits
from lit_kt.models import AKT, DKT, SAKT


def _model_spec(model: nn.Module) -> dict[str, Any]:
    cls = type(model)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(model.config)}


ALLOWED_MODULES_ENV = "LIT_KT_ALLOWED_MODULES"
"""The environment variable whose comma-separated module names are trusted as :func:`allow_model_modules` trusts."""

_DEFAULT_ALLOWED_MODULES = ("lit_kt", "torch.nn")
_allowed_modules: list[str] = []
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def allow_model_modules(*modules: str) -> tuple[str, ...]:
    """Trusts more modules to hold the model classes that ``lit-kt`` checkpoints name.

    A checkpoint stores its model as ``{"class_path", "init_args"}``; :meth:`KTModule.load_from_checkpoint` and
    :func:`~lit_kt.factories.model_from_checkpoint` import ``class_path`` only if its module is ``lit_kt``,
    ``torch.nn`` or a module allowed here or in ``$LIT_KT_ALLOWED_MODULES`` (comma separated, e.g.
    ``LIT_KT_ALLOWED_MODULES=my_project.models lit-kd fit ...``), or a submodule of one; any other name (e.g.
    ``os.system``) is refused before anything is imported, and an allowed one must name an ``nn.Module`` subclass.
    Allow only modules whose import you trust: importing a module runs its code.

    Args:
        *modules: Module names, e.g. ``"my_project.models"`` (a trailing ``.`` is ignored); none to only read the
            list.

    Returns:
        The modules trusted now: the defaults, those allowed by this function, then those of the environment.

    Raises:
        ValueError: If a name is not a dotted Python module name.

    Example:
        >>> "my_project.models" in allow_model_modules("my_project.models")  # doctest: +SKIP
        True
    """
    for module in modules:
        name = module.rstrip(".") if isinstance(module, str) else module
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ValueError(
                f"Expected `modules` to be dotted module names such as 'my_project.models' but got {module!r}."
            )
        if name not in _allowed_modules:
            _allowed_modules.append(name)
    from_env = [m.strip().rstrip(".") for m in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if m.strip()]
    return tuple(dict.fromkeys([*_DEFAULT_ALLOWED_MODULES, *_allowed_modules, *from_env]))


def _model_class(class_path: Any, source: str = "`model.class_path`") -> type[nn.Module]:
    """The ``nn.Module`` subclass named by ``class_path``, imported only when its module is trusted.

    Args:
        class_path: ``"<module>.<Class>"`` (e.g. from a checkpoint's hyperparameters).
        source: Where it was read, for the messages (e.g. ``"the checkpoint runs/best.ckpt"``).

    Raises:
        ValueError: If ``class_path`` is not a dotted name in a trusted module (nothing is imported then).
        ImportError: If it does not import.
        TypeError: If it names something else than an ``nn.Module`` subclass.
    """
    if not isinstance(class_path, str) or not _MODULE_NAME.fullmatch(class_path) or "." not in class_path:
        raise ValueError(f"Expected {source} to name a model class as `module.Class` but got {class_path!r}.")
    allowed = allow_model_modules()
    module_name, _, name = class_path.rpartition(".")
    if not any(module_name == module or module_name.startswith(f"{module}.") for module in allowed):
        raise ValueError(
            f"Refusing to import the model class {class_path!r} of {source}: expected a class in one of the trusted "
            f"modules ({', '.join(allowed)}), since importing a module runs its code. If you trust it, allow the "
            f"module with `lit_kt.module.allow_model_modules({module_name!r})` or "
            f"${ALLOWED_MODULES_ENV}={module_name}."
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"Expected the model class {class_path!r} of {source} to be importable but it is not: {e}"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(
            f"Expected {source} to name an nn.Module subclass but got {class_path!r} ({type(cls).__name__})."
        )
    return cls


def group_bounds(group_offset: Tensor) -> tuple[Tensor, Tensor]:
    """The first row and the number of rows of the question each position belongs to.

    Args:
        group_offset: (B, L) each row's 0-based position among the rows expanded from its question (a batch's
            ``group_offset``: 0 for single-concept rows and at padding).

    Returns:
        ``(start, size)``, both (B, L) int64: the position of the question's first row and its number of rows.
    """
    B, L = group_offset.shape
    start = torch.arange(L, device=group_offset.device).expand(B, L) - group_offset  # (B, L)
    counts = torch.zeros(B, L, dtype=torch.long, device=group_offset.device)
    counts.scatter_add_(1, start, torch.ones_like(start))  # (B, L) rows per question, at its first row
    return start, counts.gather(1, start)


def leak_free_logits(
    forward: Callable[..., Tensor],
    exercises: Tensor,
    responses: Tensor,
    questions: Tensor | None,
    group_offset: Tensor,
) -> Tensor:
    """Logits of expanded multi-concept questions where no row sees another row of its own question.

    In an expanded sequence the ``k`` rows of one question are consecutive and share its response, so a causal model
    predicting concept row ``j`` would see the response of rows ``< j``: the answer itself. Here row ``j`` of every
    question is predicted in pass ``j`` (``k_max`` passes in all, the most rows of a question in the batch), in which
    the rows of every question are rotated by ``j`` so that row ``j`` comes first: a causal model then predicts it from
    the earlier questions (all their rows, in rotated order) and its own concept and question only, as pyKT's
    question-level evaluation does. With one row per question this is one ordinary forward pass.

    Args:
        forward: ``forward(exercises, responses, questions)`` returning (B, L) logits, causal as in the KT contract.
        exercises: (B, L) concept ids.
        responses: (B, L) 0/1 responses.
        questions: (B, L) question ids, or ``None``.
        group_offset: (B, L) each row's position among its question's rows (see :func:`group_bounds`).

    Returns:
        (B, L) logits; ``logits[b, t]`` depends on no row of ``t``'s question other than ``t`` itself (its exercise
        and question, never its response).
    """
    start, size = group_bounds(group_offset)  # (B, L), (B, L)
    passes = int(size.max()) if size.numel() else 1
    if passes <= 1:
        return forward(exercises, responses, questions)
    logits = None
    for j in range(passes):
        source = start + (group_offset + j) % size  # (B, L) rotation by j inside every question
        rotated = forward(
            exercises.gather(1, source),
            responses.gather(1, source),
            None if questions is None else questions.gather(1, source),
        )  # (B, L); the first row of each question now holds its row j (mod its size)
        first = rotated.gather(1, start)  # (B, L) prediction of the first row of each position's question
        logits = first if logits is None else torch.where(group_offset == j, first, logits)
    return logits


def fuse_questions(
    probabilities: Tensor, responses: Tensor, mask: Tensor, group_offset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One score per question: the mean probability of its expanded rows (pyKT's late fusion, "mean").

    Args:
        probabilities: (B, L) predicted probabilities of a correct answer.
        responses: (B, L) 0/1 responses (equal over a question's rows).
        mask: (B, L) bool, the scored rows; a question's rows are all scored or none (windows keep them together).
        group_offset: (B, L) each row's position among its question's rows, or ``None`` for one row per question.

    Returns:
        ``(scores, labels)``, both 1-D of one entry per scored question, in batch order.

    Example:
        >>> p = torch.tensor([[0.2, 0.6, 0.9]]); r = torch.tensor([[1, 1, 0]]); m = torch.ones(1, 3, dtype=torch.bool)
        >>> fuse_questions(p, r, m, torch.tensor([[0, 1, 0]]))
        (tensor([0.4000, 0.9000]), tensor([1, 0]))
    """
    if group_offset is None:
        return probabilities[mask], responses[mask]
    start, _ = group_bounds(group_offset)
    B, L = mask.shape
    rows = torch.arange(B, device=mask.device).unsqueeze(1) * L  # (B, 1)
    key = (rows + start)[mask]  # (N,) one key per question, non-decreasing in row-major order
    _, inverse, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    scores = torch.zeros(counts.shape, dtype=probabilities.dtype, device=probabilities.device)
    scores.index_add_(0, inverse, probabilities[mask])
    labels = torch.zeros(counts.shape, dtype=responses.dtype, device=responses.device)
    labels.scatter_(0, inverse, responses[mask])  # every row of a question carries its response
    return scores / counts, labels


def _takes_questions(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``questions`` argument and the model embeds questions (``num_questions``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "questions" in parameters and getattr(model, "num_questions", 1) != 0


def _build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``{"class_path", "init_args"}`` (a checkpoint's hyperparameters).

    The class is checked before it is imported (:func:`allow_model_modules`).
    """
    cls = _model_class(spec.get("class_path"))
    return cls(**spec.get("init_args", {}))


class KTModule(L.LightningModule):
    """Trains and evaluates a knowledge-tracing model with a masked binary cross-entropy.

    Metrics (``val/`` and ``test/`` prefixes): ``auc`` (AUROC), ``acc`` (accuracy at 0.5), ``rmse``, ``brier`` (mean
    squared error of the probability against the 0/1 response) and ``ece`` (expected calibration error: 15
    equal-width bins, L1, weighted by bin counts; see :mod:`lit_kt.calibration`), computed over the scored positions of
    the batch (``batch["mask"]``) only; ``train/loss`` and ``val/loss`` are logged too.

    Question-level data: batches with ``questions`` pass them to models that take them (see the module docstring);
    batches with ``group_offset`` (expanded multi-concept questions) are predicted with :func:`leak_free_logits` in
    training, evaluation and prediction, and the metrics score each question once with the mean probability of its
    rows (:func:`fuse_questions`); the loss stays the mean over rows.

    Temperature: the ``temperature`` buffer ``T`` (1 by default, saved in checkpoints; fitted on the validation split
    by :class:`~lit_kt.calibration.TemperatureScaling` or :func:`~lit_kt.calibration.calibrate`) divides the logits
    of the metrics, :meth:`predict_step` and :meth:`predict_next`; the losses use the raw logits. The ``logit_shift``
    buffer ``b`` (0 by default; fitted on the training split when asked, see :mod:`lit_kt.calibration`) is added
    before the division: probabilities are ``sigmoid((z + b) / T)``. Checkpoints saved before them load with
    ``T = 1`` and ``b = 0``.

    Args:
        model: A KT model (see the module docstring), or its ``{"class_path", "init_args"}`` spec.
        optimizer: Builds the optimizer from the parameters.
        lr_scheduler: Builds a learning-rate scheduler from the optimizer, stepped every epoch; ``None`` for none.
        compile: Compile the model's forward with ``torch.compile`` when the trainer sets the module up
            (``nn.Module.compile``: in place, so state-dict keys and checkpoints are unchanged).
        compile_backend: The ``torch.compile`` backend (``"inductor"`` generates kernels; ``"aot_eager"`` only traces,
            cheap to check).
        flush_denormal: On CPU, treat denormal floats (magnitudes below ~1.2e-38) as zero while fitting
            (``torch.set_flush_denormal``, switched on at fit start and off at fit end; it sets the floating-point
            mode of the thread running the fit, which intra-op worker threads need not share). An LSTM's gradients
            decaying over long histories reach that range, where CPUs compute far more slowly: DKT's training step
            on ASSIST2009 windows is markedly slower without it (docs/benchmarks.md). Values that small do not change a
            float32 update.

    Example:
        >>> module = KTModule(SAKT(num_exercises=110))
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        flush_denormal: bool = True,
    ) -> None:
        super().__init__()
        # Callables and modules do not belong in a checkpoint's hyperparameters; the model's spec does.
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        if isinstance(model, dict):
            model = _build_model(model)
        self.hparams["model"] = _model_spec(model)
        self.model = model
        self._takes_questions = _takes_questions(model)  # checked once: the forward's signature does not change
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        metrics = MetricCollection(
            {
                "auc": BinaryAUROC(),
                "acc": BinaryAccuracy(),
                "rmse": MeanSquaredError(squared=False),
                "brier": MeanSquaredError(),
                "ece": BinaryCalibrationError(n_bins=15, norm="l1"),
            }
        )
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("logit_shift", torch.tensor(0.0))
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, exercises: Tensor, responses: Tensor, questions: Tensor | None = None) -> Tensor:
        """(B, L) logits; see the model's contract. ``questions`` (B, L) reach only models that take them."""
        if questions is not None and self._takes_questions:
            return self.model(exercises, responses, questions=questions)
        return self.model(exercises, responses)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["exercises"].shape[0])
        # train/loss stays the BCE alone, comparable across models; the optimised loss adds the penalty.
        return loss + self.penalty()

    def penalty(self) -> Tensor | float:
        """Extra term added to the training loss (not to validation or test losses); 0 here, see :class:`AKTModule`."""
        return 0.0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-position probabilities of a correct answer at ``temperature``, with the batch's mask and index."""
        probs = calibrated_probabilities(self._logits(batch), self.temperature, self.logit_shift)  # (B, L)
        return {"probabilities": probs, "mask": batch["mask"], "index": batch["index"]}

    def configure_optimizers(self):
        optimizer = self.optimizer(self.model.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile(backend=self.hparams.compile_backend)
            self._compiled = True

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves metric states created under inference mode, which fit's
        # validation (run under no_grad) cannot update in place; fresh states avoid that.
        self.val_metrics.reset()
        self.test_metrics.reset()
        if self.hparams.flush_denormal and self.device.type == "cpu":
            torch.set_flush_denormal(True)

    def on_fit_end(self) -> None:
        if self.hparams.flush_denormal and self.device.type == "cpu":
            torch.set_flush_denormal(False)

    def predict_next(
        self,
        exercises: Sequence[int],
        responses: Sequence[int],
        candidates: int | Sequence[int],
        questions: Sequence[int] | None = None,
        candidate_questions: int | Sequence[int] | None = None,
    ) -> Tensor:
        """Probability of a correct answer on each next candidate at ``temperature``; see :func:`predict_next`."""
        return predict_next(
            self.model,
            exercises,
            responses,
            candidates,
            temperature=float(self.temperature),
            logit_shift=float(self.logit_shift),
            questions=questions,
            candidate_questions=candidate_questions,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the calibration buffers existed load with T = 1, no shift, under strict loading.
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            state.setdefault("temperature", torch.tensor(1.0))
            state.setdefault("logit_shift", torch.tensor(0.0))

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, L) logits of a batch, with its questions, free of within-question leakage (:func:`leak_free_logits`)."""
        questions = batch.get("questions")
        if "group_offset" not in batch:
            return self(batch["exercises"], batch["responses"], questions)
        return leak_free_logits(self, batch["exercises"], batch["responses"], questions, batch["group_offset"])

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self._logits(batch)  # (B, L)
        return masked_bce_with_logits(logits, batch["responses"], batch["mask"]), logits

    def _eval_step(self, batch: dict[str, Tensor], metrics: MetricCollection, stage: str) -> None:
        loss, logits = self._shared_step(batch)
        mask = batch["mask"]
        probs = calibrated_probabilities(logits, self.temperature, self.logit_shift)  # (B, L)
        metrics.update(*fuse_questions(probs, batch["responses"], mask, batch.get("group_offset")))
        # Weight the epoch mean by scored positions, not by rows. A tensor count, not int(mask.sum()): Lightning only
        # adds it to its running sums, so on a GPU it stays there instead of making the host wait every step.
        n = mask.sum().clamp_min(1)
        # sync_dist: under DDP the epoch loss is reduced over processes once, at epoch end (ranks may differ in
        # their number of evaluation batches, which is fine for an epoch-end reduction).
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")


class SAKTModule(KTModule):
    """:class:`KTModule` for a :class:`~lit_kt.models.SAKT` model (same arguments; the type narrows CLI configs)."""

    def __init__(
        self,
        model: SAKT,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(model, optimizer, lr_scheduler, compile, compile_backend, flush_denormal)


class DKTModule(KTModule):
    """:class:`KTModule` for a :class:`~lit_kt.models.DKT` model (same arguments; the type narrows CLI configs)."""

    def __init__(
        self,
        model: DKT,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(model, optimizer, lr_scheduler, compile, compile_backend, flush_denormal)


class AKTModule(KTModule):
    """:class:`KTModule` for an :class:`~lit_kt.models.AKT` model, with the L2 penalty on its question difficulties.

    Args:
        model: The AKT model, or its ``{"class_path", "init_args"}`` spec.
        optimizer: Builds the optimizer from the parameters.
        lr_scheduler: Builds a learning-rate scheduler from the optimizer, stepped every epoch; ``None`` for none.
        compile: See :class:`KTModule`.
        compile_backend: See :class:`KTModule`.
        flush_denormal: See :class:`KTModule`.
        l2: Weight of ``model.regularization()`` (the sum of squared Rasch difficulties ``mu``) in the training
            loss; the paper's value is 1e-5. Without question ids the term is 0.
    """

    def __init__(
        self,
        model: AKT,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        flush_denormal: bool = True,
        l2: float = 1e-5,
    ) -> None:
        if l2 < 0:
            raise ValueError(f"Expected `l2` to be >= 0 but got {l2}.")
        super().__init__(model, optimizer, lr_scheduler, compile, compile_backend, flush_denormal)
        self.l2 = l2

    def penalty(self) -> Tensor | float:
        """``l2 * model.regularization()``."""
        return self.l2 * self.model.regularization() if self.l2 else 0.0
