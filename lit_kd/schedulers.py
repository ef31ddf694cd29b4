"""Loss-weight schedules over training progress and per-sample temperature schedules.

Weight schedules map the training progress ``p`` in [0, 1] (e.g. ``global_step / max_steps``) to a multiplier of a
loss weight, as TextBrewer's ``kd_loss_weight_scheduler`` / ``hard_label_weight_scheduler`` do.

Temperature schedules map the student's and teacher's logits, (N, C) or (B, L, C), to one temperature per sample
(or token), (N,) or (B, L), for :func:`lit_kd.losses.kd_ce` and friends. ``flsw`` and ``cwsm`` are the two
"dynamic temperature distillation" (DTD) weightings of Wen, Lai and Qian, *Preparing Lessons: Improve Knowledge
Distillation with Better Supervision* (arXiv:1911.07471), as TextBrewer implements them
(``textbrewer/schedulers.py``, ``flsw_temperature_scheduler_builder`` and ``cwsm_temperature_scheduler_builder``).
Both have the same form: a per-sample *hardness* weight ``w[n]`` and

    ``T[n] = base_temperature + beta * (mean_m w[m] - w[n])``

so harder-than-average samples get a lower temperature (sharper targets, larger gradients) and easier ones a higher
temperature, while the batch mean of ``T`` stays ``base_temperature``. The logits are detached: temperatures are not
differentiated. They assume a class dimension (softmax outputs), not single sigmoid logits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------- weight schedules
def constant(progress: float) -> float:
    """``1`` throughout training."""
    return 1.0


def linear_decay(progress: float) -> float:
    """``1 - p``: from 1 at the start to 0 at the end (``p`` clipped to [0, 1])."""
    return 1.0 - min(max(progress, 0.0), 1.0)


def linear_growth(progress: float) -> float:
    """``p``: from 0 at the start to 1 at the end (``p`` clipped to [0, 1])."""
    return min(max(progress, 0.0), 1.0)


def first_stage(progress: float, boundary: float = 0.5) -> float:
    """``1`` before ``boundary``, ``0`` from it on: a term of the first stage of staged distillation."""
    return 1.0 if progress < boundary else 0.0


def second_stage(progress: float, boundary: float = 0.5) -> float:
    """``0`` before ``boundary``, ``1`` from it on: a term of the second stage of staged distillation."""
    return 0.0 if progress < boundary else 1.0


WEIGHT_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear_decay": linear_decay,
    "linear_growth": linear_growth,
    "first_stage": first_stage,
    "second_stage": second_stage,
}


def weight_schedule(name: str, stage_boundary: float = 0.5) -> Callable[[float], float]:
    """The weight schedule called ``name``.

    Staged distillation (TinyBERT's two stages: intermediate layers first, then the prediction layer) is two
    schedules: ``"first_stage"`` on the intermediate matches and ``"second_stage"`` on the KD (and hard-label) term,
    switching at ``stage_boundary``.

    Args:
        name: ``"constant"``, ``"linear_decay"``, ``"linear_growth"``, ``"first_stage"`` or ``"second_stage"``.
        stage_boundary: Training progress in (0, 1) where the second stage starts.

    Returns:
        A function of the training progress ``p`` in [0, 1] returning the weight multiplier.

    Raises:
        ValueError: If ``name`` is not one of those.
    """
    if name not in WEIGHT_SCHEDULES:
        valid = ", ".join(repr(n) for n in WEIGHT_SCHEDULES)
        raise ValueError(f"Expected the weight schedule to be one of {valid} but got {name!r}.")
    if name in ("first_stage", "second_stage"):
        return partial(WEIGHT_SCHEDULES[name], boundary=stage_boundary)
    return WEIGHT_SCHEDULES[name]


WeightScheduleMode = Literal["multiply", "textbrewer"]


def scheduled_weight(
    weight: float, name: str, progress: float, mode: WeightScheduleMode = "multiply", stage_boundary: float = 0.5
) -> float:
    """A loss weight at training progress ``progress`` under the weight schedule ``name``.

    * ``mode="multiply"``: ``weight * schedule(p)`` from the first step on (``linear_growth`` starts at 0).
    * ``mode="textbrewer"``: as TextBrewer 0.2.1's distillers: the configured ``weight`` until the first optimizer
      step (``p == 0``), then ``schedule(p)`` *in place of* the weight (TextBrewer sets the weight to the schedule's
      value after each optimizer step, so step ``k`` uses ``schedule(k / total)`` and the configured value only at
      step 0).

    ``"constant"`` returns ``weight`` in both modes.

    Args:
        weight: The configured weight.
        name: ``"constant"``, ``"linear_decay"`` or ``"linear_growth"``.
        progress: ``global_step / total_steps`` in [0, 1], with ``global_step`` the optimizer steps done so far.
        mode: ``"multiply"`` or ``"textbrewer"``.
        stage_boundary: Where ``"first_stage"``/``"second_stage"`` switch.

    Returns:
        The weight to use for this step.

    Example:
        >>> scheduled_weight(2.0, "linear_decay", 0.25), scheduled_weight(2.0, "linear_decay", 0.25, "textbrewer")
        (1.5, 0.75)
        >>> scheduled_weight(2.0, "linear_growth", 0.0), scheduled_weight(2.0, "linear_growth", 0.0, "textbrewer")
        (0.0, 2.0)
    """
    if mode not in ("multiply", "textbrewer"):
        raise ValueError(f"Expected `mode` to be 'multiply' or 'textbrewer' but got {mode!r}.")
    schedule = weight_schedule(name, stage_boundary)
    if name == "constant":
        return weight
    if mode == "textbrewer":
        return weight if progress <= 0 else schedule(progress)
    return weight * schedule(progress)


# ------------------------------------------------------------------------------------------ temperature schedules
def constant_temperature(
    logits_s: Tensor, logits_t: Tensor, base_temperature: float, mask: Tensor | None = None
) -> Tensor:
    """``T[n] = base_temperature`` for every sample.

    Args:
        logits_s: Student logits, (N, C) or (B, L, C).
        logits_t: Teacher logits, same shape (unused).
        base_temperature: The temperature.
        mask: Unused; accepted for a signature common to all temperature schedules.

    Returns:
        (N,) or (B, L), filled with ``base_temperature``.
    """
    return logits_s.new_full(logits_s.shape[:-1], float(base_temperature))


def _centre(w: Tensor, base_temperature: float, beta: float, mask: Tensor | None, min_temperature: float) -> Tensor:
    """``max(base + beta * (mean(w) - w), min_temperature)``, the mean over valid samples only."""
    if mask is not None and mask.shape != w.shape:
        raise ValueError(
            f"Expected `mask` to have shape {tuple(w.shape)} (the logits without their class dimension) but got "
            f"{tuple(mask.shape)}."
        )
    mean = w.mean() if mask is None else w[mask.bool()].sum() / mask.bool().sum().clamp_min(1)
    return (base_temperature + beta * (mean - w)).clamp_min(min_temperature)


def flsw_temperature(
    logits_s: Tensor,
    logits_t: Tensor,
    base_temperature: float,
    beta: float,
    gamma: float,
    mask: Tensor | None = None,
    min_temperature: float = 1e-2,
    eps: float | None = None,
) -> Tensor:
    """Focal-loss-style weights (FLSW, arXiv:1911.07471): samples where student and teacher disagree are hard.

    ``v = z_s / |z_s|``, ``t = z_t / |z_t|`` (L2 over classes), ``w[n] = (1 - <v[n], t[n]>) ** gamma`` in
    [0, 2 ** gamma], and ``T[n] = max(base_temperature + beta * (mean_m w[m] - w[n]), min_temperature)``.

    Same as TextBrewer's ``flsw`` scheduler, except: the mean may skip padded tokens (``mask``; TextBrewer selects the
    ``logits_mask`` positions first, which gives the same mean), ``1 - <v, t>`` is clipped at 0 against rounding (a
    negative base with a fractional ``gamma`` would give ``nan``), and ``T`` is floored at ``min_temperature``
    (TextBrewer lets it reach 0 or below when ``beta * 2 ** gamma`` is comparable to the base temperature). The
    normalisation is exact by default (``v = z / max(|z|, 1e-12)``, a zero vector gives 0); ``eps=1e-4`` gives
    TextBrewer's ``v = z / (|z| + 1e-4)``, whose vectors are slightly shorter than 1.

    Args:
        logits_s: Student logits, (N, C) or (B, L, C); detached here.
        logits_t: Teacher logits, same shape; detached here.
        base_temperature: ``T`` of an average sample.
        beta: How far temperatures spread around the base.
        gamma: Focusing exponent of the weights.
        mask: (B, L) or (N,): which samples enter the batch mean of ``w``; ``None`` for all.
        min_temperature: Floor of the returned temperatures.
        eps: ``None`` for unit vectors; a float for ``z / (|z| + eps)`` (TextBrewer: ``1e-4``).

    Returns:
        Per-sample temperatures, (N,) or (B, L).
    """
    with torch.no_grad():
        z_s, z_t = logits_s.detach(), logits_t.detach()
        if eps is None:
            v, t = F.normalize(z_s, dim=-1), F.normalize(z_t, dim=-1)  # (..., C)
        else:
            v = z_s / (z_s.norm(dim=-1, keepdim=True) + eps)  # (..., C)
            t = z_t / (z_t.norm(dim=-1, keepdim=True) + eps)  # (..., C)
        w = (1 - (v * t).sum(dim=-1)).clamp_min(0) ** gamma  # (...)
        return _centre(w, base_temperature, beta, mask, min_temperature)


def cwsm_temperature(
    logits_s: Tensor,
    logits_t: Tensor,
    base_temperature: float,
    beta: float,
    mask: Tensor | None = None,
    eps: float = 1e-3,
    min_temperature: float = 1e-2,
) -> Tensor:
    """Confidence weighted by student max (CWSM, arXiv:1911.07471): samples the student is unsure about are hard.

    ``w[n] = 1 / (max_c softmax(z_s[n])_c + eps)`` in (1, C] (up to ``eps``), and
    ``T[n] = max(base_temperature + beta * (mean_m w[m] - w[n]), min_temperature)``.

    The confidence is the *student's* (untempered) top probability, as the paper's name and TextBrewer's ``cwsm``
    scheduler have it; the teacher's logits are not used. ``eps = 1e-3`` is TextBrewer's. Differences from
    TextBrewer: the mean may skip padded tokens (``mask``) and ``T`` is floored at ``min_temperature``.

    Args:
        logits_s: Student logits, (N, C) or (B, L, C); detached here.
        logits_t: Teacher logits, same shape (unused; kept for a common signature).
        base_temperature: ``T`` of an average sample.
        beta: How far temperatures spread around the base.
        mask: (B, L) or (N,): which samples enter the batch mean of ``w``; ``None`` for all.
        eps: Added to the top probability before inverting it.
        min_temperature: Floor of the returned temperatures.

    Returns:
        Per-sample temperatures, (N,) or (B, L).
    """
    with torch.no_grad():
        top = F.softmax(logits_s.detach(), dim=-1).amax(dim=-1)  # (...)
        w = 1 / (top + eps)  # (...)
        return _centre(w, base_temperature, beta, mask, min_temperature)


TemperatureSchedule = Callable[..., Tensor]
"""``schedule(logits_s, logits_t, base_temperature, mask=None) -> (N,) or (B, L) temperatures``."""


def temperature_schedule(
    name: str, flsw_beta: float = 1.0, flsw_gamma: float = 2.0, cwsm_beta: float = 1.0, flsw_eps: float | None = None
) -> TemperatureSchedule:
    """The temperature schedule called ``name``, with its parameters bound.

    Args:
        name: ``"constant"``, ``"flsw"`` or ``"cwsm"``.
        flsw_beta: ``beta`` of :func:`flsw_temperature`.
        flsw_gamma: ``gamma`` of :func:`flsw_temperature`.
        cwsm_beta: ``beta`` of :func:`cwsm_temperature`.
        flsw_eps: ``eps`` of :func:`flsw_temperature` (``None``: exact unit vectors; TextBrewer: ``1e-4``).

    Returns:
        ``schedule(logits_s, logits_t, base_temperature, mask=None)`` returning per-sample temperatures.

    Raises:
        ValueError: If ``name`` is not one of those.
    """
    if name == "constant":
        return constant_temperature
    if name == "flsw":
        return partial(flsw_temperature, beta=flsw_beta, gamma=flsw_gamma, eps=flsw_eps)
    if name == "cwsm":
        return partial(cwsm_temperature, beta=cwsm_beta)
    raise ValueError(f"Expected the temperature schedule to be one of 'constant', 'flsw', 'cwsm' but got {name!r}.")
