"""Adaptors and model calls: how distillation feeds a model and reads its outputs.

Adaptor contract: ``adaptor(batch, outputs) -> ModelView`` (or a ``Mapping`` with ``ModelView``'s field names, so that
code outside :mod:`lit_kd`, e.g. ``lit_kt.kt_adaptor``, needs no import of it). ``batch`` is the part of the batch the
model was called with (for a batch with ``teacher``/``student`` parts, that model's part), ``outputs`` whatever the
model returned. The view names what the losses need; fields a model does not provide stay ``None``. Parameterise an
adaptor with ``functools.partial`` (it pickles, and LightningCLI accepts it as a callable), e.g.
``partial(default_adaptor, labels_key="y", mask_key="attn")``.

Token-level tasks (``task_type`` of :class:`~lit_kd.module.DistillationModule`, :class:`~lit_kd.distiller.Distiller`
and :class:`~lit_kd.callback.DistillationCallback` picks the default adaptor): :func:`causal_lm_adaptor` shifts a
causal LM's (B, L, V) logits by one (``logits[:, :-1]`` predict ``labels[:, 1:]``), :func:`token_adaptor` keeps them
as they are (masked LMs, token classification). Both give a ``logits_mask`` of the positions that count (label not
-100, real tokens), which the KD term, the hard-label loss and the token metrics honour; :func:`default_adaptor` also
masks (B, L, C) logits by the labels and the attention mask, without a shift.

How a model is called (:func:`call_model`): with ``inputs=None``, with the batch entries whose names are *named*
parameters of its ``forward`` (never through ``**kwargs``: unknown keys are not passed); with a key map
``{forward_parameter: batch_key}``, with exactly those entries; with a function, with what ``inputs(batch)`` returns
(a dict: keyword arguments; a tuple or list: positional arguments; anything else: one positional argument). A
``transformers`` model also receives ``output_hidden_states`` / ``output_attentions`` when a match needs them. When
``forward`` cannot be called with what the batch offers, the error lists the batch's keys beside ``forward``'s
parameters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import Tensor, nn


@dataclass
class ModelView:
    """What distillation reads from one forward pass.

    Attributes:
        logits: (N, C) class logits, (B, L, C) token logits, or (B, L) / (N,) binary logits (``kd_loss_type="bce"``).
        logits_mask: Bool mask over the logits' leading dims (e.g. (B, L) scored positions); ``None`` for all.
        labels: Gold labels for the hard-label loss and the metrics, shaped like ``logits`` without the class dim.
        hidden_states: Per-layer (B, L, D) features, index 0 usually the embeddings.
        attentions: Per-layer (B, H, L, L) attention maps.
        attention_scores: Whether ``attentions`` are raw scores (True) or probabilities (False, as ``transformers``).
        input_mask: (B, L) bool/0-1 mask of real tokens, used by the intermediate matches.
        losses: The model's own losses (e.g. ``outputs.loss``); summed as the hard-label loss when present.
        features: Outputs of submodules named by dotted path (``{"encoder.layers.1": (B, L, D)}``), captured by
            forward hooks for intermediate matches whose ``layer_t``/``layer_s`` is a module name.
    """

    logits: Tensor
    logits_mask: Tensor | None = None
    labels: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | list[Tensor] | None = None
    attentions: tuple[Tensor, ...] | list[Tensor] | None = None
    attention_scores: bool = False
    input_mask: Tensor | None = None
    losses: list[Tensor] = field(default_factory=list)
    features: dict[str, Tensor] | None = None


Adaptor = Callable[[Any, Any], "ModelView | Mapping[str, Any]"]
Inputs = Mapping[str, str] | Callable[[Any], Any] | None
_VIEW_FIELDS = frozenset(f.name for f in fields(ModelView))
IGNORE_INDEX = -100
"""The label of a position that is not scored (``transformers``' and ``torch.nn.CrossEntropyLoss``'s default)."""


def as_view(view: Any, who: str = "model") -> ModelView:
    """An adaptor's result as a :class:`ModelView` (it may be one, or a mapping of its field names)."""
    if isinstance(view, ModelView):
        return view
    if isinstance(view, Mapping):
        unknown = sorted(set(view) - _VIEW_FIELDS)
        if unknown or "logits" not in view:
            raise ValueError(
                f"Expected the {who}'s adaptor to return a ModelView or a mapping with `logits` and other ModelView "
                f"fields ({', '.join(sorted(_VIEW_FIELDS))}) but got keys {sorted(view)}."
            )
        return ModelView(**view)
    raise TypeError(f"Expected the {who}'s adaptor to return a ModelView or a mapping but got {type(view).__name__}.")


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _token_mask(labels: Any, mask: Any, shape: tuple[int, ...]) -> Tensor | None:
    """The (B, L) bool mask of scored positions: ``labels != -100`` and ``mask != 0``, each where given with the
    logits' position shape ``shape``; ``None`` when neither is."""
    out = None
    for part in (None if labels is None else labels != IGNORE_INDEX, None if mask is None else mask != 0):
        if isinstance(part, Tensor) and tuple(part.shape) == tuple(shape):
            out = part if out is None else out & part
    return out


def default_adaptor(
    batch: Mapping[str, Any], outputs: Any, labels_key: str = "labels", mask_key: str = "attention_mask"
) -> ModelView:
    """Reads ``transformers`` outputs, dicts with the same keys, or a bare logits tensor.

    ``logits``, ``hidden_states``, ``attentions`` and ``loss`` come from the outputs; the labels and the input mask
    from the batch, under ``labels_key`` and ``mask_key`` (bind other names with ``functools.partial``). For
    (B, L, C) token logits the ``logits_mask`` is ``labels != -100`` and the input mask (those of the two the batch
    holds with shape (B, L)), so padding never counts in the KD loss; there is no causal shift (see
    :func:`causal_lm_adaptor` for causal language models, :func:`token_adaptor` for masked LMs and token
    classification).
    """
    if isinstance(outputs, Tensor):
        logits, loss = outputs, None
    else:
        logits, loss = _get(outputs, "logits"), _get(outputs, "loss")
        if logits is None:
            raise ValueError(
                f"Expected the model's outputs to have `logits` but got {type(outputs).__name__} without them; "
                "pass a `teacher_adaptor`/`student_adaptor` that reads your model's outputs."
            )
    is_map = isinstance(batch, Mapping)
    labels = batch.get(labels_key) if is_map else None
    input_mask = batch.get(mask_key) if is_map else None
    logits_mask = _token_mask(labels, input_mask, tuple(logits.shape[:2])) if logits.dim() == 3 else None
    return ModelView(
        logits=logits,
        logits_mask=logits_mask,
        labels=labels,
        hidden_states=None if isinstance(outputs, Tensor) else _get(outputs, "hidden_states"),
        attentions=None if isinstance(outputs, Tensor) else _get(outputs, "attentions"),
        input_mask=input_mask,
        losses=[loss] if loss is not None else [],
    )


def _token_logits(outputs: Any, who: str) -> Tensor:
    """The (B, L, V) logits of a token-level model's outputs (``transformers`` outputs, a dict or a tensor)."""
    logits = outputs if isinstance(outputs, Tensor) else _get(outputs, "logits")
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        got = type(outputs).__name__ if not isinstance(logits, Tensor) else f"shape {tuple(logits.shape)}"
        raise ValueError(
            f"Expected (B, L, V) token logits from the model's outputs for `{who}` (a `logits` entry, or a tensor) "
            f"but got {got}."
        )
    return logits


def _token_batch(
    batch: Any, outputs: Any, labels_key: str, mask_key: str, who: str
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The (B, L, V) logits and the batch's (B, L) labels and attention mask (``None`` when absent), shapes checked."""
    logits = _token_logits(outputs, who)
    is_map = isinstance(batch, Mapping)
    labels = batch.get(labels_key) if is_map else None
    input_mask = batch.get(mask_key) if is_map else None
    B, L = logits.shape[:2]
    for name, value in ((labels_key, labels), (mask_key, input_mask)):
        if value is not None and tuple(value.shape) != (B, L):
            raise ValueError(
                f"Expected `batch[{name!r}]` to have the logits' positions {(B, L)} ({who}) but got shape "
                f"{tuple(value.shape)}."
            )
    return logits, labels, input_mask


def causal_lm_adaptor(
    batch: Mapping[str, Any], outputs: Any, labels_key: str = "labels", mask_key: str = "attention_mask"
) -> ModelView:
    """Reads a causal language model: the logits at position ``t`` predict the token at ``t + 1``.

    The view holds the shifted pairs: ``logits[:, :-1]`` (B, L-1, V) and ``labels[:, 1:]`` (B, L-1), and a
    ``logits_mask`` (B, L-1) that is True where a prediction counts: the target's label is not -100 and, when the
    batch has ``mask_key``, both the predicting position ``t`` and the target ``t + 1`` are real tokens (so neither
    right nor left padding, whatever its token ids, ever counts; without labels the mask comes from the input mask
    alone). The KD term, the hard-label loss (cross-entropy over the masked positions: the model's own
    ``outputs.loss`` is not read) and the token metrics (perplexity, next-token accuracy) all read these positions.
    ``hidden_states``/``attentions`` and ``input_mask`` stay unshifted (B, L) for intermediate matches. Batches
    without labels: ``partial(causal_lm_adaptor, labels_key="input_ids")`` scores every real next token.

    Args:
        batch: The model's batch (``input_ids``, ``attention_mask``, ``labels``, ...).
        outputs: ``transformers`` outputs, a dict with ``logits``, or a (B, L, V) logits tensor.
        labels_key: The batch key of the (B, L) labels (-100: not scored); unshifted, as ``transformers`` takes them.
        mask_key: The batch key of the (B, L) attention mask (0: padding).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 4, 7)  # (B, L, V)
        >>> batch = {"labels": torch.tensor([[3, 4, 5, -100]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
        >>> view = causal_lm_adaptor(batch, logits)
        >>> tuple(view.logits.shape), view.labels.tolist(), view.logits_mask.tolist()
        ((1, 3, 7), [[4, 5, -100]], [[True, True, False]])
    """
    logits, labels, input_mask = _token_batch(batch, outputs, labels_key, mask_key, "causal_lm_adaptor")
    shifted = None if labels is None else labels[:, 1:]  # (B, L-1): the token each position predicts
    mask = None if shifted is None else shifted != IGNORE_INDEX  # (B, L-1)
    if input_mask is not None:
        real = input_mask != 0  # (B, L)
        both = real[:, :-1] & real[:, 1:]  # (B, L-1): a real token predicting a real token
        mask = both if mask is None else mask & both
    return ModelView(
        logits=logits[:, :-1],  # (B, L-1, V)
        logits_mask=mask,
        labels=shifted,
        hidden_states=None if isinstance(outputs, Tensor) else _get(outputs, "hidden_states"),
        attentions=None if isinstance(outputs, Tensor) else _get(outputs, "attentions"),
        input_mask=input_mask,
    )


def token_adaptor(
    batch: Mapping[str, Any], outputs: Any, labels_key: str = "labels", mask_key: str = "attention_mask"
) -> ModelView:
    """Reads a token-level model without a shift: masked language models and token classification.

    The view holds the (B, L, V) logits, the (B, L) labels and a ``logits_mask`` (B, L) that is True where the label
    is not -100 and, when the batch has ``mask_key``, the token is real; without labels, the input mask alone. The
    KD term, the hard-label loss (cross-entropy over the masked positions; ``outputs.loss`` is not read) and the
    token metrics read these positions.

    Args:
        batch: The model's batch.
        outputs: ``transformers`` outputs, a dict with ``logits``, or a (B, L, V) logits tensor.
        labels_key: The batch key of the (B, L) labels (-100: not scored, e.g. unmasked tokens of a masked LM).
        mask_key: The batch key of the (B, L) attention mask (0: padding).
    """
    logits, labels, input_mask = _token_batch(batch, outputs, labels_key, mask_key, "token_adaptor")
    B, L = logits.shape[:2]
    return ModelView(
        logits=logits,  # (B, L, V)
        logits_mask=_token_mask(labels, input_mask, (B, L)),  # (B, L)
        labels=labels,
        hidden_states=None if isinstance(outputs, Tensor) else _get(outputs, "hidden_states"),
        attentions=None if isinstance(outputs, Tensor) else _get(outputs, "attentions"),
        input_mask=input_mask,
    )


TaskType = Literal["sequence", "causal_lm", "token"]
TASK_ADAPTORS: dict[str, Callable[..., ModelView]] = {
    "sequence": default_adaptor,
    "causal_lm": causal_lm_adaptor,
    "token": token_adaptor,
}
"""The default adaptor of each ``task_type``: one prediction per sample (or the logits as they are), a causal LM
(shifted by one), or token-level logits without a shift."""


def check_task_type(task_type: str) -> None:
    """Refuse a ``task_type`` other than ``"sequence"``, ``"causal_lm"`` or ``"token"``."""
    if task_type not in TASK_ADAPTORS:
        raise ValueError(f"Expected `task_type` to be one of {sorted(TASK_ADAPTORS)} but got {task_type!r}.")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (without importing transformers eagerly)."""
    return any(
        cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__
    )


def model_num_labels(model: nn.Module) -> int | None:
    """A model's class count when it says: ``config.num_labels`` (``transformers``), ``config["num_labels"]``
    (:class:`~lit_kd.students.BiGRUClassifier`) or a ``num_labels`` attribute."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        value = config.get("num_labels")
    elif config is not None:
        value = getattr(config, "num_labels", None)
    else:
        value = getattr(model, "num_labels", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@functools.lru_cache(maxsize=256)
def _class_signature(forward: Callable) -> inspect.Signature:
    signature = inspect.signature(forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without `self`


def _signature(model: nn.Module) -> inspect.Signature:
    """``model.forward``'s signature, cached per class (``inspect.signature`` costs more than a small step's maths)."""
    forward = type(model).forward
    if "forward" in vars(model) or not inspect.isfunction(forward):
        return inspect.signature(model.forward)
    return _class_signature(forward)


def _describe(params: Mapping[str, inspect.Parameter]) -> str:
    shown = []
    for p in params.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            shown.append(f"**{p.name}")
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            shown.append(f"*{p.name}")
        else:
            shown.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}=")
    return ", ".join(shown)


def check_inputs(inputs: Inputs, name: str) -> None:
    """Validate a ``teacher_inputs``/``student_inputs`` argument: ``None``, a key map of strings, or a callable."""
    if inputs is None or callable(inputs):
        return
    if isinstance(inputs, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
        return
    raise ValueError(
        f"Expected `{name}` to be None, a mapping {{forward_parameter: batch_key}} of strings or a callable "
        f"`inputs(batch)` but got {inputs!r}."
    )


def model_arguments(model: nn.Module, batch: Any, inputs: Inputs = None, who: str = "model") -> tuple[tuple, dict]:
    """The positional and keyword arguments ``model`` is called with for ``batch`` (see the module docstring).

    Raises:
        KeyError: If a key map names a batch key the batch lacks (the message lists the batch's keys).
        TypeError: If ``forward`` cannot be called with the arguments (the message lists the batch's keys and
            ``forward``'s parameters).
    """
    keys = sorted(batch) if isinstance(batch, Mapping) else None
    signature = _signature(model)
    if callable(inputs):
        made = inputs(batch)
        if isinstance(made, Mapping):
            args, kwargs = (), dict(made)
        elif isinstance(made, (tuple, list)):
            args, kwargs = tuple(made), {}
        else:
            args, kwargs = (made,), {}
    elif inputs is not None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"Expected a dict batch for the {who}'s key map {dict(inputs)} but got {type(batch)}.")
        missing = {param: key for param, key in inputs.items() if key not in batch}
        if missing:
            raise KeyError(
                f"Expected the batch to hold {sorted(missing.values())} (the {who}'s inputs map {dict(inputs)}) but "
                f"its keys are {keys}."
            )
        args, kwargs = (), {param: batch[key] for param, key in inputs.items()}
    elif not isinstance(batch, Mapping):
        args, kwargs = (batch,), {}
    else:
        params = signature.parameters
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        args, kwargs = (), {k: v for k, v in batch.items() if k in named}
    try:
        signature.bind(*args, **kwargs)
        if not args and not kwargs and keys:  # every parameter optional (transformers), none of them in the batch
            raise TypeError("no batch entry is named like one of its parameters")
    except TypeError as e:
        given = "the batch" if keys is None else f"the batch entries {sorted(kwargs)}"
        raise TypeError(
            f"Expected the {who}'s `{type(model).__name__}.forward({_describe(signature.parameters)})` "
            f"to accept {given} but it does not ({e}); "
            f"the batch's keys are {keys}. Map batch entries to `forward` parameters with "
            f"`{who}_inputs={{parameter: batch_key}}` or a function `inputs(batch)`."
        ) from None
    return args, kwargs


def call_model(
    model: nn.Module,
    batch: Any,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    inputs: Inputs = None,
    who: str = "model",
) -> Any:
    """Call ``model`` on ``batch`` (see the module docstring for which entries it receives).

    Args:
        model: The model.
        batch: A dict of entries, or anything else (passed as the only argument).
        output_hidden_states: Ask a ``transformers`` model for its hidden states.
        output_attentions: Ask a ``transformers`` model for its attention maps.
        inputs: ``None`` (entries by ``forward`` parameter name), a key map ``{parameter: batch_key}``, or a function
            ``inputs(batch)`` returning keyword (dict) or positional (tuple/list) arguments.
        who: Names the model in error messages (``"teacher"``, ``"student"``).
    """
    args, kwargs = model_arguments(model, batch, inputs, who)
    if is_transformers_model(model):
        kwargs["output_hidden_states"] = output_hidden_states
        kwargs["output_attentions"] = output_attentions
        kwargs.setdefault("return_dict", True)
    return model(*args, **kwargs)
