"""Calibration of knowledge-tracing predictions: metrics and post-hoc temperature scaling.

A model is calibrated when, among the positions it predicts with probability ``p``, a fraction ``p`` is answered
correctly. Two measures:

- **Expected calibration error** (:func:`expected_calibration_error`, logged as ``val/ece``/``test/ece`` by
  ``torchmetrics.classification.BinaryCalibrationError(n_bins=15, norm="l1")``): the probabilities of a correct
  answer are put into ``n_bins`` equal-width bins of ``[0, 1]`` (bin ``k`` holds ``k/n <= p < (k+1)/n``; as in
  torchmetrics, a probability of exactly 1 forms a bin of its own), and the ECE is the mean over bins of
  ``|accuracy - mean probability|`` weighted by the fraction of positions in the bin (L1). It reads the probability
  of the positive class (a correct answer), not the confidence of the predicted class.
- **Brier score** (:func:`brier_score`, ``val/brier``/``test/brier``): the mean squared error between the
  probability and the 0/1 response (``rmse`` is its square root).

**Temperature scaling** (Guo et al., 2017) divides every logit by one scalar ``T > 0`` fitted on the validation
split to minimise the negative log-likelihood (:func:`fit_temperature`). ``T > 1`` softens an over-confident model.
Since ``z -> z / T`` is increasing, rankings, hence AUC, and the 0.5 threshold, hence accuracy, are unchanged.
:class:`~lit_kt.KTModule` keeps ``T`` in its ``temperature`` buffer (saved in checkpoints) and applies it in its
metrics, ``predict_step`` and ``predict_next``; :class:`TemperatureScaling` fits it after ``fit``, and
:func:`calibrate` fits it for any module and loader.

**The training split's base rate** (before the temperature: ``calibrate(..., train_dataloader=...)``,
:class:`TemperatureScaling`, by default): a model trained with dropout fits its output bias to the *noisy*
training-mode logits; in eval mode its predictions shift, upwards when most answers are correct (SAKT on ASSIST2009,
dropout 0.2: the mean eval-mode probability on its own training students is 0.681 against their 0.659 rate of
correct answers; dropout 0.1: 0.663). A temperature cannot remove a shift, and the validation split is too small to
measure one reliably (on ASSIST2009 the correct-answer rate of a random 10% of the training students varies with a
standard deviation of 0.017). So the shift ``b`` is fitted on the training split, in eval mode, such that the mean
of ``sigmoid(z + b)`` equals its rate of correct answers (:func:`fit_logit_shift`), then ``T`` on the validation
split's ``z + b``. The calibrated probability is ``sigmoid((z + b) / T)``, still increasing in ``z``: AUC and the
ranking are unchanged (accuracy may move, since the 0.5 threshold moves by ``-b`` in ``z``). The module keeps ``b``
in its ``logit_shift`` buffer (0 by default) and applies it wherever it applies ``T``. Measured on ASSIST2009 in
docs/benchmarks.md ("Calibration").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor


def _as_labels(labels: Any, n: int) -> Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).reshape(-1)
    if y.numel() != n:
        raise ValueError(f"Expected `labels` to have as many values as the predictions ({n}) but got {y.numel()}.")
    bad = ((y != 0) & (y != 1)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"Expected `labels` to be 0 or 1 but got {y[i].item()} at position {i}.")
    return y


def _as_probs(probs: Any) -> Tensor:
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, Tensor) else probs).reshape(-1)
    if not p.is_floating_point():
        p = p.double()
    if p.numel() == 0:
        raise ValueError("Expected at least one probability in `probs` but got none.")
    bad = (~((p >= 0) & (p <= 1))).nonzero()  # also catches NaN
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"Expected `probs` between 0 and 1 but got {p[i].item()} at position {i}.")
    return p


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive integer but got {n_bins!r}.")


def _bin_index(p: Tensor, n_bins: int) -> Tensor:
    """Bin of each probability: ``k`` for ``k/n <= p < (k+1)/n`` and ``n`` for ``p == 1`` (torchmetrics' binning)."""
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=p.dtype)
    return torch.bucketize(p, boundaries, right=True) - 1


def calibration_bins(probs: Any, labels: Any, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean probability, accuracy and count, over ``n_bins`` equal-width bins of ``[0, 1]``.

    Bin ``k`` holds ``k/n <= p < (k+1)/n``; the last bin also holds ``p == 1`` (for plots:
    :func:`expected_calibration_error` keeps ``p == 1`` apart, as torchmetrics does).

    Args:
        probs: Predicted probabilities of a correct answer, any shape (flattened).
        labels: The 0/1 responses, as many.
        n_bins: Number of bins.

    Returns:
        ``(confidence, accuracy, count)``, each ``(n_bins,)`` float64; empty bins have confidence and accuracy NaN.

    Raises:
        ValueError: If a probability is outside ``[0, 1]``, a label is not 0/1, the sizes differ or ``n_bins < 1``.
    """
    _check_bins(n_bins)
    p = _as_probs(probs)
    y = _as_labels(labels, p.numel()).double()
    idx = _bin_index(p, n_bins).clamp(max=n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(y))
    conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, p.double()) / count
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, y) / count
    return conf, acc, count


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width bins weighted by their counts), as torchmetrics computes it.

    ``sum_k (n_k / N) * |acc_k - conf_k|`` where bin ``k`` holds the ``n_k`` probabilities with
    ``k/n_bins <= p < (k+1)/n_bins``, ``acc_k`` is their fraction of correct answers and ``conf_k`` their mean
    probability; probabilities equal to 1 form one more bin (``torchmetrics.classification.BinaryCalibrationError``
    with ``norm="l1"`` bins the same way).

    Args:
        probs: Predicted probabilities of a correct answer, any shape (flattened).
        labels: The 0/1 responses, as many.
        n_bins: Number of equal-width bins.

    Returns:
        The ECE, in ``[0, 1]``.

    Raises:
        ValueError: If a probability is outside ``[0, 1]``, a label is not 0/1, the sizes differ or ``n_bins < 1``.

    Example:
        >>> round(expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1], n_bins=2), 6)  # 0.4/2 + 0.1/2
        0.25
    """
    _check_bins(n_bins)
    p = _as_probs(probs)
    y = _as_labels(labels, p.numel()).to(p.dtype)
    idx = _bin_index(p, n_bins)
    conf = torch.zeros(n_bins + 1, dtype=p.dtype).index_add_(0, idx, p)
    acc = torch.zeros(n_bins + 1, dtype=p.dtype).index_add_(0, idx, y)
    # sum_k (n_k / N) |acc_k / n_k - conf_k / n_k| = sum_k |sum of labels - sum of probabilities| / N
    return float((acc - conf).abs().sum() / p.numel())


def brier_score(probs: Any, labels: Any) -> float:
    """Brier score: the mean of ``(p - y) ** 2`` over the positions.

    Args:
        probs: Predicted probabilities of a correct answer, any shape (flattened).
        labels: The 0/1 responses, as many.

    Raises:
        ValueError: If a probability is outside ``[0, 1]``, a label is not 0/1 or the sizes differ.

    Example:
        >>> round(brier_score([0.8, 0.4], [1, 0]), 6)  # (0.04 + 0.16) / 2
        0.1
    """
    p = _as_probs(probs).double()
    y = _as_labels(labels, p.numel()).double()
    return float(((p - y) ** 2).mean())


def calibrated_probabilities(logits: Tensor, temperature: float | Tensor = 1.0, shift: float | Tensor = 0.0) -> Tensor:
    """``sigmoid((logits + shift) / temperature)`` in float32 (or wider): the calibration map of the package.

    Example:
        >>> calibrated_probabilities(torch.tensor([0.0, 2.0]), temperature=2.0, shift=-2.0)
        tensor([0.2689, 0.5000])
    """
    return torch.sigmoid((logits.float() + shift) / temperature)


def fit_logit_shift(logits: Any, labels: Any, tol: float = 1e-9) -> float:
    """The shift ``b`` that makes the mean of ``sigmoid(logits + b)`` equal the fraction of correct labels.

    The mean is increasing in ``b``, so a bisection finds the one root (on the bracket ``[-50, 50]``, wide enough
    for any rate strictly between 0 and 1 at float precision).

    Args:
        logits: Logits of a correct answer (before the sigmoid), any shape (flattened).
        labels: The 0/1 responses, as many; both classes must occur.
        tol: Stop when the bracket on ``b`` is narrower than this.

    Returns:
        ``b`` as a float.

    Raises:
        ValueError: If there are no logits, a logit is not finite, a label is not 0/1, the sizes differ, or every
            label is the same (no finite shift exists).

    Example:
        >>> # logits 0, right 3 times in 4: sigmoid(b) = 3/4, so b = log 3
        >>> round(fit_logit_shift([0.0, 0, 0, 0], [1, 1, 1, 0]), 4)
        1.0986
    """
    z = _as_logits(logits)
    y = _as_labels(labels, z.numel()).double()
    rate = float(y.mean())
    if rate in (0.0, 1.0):
        raise ValueError(
            f"Expected both correct and incorrect answers to fit a logit shift on but every label is {int(rate)}."
        )
    lo, hi = -50.0, 50.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if float(torch.sigmoid(z + mid).mean()) > rate:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def _as_logits(logits: Any) -> Tensor:
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, Tensor) else logits).reshape(-1).double()
    if z.numel() == 0:
        raise ValueError("Expected at least one logit in `logits` but got none.")
    bad = (~torch.isfinite(z)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"Expected finite `logits` but got {z[i].item()} at position {i}.")
    return z


def _nll(logits: Tensor, labels: Tensor, log_t: float) -> float:
    return float(F.binary_cross_entropy_with_logits(logits * math.exp(-log_t), labels))


def fit_temperature(
    logits: Any, labels: Any, min_temperature: float = 1e-2, max_temperature: float = 1e2, tol: float = 1e-7
) -> float:
    """The temperature ``T`` minimising the mean NLL of ``sigmoid(logits / T)`` against the labels.

    A bounded 1-D search (golden section) over ``log T`` in ``[log min_temperature, log max_temperature]``: the NLL
    is convex in ``1 / T``, hence unimodal in ``log T``, so the search finds the minimum within the bounds (a bound
    is returned when the minimum lies beyond it, e.g. ``max_temperature`` for logits unrelated to the labels).

    Args:
        logits: Logits of a correct answer (before the sigmoid), any shape (flattened).
        labels: The 0/1 responses, as many.
        min_temperature: Smallest temperature considered (> 0).
        max_temperature: Largest temperature considered.
        tol: Stop when the bracket on ``log T`` is narrower than this.

    Returns:
        ``T`` as a float.

    Raises:
        ValueError: If there are no logits, a logit is not finite, a label is not 0/1, the sizes differ or the
            bounds are not ``0 < min_temperature <= max_temperature``.

    Example:
        >>> # logits +-2, right 3 times in 4: sigmoid(2 / T) = 3/4, so T = 2 / log(3)
        >>> round(fit_temperature([2.0, 2, 2, 2, -2, -2, -2, -2], [1, 1, 1, 0, 0, 0, 0, 1]), 4)
        1.8205
    """
    if not 0 < min_temperature <= max_temperature:
        raise ValueError(
            f"Expected 0 < `min_temperature` <= `max_temperature` but got {min_temperature} and {max_temperature}."
        )
    z = _as_logits(logits)
    y = _as_labels(labels, z.numel()).double()
    lo, hi = math.log(min_temperature), math.log(max_temperature)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll(z, y, c), _nll(z, y, d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll(z, y, c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll(z, y, d)
    # The ends are candidates too: the minimum may sit on a bound.
    candidates = ((min_temperature, lo), (math.exp((a + b) / 2), (a + b) / 2), (max_temperature, hi))
    return float(min(candidates, key=lambda c: _nll(z, y, c[1]))[0])


def _gather(trainer: L.Trainer | None, values: Tensor) -> Tensor:
    """Concatenates a 1-D tensor over the processes of a distributed run (sizes may differ); as is otherwise."""
    if trainer is None or trainer.world_size <= 1:
        return values
    n = torch.tensor([values.numel()], device=values.device)
    sizes = trainer.strategy.all_gather(n).reshape(-1).tolist()
    padded = values.new_zeros(max(sizes))
    padded[: values.numel()] = values
    gathered = trainer.strategy.all_gather(padded).reshape(len(sizes), -1)
    return torch.cat([row[:size] for row, size in zip(gathered, sizes)])


@torch.no_grad()
def collect_logits(module: torch.nn.Module, dataloader: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Raw logits (before the temperature) and responses at the scored positions of every batch of a loader.

    Args:
        module: A :class:`~lit_kt.KTModule` (or any ``forward(exercises, responses) -> logits`` module); it runs in
            eval mode, restored afterwards. Under a trainer, its precision context is used and the values are
            gathered from every process.
        dataloader: Batches with ``exercises``, ``responses`` and ``mask`` (a :class:`~lit_kt.KTDataModule` loader).

    Returns:
        ``(logits, labels)``, both 1-D float32 on the CPU. For a :class:`~lit_kt.KTModule` the logits are those of
        its metrics (its ``_logits``: with the batch's ``questions``, and leak-free for expanded multi-concept
        questions); the temperature is fitted on the rows (each row of an expanded question carries its response),
        and the metrics then average the scaled probabilities of a question's rows.
    """
    trainer = getattr(module, "_trainer", None)
    device = next(module.parameters()).device
    logits, labels = [], []
    was_training = module.training
    module.eval()
    try:
        for batch in dataloader:
            mask, responses = batch["mask"].to(device), batch["responses"].to(device)
            with trainer.precision_plugin.forward_context() if trainer is not None else nullcontext():
                if hasattr(module, "_logits"):  # a KTModule: questions and leak-free multi-concept logits included
                    z = module._logits({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
                else:
                    z = module(batch["exercises"].to(device), responses)
            logits.append(z[mask].float())
            labels.append(responses[mask].float())
    finally:
        module.train(was_training)
    z = torch.cat(logits) if logits else torch.zeros(0, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, device=device)
    return _gather(trainer, z).cpu(), _gather(trainer, y).cpu()


def calibrate(
    module: torch.nn.Module,
    dataloader: Iterable[dict[str, Tensor]],
    train_dataloader: Iterable[dict[str, Tensor]] | None = None,
    **kwargs: Any,
) -> float:
    """Fits the calibration of a :class:`~lit_kt.KTModule` and stores it: ``T`` on ``dataloader`` (validation).

    With ``train_dataloader``, first the logit shift on the training split (:func:`fit_logit_shift`, stored in the
    ``logit_shift`` buffer), then ``T`` on the validation logits plus that shift; without it the shift is set to 0.

    Args:
        module: The module; its ``temperature`` buffer is set to the fitted ``T`` (and ``logit_shift`` to ``b``).
        dataloader: Batches of the split to fit ``T`` on (never the test split).
        train_dataloader: Batches of the training split to fit the shift on (run in eval mode), or ``None``.
        **kwargs: Passed to :func:`fit_temperature` (``min_temperature``, ``max_temperature``, ``tol``).

    Returns:
        The fitted temperature.

    Raises:
        AttributeError: If the module has no ``temperature`` buffer (or no ``logit_shift`` one when asked to fit it).
        ValueError: If a loader yields no scored position.

    Example:
        >>> calibrate(module, datamodule.val_dataloader(), datamodule.train_dataloader())  # doctest: +SKIP
        1.16
    """
    if not isinstance(getattr(module, "temperature", None), Tensor):
        raise AttributeError(
            f"Expected a module with a `temperature` buffer (a lit_kt.KTModule) but got {type(module).__name__}."
        )
    shift = _fit_shift(module, train_dataloader)
    logits, labels = collect_logits(module, dataloader)
    if logits.numel() == 0:
        raise ValueError("Expected the loader to yield scored positions to fit the temperature on but got none.")
    t = fit_temperature(logits + shift, labels, **kwargs)
    module.temperature.fill_(t)
    if isinstance(getattr(module, "logit_shift", None), Tensor):
        module.logit_shift.fill_(shift)
    return t


def _fit_shift(module: torch.nn.Module, train_dataloader: Iterable[dict[str, Tensor]] | None) -> float:
    """0 without a loader; else :func:`fit_logit_shift` on the loader's eval-mode logits (the module must hold a
    ``logit_shift`` buffer to keep it)."""
    if train_dataloader is None:
        return 0.0
    if not isinstance(getattr(module, "logit_shift", None), Tensor):
        raise AttributeError(
            "Expected a module with a `logit_shift` buffer (a lit_kt.KTModule) to fit a shift on the training split"
            f" but got {type(module).__name__}."
        )
    logits, labels = collect_logits(module, train_dataloader)
    if logits.numel() == 0:
        raise ValueError(
            "Expected the training loader to yield scored positions to fit the logit shift on but got none."
        )
    return fit_logit_shift(logits, labels)


class TemperatureScaling(L.Callback):
    """Fits the module's calibration when ``fit`` ends: the temperature on the validation split (post-hoc scaling).

    After ``fit``, the model runs over the validation loader, :func:`fit_temperature` fits ``T`` on its scored
    positions, and ``T`` is stored in the module's ``temperature`` buffer (so test metrics, ``predict_step`` and
    ``predict_next`` use it, and a checkpoint saved afterwards holds it) and reported as ``val/temperature``
    (``trainer.callback_metrics`` and the loggers). With ``shift_on_train``, the logit shift is fitted first on the
    training loader in eval mode (:func:`fit_logit_shift`, the ``logit_shift`` buffer, ``val/logit_shift``) and ``T``
    on the shifted validation logits (see the module docstring).

    The checkpoints written *during* fit hold the calibration of their time (``T = 1``, no shift, on a first fit). So
    that a test or predict run from a checkpoint (``test_after_fit`` tests ``best.ckpt``) uses one fitted for those
    weights, the callback fits it again on the datamodule's loaders when a test or predict run restores a
    checkpoint (``refit_after_restore``).

    From the command line: ``lit-kt fit --config CONFIG --trainer.callbacks+ lit_kt.TemperatureScaling``.

    Args:
        refit_after_restore: Fit again at the start of a ``test``/``predict`` run that loads a checkpoint
            (``ckpt_path``).
        min_temperature: Smallest temperature considered.
        max_temperature: Largest temperature considered.
        shift_on_train: Also fit the logit shift on the training split first (needs a training loader: the
            datamodule's, or the fit's); ``False``: the temperature alone, no shift.
    """

    def __init__(
        self,
        refit_after_restore: bool = True,
        min_temperature: float = 1e-2,
        max_temperature: float = 1e2,
        shift_on_train: bool = True,
    ) -> None:
        if not 0 < min_temperature <= max_temperature:
            raise ValueError(
                f"Expected 0 < `min_temperature` <= `max_temperature` but got {min_temperature} and {max_temperature}."
            )
        self.refit_after_restore = refit_after_restore
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.shift_on_train = shift_on_train

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        train = None
        if self.shift_on_train:
            dm = trainer.datamodule
            train = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        self._fit(trainer, pl_module, loaders, train)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refit(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refit(trainer, pl_module)

    def _refit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.refit_after_restore and trainer.ckpt_path):
            return
        if trainer.datamodule is None:
            raise ValueError(
                "Expected a datamodule with a validation split to fit the temperature for the checkpoint "
                f"{trainer.ckpt_path} but the run has none; pass `datamodule=` or `refit_after_restore=False`."
            )
        train = trainer.datamodule.train_dataloader() if self.shift_on_train else None
        self._fit(trainer, pl_module, trainer.datamodule.val_dataloader(), train)

    def _fit(self, trainer: L.Trainer, pl_module: L.LightningModule, loaders: Any, train: Any = None) -> None:
        if not loaders:
            raise ValueError("Expected a validation loader to fit the temperature on but the run has none.")
        if self.shift_on_train and train is None:
            raise ValueError(
                "Expected a training loader to fit the logit shift on (`shift_on_train=True`) but the run has none."
            )
        shift = _fit_shift(pl_module, train)
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        parts = [collect_logits(pl_module, loader) for loader in loaders]
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if logits.numel() == 0:
            raise ValueError("Expected scored positions in the validation split to fit the temperature but got none.")
        t = fit_temperature(logits + shift, labels, self.min_temperature, self.max_temperature)
        pl_module.temperature.fill_(t)
        metrics = {"val/temperature": t}
        if isinstance(getattr(pl_module, "logit_shift", None), Tensor):
            pl_module.logit_shift.fill_(shift)
            metrics["val/logit_shift"] = shift
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        where = f" on {logits.numel()} validation positions"
        extra = f", shift {shift:+.4f} fitted on the training split" if train is not None else ""
        rank_zero_info(f"TemperatureScaling: T = {t:.4f} fitted{where}{extra}.")
