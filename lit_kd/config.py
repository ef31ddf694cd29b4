"""Distillation configuration: plain dataclasses that LightningCLI can fill from YAML, validated on construction.

The total loss these describe (TextBrewer's, with an optional ``T**2`` factor):

    ``loss = w_kd(p) * [T**2] * kd_loss(z_s, z_t, T) + w_hl(p) * hard_label_loss + sum_m weight_m * match_loss_m``

where ``p`` in [0, 1] is the training progress and ``w(p) = weight * schedule(p)`` (or, with
``weight_schedule_mode="textbrewer"``, ``weight`` at step 0 and ``schedule(p)`` after it, as TextBrewer does).

User-defined losses: wherever a loss is named (``kd_loss_type``, ``hard_label_loss``, ``IntermediateMatch.loss``) a
Python callable or, from YAML, a dotted import path (``mypkg.losses.focal``) is accepted. Signatures, checked when
the config is built:

* KD loss: ``fn(logits_s, logits_t, temperature, mask) -> Tensor`` (TextBrewer's ``fn(logits_S, logits_T,
  temperature)`` also works when the logits carry no mask). ``logits_s``/``logits_t`` are the raw (untempered)
  student and teacher logits, (N, C) or (B, L, C), float32. ``temperature`` is a tensor that broadcasts against the
  logits: (N, 1) or (B, L, 1) (one temperature per sample or token; all equal unless ``temperature_scheduler`` is
  ``"flsw"``/``"cwsm"``), so ``logits_s / temperature`` is always right, even when the batch size equals the class
  count. ``mask`` is a bool tensor of the logits' shape without the class dimension, True where an item counts, or
  ``None``. Return a scalar. ``scale_by_temperature_squared`` applies to the built-in losses only: a user loss does
  its own scaling.
* Hard-label loss: ``fn(logits, labels, mask) -> Tensor`` with the student's logits, the gold labels (the logits'
  shape without the class dimension) and the same kind of mask (or ``None``); return a scalar.
* Match loss: ``fn(feature_s, feature_t, mask) -> Tensor`` with the student's feature (after its projection, if
  any) and the teacher's, float32, and ``mask`` the (B, L) bool mask of real tokens or ``None``; return a scalar.
  User match losses relate one layer of each model.

A user loss is logged under its function's name: ``train/kd/<name>``, ``train/hard/<name>`` (besides ``train/kd``,
``train/hard``), and a match's default name ends in it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, get_args

from torch import Tensor

from lit_kd import losses, schedulers

Feature = Literal["hidden", "attention"]
MatchLoss = Literal[
    "hidden_mse",
    "cos",
    "pkd",
    "fsp",
    "gram",
    "nst",
    "mmd",
    "attention_mse",
    "attention_mse_sum",
    "attention_mse_mean",
    "attention_ce",
    "attention_ce_mean",
]
ProjectionKind = Literal["linear", "relu", "tanh"]
KDLossType = Literal["ce", "kl", "mse", "bce", "forward_kl", "reverse_kl", "jsd", "tvd"]
HardLabelLoss = Literal["ce", "bce"]
TemperatureScheduler = Literal["constant", "flsw", "cwsm"]
WeightScheduler = Literal["constant", "linear_decay", "linear_growth", "first_stage", "second_stage"]
WeightScheduleMode = schedulers.WeightScheduleMode
ProjectionInit = Literal["pytorch", "textbrewer"]
MatchVariant = Literal["lit_kd", "textbrewer"]

HIDDEN_LOSSES: tuple[str, ...] = ("hidden_mse", "cos", "pkd", "fsp", "gram", "nst", "mmd")
ATTENTION_LOSSES: tuple[str, ...] = (
    "attention_mse",
    "attention_mse_sum",
    "attention_mse_mean",
    "attention_ce",
    "attention_ce_mean",
)
TWO_LAYER_LOSSES: tuple[str, ...] = ("fsp", "gram", "nst", "mmd")


def _pkd(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None) -> Tensor:
    return losses.pkd(h_s, h_t)  # first token only: the mask is not needed


_MATCH_LOSS_FNS: dict[str, Callable[..., Tensor]] = {
    "hidden_mse": losses.hidden_mse,
    "cos": losses.cos,
    "pkd": _pkd,
    "fsp": losses.fsp,
    "gram": losses.fsp,
    "nst": losses.nst,
    "mmd": losses.nst,
    "attention_mse": partial(losses.attention_mse, head_reduce="none"),
    "attention_mse_sum": partial(losses.attention_mse, head_reduce="sum"),
    "attention_mse_mean": partial(losses.attention_mse, head_reduce="mean"),
    "attention_ce": partial(losses.attention_ce, head_reduce="none"),
    "attention_ce_mean": partial(losses.attention_ce, head_reduce="mean"),
}

# `variant="textbrewer"`: TextBrewer 0.2.1's definitions where they differ from lit_kd's (the others are equal).
_TEXTBREWER_MATCH_LOSS_FNS: dict[str, Callable[..., Tensor]] = {
    **_MATCH_LOSS_FNS,
    "nst": partial(losses.nst, normalise="textbrewer"),
    "mmd": partial(losses.nst, normalise="textbrewer"),
    "attention_mse": partial(losses.attention_mse_textbrewer, head_reduce="none"),
    "attention_mse_sum": partial(losses.attention_mse_textbrewer, head_reduce="sum"),
    "attention_mse_mean": partial(losses.attention_mse_textbrewer, head_reduce="mean"),
    "attention_ce": partial(losses.attention_ce_textbrewer, head_reduce="none"),
    "attention_ce_mean": partial(losses.attention_ce_textbrewer, head_reduce="mean"),
}


def _lm_divergence_kd(
    fn: Callable[..., Tensor],
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor,
    mask: Tensor | None = None,
    scale_by_temperature_squared: bool = False,
    **options: Any,
) -> Tensor:
    """A token-level divergence of :mod:`lit_kd.losses` under the built-in KD signature.

    ``scale_by_temperature_squared`` is ignored: these divergences follow TRL, which never multiplies by ``T**2``.
    ``options`` are ``chunk_size`` and, for the JSD, ``beta``.
    """
    return fn(logits_s, logits_t, mask=mask, temperature=temperature, **options)


# The token-level divergences for LM distillation (TRL's conventions: per token, summed over the vocabulary).
LM_DIVERGENCE_LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd")

_KD_LOSS_FNS: dict[str, Callable[..., Tensor]] = {
    "ce": losses.kd_ce,
    "kl": losses.kd_kl,
    "mse": losses.kd_mse,
    "bce": losses.kd_bce,
    "forward_kl": partial(_lm_divergence_kd, losses.forward_kl),
    "reverse_kl": partial(_lm_divergence_kd, losses.reverse_kl),
    "jsd": partial(_lm_divergence_kd, losses.generalized_jsd),
    "tvd": partial(_lm_divergence_kd, losses.total_variation),
}


def import_callable(path: str, name: str) -> Callable[..., Any]:
    """The callable at a dotted import path (``mypkg.losses.focal``), with an error naming the argument."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Expected `{name}`={path!r} to be an importable dotted path but {e}.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"Expected `{name}`={path!r} to name a callable but {module_name} has no callable {attr!r}.")
    return fn


def loss_name(loss: str | Callable[..., Any]) -> str:
    """A loss's name for logs: a built-in's name, the last part of a dotted path, or the callable's ``__name__``."""
    if isinstance(loss, str):
        return loss.rpartition(".")[2]
    inner = loss.func if isinstance(loss, partial) else loss
    return getattr(inner, "__name__", type(inner).__name__)


def _accepts(fn: Callable[..., Any], n: int) -> bool | None:
    """Whether ``fn`` can be called with ``n`` positional arguments (``None`` when its signature is unknown)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(n))
    except TypeError:
        return False
    return True


def resolve_loss(
    value: Any, name: str, builtins: tuple[str, ...], params: tuple[str, ...], optional_last: bool = False
) -> Callable[..., Any] | None:
    """Check a loss argument: a built-in name (returns ``None``), a callable or a dotted import path (returns it).

    Args:
        value: What the user gave.
        name: The argument's name, for errors.
        builtins: The built-in loss names.
        params: The positional arguments the loss is called with, for the signature check and the error.
        optional_last: Whether a callable may also take one argument fewer (a KD loss without ``mask``).

    Raises:
        ValueError: For an unknown name, an unimportable path or a callable whose signature does not fit.
    """
    if isinstance(value, str) and value in builtins:
        return None
    if isinstance(value, str) and "." in value.strip(".") and " " not in value:
        fn = import_callable(value, name)
    elif callable(value) and not isinstance(value, str):
        fn = value
    else:
        raise ValueError(
            f"Expected `{name}` to be one of {_choices(builtins)}, a callable or a dotted import path "
            f"(`mypkg.losses.fn`) but got {value!r}."
        )
    fits = _accepts(fn, len(params))
    if fits is False and optional_last:
        fits = _accepts(fn, len(params) - 1)
    if fits is False:
        shown = ", ".join(params[:-1]) + f"[, {params[-1]}]" if optional_last else ", ".join(params)
        try:
            actual = f"{loss_name(fn)}{inspect.signature(fn)}"
        except (TypeError, ValueError):
            actual = loss_name(fn)
        raise ValueError(
            f"Expected `{name}` to be callable as fn({shown}) -> Tensor but got {actual}; see lit_kd.config for the "
            "arguments' meaning and shapes."
        )
    return fn


def _choices(options: tuple[str, ...] | Any) -> str:
    return ", ".join(repr(o) for o in options)


def _check_choice(name: str, value: Any, literal: Any) -> None:
    options = get_args(literal)
    if value not in options:
        raise ValueError(f"Expected `{name}` to be one of {_choices(options)} but got {value!r}.")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also refuses nan
        raise ValueError(f"Expected `{name}` to be >= 0 but got {value!r}.")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_str(layer: int | list[int] | str) -> str:
    if isinstance(layer, str):
        return layer.replace(".", "_")  # a module path: names key the projections, where dots are not allowed
    return "-".join(str(i) for i in layer) if isinstance(layer, list) else str(layer)


@dataclass
class IntermediateMatch:
    """One intermediate-feature match between a teacher layer and a student layer (an ``intermediate_matches`` item).

    Layer indices count in the lists of features the models return (e.g. ``hidden_states`` of a ``transformers``
    model, where 0 is the embedding output), not in the models' layers.

    Losses (see :mod:`lit_kd.losses`):

    * ``feature="hidden"``: ``"hidden_mse"``, ``"cos"``, ``"pkd"`` (one layer each), ``"fsp"`` (alias ``"gram"``),
      ``"nst"`` (alias ``"mmd"``) (two layers each: ``layer_t=[a, b]``, ``layer_s=[a, b]``).
    * ``feature="attention"``: ``"attention_mse"`` (per head), ``"attention_mse_sum"`` / ``"attention_mse_mean"``
      (summed / averaged over heads first), ``"attention_ce"`` (per head), ``"attention_ce_mean"`` (averaged over
      heads first).
    * Either feature: a callable ``fn(feature_s, feature_t, mask)`` or a dotted import path to one (see
      :mod:`lit_kd.config`), relating one layer of each model.

    A layer may also be a module's dotted name (``"bert.encoder.layer.5"`` in the teacher, ``"encoder.1"`` in the
    student): the feature is then that submodule's output (its first element when it returns a tuple), captured by a
    forward hook, for models that do not return ``hidden_states``.

    Attributes:
        layer_t: Teacher layer index, or two indices for ``fsp``/``nst``/``mmd``, or a submodule's dotted name.
        layer_s: Student layer index, or two indices for ``fsp``/``nst``/``mmd``, or a submodule's dotted name.
        feature: ``"hidden"`` (hidden states, (B, L, D)) or ``"attention"`` (attention maps, (B, H, L, L)).
        loss: The match loss, one of those listed above (it must suit ``feature``), a callable or a dotted path.
        weight: Multiplies this match's loss in the total loss; >= 0.
        projection: ``(kind, dim_s, dim_t)`` with kind ``"linear"``, ``"relu"`` or ``"tanh"``: a trainable map from the
            student's width ``dim_s`` to the teacher's ``dim_t``, applied to the student's feature (both features for
            two-layer losses) before the loss. Needed by every hidden loss but ``nst``/``mmd`` when the widths differ.
            Must be ``None`` for attention.
        name: Logged as ``train/match/<name>``; default ``f"{feature}_{layer_s}_{layer_t}_{loss}"`` (two layers
            written ``a-b``, module paths with ``_`` for ``.``, a user loss by its function's name). No dots.
        variant: ``"lit_kd"`` (default), or ``"textbrewer"`` to compute the built-in loss exactly as TextBrewer 0.2.1
            does, quirks included: ``nst``/``mmd`` divide by the padded length instead of the width when there is a
            mask; attention losses zero every entry <= -1e-3 when there is no mask and none when there is one; and
            ``attention_ce``/``attention_ce_mean`` softmax the maps again (even ``transformers`` probabilities) and
            mask padded keys after that softmax (:func:`lit_kd.losses.attention_mse_textbrewer`,
            :func:`lit_kd.losses.attention_ce_textbrewer`). The other losses are the same in both variants.
        score_threshold: Attention matches on raw scores (a view with ``attention_scores=True``), ``"lit_kd"``
            variant: entries at or below it count as masked by the model (default ``-1e3``: ``-inf``, ``finfo.min``,
            BERT's ``-10000``). TextBrewer's unmasked losses use ``-1e-3``. Only for attention matches.
        projection_options: Options of the projection's optimizer parameter group, e.g. ``{"lr": 1e-3,
            "weight_decay": 0.0}`` (TextBrewer's ``proj[3]``); they override the optimizer's defaults and
            ``projection_lr`` for this projection. Needs ``projection``.
        weight_scheduler: Schedules ``weight`` over training like ``DistillationConfig.kd_loss_weight_scheduler``;
            ``"first_stage"`` here with ``kd_loss_weight_scheduler="second_stage"`` is TinyBERT's staged
            distillation (intermediate layers first, then the predictions; see ``DistillationConfig.stage_boundary``).
    """

    layer_t: int | list[int] | str
    layer_s: int | list[int] | str
    feature: Feature = "hidden"
    loss: MatchLoss | str | Callable[..., Tensor] = "hidden_mse"
    weight: float = 1.0
    projection: tuple[str, int, int] | None = None
    name: str | None = None
    variant: MatchVariant = "lit_kd"
    score_threshold: float = losses.MASKED_SCORE_THRESHOLD
    projection_options: dict[str, Any] | None = None
    weight_scheduler: WeightScheduler = "constant"

    def __post_init__(self) -> None:
        _check_choice("feature", self.feature, Feature)
        _check_choice("weight_scheduler", self.weight_scheduler, WeightScheduler)
        _check_choice("variant", self.variant, MatchVariant)
        self._user_loss = resolve_loss(self.loss, "loss", get_args(MatchLoss), ("feature_s", "feature_t", "mask"))
        if self._user_loss is not None and self.variant != "lit_kd":
            raise ValueError(
                f"Expected `variant` to be 'lit_kd' with a user loss (only built-in losses have a TextBrewer variant) "
                f"but got {self.variant!r}."
            )
        self._check_score_threshold()
        allowed = HIDDEN_LOSSES if self.feature == "hidden" else ATTENTION_LOSSES
        if self._user_loss is None and self.loss not in allowed:
            raise ValueError(
                f"Expected `loss` to be one of {_choices(allowed)} for `feature={self.feature!r}` but got "
                f"{self.loss!r}."
            )
        self.layer_t = self._checked_layer("layer_t", self.layer_t)
        self.layer_s = self._checked_layer("layer_s", self.layer_s)
        _check_non_negative("weight", self.weight)
        if self.projection is not None:
            self.projection = self._checked_projection(self.projection)
        self._check_projection_options()
        if self.name is None:
            self.name = f"{self.feature}_{_layer_str(self.layer_s)}_{_layer_str(self.layer_t)}_{loss_name(self.loss)}"
        elif not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ValueError(f"Expected `name` to be a non-empty string without '.' or None but got {self.name!r}.")

    @property
    def two_layers(self) -> bool:
        """Whether the loss relates two layers of each model (``fsp``, ``nst``, ``mmd``)."""
        return isinstance(self.loss, str) and self.loss in TWO_LAYER_LOSSES

    @property
    def user_loss(self) -> Callable[..., Tensor] | None:
        """The user's loss callable (``fn(feature_s, feature_t, mask)``), or ``None`` for a built-in loss."""
        return self._user_loss

    @property
    def layers_t(self) -> list[int | str]:
        """The teacher layers (indices or module names) this match reads."""
        return self.layer_t if isinstance(self.layer_t, list) else [self.layer_t]

    @property
    def layers_s(self) -> list[int | str]:
        """The student layers (indices or module names) this match reads."""
        return self.layer_s if isinstance(self.layer_s, list) else [self.layer_s]

    def loss_fn(self) -> Callable[..., Tensor]:
        """The loss function this match uses: the user's, or :mod:`lit_kd.losses`' with its options bound.

        Returns:
            ``fn(feature_s, feature_t, mask)`` for one-layer losses, ``fn(s_a, s_b, t_a, t_b, mask)`` for two-layer
            ones; built-in attention losses of the ``"lit_kd"`` variant also take ``scores=`` (whether the maps are
            raw scores).
        """
        if self._user_loss is not None:
            return self._user_loss
        if self.variant == "textbrewer":
            return _TEXTBREWER_MATCH_LOSS_FNS[self.loss]
        if self.feature == "attention" and self.score_threshold != losses.MASKED_SCORE_THRESHOLD:
            return partial(_MATCH_LOSS_FNS[self.loss], score_threshold=self.score_threshold)
        return _MATCH_LOSS_FNS[self.loss]

    @property
    def takes_scores(self) -> bool:
        """Whether :meth:`loss_fn` takes ``scores=`` (built-in attention losses of the ``"lit_kd"`` variant)."""
        return self._user_loss is None and self.feature == "attention" and self.variant == "lit_kd"

    def _check_score_threshold(self) -> None:
        value = self.score_threshold
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(f"Expected `score_threshold` to be a number (or -inf) but got {value!r}.")
        self.score_threshold = float(value)
        if self.score_threshold != losses.MASKED_SCORE_THRESHOLD and not (
            self.feature == "attention" and self.variant == "lit_kd" and self._user_loss is None
        ):
            raise ValueError(
                "Expected `score_threshold` to be left at its default except for built-in attention losses of the "
                f"'lit_kd' variant (the TextBrewer variant uses TextBrewer's -1e-3) but got {value!r} with "
                f"`feature={self.feature!r}`, `variant={self.variant!r}`."
            )

    def _check_projection_options(self) -> None:
        options = self.projection_options
        if options is None:
            return
        if self.projection is None:
            raise ValueError(
                f"Expected `projection_options` to be None when `projection` is None (there is no projection to "
                f"optimise) but got {options!r}."
            )
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options) or "params" in options:
            raise ValueError(
                "Expected `projection_options` to be a dict of optimizer parameter-group options (e.g. {'lr': 1e-3}) "
                f"without 'params' but got {options!r}."
            )
        lr = options.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
            raise ValueError(f"Expected `projection_options['lr']` to be > 0 but got {lr!r}.")

    def _checked_layer(self, name: str, value: Any) -> int | list[int]:
        if self.two_layers:
            if not (isinstance(value, list | tuple) and len(value) == 2 and all(_is_index(v) for v in value)):
                raise ValueError(
                    f"Expected `{name}` to be a list of two layer indices for `loss={self.loss!r}` but got {value!r}."
                )
            value = list(value)
            indices = value
        else:
            if isinstance(value, str) and value.strip():
                return value.strip()
            if not _is_index(value):
                raise ValueError(
                    f"Expected `{name}` to be a single layer index or a module's dotted name for "
                    f"`loss={loss_name(self.loss)!r}` but got {value!r}."
                )
            indices = [value]
        for index in indices:
            if index < 0:
                raise ValueError(f"Expected `{name}` to be >= 0 but got {index}.")
        return value

    def _checked_projection(self, projection: Any) -> tuple[str, int, int]:
        if self.feature == "attention":
            raise ValueError(
                "Expected `projection` to be None for `feature='attention'` (attention maps have no feature "
                f"dimension) but got {projection!r}."
            )
        kinds = get_args(ProjectionKind)
        if not (isinstance(projection, list | tuple) and len(projection) == 3 and projection[0] in kinds):
            raise ValueError(
                f"Expected `projection` to be (kind, dim_s, dim_t) with kind one of {_choices(kinds)} but got "
                f"{projection!r}."
            )
        kind, dim_s, dim_t = projection
        if not (_is_index(dim_s) and _is_index(dim_t) and dim_s > 0 and dim_t > 0):
            raise ValueError(
                f"Expected the dimensions of `projection` to be positive integers but got {tuple(projection)!r}."
            )
        return kind, dim_s, dim_t


@dataclass
class DistillationConfig:
    """What to distil and how: logits loss, temperature, loss weights and intermediate matches (TextBrewer's names).

    Attributes:
        temperature: Base temperature ``T`` of the logits loss; > 0.
        temperature_scheduler: ``"constant"``, or the per-sample schedules ``"flsw"`` and ``"cwsm"`` of
            arXiv:1911.07471 (see :mod:`lit_kd.schedulers`), which spread temperatures around ``temperature``.
            ``"flsw"``/``"cwsm"`` need a class dimension, so not with ``kd_loss_type="bce"``.
        flsw_beta: Spread ``beta`` of ``"flsw"`` (TextBrewer's example value 1); >= 0.
        flsw_gamma: Focusing exponent ``gamma`` of ``"flsw"`` (TextBrewer's example value 2); >= 0.
        flsw_eps: How ``"flsw"`` normalises the logits: ``None`` for exact unit vectors ``z / max(|z|, 1e-12)``, a
            float > 0 for ``z / (|z| + flsw_eps)``; TextBrewer's is ``1e-4``.
        cwsm_beta: Spread ``beta`` of ``"cwsm"`` (TextBrewer's example value 1); >= 0.
        kd_loss_type: Logits loss: ``"ce"`` (soft cross-entropy, TextBrewer's default), ``"kl"``, ``"mse"`` (on
            tempered logits) or ``"bce"`` (sigmoid outputs: binary or multi-label, e.g. knowledge tracing); or a
            user loss ``fn(logits_s, logits_t, temperature, mask)`` (a callable or a dotted import path; see
            :mod:`lit_kd.config`). For language models, the token-level divergences of TRL's GKD:
            ``"forward_kl"`` (``KL(p_t || p_s)``), ``"reverse_kl"`` (``KL(p_s || p_t)``), ``"jsd"`` (the generalised
            JSD, see ``jsd_beta``) and ``"tvd"`` (total variation), each summed over the vocabulary and averaged over
            tokens (:func:`lit_kd.losses.generalized_jsd`); they are never scaled by ``T**2``, whatever
            ``scale_by_temperature_squared`` says (TRL's convention).
        jsd_beta: The teacher's weight ``beta`` in the mixture of ``kd_loss_type="jsd"``, in [0, 1]: 0 is exactly
            the forward KL, 1 exactly the reverse KL (TRL's ``GKDConfig.beta``, default 0.5).
        kd_chunk_size: With a token-level divergence (``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``):
            compute the loss and its gradient this many tokens at a time, so that no (N, V) float32 copy of the
            log-probabilities is held (same values); ``None`` (default) for all tokens at once; > 0.
        kd_loss_weight: Weight of the logits loss; >= 0.
        kd_loss_weight_scheduler: Schedules ``kd_loss_weight`` over training: ``"constant"``, ``"linear_decay"``
            (1 to 0) or ``"linear_growth"`` (0 to 1); see ``weight_schedule_mode``.
        hard_label_weight: Weight of the student's loss on the gold labels; >= 0 (0: pure distillation).
        hard_label_weight_scheduler: Schedules ``hard_label_weight`` over training, as above.
        weight_schedule_mode: How a schedule acts on its weight: ``"multiply"`` (``weight * schedule(p)`` from step 0
            on) or ``"textbrewer"`` (TextBrewer 0.2.1: the configured weight at step 0, then ``schedule(p)`` in its
            place, ``p`` counting the optimizer steps done; see :func:`lit_kd.schedulers.scheduled_weight`).
        stage_boundary: Training progress in (0, 1) where the ``"first_stage"`` schedules end and the
            ``"second_stage"`` ones start (staged distillation: e.g. matches with ``weight_scheduler="first_stage"``,
            ``kd_loss_weight_scheduler="second_stage"``).
        hard_label_loss: The student's loss on the gold labels: ``None`` for the model's own loss when it reports one
            (``outputs.loss``), else cross-entropy (binary cross-entropy with ``kd_loss_type="bce"``); ``"ce"``,
            ``"bce"``, or a user loss ``fn(logits, labels, mask)`` (a callable or a dotted import path).
        scale_by_temperature_squared: Multiply the logits loss by ``T**2``. With soft targets at temperature ``T``
            the gradients scale as ``1 / T**2`` (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"),
            so the factor keeps the soft and hard terms balanced when ``T`` changes. TextBrewer does not scale; set
            False to reproduce its numbers. With per-sample temperatures the factor is per sample too. Not applied
            to the token-level divergences (``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``).
        probability_shift: Knowledge adjustment (arXiv:1911.07471, TextBrewer's option): where the teacher is wrong,
            swap its top logit with the gold label's logit (:func:`lit_kd.losses.shift_probability`). Needs class
            labels, so not with ``kd_loss_type="bce"``. Positions with a negative label are left as they are.
        intermediate_matches: Intermediate-feature matches; their names must be unique.
        projection_init: Initial weights of the matches' projections: ``"pytorch"`` (``nn.Linear``'s default) or
            ``"textbrewer"`` (TextBrewer's: weights drawn from normal(0, 0.02), biases 0).
    """

    temperature: float = 4.0
    temperature_scheduler: TemperatureScheduler = "constant"
    flsw_beta: float = 1.0
    flsw_gamma: float = 2.0
    cwsm_beta: float = 1.0
    kd_loss_type: KDLossType | str | Callable[..., Tensor] = "ce"
    kd_loss_weight: float = 1.0
    kd_loss_weight_scheduler: WeightScheduler = "constant"
    hard_label_weight: float = 0.0
    hard_label_weight_scheduler: WeightScheduler = "constant"
    hard_label_loss: HardLabelLoss | str | Callable[..., Tensor] | None = None
    scale_by_temperature_squared: bool = True
    probability_shift: bool = False
    intermediate_matches: list[IntermediateMatch] = field(default_factory=list)
    weight_schedule_mode: WeightScheduleMode = "multiply"
    stage_boundary: float = 0.5
    flsw_eps: float | None = None
    projection_init: ProjectionInit = "pytorch"
    jsd_beta: float = 0.5
    kd_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"Expected `temperature` to be > 0 but got {self.temperature!r}.")
        _check_choice("temperature_scheduler", self.temperature_scheduler, TemperatureScheduler)
        _check_choice("weight_schedule_mode", self.weight_schedule_mode, WeightScheduleMode)
        if not 0 < self.stage_boundary < 1:
            raise ValueError(f"Expected `stage_boundary` to be in (0, 1) but got {self.stage_boundary!r}.")
        _check_choice("projection_init", self.projection_init, ProjectionInit)
        if self.flsw_eps is not None and (isinstance(self.flsw_eps, bool) or not self.flsw_eps > 0):
            raise ValueError(f"Expected `flsw_eps` to be None or > 0 but got {self.flsw_eps!r}.")
        for name in ("flsw_beta", "flsw_gamma", "cwsm_beta", "kd_loss_weight", "hard_label_weight"):
            _check_non_negative(name, getattr(self, name))
        if isinstance(self.jsd_beta, bool) or not (isinstance(self.jsd_beta, int | float) and 0 <= self.jsd_beta <= 1):
            raise ValueError(f"Expected `jsd_beta` to be in [0, 1] but got {self.jsd_beta!r}.")
        if self.kd_chunk_size is not None and not (_is_index(self.kd_chunk_size) and self.kd_chunk_size > 0):
            raise ValueError(f"Expected `kd_chunk_size` to be None or an integer > 0 but got {self.kd_chunk_size!r}.")
        if self.kd_chunk_size is not None and self.kd_loss_type not in LM_DIVERGENCE_LOSSES:
            raise ValueError(
                "Expected `kd_chunk_size` to be None when `kd_loss_type` is not one of "
                f"{_choices(LM_DIVERGENCE_LOSSES)} (only those are chunked) but got {self.kd_chunk_size!r} with "
                f"{loss_name(self.kd_loss_type)!r}."
            )
        self._user_kd_loss = resolve_loss(
            self.kd_loss_type,
            "kd_loss_type",
            get_args(KDLossType),
            ("logits_s", "logits_t", "temperature", "mask"),
            optional_last=True,
        )
        self._user_kd_takes_mask = self._user_kd_loss is not None and _accepts(self._user_kd_loss, 4) is not False
        self._user_hard_loss = (
            None
            if self.hard_label_loss is None
            else resolve_loss(
                self.hard_label_loss, "hard_label_loss", get_args(HardLabelLoss), ("logits", "labels", "mask")
            )
        )
        _check_choice("kd_loss_weight_scheduler", self.kd_loss_weight_scheduler, WeightScheduler)
        _check_choice("hard_label_weight_scheduler", self.hard_label_weight_scheduler, WeightScheduler)
        if self.kd_loss_type == "bce" and self.temperature_scheduler != "constant":
            raise ValueError(
                "Expected `temperature_scheduler` to be 'constant' when `kd_loss_type` is 'bce' (flsw and cwsm are "
                f"defined on softmax distributions) but got {self.temperature_scheduler!r}."
            )
        if self.kd_loss_type == "bce" and self.probability_shift:
            raise ValueError(
                "Expected `probability_shift` to be False when `kd_loss_type` is 'bce' (it swaps class logits) but "
                "got True."
            )
        self.intermediate_matches = [
            IntermediateMatch(**m) if isinstance(m, dict) else m for m in self.intermediate_matches
        ]
        names = [m.name for m in self.intermediate_matches]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Expected the names of `intermediate_matches` to be unique but got {duplicates} more than once; "
                "set `name` on the matches."
            )

    @property
    def binary(self) -> bool:
        """Whether the logits are sigmoid outputs (``kd_loss_type="bce"``): no class dimension."""
        return self.kd_loss_type == "bce"

    @property
    def user_kd_loss(self) -> Callable[..., Tensor] | None:
        """The user's KD loss, or ``None`` for a built-in one."""
        return self._user_kd_loss

    @property
    def user_hard_loss(self) -> Callable[..., Tensor] | None:
        """The user's hard-label loss, or ``None`` for a built-in one (or the model's own loss)."""
        return self._user_hard_loss

    def kd_loss_fn(self) -> Callable[..., Tensor]:
        """The logits loss: the user's, or :mod:`lit_kd.losses`' ``fn(logits_s, logits_t, T, mask, scale)``."""
        if self._user_kd_loss is not None:
            return self._user_kd_loss
        if self.kd_loss_type in LM_DIVERGENCE_LOSSES:
            return partial(_KD_LOSS_FNS[self.kd_loss_type], **self._divergence_options())
        return _KD_LOSS_FNS[self.kd_loss_type]

    def _divergence_options(self) -> dict[str, Any]:
        """The options of a token-level divergence: ``chunk_size`` and, for the JSD, ``beta``."""
        options: dict[str, Any] = {"chunk_size": self.kd_chunk_size}
        if self.kd_loss_type == "jsd":
            options["beta"] = self.jsd_beta
        return options

    def kd_loss(self, logits_s: Tensor, logits_t: Tensor, temperature: Tensor, mask: Tensor | None) -> Tensor:
        """The logits loss on one batch.

        Args:
            logits_s: Student logits, (N, C) or (B, L, C) (any shape for ``"bce"``).
            logits_t: Teacher logits, same shape.
            temperature: Per-item temperatures, the logits' shape without the class dimension (as the temperature
                schedules return them).
            mask: Bool mask of that shape, or ``None``.

        Returns:
            A scalar; built-in losses but the token-level divergences are scaled by ``T**2`` per item when
            ``scale_by_temperature_squared``.
        """
        fn = self._user_kd_loss
        if fn is None:
            return self.kd_loss_fn()(logits_s, logits_t, temperature, mask, self.scale_by_temperature_squared)
        # One temperature per item with a trailing singleton: `logits / temperature` broadcasts correctly even when
        # the batch size equals the class count.
        t = temperature.unsqueeze(-1) if temperature.dim() == logits_s.dim() - 1 else temperature
        if self._user_kd_takes_mask:
            return fn(logits_s, logits_t, t, mask)
        if mask is not None:
            raise ValueError(
                f"Expected the KD loss {loss_name(fn)} to take a `mask` (a 4th argument) because the logits come with "
                "one (padding or unscored positions), but it takes three arguments."
            )
        return fn(logits_s, logits_t, t)

    def temperature_fn(self) -> schedulers.TemperatureSchedule:
        """``fn(logits_s, logits_t, base_temperature, mask=None)`` returning per-sample temperatures."""
        return schedulers.temperature_schedule(
            self.temperature_scheduler,
            flsw_beta=self.flsw_beta,
            flsw_gamma=self.flsw_gamma,
            cwsm_beta=self.cwsm_beta,
            flsw_eps=self.flsw_eps,
        )

    def kd_loss_weight_at(self, progress: float) -> float:
        """``kd_loss_weight`` under ``kd_loss_weight_scheduler`` at ``progress`` in [0, 1] (see
        ``weight_schedule_mode``)."""
        return schedulers.scheduled_weight(
            self.kd_loss_weight, self.kd_loss_weight_scheduler, progress, self.weight_schedule_mode, self.stage_boundary
        )

    def hard_label_weight_at(self, progress: float) -> float:
        """``hard_label_weight`` under ``hard_label_weight_scheduler`` at ``progress`` in [0, 1] (see
        ``weight_schedule_mode``)."""
        return schedulers.scheduled_weight(
            self.hard_label_weight,
            self.hard_label_weight_scheduler,
            progress,
            self.weight_schedule_mode,
            self.stage_boundary,
        )

    def match_weight_at(self, match: IntermediateMatch, progress: float) -> float:
        """An intermediate match's ``weight`` under its ``weight_scheduler`` at ``progress`` in [0, 1]."""
        return schedulers.scheduled_weight(
            match.weight, match.weight_scheduler, progress, self.weight_schedule_mode, self.stage_boundary
        )

    def validate_layers(
        self, num_hidden_t: int, num_hidden_s: int, num_attn_t: int | None = None, num_attn_s: int | None = None
    ) -> None:
        """Check every match's layer indices against what the models return (call it at the first batch).

        Args:
            num_hidden_t: How many hidden states the teacher returns (``len(outputs.hidden_states)``).
            num_hidden_s: How many hidden states the student returns.
            num_attn_t: How many attention maps the teacher returns; ``None`` when it returns none.
            num_attn_s: How many attention maps the student returns; ``None`` when it returns none.

        Raises:
            ValueError: e.g. "Expected `layer_s` to be < 3 (the student returns 3 hidden states) but got 6
                (intermediate match `hidden_6_2_hidden_mse`)."
        """
        for match in self.intermediate_matches:
            if match.feature == "hidden":
                available = {"teacher": num_hidden_t, "student": num_hidden_s}
                what = "hidden states"
            else:
                available = {"teacher": num_attn_t, "student": num_attn_s}
                what = "attention maps"
            for model, attr in (("teacher", "layer_t"), ("student", "layer_s")):
                count = available[model]
                layers = getattr(match, attr)
                if all(isinstance(i, str) for i in (layers if isinstance(layers, list) else [layers])):
                    continue  # module names: their outputs are captured by hooks
                if count is None:
                    raise ValueError(
                        f"Expected the {model} to return {what} (intermediate match `{match.name}`) but "
                        f"`num_attn_{attr[-1]}` is None."
                    )
                layers = getattr(match, attr)
                for index in layers if isinstance(layers, list) else [layers]:
                    if isinstance(index, str):
                        continue  # a module name, checked when its hook is registered
                    if index >= count:
                        raise ValueError(
                            f"Expected `{attr}` to be < {count} (the {model} returns {count} {what}) but got "
                            f"{index} (intermediate match `{match.name}`)."
                        )
