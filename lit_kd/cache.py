"""Teacher output cache: run the frozen teacher once, then distil from its stored outputs.

A distillation step with a live teacher pays for the teacher's forward pass every step. The teacher is frozen,
so on a fixed data set its outputs never change: :meth:`TeacherCache.build` computes the logits of every sample
once and stores them in a memory-mapped ``.npy`` file, and ``DistillationModule(teacher_cache=path)`` reads them by
sample index (``batch["index"]``) instead of calling the teacher. Lookups by index work the same under DDP, where
each rank sees its own shard.

Layout of a cache folder:

- ``logits.npy``: (N, ...) float32 logits of sample ``i`` at row ``i``; sequence outputs (e.g. knowledge tracing's
  (L,) logits per window) are right-padded to the longest sample;
- with ``top_k=k`` instead of ``logits.npy`` (for many classes, e.g. a vocabulary): ``topk_logits.npy`` and
  ``topk_indices.npy`` (N, ..., k), the k largest logits of each row and their classes, and ``logsumexp.npy``
  (N, ...), the log-normaliser over all classes. A lookup rebuilds full logits whose softmax gives the k cached
  classes their exact probabilities and shares the remaining probability equally among the other classes;
- with ``hidden_layers=[...]``: ``hidden_<i>.npy`` (N, L, D) float32, the teacher's hidden state ``i`` (right-padded
  along L), for hidden-state matches (attention maps are not cached);
- ``sample_hashes.npy``: (N,) int64 hash of each sample's teacher inputs (padding trimmed);
- ``meta.json``: number of samples, logits shape, ``top_k``, ``hidden_layers`` and the teacher's number of hidden
  states, the teacher's fingerprint (SHA-256 of its weights) and the data fingerprint (a hash of all sample hashes).

A stale or mismatched cache is refused with an error that says what differs: a different teacher (fingerprint of
the weights), or a batch whose inputs are not the ones cached under its indices (checked for every batch, a few
microseconds per sample), or an index past the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_kd.adaptors import as_view, call_model, default_adaptor

_SKIP_KEYS = ("labels", "index", "task")
_LOGIT_FILES = ("logits.npy", "topk_logits.npy", "topk_indices.npy", "logsumexp.npy")


def topk_to_logits(values: Tensor, indices: Tensor, logsumexp: Tensor, num_classes: int) -> Tensor:
    """Full logits from a row's ``k`` largest logits and its log-normaliser.

    The result's softmax gives the ``k`` classes their exact probabilities ``exp(value - logsumexp)`` and shares the
    remaining probability equally among the other ``num_classes - k`` classes.

    Args:
        values: (..., k) the largest logits.
        indices: (..., k) their classes.
        logsumexp: (...) ``logsumexp`` of all the row's logits.
        num_classes: C.

    Returns:
        (..., C) logits (log-probabilities shifted by ``logsumexp``).
    """
    k = values.shape[-1]
    rest = (1 - (values - logsumexp.unsqueeze(-1)).exp().sum(dim=-1)).clamp_min(torch.finfo(values.dtype).tiny)
    fill = (rest / (num_classes - k)).log() + logsumexp  # (...)
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()  # (..., C)
    return out.scatter_(-1, indices, values)


def _max_shape(rows: dict[int, np.ndarray]) -> tuple[int, ...]:
    """The smallest shape every row fits in (rows of a sequence output differ in length)."""
    first = next(iter(rows.values()))
    return tuple(max(r.shape[d] for r in rows.values()) for d in range(first.ndim))


def _write_padded(path: Path, rows: dict[int, np.ndarray], shape: tuple[int, ...], dtype) -> None:
    """Rows ``0..N-1`` into a (N, *shape) ``.npy`` memory map, each right-padded with zeros."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(rows), *shape))
    for i, r in rows.items():
        out[(i, *(slice(0, s) for s in r.shape))] = r
    out.flush()
    del out


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def sample_hashes(batch: Mapping[str, Any]) -> np.ndarray:
    """(B,) int64 hashes of each sample's inputs: every 2-D tensor entry but labels/index/task, padding trimmed.

    A row's length is the last position where any input is non-zero (+1), so dynamic padding to different batch
    widths gives the same hash.
    """
    tensors = [v for k, v in batch.items() if k not in _SKIP_KEYS and isinstance(v, Tensor) and v.dim() == 2]
    if not tensors:
        raise ValueError(
            "Expected the teacher's batch to hold (B, L) input tensors to fingerprint (e.g. input_ids) but got keys "
            f"{sorted(batch)}."
        )
    B, L = tensors[0].shape
    nonzero = torch.zeros(B, L, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        nonzero |= t != 0
    positions = torch.arange(1, L + 1, device=nonzero.device)  # (L,)
    lengths = (nonzero * positions).amax(dim=1).cpu().tolist()  # (B,) last non-zero position + 1
    rows = [t.cpu().numpy() for t in tensors]
    out = np.empty(B, dtype=np.int64)
    for i, n in enumerate(lengths):
        digest = hashlib.blake2b(digest_size=8)
        for r in rows:
            digest.update(np.ascontiguousarray(r[i, :n]).tobytes())
        out[i] = int.from_bytes(digest.digest(), "little", signed=True)
    return out


class TeacherCache:
    """Read access to a cache folder written by :meth:`build`.

    Args:
        path: The cache folder.
        teacher: If given, its fingerprint must match the one the cache was built with.

    Raises:
        FileNotFoundError: If the folder holds no cache.
        ValueError: If ``teacher`` is not the teacher the cache was built from.
    """

    def __init__(self, path: str | os.PathLike, teacher: nn.Module | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"Expected a teacher cache in {self.path} (meta.json, logits.npy) but found none; build it with "
                "`TeacherCache.build(teacher, dataloader, path)`."
            )
        self.meta = json.loads(meta_path.read_text())
        self.top_k: int | None = self.meta.get("top_k")
        self.hidden_layers: list[int] = list(self.meta.get("hidden_layers", []))
        self.num_hidden_states: int | None = self.meta.get("num_hidden_states")
        if self.top_k is None:
            self.logits = np.load(self.path / "logits.npy", mmap_mode="r")  # (N, ...)
        else:
            self.topk_logits = np.load(self.path / "topk_logits.npy", mmap_mode="r")  # (N, ..., k)
            self.topk_indices = np.load(self.path / "topk_indices.npy", mmap_mode="r")  # (N, ..., k)
            self.logsumexp = np.load(self.path / "logsumexp.npy", mmap_mode="r")  # (N, ...)
        self.hidden = {i: np.load(self.path / f"hidden_{i}.npy", mmap_mode="r") for i in self.hidden_layers}
        self.hashes = np.load(self.path / "sample_hashes.npy")  # (N,)
        if teacher is not None:
            self.check_teacher(teacher)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def check_teacher(self, teacher: nn.Module) -> None:
        """Refuse a cache built from another teacher (or from other weights of the same one)."""
        found = teacher_fingerprint(teacher)
        if found != self.meta["teacher_fingerprint"]:
            raise ValueError(
                f"Expected the teacher the cache in {self.path} was built from (fingerprint "
                f"{self.meta['teacher_fingerprint'][:16]}...) but got a teacher with fingerprint {found[:16]}...; "
                "the cache is stale: rebuild it."
            )

    def lookup(self, index: Tensor, batch: Mapping[str, Any], like: Tensor) -> Tensor:
        """The cached teacher logits of a batch, checked against the batch's inputs.

        Args:
            index: (B,) sample indices (``batch["index"]``).
            batch: The teacher's part of the batch (its inputs are hashed and compared with the cache).
            like: The student's logits: the result is cut to their shape and put on their device.

        Raises:
            ValueError: If an index is out of range or a sample's inputs differ from those cached.
        """
        idx = index.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(
                f"Expected sample indices in [0, {len(self)}) (the cache in {self.path}) but got {int(idx.max())}."
            )
        mismatch = np.nonzero(sample_hashes(batch) != self.hashes[idx])[0]
        if mismatch.size:
            raise ValueError(
                f"Expected the inputs of sample {int(idx[mismatch[0]])} to be those cached in {self.path} but they "
                "differ: the data changed since the cache was built (or `index` does not identify samples); rebuild "
                "the cache."
            )
        if self.top_k is None:
            rows = torch.from_numpy(np.ascontiguousarray(self.logits[idx]))  # (B, ...)
        else:
            rows = topk_to_logits(
                torch.from_numpy(np.ascontiguousarray(self.topk_logits[idx])),
                torch.from_numpy(np.ascontiguousarray(self.topk_indices[idx])).long(),
                torch.from_numpy(np.ascontiguousarray(self.logsumexp[idx])),
                int(self.meta["logits_shape"][-1]),
            )  # (B, ..., C)
        cut = rows[tuple(slice(0, n) for n in like.shape)]
        return cut.to(device=like.device, dtype=torch.float32)

    def hidden_state(self, index: Tensor, layer: int, like: Tensor) -> Tensor:
        """The cached hidden state ``layer`` of a batch's samples (check the inputs with :meth:`lookup` first).

        Args:
            index: (B,) sample indices.
            layer: A layer given to :meth:`build` as ``hidden_layers``.
            like: A (B, L, ...) tensor of the batch (e.g. the student's hidden state): the result is cut to its L
                and put on its device.

        Returns:
            (B, L, D) float32.
        """
        if layer not in self.hidden:
            raise ValueError(
                f"Expected a hidden layer cached in {self.path} ({self.hidden_layers}) but got {layer}; rebuild the "
                f"cache with `hidden_layers` including {layer}."
            )
        rows = torch.from_numpy(np.ascontiguousarray(self.hidden[layer][index.cpu().numpy()]))  # (B, L_max, D)
        return rows[:, : like.shape[1]].to(device=like.device, dtype=torch.float32)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        batches: Iterable[Any],
        path: str | os.PathLike,
        adaptor: Callable | None = None,
        part: str | None = None,
        progress: bool = True,
        top_k: int | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> TeacherCache:
        """Run ``teacher`` over every batch and write its outputs, by sample index, to ``path``.

        Args:
            teacher: The frozen teacher (put in eval mode).
            batches: Batches carrying ``index`` (e.g. a DataModule's ``train_dataloader()``; order does not matter,
                every index must appear once).
            path: The cache folder (created; an existing cache there is replaced).
            adaptor: Reads the teacher's outputs (default :func:`~lit_kd.adaptors.default_adaptor`).
            part: ``"teacher"`` when batches carry ``teacher``/``student`` parts.
            progress: Show a progress bar.
            top_k: Keep only the ``top_k`` largest logits of each row (plus the log-normaliser) instead of all
                ``C`` of them (the last dimension must be the classes; ``1 <= top_k < C``); ``None`` keeps all.
            hidden_layers: Also store these hidden states of the teacher (indices into its adaptor's
                ``hidden_states``), for hidden-state matches.

        Returns:
            The cache, opened.

        Raises:
            ValueError: If a batch has no ``index`` or an index appears twice or is missing, if ``top_k`` is out of
                range, or if a hidden layer does not exist.
        """
        adaptor = adaptor or default_adaptor
        teacher.eval()
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="teacher cache", unit="batch")
        device = next(teacher.parameters()).device
        hidden_layers = sorted(set(int(i) for i in hidden_layers))
        rows: dict[int, np.ndarray] = {}
        hidden_rows: dict[int, dict[int, np.ndarray]] = {layer: {} for layer in hidden_layers}
        hashes: dict[int, int] = {}
        num_hidden_states = None
        for batch in iterator:
            if not isinstance(batch, Mapping) or "index" not in batch:
                raise ValueError("Expected every batch to be a dict with an `index` entry (sample indices).")
            inputs = dict(batch[part]) if part else dict(batch)
            moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            view = as_view(adaptor(moved, call_model(teacher, moved, output_hidden_states=bool(hidden_layers))))
            logits = view.logits.float().cpu().numpy()
            if hidden_layers:
                states = view.hidden_states or []
                num_hidden_states = len(states)
                missing = [layer for layer in hidden_layers if layer >= len(states) or layer < 0]
                if missing:
                    raise ValueError(
                        f"Expected `hidden_layers` to index the teacher's {len(states)} hidden states but got "
                        f"{missing}."
                    )
            index = batch["index"].tolist()
            for row, i in enumerate(index):
                if i in rows:
                    raise ValueError(f"Expected every sample index once but got {i} twice.")
                rows[i] = logits[row]
            for layer in hidden_layers:
                states = view.hidden_states[layer].float().cpu().numpy()  # (B, L, D)
                for row, i in enumerate(index):
                    hidden_rows[layer][i] = states[row]
            for i, h in zip(index, sample_hashes(inputs)):
                hashes[i] = int(h)
        n = len(rows)
        if n == 0:
            raise ValueError("Expected at least one batch to cache but got none.")
        missing = sorted(set(range(n)) - set(rows))
        if missing:
            raise ValueError(f"Expected sample indices 0..{n - 1} but {missing[:5]} are missing.")
        shape = _max_shape(rows)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in [*path.glob("hidden_*.npy"), *(path / f for f in _LOGIT_FILES)]:
            stale.unlink(missing_ok=True)  # a previous cache's files must not survive a rebuild
        if top_k is None:
            _write_padded(path / "logits.npy", rows, shape, np.float32)
        else:
            if not shape or not 1 <= top_k < shape[-1]:
                raise ValueError(
                    f"Expected `top_k` in [1, {shape[-1] if shape else 0}) (the teacher's classes, the logits' last "
                    f"dimension) but got {top_k}; use top_k=None to keep every logit."
                )
            full = {i: torch.from_numpy(r) for i, r in rows.items()}
            top = {i: r.topk(top_k, dim=-1) for i, r in full.items()}
            k_shape = (*shape[:-1], top_k)
            _write_padded(path / "topk_logits.npy", {i: t.values.numpy() for i, t in top.items()}, k_shape, np.float32)
            _write_padded(path / "topk_indices.npy", {i: t.indices.numpy() for i, t in top.items()}, k_shape, np.int32)
            lse = {i: r.logsumexp(-1).numpy() for i, r in full.items()}
            _write_padded(path / "logsumexp.npy", lse, shape[:-1], np.float32)
        for layer in hidden_layers:
            states = hidden_rows[layer]
            _write_padded(path / f"hidden_{layer}.npy", states, _max_shape(states), np.float32)
        hash_array = np.array([hashes[i] for i in range(n)], dtype=np.int64)
        np.save(path / "sample_hashes.npy", hash_array)
        meta = {
            "num_samples": n,
            "logits_shape": list(shape),
            "top_k": top_k,
            "hidden_layers": hidden_layers,
            "num_hidden_states": num_hidden_states,
            "teacher_fingerprint": teacher_fingerprint(teacher),
            "data_fingerprint": hashlib.sha256(hash_array.tobytes()).hexdigest(),
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return cls(path)
