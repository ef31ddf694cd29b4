"""On-policy and sequence-level distillation data (GKD): which batches are generated, generation, and the batches built
from the generated sequences. Pure functions, without Lightning.

Anchored on TRL's ``GKDTrainer`` (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): for a fraction ``on_policy_fraction`` of the training batches (TRL's ``lmbda``) the
*student* samples a continuation of each prompt and the divergence to the teacher is computed on the student's own
sequences (the teacher scores them); with ``seq_kd`` the *teacher* samples the continuations of the other batches
(sequence-level KD); the remaining batches are the data set's, as they are. Only the completion counts: the labels are
-100 on the prompt, and on the padding after a row's first end-of-sequence token (which itself counts, so that the
student learns to stop).

Batch contract: a batch that may be generated carries its prompts, **left-padded**, as

* ``prompt_input_ids`` (B, P): the prompt tokens (TRL's ``DataCollatorForChatML`` calls them ``prompts``);
* ``prompt_attention_mask`` (B, P): 1 on prompt tokens, 0 on the left padding;

next to the usual ``input_ids``/``attention_mask``/``labels`` of the prompt followed by its reference completion
(labels -100 on the prompt and the padding), which the batches that are not generated are trained on. A generated
batch replaces these three entries by the sequence ``[prompt, completion]`` (B, P + N), N <= ``max_new_tokens``, and
adds ``position_ids`` counted from the first real token (as ``generate`` counts them, so that the models score the
sequence with the positions it was generated with); only ``task`` is kept from the rest of the batch.

Example (plain PyTorch):

    source = batch_source(seed=0, index=step, on_policy_fraction=0.5, seq_kd=False)  # "student" or None
    if source is not None:
        batch = generated_batch(student if source == "student" else teacher, batch, max_new_tokens=32)
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_kd.adaptors import IGNORE_INDEX

__all__ = [
    "PROMPT_KEYS",
    "GenerationSource",
    "batch_source",
    "check_generation_args",
    "completion_batch",
    "generate",
    "generated_batch",
    "prompts",
    "special_token_ids",
]

PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")
GenerationSource = Literal["student", "teacher"]


def check_generation_args(
    on_policy_fraction: float,
    seq_kd: bool,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int = 0,
) -> None:
    """Check the generation hyperparameters (see :func:`batch_source` and :func:`generate`).

    Raises:
        ValueError: Naming the argument that is out of its range or of the wrong type.
    """
    if isinstance(on_policy_fraction, bool) or not isinstance(on_policy_fraction, (int, float)):
        raise ValueError(f"Expected `on_policy_fraction` to be a number in [0, 1] but got {on_policy_fraction!r}.")
    if not 0.0 <= on_policy_fraction <= 1.0:
        raise ValueError(f"Expected `on_policy_fraction` to be in [0, 1] but got {on_policy_fraction!r}.")
    if not isinstance(seq_kd, bool):
        raise ValueError(f"Expected `seq_kd` to be True or False but got {seq_kd!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"Expected `max_new_tokens` to be an integer >= 1 but got {max_new_tokens!r}.")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"Expected `generation_temperature` to be a finite number > 0 but got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"Expected `generation_top_k` to be None or an integer >= 1 but got {top_k!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `on_policy_seed` to be an integer but got {seed!r}.")


def batch_source(seed: int, index: int, on_policy_fraction: float, seq_kd: bool) -> GenerationSource | None:
    """Who generates training batch number ``index``: ``"student"`` (on-policy), ``"teacher"`` (``seq_kd``) or None.

    One uniform draw ``u`` per batch from ``random.Random`` seeded by ``(seed, index)``: the same batches are on-policy
    for the same seed, whatever ran before (a resumed fit, every DDP rank), and a fraction ``on_policy_fraction`` of
    them on average. The student generates when ``u < on_policy_fraction`` (never for 0, always for 1); otherwise the
    teacher when ``seq_kd``, else nobody. TRL draws the same way (``random.random() <= lmbda``) and, with ``seq_kd``,
    lets the student's sequences replace the teacher's; here the teacher is not asked to generate for batches the
    student generates.

    Example:
        >>> [batch_source(0, i, 0.0, False) for i in range(3)]
        [None, None, None]
        >>> [batch_source(0, i, 1.0, True) for i in range(2)], batch_source(0, 7, 0.0, True)
        (['student', 'student'], 'teacher')
    """
    u = random.Random(seed * 1_000_003 + index).random()  # in [0, 1)
    if u < on_policy_fraction:
        return "student"
    return "teacher" if seq_kd else None


def prompts(batch: Any) -> tuple[Tensor, Tensor]:
    """The left-padded prompts of a batch: ``(prompt_input_ids, prompt_attention_mask)``, both (B, P).

    Raises:
        ValueError: If the batch lacks the prompt entries, the shapes disagree, or a prompt is right-padded (its last
            position is padding) or empty.
    """
    if not isinstance(batch, Mapping) or any(key not in batch for key in PROMPT_KEYS):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        hint = " (TRL's DataCollatorForChatML calls the first `prompts`)" if isinstance(batch, Mapping) else ""
        raise ValueError(
            f"Expected the batch to hold the left-padded prompts `prompt_input_ids` and `prompt_attention_mask` "
            f"(B, P) for on-policy / seq_kd generation (`on_policy_fraction` > 0 or `seq_kd`) but got {keys}{hint}."
        )
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"Expected `prompt_input_ids` and `prompt_attention_mask` of the same shape (B, P) but got "
            f"{tuple(ids.shape)} and {tuple(mask.shape)}."
        )
    if ids.shape[1] == 0 or not bool((mask[:, -1] != 0).all()):
        raise ValueError(
            "Expected left-padded, non-empty prompts (`prompt_attention_mask[:, -1]` all 1: the continuation follows "
            "the last prompt token) but some rows end with padding; pad prompts on the left (tokenizer "
            "`padding_side='left'`)."
        )
    return ids, mask


def special_token_ids(model: nn.Module) -> tuple[int | None, int]:
    """``(eos_token_id, pad_token_id)`` of a ``transformers`` model: the first end-of-sequence id of its generation
    config (or config; None when it has none) and its pad id, else the end-of-sequence id, else 0."""
    eos = pad = None
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        if source is None:
            continue
        eos = eos if eos is not None else getattr(source, "eos_token_id", None)
        pad = pad if pad is not None else getattr(source, "pad_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return eos, pad if pad is not None else eos if eos is not None else 0


def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """Sample continuations of left-padded prompts: ``model.generate`` under ``torch.no_grad()`` in eval mode.

    The model's train/eval mode is restored afterwards. Sampling draws from the global torch RNG (seeded by
    ``lightning.seed_everything``).

    Args:
        model: A model with ``transformers``' ``generate`` (a student or a teacher).
        prompt_ids: The prompts (B, P), left-padded.
        prompt_mask: Their attention mask (B, P).
        max_new_tokens: The most tokens sampled per prompt.
        temperature: The sampling temperature (> 0).
        top_k: Sample among the ``top_k`` most likely tokens; ``None`` for the whole vocabulary.
        pad_token_id: The id written after a row's end of sequence; ``None`` for :func:`special_token_ids`'.

    Returns:
        The sequences (B, P + N), the prompts followed by N <= ``max_new_tokens`` sampled tokens.
    """
    if not callable(getattr(model, "generate", None)):
        raise ValueError(
            f"Expected a model with `generate` (a `transformers` language model) for on-policy / seq_kd generation "
            f"but got {type(model).__name__}."
        )
    if pad_token_id is None:
        pad_token_id = special_token_ids(model)[1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=float(temperature),
                top_k=0 if top_k is None else top_k,  # transformers: 0 switches top-k filtering off
                top_p=1.0,
                pad_token_id=pad_token_id,
            )
    finally:
        model.train(was_training)
    sequences = out if isinstance(out, Tensor) else out.sequences  # (B, P + N)
    return sequences.detach()


def completion_batch(
    sequences: Tensor, prompt_mask: Tensor, eos_token_id: int | None, pad_token_id: int = 0
) -> dict[str, Tensor]:
    """The training batch of generated sequences: loss on the completion only.

    Args:
        sequences: ``[prompt, completion]`` (B, P + N), as :func:`generate` returns them.
        prompt_mask: The prompts' attention mask (B, P) (0 on the left padding).
        eos_token_id: The end-of-sequence id: completion tokens after a row's first one are padding; ``None``: none.
        pad_token_id: The id written at those padded positions of ``input_ids``.

    Returns:
        ``input_ids`` (B, P + N), ``attention_mask`` (B, P + N: the prompt's, then 1 up to and including the first
        end-of-sequence token), ``labels`` (B, P + N: the tokens, -100 on the prompt and the padding) and
        ``position_ids`` (B, P + N: 0 on the left padding, then 0, 1, ... from the first real token).

    Example:
        >>> seqs = torch.tensor([[0, 5, 6, 7, 9, 8], [4, 5, 6, 9, 0, 0]])  # P=3, then the completions; EOS=9
        >>> out = completion_batch(seqs, torch.tensor([[0, 1, 1], [1, 1, 1]]), eos_token_id=9)
        >>> out["labels"].tolist()
        [[-100, -100, -100, 7, 9, -100], [-100, -100, -100, 9, -100, -100]]
        >>> out["attention_mask"].tolist(), out["position_ids"].tolist()
        ([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 0]])
    """
    B, P = prompt_mask.shape
    if sequences.dim() != 2 or sequences.shape[0] != B or sequences.shape[1] < P:
        raise ValueError(
            f"Expected generated sequences (B, P + N) starting with the prompts {(B, P)} but got shape "
            f"{tuple(sequences.shape)}."
        )
    completion = sequences[:, P:]  # (B, N)
    if eos_token_id is None:
        real = torch.ones_like(completion, dtype=torch.bool)
    else:
        is_eos = (completion == eos_token_id).long()  # (B, N)
        # Real up to and including the first EOS: no EOS strictly before the position.
        real = (is_eos.cumsum(-1) - is_eos) == 0  # (B, N)
    prompt_real = prompt_mask != 0  # (B, P)
    attention_mask = torch.cat([prompt_real, real], dim=1)  # (B, P + N)
    input_ids = sequences.masked_fill(~attention_mask, pad_token_id)  # (B, P + N)
    scored = torch.cat([torch.zeros_like(prompt_real), real], dim=1)  # (B, P + N): completion tokens only
    labels = input_ids.masked_fill(~scored, IGNORE_INDEX)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 0)  # (B, P + N)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask.to(prompt_mask.dtype),
        "labels": labels,
        "position_ids": position_ids,
    }


def generated_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> dict[str, Any]:
    """The batch of ``model``'s continuations of ``batch``'s prompts (see the module docstring's batch contract).

    Args:
        model: Who generates: the student (on-policy) or a teacher (``seq_kd``); a ``transformers`` language model.
        batch: A batch with ``prompt_input_ids``/``prompt_attention_mask`` (left-padded).
        max_new_tokens: The most tokens sampled per prompt.
        temperature: The sampling temperature (> 0).
        top_k: Sample among the ``top_k`` most likely tokens; ``None`` for the whole vocabulary.

    Returns:
        :func:`completion_batch`'s entries (and ``task`` when the batch names one).
    """
    if "teacher" in batch or "student" in batch:
        raise ValueError(
            "Expected one batch for both models with on-policy / seq_kd generation but got `teacher`/`student` "
            "parts (different inputs per model, e.g. tokenizers): generated sequences are in one model's tokens."
        )
    ids, mask = prompts(batch)
    eos, pad = special_token_ids(model)
    sequences = generate(model, ids, mask, max_new_tokens, temperature, top_k, pad)
    out: dict[str, Any] = completion_batch(sequences, mask, eos, pad)
    if "task" in batch:
        out["task"] = batch["task"]
    return out
