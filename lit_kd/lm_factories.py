"""Factories of small causal language models for YAML configs: a fresh GPT-2 over a tokenizer's vocabulary, and one
loaded from a Lightning checkpoint (the pretrained teacher of a distillation)::

    teacher:
      class_path: lit_kd.lm_factories.gpt2_from_checkpoint
      init_args: {checkpoint: runs/pretrain_lm_sst2/checkpoints/best.ckpt}
    student:
      class_path: lit_kd.lm_factories.gpt2_lm
      init_args: {tokenizer: all-MiniLM-L6-v2, n_layer: 1, n_embd: 128, n_head: 2}
"""

from __future__ import annotations

import json

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lit_kd._files import read_checkpoint
from lit_kd.lm import LM_CONFIG_KEY
from lit_kd.students import resolve_name_or_path

__all__ = ["gpt2_from_checkpoint", "gpt2_lm"]


def _special_ids(tokenizer: str) -> tuple[int, int | None, int | None, int | None]:
    """``(len(tokenizer), pad, bos, eos)`` ids; BERT-style tokenizers' ``[CLS]``/``[SEP]`` serve as bos/eos."""
    tok = AutoTokenizer.from_pretrained(resolve_name_or_path(tokenizer), trust_remote_code=False)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return len(tok), tok.pad_token_id, bos, eos


def gpt2_lm(
    vocab_size: int | None = None,
    tokenizer: str = "all-MiniLM-L6-v2",
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 128,
    n_inner: int | None = None,
    dropout: float = 0.1,
) -> nn.Module:
    """A fresh (randomly initialised) ``GPT2LMHeadModel`` over the vocabulary of ``tokenizer``, in train mode.

    Args:
        vocab_size: Rows of the (tied) token embedding; ``None`` for the tokenizer's size (added tokens included).
        tokenizer: Name or local path of the tokenizer whose ids the model reads: gives the vocabulary size and the
            pad, bos and eos ids (``[CLS]``/``[SEP]`` for BERT-style tokenizers); ``"all-MiniLM-L6-v2"`` is the
            installed one.
        n_layer: Transformer blocks.
        n_embd: Width of the model.
        n_head: Attention heads; must divide ``n_embd``.
        n_positions: Longest sequence the position embeddings cover (>= the data's ``max_length``).
        n_inner: Feed-forward width; ``None`` for ``4 * n_embd``.
        dropout: Dropout of the embeddings, the residual branches and the attention weights.

    Raises:
        ValueError: If a size is out of range, ``n_head`` does not divide ``n_embd`` or ``vocab_size`` is smaller
            than the tokenizer's ids need.
    """
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("n_positions", n_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{name}` to be an integer >= 1 but got {value!r}.")
    if n_embd % n_head:
        raise ValueError(f"Expected `n_head` ({n_head}) to divide `n_embd` ({n_embd}).")
    if n_inner is not None and n_inner < 1:
        raise ValueError(f"Expected `n_inner` to be None or >= 1 but got {n_inner}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"Expected `dropout` to be in [0, 1) but got {dropout}.")
    size, pad, bos, eos = _special_ids(tokenizer)
    if vocab_size is None:
        vocab_size = size
    needed = max(i for i in (pad, bos, eos, size - 1) if i is not None) + 1
    if vocab_size < needed:
        raise ValueError(
            f"Expected `vocab_size` to be >= {needed} (the ids of tokenizer {tokenizer!r}) but got {vocab_size}."
        )
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=n_inner,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return GPT2LMHeadModel(config).train()


def gpt2_from_checkpoint(
    checkpoint: str,
    vocab_size: int | None = None,
    tokenizer: str = "all-MiniLM-L6-v2",
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 128,
    n_inner: int | None = None,
) -> nn.Module:
    """A causal LM with the weights of a Lightning checkpoint: a :class:`~lit_kd.lm.CausalLMModule`'s (``model.*``,
    e.g. ``runs/pretrain_lm_sst2/checkpoints/best.ckpt``) or a ``DistillationModule``'s student (``student.*``).

    The model is rebuilt from the config the checkpoint keeps (``CausalLMModule`` writes it, see
    :data:`~lit_kd.lm.LM_CONFIG_KEY`); the sizes given here are used only for a checkpoint without one (a
    ``DistillationModule``'s), through :func:`gpt2_lm`. The checkpoint is read with ``weights_only=True``. Returned
    in eval mode (a teacher; call ``.train()`` to train it further).

    Args:
        checkpoint: The ``.ckpt`` file.
        vocab_size: See :func:`gpt2_lm` (only without a config in the checkpoint).
        tokenizer: See :func:`gpt2_lm` (only without a config in the checkpoint).
        n_layer: See :func:`gpt2_lm` (only without a config in the checkpoint).
        n_embd: See :func:`gpt2_lm` (only without a config in the checkpoint).
        n_head: See :func:`gpt2_lm` (only without a config in the checkpoint).
        n_positions: See :func:`gpt2_lm` (only without a config in the checkpoint).
        n_inner: See :func:`gpt2_lm` (only without a config in the checkpoint).

    Raises:
        FileNotFoundError: If ``checkpoint`` is not a file (the message names it).
        ValueError: If it is not a Lightning checkpoint, holds no ``model.``/``student.`` weights or their shapes do
            not fit the model (the message names the file).
    """
    state = read_checkpoint(checkpoint, "checkpoint")
    saved = state.get(LM_CONFIG_KEY)
    if isinstance(saved, str):
        values = json.loads(saved)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = gpt2_lm(vocab_size, tokenizer, n_layer, n_embd, n_head, n_positions, n_inner)
    weights = state["state_dict"]
    for prefix in ("model.", "student."):
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if sub:
            break
    else:
        raise ValueError(
            f"Expected the checkpoint {checkpoint} to hold weights under `model.` (CausalLMModule) or `student.` "
            f"(DistillationModule) but got keys like {sorted(weights)[:3]}."
        )
    try:
        model.load_state_dict(sub)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"Expected the weights of {checkpoint} to fit the model {type(model).__name__}: {e}") from e
    return model.eval()
