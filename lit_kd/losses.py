"""Knowledge-distillation losses as pure functions (torch only).

Conventions shared by every function here:

* ``_s`` is the student, ``_t`` the teacher; the loss is differentiable in the student's inputs (and in the teacher's,
  which the caller normally computes under ``torch.no_grad``).
* ``mask`` is a bool (or 0/1) tensor, True where a sample or token counts. A masked-out position contributes nothing,
  whatever its finite values (attention scores may also be ``-inf``, see the attention losses), and is not counted
  in the mean. An all-False mask gives 0 (with a gradient path), not ``nan``.
* Every loss is a *mean over valid items*; each docstring says which items (samples, tokens, token pairs, ...).
* Shape errors name both shapes, e.g. "Expected `h_s` and `h_t` to have the same shape but got (2, 5, 8) and
  (2, 5, 16); add a projection to the IntermediateMatch."

Symbols: ``z`` logits, ``T`` temperature, ``p = softmax(z / T)`` over the class dimension ``C``; ``B`` batch,
``L`` length, ``D`` features, ``H`` heads, ``N`` samples.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED_SCORE_THRESHOLD = -1e3
"""Raw attention scores at or below this value (``-inf``, ``torch.finfo(dtype).min``, BERT's ``-10000`` additive
mask, ...) are treated as masked out by the model itself (padding or causal masking); the default ``score_threshold``
of the attention losses."""

TEXTBREWER_SCORE_THRESHOLD = -1e-3
"""TextBrewer 0.2.1's threshold: without a mask its attention losses zero every entry at or below ``-1e-3``."""

_SCORE_FILL = -1e4  # a masked score for softmax: exp(-1e4 - max) underflows to 0 yet stays finite (no 0 * -inf = nan)

_PROJECTION_HINT = "; add a projection to the IntermediateMatch"
_HEAD_REDUCTIONS = ("none", "sum", "mean")


# --------------------------------------------------------------------------------------------------------- helpers
def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_same_shape(x_s: Tensor, x_t: Tensor, name_s: str, name_t: str, hint: str = "") -> None:
    if x_s.shape != x_t.shape:
        raise ValueError(
            f"Expected `{name_s}` and `{name_t}` to have the same shape but got {_shape(x_s)} and {_shape(x_t)}{hint}."
        )


def _projection_hint(x_s: Tensor, x_t: Tensor) -> str:
    """The projection hint when two features differ in their last (feature) dimension alone: a projection helps
    there, not with other batch sizes or lengths."""
    return _PROJECTION_HINT if x_s.dim() == x_t.dim() and x_s.shape[:-1] == x_t.shape[:-1] else ""


def _check_mask(mask: Tensor | None, shape: tuple[int, ...], what: str) -> Tensor | None:
    """Return ``mask`` as bool after checking that its shape is ``shape`` (``what`` explains that shape)."""
    if mask is None:
        return None
    if _shape(mask) != tuple(shape):
        raise ValueError(f"Expected `mask` to have shape {tuple(shape)} ({what}) but got {_shape(mask)}.")
    return mask.bool()


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` where ``mask`` (broadcastable to ``values``) is True; 0 when nothing is valid."""
    if mask is None:
        return values.mean()
    # torch.where rather than a product: masked positions may hold inf, and inf * 0 = nan.
    total = torch.where(mask, values, 0.0).sum()  # broadcasts the mask without materialising its expansion
    # Under broadcasting each mask entry stands for numel(values) / numel(mask) values: count on the small mask.
    return total / (mask.sum() * (values.numel() // max(mask.numel(), 1))).clamp_min(1)


def _broadcast_temperature(temperature: float | Tensor, logits: Tensor, item_dims: int) -> float | Tensor:
    """Give a per-sample temperature trailing singleton dimensions so that it broadcasts against ``logits``.

    A tensor temperature must have the shape of the first ``k <= item_dims`` dimensions of ``logits``: (N,) for (N, C)
    logits; (B,) or (B, L) for (B, L, C) logits.
    """
    if not isinstance(temperature, Tensor) or temperature.dim() == 0:
        return temperature
    k = temperature.dim()
    if k > item_dims or _shape(temperature) != _shape(logits)[:k]:
        allowed = " or ".join(str(_shape(logits)[:i]) for i in range(1, item_dims + 1))
        raise ValueError(
            f"Expected `temperature` to be a float or a tensor of shape {allowed} but got {_shape(temperature)}."
        )
    return temperature.reshape(*temperature.shape, *([1] * (logits.dim() - k)))


def _squeeze_class(t: float | Tensor) -> float | Tensor:
    """A temperature broadcast against (..., C) logits, without its class dimension (to scale per-item losses)."""
    return t.squeeze(-1) if isinstance(t, Tensor) and t.dim() > 0 else t


def _check_class_logits(logits_s: Tensor, logits_t: Tensor, mask: Tensor | None) -> Tensor | None:
    _check_same_shape(logits_s, logits_t, "logits_s", "logits_t")
    if logits_s.dim() < 2:
        raise ValueError(
            f"Expected `logits_s` to have a class dimension, shape (N, C) or (B, L, C), but got {_shape(logits_s)}."
        )
    return _check_mask(mask, _shape(logits_s)[:-1], "the logits without their class dimension")


# ------------------------------------------------------------------------------------------------- logits (KD) losses
def kd_ce(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Soft-label cross-entropy of the student against the teacher's tempered distribution.

    ``loss = mean_{valid n} -sum_c softmax(z_t[n] / T[n])_c * log softmax(z_s[n] / T[n])_c``

    Not scaled by ``T**2``; the caller decides (see ``DistillationConfig.scale_by_temperature_squared``).

    Args:
        logits_s: Student logits, (N, C), or (B, L, C) for token-level tasks.
        logits_t: Teacher logits, same shape.
        temperature: A float, or per-sample temperatures of shape (N,) for (N, C) logits, (B,) or (B, L) for
            (B, L, C) logits (as returned by :mod:`lit_kd.schedulers`).
        mask: Which samples count: (N,) or (B, L); ``None`` for all.
        scale_by_temperature_squared: Multiply each item's loss by its own ``T**2`` before averaging.

    Returns:
        A scalar: the mean over valid samples (or tokens).
    """
    mask = _check_class_logits(logits_s, logits_t, mask)
    t = _broadcast_temperature(temperature, logits_s, logits_s.dim() - 1)
    p_t = F.softmax(logits_t / t, dim=-1)  # (..., C)
    per_item = -(p_t * F.log_softmax(logits_s / t, dim=-1)).sum(dim=-1)  # (...)
    if scale_by_temperature_squared:
        per_item = per_item * _squeeze_class(t) ** 2
    return _masked_mean(per_item, mask)


def kd_kl(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Kullback-Leibler divergence ``KL(p_t || p_s)`` between the tempered distributions.

    ``loss = mean_{valid n} sum_c p_t[n, c] * (log p_t[n, c] - log p_s[n, c])``, with ``p = softmax(z / T[n])``.

    It differs from :func:`kd_ce` by the teacher's entropy, a constant for the student: same gradients, but 0 at a
    perfect match.

    Args:
        logits_s: Student logits, (N, C) or (B, L, C).
        logits_t: Teacher logits, same shape.
        temperature: A float, or per-sample temperatures (N,), (B,) or (B, L) (see :func:`kd_ce`).
        mask: Which samples count: (N,) or (B, L); ``None`` for all.
        scale_by_temperature_squared: Multiply each item's loss by its own ``T**2`` before averaging.

    Returns:
        A scalar: the mean over valid samples (or tokens).
    """
    mask = _check_class_logits(logits_s, logits_t, mask)
    t = _broadcast_temperature(temperature, logits_s, logits_s.dim() - 1)
    log_p_s = F.log_softmax(logits_s / t, dim=-1)  # (..., C)
    log_p_t = F.log_softmax(logits_t / t, dim=-1)  # (..., C)
    per_item = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)  # (...)
    if scale_by_temperature_squared:
        per_item = per_item * _squeeze_class(t) ** 2
    return _masked_mean(per_item, mask)


def kd_mse(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Mean squared error between the tempered logits.

    ``loss = mean_{valid n, c} (z_s[n, c] / T[n] - z_t[n, c] / T[n]) ** 2``

    Args:
        logits_s: Student logits, (N, C) or (B, L, C).
        logits_t: Teacher logits, same shape.
        temperature: A float, or per-sample temperatures (N,), (B,) or (B, L) (see :func:`kd_ce`).
        mask: Which samples count: (N,) or (B, L); ``None`` for all.
        scale_by_temperature_squared: Multiply each item's loss by its own ``T**2`` before averaging.

    Returns:
        A scalar: the mean over valid samples *and* classes.
    """
    mask = _check_class_logits(logits_s, logits_t, mask)
    t = _broadcast_temperature(temperature, logits_s, logits_s.dim() - 1)
    per_element = (logits_s / t - logits_t / t) ** 2  # (..., C)
    if scale_by_temperature_squared:
        per_element = per_element * t**2
    return _masked_mean(per_element, None if mask is None else mask.unsqueeze(-1))


def kd_bce(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Binary (or multi-label) distillation of sigmoid outputs.

    ``loss = mean_{valid e} -(q_e log sigmoid(z_s[e] / T) + (1 - q_e) log(1 - sigmoid(z_s[e] / T)))`` with the soft
    targets ``q_e = sigmoid(z_t[e] / T)``, over elements ``e``. Its minimum is the teacher's binary entropy, not 0.

    Args:
        logits_s: Student logits of any shape: (N,) or (B, L) for one binary output per sample or token (knowledge
            tracing), (N, C) or (B, L, C) for multi-label outputs.
        logits_t: Teacher logits, same shape.
        temperature: A float, or per-sample temperatures whose shape is a leading part of the logits' shape
            ((N,), (B,), (B, L), ...).
        mask: Which elements count: either the logits' shape, or the logits' shape without its last dimension
            (one flag per sample or token of multi-label logits); ``None`` for all.
        scale_by_temperature_squared: Multiply each element's loss by its own ``T**2`` before averaging.

    Returns:
        A scalar: the mean over valid elements.
    """
    _check_same_shape(logits_s, logits_t, "logits_s", "logits_t")
    if mask is not None:
        if _shape(mask) == _shape(logits_s)[:-1] and logits_s.dim() > 1:
            mask = mask.bool().unsqueeze(-1)
        else:
            mask = _check_mask(mask, _shape(logits_s), "the logits, or the logits without their last dimension")
    t = _broadcast_temperature(temperature, logits_s, logits_s.dim())
    targets = torch.sigmoid(logits_t / t)
    per_element = F.binary_cross_entropy_with_logits(logits_s / t, targets, reduction="none")
    if scale_by_temperature_squared:
        per_element = per_element * t**2
    return _masked_mean(per_element, mask)


def shift_probability(logits_t: Tensor, labels: Tensor) -> Tensor:
    """Knowledge adjustment by probability shift (arXiv:1911.07471; TextBrewer's ``probability_shift``).

    Where the teacher's top class is not the gold label, swap the teacher's largest logit with the gold label's logit,
    so that the gold label becomes the teacher's prediction while the other classes keep their values. Samples the
    teacher gets right are unchanged, and so are positions whose label is negative (padding, transfer-set rows:
    ``-100``, ``-1``, ...), as in TextBrewer's ``probability_shift_`` on token logits.

    Args:
        logits_t: Teacher logits, (N, C) or (B, L, C).
        labels: Gold class ids, (N,) or (B, L); positions with a negative label are left unchanged.

    Returns:
        A new tensor of the shape of ``logits_t``; the input is not modified.
    """
    if logits_t.dim() < 2 or _shape(labels) != _shape(logits_t)[:-1]:
        raise ValueError(
            f"Expected `labels` to have the shape of `logits_t` without its class dimension but got {_shape(labels)} "
            f"and {_shape(logits_t)}."
        )
    shifted = logits_t.reshape(-1, logits_t.shape[-1]).clone()  # (N, C)
    flat_labels = labels.reshape(-1)  # (N,)
    rows = torch.nonzero(flat_labels >= 0).squeeze(-1)  # (V,)
    gold = flat_labels[rows].long()  # (V,)
    top = shifted[rows].argmax(dim=-1)  # (V,)
    gold_values, top_values = shifted[rows, gold], shifted[rows, top]  # (V,), (V,) copies, read before writing
    shifted[rows, top] = gold_values
    shifted[rows, gold] = top_values
    return shifted.reshape(logits_t.shape)


# ------------------------------------------------------------------------------------------- hidden-state losses
def hidden_mse(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states (TinyBERT's hidden-state loss).

    ``loss = mean_{valid (b, l), d} (h_s[b, l, d] - h_t[b, l, d]) ** 2``

    Args:
        h_s: Student hidden states, (B, L, D) (project them first when the widths differ).
        h_t: Teacher hidden states, (B, L, D).
        mask: (B, L), True for real tokens; ``None`` for all.

    Returns:
        A scalar: the mean over valid tokens and features.
    """
    _check_same_shape(h_s, h_t, "h_s", "h_t", _projection_hint(h_s, h_t))
    mask = _check_mask(mask, _shape(h_s)[:-1], "the hidden states without their feature dimension")
    per_element = F.mse_loss(h_s, h_t, reduction="none")  # (B, L, D); one fused kernel each way, unlike (h_s - h_t)**2
    return _masked_mean(per_element, None if mask is None else mask.unsqueeze(-1))


def cos(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine distance between hidden states, token by token (DistilBERT's cosine loss).

    ``loss = mean_{valid (b, l)} 1 - <h_s[b, l], h_t[b, l]> / (|h_s[b, l]| |h_t[b, l]|)``

    Args:
        h_s: Student hidden states, (B, L, D).
        h_t: Teacher hidden states, (B, L, D).
        mask: (B, L), True for real tokens; ``None`` for all.

    Returns:
        A scalar: the mean over valid tokens, in [0, 2].
    """
    _check_same_shape(h_s, h_t, "h_s", "h_t", _projection_hint(h_s, h_t))
    mask = _check_mask(mask, _shape(h_s)[:-1], "the hidden states without their feature dimension")
    per_token = 1 - F.cosine_similarity(h_s, h_t, dim=-1)  # (B, L)
    return _masked_mean(per_token, mask)


def pkd(h_s: Tensor, h_t: Tensor) -> Tensor:
    """Patient-KD loss (Sun et al. 2019): squared distance between L2-normalised first-token ([CLS]) vectors.

    ``loss = mean_b sum_d (u_s[b, d] - u_t[b, d]) ** 2`` with ``u = h[b, 0] / |h[b, 0]|``: a *sum* over features and a
    *mean* over the batch, in [0, 4]. No mask: only the first token, which is never padding, is used, so the two
    lengths may differ (e.g. different tokenizers); only the first-token vectors must have the same shape.

    Args:
        h_s: Student hidden states, (B, L_s, D), or first-token vectors (B, D).
        h_t: Teacher hidden states, (B, L_t, D), or first-token vectors (B, D).

    Returns:
        A scalar.
    """
    for name, h in (("h_s", h_s), ("h_t", h_t)):
        if h.dim() not in (2, 3):
            raise ValueError(f"Expected `{name}` to have shape (B, L, D) or (B, D) but got {_shape(h)}.")
    cls_s = h_s[:, 0] if h_s.dim() == 3 else h_s  # (B, D)
    cls_t = h_t[:, 0] if h_t.dim() == 3 else h_t  # (B, D)
    _check_same_shape(cls_s, cls_t, "h_s[:, 0]", "h_t[:, 0]", _projection_hint(cls_s, cls_t))
    diff = F.normalize(cls_s, dim=-1) - F.normalize(cls_t, dim=-1)  # (B, D)
    return (diff**2).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------- attention losses
def _prepare_attention(
    a_s: Tensor, a_t: Tensor, mask: Tensor | None, head_reduce: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check shapes and head_reduce; return (B, H, L, L) maps (a (B, L, L) map gets H = 1) and a bool mask."""
    if head_reduce not in _HEAD_REDUCTIONS:
        raise ValueError(f"Expected `head_reduce` to be one of {_HEAD_REDUCTIONS} but got {head_reduce!r}.")
    for name, a in (("a_s", a_s), ("a_t", a_t)):
        if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"Expected `{name}` to have shape (B, H, L, L) or (B, L, L) but got {_shape(a)}.")
    a_s = a_s if a_s.dim() == 4 else a_s.unsqueeze(1)  # (B, H_s, L, L)
    a_t = a_t if a_t.dim() == 4 else a_t.unsqueeze(1)  # (B, H_t, L, L)
    if head_reduce == "none":
        _check_same_shape(
            a_s, a_t, "a_s", "a_t", "; use head_reduce='mean' or 'sum' to compare maps with different numbers of heads"
        )
    elif (a_s.shape[0], *a_s.shape[2:]) != (a_t.shape[0], *a_t.shape[2:]):
        raise ValueError(
            f"Expected `a_s` and `a_t` to have the same batch size and length but got {_shape(a_s)} and {_shape(a_t)}."
        )
    mask = _check_mask(mask, (a_s.shape[0], a_s.shape[-1]), "batch size, length")
    return a_s, a_t, mask


def _reduce_heads(a: Tensor, head_reduce: str) -> Tensor:
    if head_reduce == "sum":
        return a.sum(dim=1, keepdim=True)  # (B, 1, L, L)
    if head_reduce == "mean":
        return a.mean(dim=1, keepdim=True)  # (B, 1, L, L)
    return a


def attention_mse(
    a_s: Tensor,
    a_t: Tensor,
    mask: Tensor | None = None,
    scores: bool = False,
    head_reduce: Literal["none", "sum", "mean"] = "none",
    score_threshold: float = MASKED_SCORE_THRESHOLD,
) -> Tensor:
    """Mean squared error between attention maps (TinyBERT's attention loss; TextBrewer's ``attention_mse[_sum]``).

    ``loss = mean_{h, valid (i, j)} (A_s[b, h, i, j] - A_t[b, h, i, j]) ** 2`` where ``(i, j)`` is valid when both the
    query token ``i`` and the key token ``j`` are real (``mask[b, i] and mask[b, j]``).

    * ``scores=False``: the maps are probabilities (what ``transformers`` returns with ``output_attentions=True``);
      padded keys already hold 0 and padded query rows are excluded by the mask.
    * ``scores=True``: the maps are raw scores. Entries the model masked itself (at or below ``score_threshold``,
      default :data:`MASKED_SCORE_THRESHOLD`: ``-inf``, ``finfo.min``, ``-10000`` ...), e.g. causal masking, are set
      to 0 before the difference (per head, before ``head_reduce``); padded query rows and key columns are excluded
      through ``mask``. Without ``mask``, setting masked scores to 0 is the only exclusion.
    * ``head_reduce``: ``"none"`` compares head ``h`` of the student with head ``h`` of the teacher; ``"sum"`` and
      ``"mean"`` first sum or average each model's maps over its heads (then ``H`` may differ between the two) and
      compare the (B, L, L) results.

    Args:
        a_s: Student attention, (B, H_s, L, L) or (B, L, L).
        a_t: Teacher attention, (B, H_t, L, L) or (B, L, L); ``H_t == H_s`` when ``head_reduce="none"``.
        mask: (B, L), True for real tokens; ``None`` for all.
        scores: Whether the maps are raw scores rather than probabilities.
        head_reduce: ``"none"``, ``"sum"`` or ``"mean"`` over heads before the loss.
        score_threshold: With ``scores=True``, entries at or below it count as masked by the model.

    Returns:
        A scalar: the mean over heads (after ``head_reduce``) and valid (query, key) pairs.
    """
    a_s, a_t, mask = _prepare_attention(a_s, a_t, mask, head_reduce)
    if scores:
        a_s = a_s.masked_fill(a_s <= score_threshold, 0.0)
        a_t = a_t.masked_fill(a_t <= score_threshold, 0.0)
    per_pair = F.mse_loss(_reduce_heads(a_s, head_reduce), _reduce_heads(a_t, head_reduce), reduction="none")
    if mask is None:
        return per_pair.mean()
    pairs = mask[:, :, None] & mask[:, None, :]  # (B, L, L): query i and key j both real
    return _masked_mean(per_pair, pairs[:, None])


def attention_ce(
    a_s: Tensor,
    a_t: Tensor,
    mask: Tensor | None = None,
    scores: bool = False,
    head_reduce: Literal["none", "mean"] = "none",
    eps: float = 1e-12,
    score_threshold: float = MASKED_SCORE_THRESHOLD,
) -> Tensor:
    """Cross-entropy between the teacher's and the student's attention distributions (TextBrewer's ``attention_ce``).

    ``loss = mean_{h, valid i} -sum_{valid j} P_t[b, h, i, j] * log P_s[b, h, i, j]``: one term per valid query row.

    * ``scores=False``: the maps are probabilities; ``log P_s`` is ``log(max(P_s, eps))`` (``eps`` raised to the
      dtype's smallest normal number if needed), so a key the student ignores costs a large but finite amount.
    * ``scores=True``: the maps are raw scores. Scores at or below ``score_threshold`` (default
      :data:`MASKED_SCORE_THRESHOLD`) and padded key columns are masked, then ``P_t = softmax(scores_t)`` and
      ``log P_s = log_softmax(scores_s)`` over keys. Given the same masking, this equals ``scores=False`` on the
      softmaxed maps. TextBrewer's ``attention_ce`` softmaxes whatever it gets (also probabilities) and masks padded
      keys after the softmax: see :func:`attention_ce_textbrewer`.
    * ``head_reduce="mean"`` first averages over heads (TextBrewer's ``attention_ce_mean``): probabilities for
      ``scores=False``, raw scores (then softmax) for ``scores=True``. ``"sum"`` is refused: a sum of
      distributions is not a distribution.

    Args:
        a_s: Student attention, (B, H_s, L, L) or (B, L, L).
        a_t: Teacher attention, (B, H_t, L, L) or (B, L, L); ``H_t == H_s`` when ``head_reduce="none"``.
        mask: (B, L), True for real tokens: padded query rows are not averaged, padded key columns not summed.
        scores: Whether the maps are raw scores rather than probabilities.
        head_reduce: ``"none"`` or ``"mean"``.
        eps: Floor of ``P_s`` before the log when ``scores=False``.
        score_threshold: With ``scores=True``, scores at or below it count as masked by the model.

    Returns:
        A scalar: the mean over heads (after ``head_reduce``) and valid query rows.
    """
    if head_reduce == "sum":
        raise ValueError(
            "Expected `head_reduce` to be 'none' or 'mean' for attention_ce (a sum of distributions is not a "
            "distribution) but got 'sum'."
        )
    a_s, a_t, mask = _prepare_attention(a_s, a_t, mask, head_reduce)
    key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
    if scores:
        a_s = _reduce_heads(a_s.masked_fill(a_s <= score_threshold, _SCORE_FILL), head_reduce)
        a_t = _reduce_heads(a_t.masked_fill(a_t <= score_threshold, _SCORE_FILL), head_reduce)
        if key_mask is not None:
            a_s = a_s.masked_fill(~key_mask, _SCORE_FILL)
            a_t = a_t.masked_fill(~key_mask, _SCORE_FILL)
        log_p_s = F.log_softmax(a_s, dim=-1)  # (B, H', L, L)
        p_t = F.softmax(a_t, dim=-1)  # (B, H', L, L)
    else:
        floor = max(eps, torch.finfo(a_s.dtype).tiny)
        log_p_s = _reduce_heads(a_s, head_reduce).clamp_min(floor).log()  # (B, H', L, L)
        p_t = _reduce_heads(a_t, head_reduce)  # (B, H', L, L)
        if key_mask is not None:
            p_t = torch.where(key_mask, p_t, p_t.new_zeros(()))
    per_row = -(p_t * log_p_s).sum(dim=-1)  # (B, H', L)
    return _masked_mean(per_row, None if mask is None else mask[:, None, :])


def attention_mse_textbrewer(
    a_s: Tensor,
    a_t: Tensor,
    mask: Tensor | None = None,
    head_reduce: Literal["none", "sum", "mean"] = "none",
) -> Tensor:
    """TextBrewer 0.2.1's ``att_mse_loss`` (``head_reduce="none"``) and ``att_mse_sum_loss`` (``"sum"``), as it computes
    them (``IntermediateMatch(variant="textbrewer")``).

    The maps are reduced over heads first. Without ``mask``, every entry at or below
    :data:`TEXTBREWER_SCORE_THRESHOLD` (``-1e-3``) is set to 0 in both maps, then
    ``loss = mean_{h, i, j} (A_s - A_t) ** 2``: a no-op on probabilities, but on raw scores it zeroes every negative
    score, not only the masked ones. With ``mask``, nothing is zeroed and the loss is the mean over valid (query, key)
    pairs, as :func:`attention_mse` on probabilities.

    Args:
        a_s: Student attention, (B, H_s, L, L) or (B, L, L).
        a_t: Teacher attention, (B, H_t, L, L) or (B, L, L); ``H_t == H_s`` when ``head_reduce="none"``.
        mask: (B, L), True for real tokens; ``None`` for all.
        head_reduce: ``"none"``, ``"sum"`` or ``"mean"`` over heads before the loss.

    Returns:
        A scalar.

    Example:
        >>> a = torch.tensor([[[0.5, -2.0], [0.0, 1.0]]])  # (B, L, L) raw scores
        >>> float(attention_mse_textbrewer(a, torch.zeros_like(a)))  # -2.0 is zeroed: (0.25 + 1) / 4
        0.3125
    """
    a_s, a_t, mask = _prepare_attention(a_s, a_t, mask, head_reduce)
    a_s, a_t = _reduce_heads(a_s, head_reduce), _reduce_heads(a_t, head_reduce)  # (B, H', L, L)
    if mask is None:
        return attention_mse(a_s, a_t, scores=True, score_threshold=TEXTBREWER_SCORE_THRESHOLD)
    return attention_mse(a_s, a_t, mask)


def attention_ce_textbrewer(
    a_s: Tensor,
    a_t: Tensor,
    mask: Tensor | None = None,
    head_reduce: Literal["none", "mean"] = "none",
) -> Tensor:
    """TextBrewer 0.2.1's ``att_ce_loss`` (``head_reduce="none"``) and ``att_ce_mean_loss`` (``"mean"``), as it computes
    them (``IntermediateMatch(variant="textbrewer")``).

    Whatever the maps hold (``transformers`` gives probabilities), they are treated as scores: after ``head_reduce``,
    ``P_t = softmax(A_t)`` and ``log P_s = log_softmax(A_s)`` over *all* keys. Without ``mask``,
    ``P_t`` is set to 0 where ``A_t <= -1e-3`` (not renormalised) and
    ``loss = mean_{h, i} -sum_j P_t[h, i, j] log P_s[h, i, j]``. With ``mask``, ``P_t`` is set to 0 at padded key
    columns (after the softmax, not renormalised) and the loss is the mean of the rows' sums over valid query rows.

    Args:
        a_s: Student attention, (B, H_s, L, L) or (B, L, L).
        a_t: Teacher attention, (B, H_t, L, L) or (B, L, L); ``H_t == H_s`` when ``head_reduce="none"``.
        mask: (B, L), True for real tokens; ``None`` for all.
        head_reduce: ``"none"`` or ``"mean"``.

    Returns:
        A scalar.

    Example:
        >>> a = torch.zeros(1, 2, 2)  # uniform after the softmax: -log(1/2) per row
        >>> round(float(attention_ce_textbrewer(a, a)), 4)
        0.6931
    """
    if head_reduce == "sum":
        raise ValueError(
            "Expected `head_reduce` to be 'none' or 'mean' for attention_ce (a sum of distributions is not a "
            "distribution) but got 'sum'."
        )
    a_s, a_t, mask = _prepare_attention(a_s, a_t, mask, head_reduce)
    a_s, a_t = _reduce_heads(a_s, head_reduce), _reduce_heads(a_t, head_reduce)  # (B, H', L, L)
    p_t = F.softmax(a_t, dim=-1)  # (B, H', L, L)
    log_p_s = F.log_softmax(a_s, dim=-1)  # (B, H', L, L)
    if mask is None:
        p_t = p_t.masked_fill(a_t <= TEXTBREWER_SCORE_THRESHOLD, 0.0)
        return -(p_t * log_p_s).sum(dim=-1).mean()
    p_t = p_t.masked_fill(~mask[:, None, None, :], 0.0)  # padded keys, after the softmax
    per_row = -(p_t * log_p_s).sum(dim=-1)  # (B, H', L)
    return _masked_mean(per_row, mask[:, None, :])


# --------------------------------------------------------------------------------------- two-layer relation losses
def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str, same_width: bool) -> None:
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have shape (B, L, D) but got {_shape(a)} and {_shape(b)}."
        )
    if same_width:
        _check_same_shape(a, b, name_a, name_b)
    elif a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have the same batch size and length but got {_shape(a)} and "
            f"{_shape(b)}."
        )


def _zero_padding(h: Tensor, mask: Tensor | None) -> Tensor:
    return h if mask is None else h.masked_fill(~mask.unsqueeze(-1), 0.0)


def fsp(h_s_a: Tensor, h_s_b: Tensor, h_t_a: Tensor, h_t_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Flow-of-solution-procedure loss (Yim et al. 2017) between two layers, in TextBrewer's token form.

    ``G[b] = A[b]^T B[b] / n_b`` (D_a, D_b), a Gram matrix of the features of layers ``a`` and ``b`` over the
    ``n_b`` valid tokens of sample ``b`` (padded tokens are zeroed; ``n_b = L`` without a mask), then
    ``loss = mean_{b, i, j} (G_s[b, i, j] - G_t[b, i, j]) ** 2``.

    The student's widths must equal the teacher's (project the student's features first).

    Args:
        h_s_a: Student features of the first layer, (B, L, D_a).
        h_s_b: Student features of the second layer, (B, L, D_b).
        h_t_a: Teacher features of the first layer, (B, L, D_a).
        h_t_b: Teacher features of the second layer, (B, L, D_b).
        mask: (B, L), True for real tokens; ``None`` for all.

    Returns:
        A scalar: the mean over the batch and the D_a x D_b Gram entries.
    """
    _check_pair(h_s_a, h_s_b, "h_s_a", "h_s_b", same_width=False)
    _check_pair(h_t_a, h_t_b, "h_t_a", "h_t_b", same_width=False)
    _check_same_shape(h_s_a, h_t_a, "h_s_a", "h_t_a", _projection_hint(h_s_a, h_t_a))
    _check_same_shape(h_s_b, h_t_b, "h_s_b", "h_t_b", _projection_hint(h_s_b, h_t_b))
    mask = _check_mask(mask, _shape(h_s_a)[:2], "batch size, length")
    if mask is None:
        n = h_s_a.new_full((1, 1, 1), h_s_a.shape[1])
    else:
        n = mask.sum(dim=1).clamp_min(1).to(h_s_a.dtype)[:, None, None]  # (B, 1, 1)

    def gram(a: Tensor, b: Tensor) -> Tensor:
        return _zero_padding(a, mask).transpose(1, 2) @ _zero_padding(b, mask) / n  # (B, D_a, D_b)

    return ((gram(h_s_a, h_s_b) - gram(h_t_a, h_t_b)) ** 2).mean()


def nst(
    h_s_a: Tensor,
    h_s_b: Tensor,
    h_t_a: Tensor,
    h_t_b: Tensor,
    mask: Tensor | None = None,
    normalise: Literal["width", "textbrewer"] = "width",
) -> Tensor:
    """Token-similarity loss between two layers (TextBrewer's ``nst``/``mmd``, a variant of Huang & Wang 2017's NST).

    ``S[b] = A[b] B[b]^T / D`` (L, L): similarities between the tokens of layers ``a`` and ``b``, for the student
    (width ``D_s``) and the teacher (width ``D_t``), then
    ``loss = mean_{b, valid (i, j)} (S_s[b, i, j] - S_t[b, i, j]) ** 2`` where ``(i, j)`` is valid when both tokens
    are real. The widths may differ between student and teacher (no projection needed).

    ``normalise="textbrewer"`` divides as TextBrewer 0.2.1's ``mmd_loss`` does: by the width without a mask, but by the
    padded length ``L`` (for both models) with one, which changes the loss's scale with the padding.

    Args:
        h_s_a: Student features of the first layer, (B, L, D_s).
        h_s_b: Student features of the second layer, (B, L, D_s).
        h_t_a: Teacher features of the first layer, (B, L, D_t).
        h_t_b: Teacher features of the second layer, (B, L, D_t).
        mask: (B, L), True for real tokens; ``None`` for all.
        normalise: ``"width"`` (``S = A B^T / D``) or ``"textbrewer"`` (``/ L`` when ``mask`` is given).

    Returns:
        A scalar: the mean over valid token pairs.
    """
    if normalise not in ("width", "textbrewer"):
        raise ValueError(f"Expected `normalise` to be 'width' or 'textbrewer' but got {normalise!r}.")
    _check_pair(h_s_a, h_s_b, "h_s_a", "h_s_b", same_width=True)
    _check_pair(h_t_a, h_t_b, "h_t_a", "h_t_b", same_width=True)
    if h_s_a.shape[:2] != h_t_a.shape[:2]:
        raise ValueError(
            f"Expected `h_s_a` and `h_t_a` to have the same batch size and length but got {_shape(h_s_a)} and "
            f"{_shape(h_t_a)}."
        )
    mask = _check_mask(mask, _shape(h_s_a)[:2], "batch size, length")
    by_length = normalise == "textbrewer" and mask is not None
    sim_s = h_s_a @ h_s_b.transpose(1, 2) / h_s_a.shape[1 if by_length else -1]  # (B, L, L)
    sim_t = h_t_a @ h_t_b.transpose(1, 2) / h_t_a.shape[1 if by_length else -1]  # (B, L, L)
    per_pair = (sim_s - sim_t) ** 2  # (B, L, L)
    if mask is None:
        return per_pair.mean()
    return _masked_mean(per_pair, mask[:, :, None] & mask[:, None, :])


mmd = nst
"""Alias of :func:`nst` (TextBrewer maps both names to the same loss)."""

gram = fsp
"""Alias of :func:`fsp` (TextBrewer's ``"gram"`` name for the same loss)."""


# ------------------------------------------------------------------------------- token-level LM divergences (TRL)
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd")
"""The names of the token-level divergences (:func:`per_token_divergence`)."""


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a divergence is computed in: float32 for half and bfloat16 inputs (their softmax loses too much),
    the input's own dtype otherwise (float64 stays float64 for gradcheck)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` summed over the last dimension, from log-probabilities (..., V) -> (...)."""
    # F.kl_div(input, target) is KL(target || input): the arguments are swapped on purpose.
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def check_divergence_args(divergence: str, beta: float, temperature: float | Tensor, chunk_size: int | None) -> None:
    """Check the scalar arguments shared by the token-level divergences, with errors naming the argument.

    Raises:
        ValueError: For an unknown ``divergence``, ``beta`` outside [0, 1], a float ``temperature`` <= 0 or a
            ``chunk_size`` that is not a positive integer (or ``None``).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Expected `divergence` to be one of {_choices(DIVERGENCES)} but got {divergence!r}.")
    if isinstance(beta, bool) or not (isinstance(beta, int | float) and 0 <= beta <= 1):
        raise ValueError(f"Expected `beta` to be a float in [0, 1] but got {beta!r}.")
    if not isinstance(temperature, Tensor) and not temperature > 0:
        raise ValueError(f"Expected `temperature` to be > 0 but got {temperature!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"Expected `chunk_size` to be None or an integer > 0 but got {chunk_size!r}.")


def per_token_divergence(
    logits_s: Tensor,
    logits_t: Tensor,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """One divergence per token between ``P_s = softmax(z_s / T)`` and ``P_t = softmax(z_t / T)``, summed over
    the vocabulary (no mask, no mean, no upcast: the building block of the losses below and of
    :func:`lit_kd.fused.fused_linear_divergence`).

    * ``"forward_kl"``: ``KL(P_t || P_s) = sum_v P_t (log P_t - log P_s)``.
    * ``"reverse_kl"``: ``KL(P_s || P_t)``.
    * ``"jsd"``: TRL's generalised Jensen-Shannon divergence ``beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``
      with ``M = beta * P_t + (1 - beta) * P_s``, ``log M`` computed as ``logaddexp(log P_t + log beta,
      log P_s + log(1 - beta))`` (no probability is exponentiated to form it). ``beta = 0`` is ``"forward_kl"`` and
      ``beta = 1`` ``"reverse_kl"``, exactly, as in TRL: the mixture formula itself tends to 0 at both ends, so the
      value jumps there.
    * ``"tvd"``: total variation ``0.5 * sum_v |P_t - P_s|``, in [0, 1].

    Args:
        logits_s: Student logits, (..., V).
        logits_t: Teacher logits, same shape; finite (a ``-inf`` logit gives ``nan`` in the KL terms, as in TRL).
        divergence: One of :data:`DIVERGENCES`.
        beta: The JSD's mixture weight of the teacher, in [0, 1]; ignored by the other divergences.
        temperature: A float, or a tensor that broadcasts against the logits (e.g. (..., 1)).

    Returns:
        (...): the logits' shape without the vocabulary dimension, in the logits' dtype.
    """
    log_p_s, log_p_t = _log_probs(logits_s, logits_t, temperature)  # (..., V) each
    return _divergence_from_log_probs(log_p_s, log_p_t, divergence, beta)


def per_token_divergence_grad(
    logits_s: Tensor,
    logits_t: Tensor,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """The gradient of :func:`per_token_divergence` with respect to ``logits_s``, in closed form (no autograd graph,
    for the chunked and fused paths): row ``n`` holds ``d divergence[n] / d logits_s[n]``.

    With ``P = P_s``, a loss ``l(P)`` has ``dl/dz = P * (u - sum_v P u) / T`` where ``u = dl/dP`` up to a constant:

    * ``"forward_kl"``: ``u = -P_t / P_s``, so ``dl/dz = (P_s - P_t) / T``;
    * ``"reverse_kl"``: ``u = log P_s - log P_t``;
    * ``"jsd"``: ``u = (1 - beta) (log P_s - log M)`` (the terms through ``M`` cancel);
    * ``"tvd"``: ``u = 0.5 * sign(P_s - P_t)`` (0 where they are equal, as autograd's ``abs``).

    Args:
        logits_s: Student logits, (..., V).
        logits_t: Teacher logits, same shape.
        divergence: One of :data:`DIVERGENCES`.
        beta: The JSD's mixture weight of the teacher, in [0, 1].
        temperature: A float, or a tensor that broadcasts against the logits (e.g. (..., 1)).

    Returns:
        (..., V), the logits' shape and dtype.
    """
    log_p_s, log_p_t = _log_probs(logits_s, logits_t, temperature)  # (..., V) each
    return _grad_from_log_probs(log_p_s, log_p_t, divergence, beta, temperature)


def _log_probs(logits_s: Tensor, logits_t: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    """``log softmax(z / T)`` of both models, (..., V) each."""
    if not isinstance(temperature, Tensor) and temperature == 1:
        return F.log_softmax(logits_s, dim=-1), F.log_softmax(logits_t, dim=-1)  # no (..., V) copy for z / 1
    return F.log_softmax(logits_s / temperature, dim=-1), F.log_softmax(logits_t / temperature, dim=-1)


def _log_mixture(log_p_s: Tensor, log_p_t: Tensor, beta: float) -> Tensor:
    """``log M = log(beta * P_t + (1 - beta) * P_s)`` for 0 < beta < 1, (..., V), without forming ``M``."""
    # logaddexp is elementwise: unlike TRL's logsumexp over a stack it holds no (2, ..., V) copy.
    if torch.is_grad_enabled() and (log_p_s.requires_grad or log_p_t.requires_grad):
        return torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    # Without autograd (the chunked and fused paths) the result overwrites its first operand: one (..., V) fewer.
    log_m = log_p_t + math.log(beta)  # (..., V)
    return torch.logaddexp(log_m, log_p_s + math.log1p(-beta), out=log_m)


def _ends(divergence: str, beta: float) -> str:
    """The divergence actually computed: the JSD's ends are the two KLs (TRL's special cases); checks the name."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"Expected `divergence` to be one of {_choices(DIVERGENCES)} but got {divergence!r}.")
    if divergence == "jsd" and beta in (0, 1):
        return "forward_kl" if beta == 0 else "reverse_kl"
    return divergence


def _divergence_from_log_probs(
    log_p_s: Tensor, log_p_t: Tensor, divergence: str, beta: float, log_m: Tensor | None = None
) -> Tensor:
    """:func:`per_token_divergence` from the two models' log-probabilities (..., V) -> (...); ``log_m``, the JSD's
    :func:`_log_mixture` when the caller already has it."""
    divergence = _ends(divergence, beta)
    if divergence == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(dim=-1)
    if divergence == "forward_kl":
        return _kl_rows(log_p_t, log_p_s)
    if divergence == "reverse_kl":
        return _kl_rows(log_p_s, log_p_t)
    log_m = _log_mixture(log_p_s, log_p_t, beta) if log_m is None else log_m  # (..., V)
    return beta * _kl_rows(log_p_t, log_m) + (1 - beta) * _kl_rows(log_p_s, log_m)


def _grad_from_log_probs(
    log_p_s: Tensor,
    log_p_t: Tensor,
    divergence: str,
    beta: float,
    temperature: float | Tensor,
    log_m: Tensor | None = None,
) -> Tensor:
    """:func:`per_token_divergence_grad` from the log-probabilities (..., V) (and the JSD's ``log_m``, if known); the
    inputs are not modified."""
    divergence = _ends(divergence, beta)
    p_s = log_p_s.exp()  # (..., V)
    if divergence == "forward_kl":
        return p_s.sub_(log_p_t.exp()).div_(temperature)
    if divergence == "reverse_kl":
        u = log_p_s - log_p_t  # (..., V)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p_s, log_p_t, beta) if log_m is None else log_m  # (..., V)
        u = (log_p_s - log_m).mul_(1 - beta)  # (..., V)
    else:
        u = torch.sign(p_s - log_p_t.exp()).mul_(0.5)  # (..., V)
    # (..., 1): the P_s-weighted mean of u. A product then a sum, not a batched matmul: the sum's pairwise
    # reduction keeps float32 gradients within ~5e-5 of float64 where a (1, V) @ (V, 1) matmul drifted to 3e-4.
    centre = (p_s * u).sum(dim=-1, keepdim=True)
    return u.sub_(centre).mul_(p_s).div_(temperature)


def _token_temperature(temperature: float | Tensor, logits: Tensor) -> float | Tensor:
    """A float, or per-token temperatures reshaped to broadcast against (..., V) logits as (..., 1).

    Accepted tensors: a 0-d tensor, the leading part of the logits' shape ((N,) for (N, V); (B,) or (B, L) for
    (B, L, V)), or that shape with a trailing 1 ((N, 1), (B, L, 1): the user KD losses' convention).
    """
    if isinstance(temperature, Tensor) and temperature.dim() == logits.dim() > 1 and temperature.shape[-1] == 1:
        temperature = temperature.squeeze(-1)
    return _broadcast_temperature(temperature, logits, logits.dim() - 1)


def _row_temperature(temperature: float | Tensor, logits: Tensor) -> float | Tensor:
    """:func:`_token_temperature` flattened to one row per token: a float, or (N, 1) for the N = numel / V tokens."""
    t = _token_temperature(temperature, logits)
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    return t.expand(*logits.shape[:-1], 1).reshape(-1, 1).detach()  # (N, 1): temperatures get no gradient here


def _valid_rows(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """The indices of the rows that count, (N_valid,): every row without a mask (one host sync with one)."""
    if mask is None:
        return torch.arange(n, device=device)
    return mask.reshape(-1).nonzero().squeeze(-1)


class _ChunkedDivergence(torch.autograd.Function):
    """A token-level divergence, mean over the given rows, computed ``chunk_size`` rows at a time.

    Forward keeps no (N, V) intermediate: each chunk is upcast, its per-row divergences summed, then freed. Backward
    recomputes each chunk's log-probabilities from the saved inputs and writes its closed-form gradient
    (:func:`per_token_divergence_grad`, no autograd graph) into one preallocated (N, V) tensor in the inputs' dtype
    (the gradient autograd needs anyway), so the peak holds one chunk's float32 intermediates on top of the inputs and
    that gradient. Storing the gradient from the forward pass instead would save the recomputation but not memory,
    and scaling it by the incoming gradient would then need a second (N, V) tensor. The teacher's gradient (only
    when its logits require one) uses the symmetries ``forward_kl(s, t) = reverse_kl(t, s)``,
    ``jsd(s, t, beta) = jsd(t, s, 1 - beta)`` and ``tvd(s, t) = tvd(t, s)``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits_s: Tensor,
        logits_t: Tensor,
        rows: Tensor,
        temperature: Tensor | None,
        scalar_temperature: float,
        divergence: str,
        beta: float,
        chunk_size: int,
    ) -> Tensor:
        # logits_s, logits_t: (N, V); rows: (N_valid,) indices of the rows that count; temperature: (N, 1) or None.
        dtype = compute_dtype(logits_s.dtype)
        total = logits_s.new_zeros((), dtype=dtype)
        for idx in rows.split(chunk_size):  # (c,) row indices, c <= chunk_size
            z_s = logits_s.index_select(0, idx).to(dtype)  # (c, V)
            z_t = logits_t.index_select(0, idx).to(dtype)  # (c, V)
            t = scalar_temperature if temperature is None else temperature.index_select(0, idx).to(dtype)  # (c, 1)
            total = total + per_token_divergence(z_s, z_t, divergence, beta, t).sum()
            del z_s, z_t  # freed before the next chunk's copies are made
        ctx.save_for_backward(logits_s, logits_t, rows, temperature)
        ctx.settings = (scalar_temperature, divergence, beta, chunk_size)
        return total / max(rows.numel(), 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        logits_s, logits_t, rows, temperature = ctx.saved_tensors
        scalar_temperature, divergence, beta, chunk_size = ctx.settings
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(logits_s.dtype)
        # Masked rows keep a zero gradient: only the valid rows are written (all of them without a mask, then the
        # zero fill, one pass over (N, V), is skipped).
        new = torch.empty_like if rows.numel() == logits_s.shape[0] else torch.zeros_like
        grad_s = new(logits_s) if need_s else None  # (N, V)
        grad_t = new(logits_t) if need_t else None  # (N, V)
        scale = grad_out.to(dtype) / max(rows.numel(), 1)  # d loss / d per-row divergence
        swapped = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl"}.get(divergence, divergence)
        for idx in rows.split(chunk_size):  # (c,) row indices, c <= chunk_size
            z_s = logits_s.index_select(0, idx).to(dtype)  # (c, V)
            z_t = logits_t.index_select(0, idx).to(dtype)  # (c, V)
            t = scalar_temperature if temperature is None else temperature.index_select(0, idx).to(dtype)  # (c, 1)
            log_p_s, log_p_t = _log_probs(z_s, z_t, t)  # (c, V) each
            del z_s, z_t  # one chunk's copies fewer at the peak
            if need_s:
                g_s = _grad_from_log_probs(log_p_s, log_p_t, divergence, beta, t).mul_(scale)  # (c, V)
                grad_s.index_copy_(0, idx, g_s.to(grad_s.dtype))
                del g_s
            if need_t:
                g_t = _grad_from_log_probs(log_p_t, log_p_s, swapped, 1 - beta, t).mul_(scale)  # (c, V)
                grad_t.index_copy_(0, idx, g_t.to(grad_t.dtype))
                del g_t
            del log_p_s, log_p_t  # freed before the next chunk's are made
        return grad_s, grad_t, None, None, None, None, None, None


def _lm_divergence(
    divergence: str,
    logits_s: Tensor,
    logits_t: Tensor,
    mask: Tensor | None,
    beta: float,
    temperature: float | Tensor,
    chunk_size: int | None,
) -> Tensor:
    """Check the inputs, then the mean of :func:`per_token_divergence` over the valid tokens, whole or chunked."""
    check_divergence_args(divergence, beta, temperature, chunk_size)
    mask = _check_class_logits(logits_s, logits_t, mask)
    if chunk_size is None:
        dtype = compute_dtype(logits_s.dtype)
        t = _token_temperature(temperature, logits_s)
        t = t.to(dtype) if isinstance(t, Tensor) else t
        per_token = per_token_divergence(logits_s.to(dtype), logits_t.to(dtype), divergence, beta, t)  # (...)
        return _masked_mean(per_token, mask)
    vocab = logits_s.shape[-1]
    t = _row_temperature(temperature, logits_s)
    tensor_t = t if isinstance(t, Tensor) and t.dim() > 0 else None
    scalar_t = float(t) if tensor_t is None else 1.0
    rows = _valid_rows(mask, logits_s.numel() // max(vocab, 1), logits_s.device)  # (N_valid,)
    return _ChunkedDivergence.apply(
        logits_s.reshape(-1, vocab), logits_t.reshape(-1, vocab), rows, tensor_t, scalar_t, divergence, beta, chunk_size
    )


def generalized_jsd(
    logits_s: Tensor,
    logits_t: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """TRL's generalised Jensen-Shannon divergence for token-level LM distillation (GKD, arXiv:2306.13649).

    ``loss = mean_{valid tokens} beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``, ``M = beta * P_t + (1 - beta) *
    P_s``, ``P = softmax(z / T)``; ``beta = 0`` is exactly :func:`forward_kl`, ``beta = 1`` exactly
    :func:`reverse_kl` (see :func:`per_token_divergence`).

    With a mask it equals TRL's ``GKDTrainer.generalized_jsd_loss(logits_s, logits_t, labels, beta, temperature)``
    where ``labels == -100`` exactly where the mask is False (TRL sums the kept tokens' divergences and divides by
    their count). Without labels TRL's default ``"batchmean"`` divides the sum by the first dimension: the same for
    (N, V) logits, but the batch size B, not B * L, for (B, L, V) logits; this function always takes the mean over
    tokens.

    Args:
        logits_s: Student logits, (B, L, V) or (N, V).
        logits_t: Teacher logits, same shape.
        mask: Which tokens count: (B, L) or (N,), True where a token counts (TRL's ``labels != -100``); ``None``
            for all.
        beta: The mixture weight of the teacher, in [0, 1].
        temperature: A float, or per-token temperatures: (N,) or (N, 1) for (N, V) logits; (B,), (B, L) or
            (B, L, 1) for (B, L, V) logits. The chunked path gives a tensor temperature no gradient.
        chunk_size: ``None`` computes every token at once; an integer computes the loss and its gradient that many
            tokens at a time, with the same value and gradients (see :class:`_ChunkedDivergence`).

    Returns:
        A scalar: the mean over valid tokens of the divergence summed over the vocabulary; 0 (with a gradient path)
        when no token is valid. Never scaled by ``T**2`` (TRL's convention).
    """
    return _lm_divergence("jsd", logits_s, logits_t, mask, beta, temperature, chunk_size)


def forward_kl(
    logits_s: Tensor,
    logits_t: Tensor,
    mask: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL ``KL(P_t || P_s)`` per token (mean-seeking), TRL's ``generalized_jsd_loss`` with ``beta=0``.

    ``loss = mean_{valid tokens} sum_v P_t[v] (log P_t[v] - log P_s[v])``. Equal to :func:`kd_kl` on the same
    inputs; this one can be chunked.


    Args:
        logits_s: Student logits, (B, L, V) or (N, V).
        logits_t: Teacher logits, same shape.
        mask: Which tokens count: (B, L) or (N,), True where a token counts (TRL's ``labels != -100``); ``None``
            for all.
        temperature: A float, or per-token temperatures: (N,) or (N, 1) for (N, V) logits; (B,), (B, L) or
            (B, L, 1) for (B, L, V) logits. The chunked path gives a tensor temperature no gradient.
        chunk_size: ``None`` computes every token at once; an integer computes the loss and its gradient that many
            tokens at a time, with the same value and gradients (see :class:`_ChunkedDivergence`).

    Returns:
        A scalar: the mean over valid tokens of the divergence summed over the vocabulary; 0 (with a gradient path)
        when no token is valid. Never scaled by ``T**2`` (TRL's convention).
    """
    return _lm_divergence("forward_kl", logits_s, logits_t, mask, 0.0, temperature, chunk_size)


def reverse_kl(
    logits_s: Tensor,
    logits_t: Tensor,
    mask: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL ``KL(P_s || P_t)`` per token (mode-seeking), TRL's ``generalized_jsd_loss`` with ``beta=1``.

    ``loss = mean_{valid tokens} sum_v P_s[v] (log P_s[v] - log P_t[v])``.


    Args:
        logits_s: Student logits, (B, L, V) or (N, V).
        logits_t: Teacher logits, same shape.
        mask: Which tokens count: (B, L) or (N,), True where a token counts (TRL's ``labels != -100``); ``None``
            for all.
        temperature: A float, or per-token temperatures: (N,) or (N, 1) for (N, V) logits; (B,), (B, L) or
            (B, L, 1) for (B, L, V) logits. The chunked path gives a tensor temperature no gradient.
        chunk_size: ``None`` computes every token at once; an integer computes the loss and its gradient that many
            tokens at a time, with the same value and gradients (see :class:`_ChunkedDivergence`).

    Returns:
        A scalar: the mean over valid tokens of the divergence summed over the vocabulary; 0 (with a gradient path)
        when no token is valid. Never scaled by ``T**2`` (TRL's convention).
    """
    return _lm_divergence("reverse_kl", logits_s, logits_t, mask, 1.0, temperature, chunk_size)


def total_variation(
    logits_s: Tensor,
    logits_t: Tensor,
    mask: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance per token, in [0, 1].

    ``loss = mean_{valid tokens} 0.5 * sum_v |P_t[v] - P_s[v]|``.


    Args:
        logits_s: Student logits, (B, L, V) or (N, V).
        logits_t: Teacher logits, same shape.
        mask: Which tokens count: (B, L) or (N,), True where a token counts (TRL's ``labels != -100``); ``None``
            for all.
        temperature: A float, or per-token temperatures: (N,) or (N, 1) for (N, V) logits; (B,), (B, L) or
            (B, L, 1) for (B, L, V) logits. The chunked path gives a tensor temperature no gradient.
        chunk_size: ``None`` computes every token at once; an integer computes the loss and its gradient that many
            tokens at a time, with the same value and gradients (see :class:`_ChunkedDivergence`).

    Returns:
        A scalar: the mean over valid tokens of the divergence summed over the vocabulary; 0 (with a gradient path)
        when no token is valid. Never scaled by ``T**2`` (TRL's convention).
    """
    return _lm_divergence("tvd", logits_s, logits_t, mask, 0.5, temperature, chunk_size)
