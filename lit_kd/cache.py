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
  classes their exact probabilities and shares the remaining probability equally among the other classes. Storage
  per scored item (a sample, or a token of (N, L, V) logits): ``k`` float32 values + ``k`` int32 indices + one
  float32 log-normaliser, i.e. ``8k + 4`` bytes (plus 1 byte of ``logits_mask.npy`` for token logits), against
  ``4V`` bytes for full logits: k=32 of a V=50,257 vocabulary is 260 (+1) bytes per token instead of 201,028;
- ``logits_mask.npy``: (N, L) bool, written when the adaptor gives a ``logits_mask`` over the positions of (N, L, C)
  token logits (:func:`~lit_kd.adaptors.causal_lm_adaptor`, :func:`~lit_kd.adaptors.token_adaptor`): True where the
  teacher's logits were stored. Positions outside it (padding, label -100) are not stored: their logits are written
  as zeros, so the cache does not depend on pad token ids. A lookup refuses a student that scores a position the
  cache did not store (e.g. padding on another side than at build time);
- with ``hidden_layers=[...]``: ``hidden_<i>.npy`` (N, L, D) float32, the teacher's hidden state ``i`` (right-padded
  along L), for hidden-state matches (attention maps are not cached);
- ``sample_hashes.npy``: (N,) int64 hash of each sample's teacher inputs, padding left out (:func:`sample_hashes`);
- ``meta.json``, written last: the format version, number of samples, logits shape, ``top_k``, ``logits_mask``
  (whether ``logits_mask.npy`` was written; absent in older caches: no), ``hidden_layers``
  and the teacher's number of hidden states, the teacher's fingerprint (SHA-256 of its weights), the pad id the
  inputs were hashed with, and for every ``.npy`` file its shape, dtype and SHA-256 checksum.

Shapes. A lookup returns the cached rows cut to the student's sequence length (rows are right-padded to the longest
sample) and refuses any other mismatch, naming both sides: another number of dimensions, a student sequence longer
than the cached one, or another class count (e.g. a teacher vocabulary of ``V_t`` tokens against a student's
``V_s``: the KD loss needs one shared vocabulary).

Checks. Opening a cache (:class:`TeacherCache`) reads ``meta.json`` and, for every array it lists, the ``.npy``
header: shape and dtype must be those recorded, the file size the one they imply (a truncated or empty file is
refused before it is memory-mapped), and with ``verify=True`` (default) the file's SHA-256 must equal the recorded
one, so a changed, negated or swapped-in array is refused, naming the file. Verification reads every byte once
(about 0.8 s per GB from the page cache on the 2-core development machine, see ``docs/benchmarks.md``);
``verify=False`` keeps the header and size checks and skips the checksums. A file changed after the cache is opened
is not detected. ``teacher=`` refuses a cache built from other weights. Every batch's inputs are hashed and compared
with the cached hashes of its indices (a few microseconds per sample), so data that changed since the build, or an
``index`` that does not identify samples, is refused at the first batch that shows it, in any order, on any DDP
shard. (There is no whole-data-set fingerprint: it could only be checked by reading every sample in index order,
and the per-batch check covers exactly the samples trained on.)

A build writes into a temporary folder beside ``path`` and moves it into place only once ``meta.json`` is written
(the old cache, if any, is moved aside first and then deleted): a build that fails or is killed leaves the old
cache untouched (or, killed between the two moves, no cache at ``path``), never new arrays under old metadata. A
killed process cannot delete its temporary folder (``.<name>.building-*`` beside ``path``): remove it by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_kd.adaptors import as_view, call_model, default_adaptor

_SKIP_KEYS = ("labels", "index", "task")
_MASK_KEY = "attention_mask"
_IDS_KEY = "input_ids"
_FORMAT = 2  # meta.json format: 2 adds per-array checksums, shapes, dtypes and the pad id
_CHECKSUM = "sha256"
_CHUNK = 1 << 24  # bytes read at a time when checksumming


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


def sample_hashes(batch: Mapping[str, Any], pad_token_id: int = 0) -> np.ndarray:
    """(B,) int64 hashes of each sample's inputs, padding left out, so any padding of the same sample hashes alike.

    The inputs are every 2-D tensor entry but ``labels``/``index``/``task`` and the attention mask, hashed with
    their names. With an ``attention_mask``, a row's real tokens are its positions where the mask is non-zero (left
    or right padding, of any width and any pad id). Without one, padding is right padding: the trailing positions
    where ``input_ids`` equals ``pad_token_id`` and every other input is 0. For right-padded rows both give the same
    hash.

    Args:
        batch: The teacher's inputs.
        pad_token_id: The pad id of ``input_ids`` (used only without an ``attention_mask``).

    Returns:
        (B,) int64.

    Example:
        >>> ids = torch.tensor([[5, 6, 1, 1]])  # RoBERTa-style pad id 1
        >>> wide = {"input_ids": torch.tensor([[5, 6, 1, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 0, 0, 0]])}
        >>> bool(sample_hashes({"input_ids": ids}, pad_token_id=1)[0] == sample_hashes(wide)[0])
        True
    """
    inputs = {k: v for k, v in batch.items() if k not in _SKIP_KEYS and isinstance(v, Tensor) and v.dim() == 2}
    if not inputs:
        raise ValueError(
            "Expected the teacher's batch to hold (B, L) input tensors to fingerprint (e.g. input_ids) but got keys "
            f"{sorted(batch)}."
        )
    mask = inputs.pop(_MASK_KEY, None)
    if not inputs:  # the mask is the only input: it is all there is to compare
        inputs = {_MASK_KEY: mask}
    if mask is not None:
        real = (mask != 0).cpu().numpy()  # (B, L)
    else:
        padding = torch.ones_like(next(iter(inputs.values())), dtype=torch.bool)  # (B, L)
        for key, t in inputs.items():
            padding &= t == (pad_token_id if key == _IDS_KEY else 0)
        L = padding.shape[1]
        lengths = ((~padding) * torch.arange(1, L + 1, device=padding.device)).amax(dim=1)  # (B,) last real + 1
        real = (torch.arange(L, device=padding.device) < lengths.unsqueeze(1)).cpu().numpy()  # (B, L)
    rows = {}
    for key in sorted(inputs):
        t = inputs[key].detach().cpu()
        rows[key] = (t if t.is_floating_point() else t.long()).numpy()  # ids of any int dtype hash alike
    out = np.empty(real.shape[0], dtype=np.int64)
    for i, keep in enumerate(real):
        digest = hashlib.blake2b(digest_size=8)
        for key, r in rows.items():
            digest.update(key.encode() + b"\0")
            digest.update(np.ascontiguousarray(r[i, keep]).tobytes())
        out[i] = int.from_bytes(digest.digest(), "little", signed=True)
    return out


def _pad_ids(inputs: Mapping[str, Any]) -> set[int]:
    """The ids ``input_ids`` holds where ``attention_mask`` is 0 (the batch's pad id, when it has padding)."""
    ids, mask = inputs.get(_IDS_KEY), inputs.get(_MASK_KEY)
    if not (isinstance(ids, Tensor) and isinstance(mask, Tensor) and ids.shape == mask.shape):
        return set()
    return set(ids[mask == 0].unique().tolist())


def _file_checksum(file: Path) -> str:
    """SHA-256 of a file's bytes (the same as ``sha256sum``)."""
    digest = hashlib.new(_CHECKSUM)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _checksums(files: Sequence[Path]) -> list[str]:
    """Checksums of several files, in threads (``hashlib`` releases the GIL while it hashes)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        return list(pool.map(_file_checksum, files))


def _array_record(file: Path) -> dict[str, Any]:
    """What ``meta.json`` records of a written ``.npy`` file (its checksum is added by the caller)."""
    shape, dtype, _ = _read_npy_header(file)
    return {"shape": list(shape), "dtype": dtype.str}


def _read_npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """A ``.npy`` file's (shape, dtype, data offset), read without mapping the data.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a C-ordered ``.npy`` array (e.g. empty or cut inside its header).
    """
    if not file.is_file():
        raise FileNotFoundError(f"Expected {file} (listed in meta.json) but it does not exist; rebuild the cache.")
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as err:
        raise ValueError(
            f"Expected {file} to be a .npy array but could not read its header ({err}; the file holds "
            f"{file.stat().st_size} bytes): it is empty or damaged; rebuild the cache."
        ) from None
    if fortran_order:
        raise ValueError(f"Expected {file} to be a C-ordered .npy array but got a Fortran-ordered one.")
    return tuple(shape), dtype, offset


def _check_array(file: Path, record: Mapping[str, Any], num_samples: int) -> None:
    """Shape, dtype and size of a cache array against its ``meta.json`` record (not its checksum)."""
    shape, dtype, offset = _read_npy_header(file)
    expected_shape, expected_dtype = tuple(record["shape"]), np.dtype(record["dtype"])
    if shape != expected_shape or dtype != expected_dtype:
        raise ValueError(
            f"Expected {file} to hold a {expected_shape} {expected_dtype.name} array (as meta.json records) but got "
            f"{shape} {dtype.name}: the file was replaced since the cache was built; rebuild it."
        )
    if not shape or shape[0] != num_samples:
        raise ValueError(
            f"Expected {file} to hold one row per sample ({num_samples}, as meta.json records) but got shape {shape}."
        )
    size, expected_size = file.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected_size:
        raise ValueError(
            f"Expected {file} to hold {expected_size} bytes (a {offset}-byte header and a {shape} {dtype.name} "
            f"array) but it holds {size}: the file is {'truncated' if size < expected_size else 'longer'}; rebuild "
            "the cache."
        )


def _array_names(meta: Mapping[str, Any]) -> list[str]:
    """The ``.npy`` files a cache with this ``meta.json`` holds."""
    logits = ["logits.npy"] if meta["top_k"] is None else ["topk_logits.npy", "topk_indices.npy", "logsumexp.npy"]
    masks = ["logits_mask.npy"] if meta.get("logits_mask") else []
    return [*logits, *masks, *(f"hidden_{i}.npy" for i in meta["hidden_layers"]), "sample_hashes.npy"]


_META_KEYS = (
    "format",
    "num_samples",
    "logits_shape",
    "top_k",
    "hidden_layers",
    "num_hidden_states",
    "teacher_fingerprint",
    "pad_token_id",
    "checksum",
    "arrays",
)


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """``meta.json``, checked for the keys and format this version writes."""
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"Expected {meta_path} to hold the JSON that `TeacherCache.build` writes but could not parse it ({err}; "
            f"the file holds {meta_path.stat().st_size} bytes): it is damaged or was edited; rebuild the cache."
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"Expected {meta_path} to hold a JSON object but got {type(meta).__name__}; rebuild the cache."
        )
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"Expected {meta_path} to be cache format {_FORMAT} (with per-array checksums) but got format "
            f"{meta.get('format')}: the cache was written by another version of lit_kd; rebuild it."
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"Expected {meta_path} to hold the keys {list(_META_KEYS)} but {missing} are missing.")
    if meta["checksum"] != _CHECKSUM:
        raise ValueError(f"Expected checksums of kind {_CHECKSUM!r} in {meta_path} but got {meta['checksum']!r}.")
    fields = {"shape", "dtype", _CHECKSUM}
    arrays = meta["arrays"] if isinstance(meta["arrays"], dict) else {}
    unlisted = [n for n in _array_names(meta) if not (isinstance(arrays.get(n), dict) and fields <= set(arrays[n]))]
    if unlisted:
        raise ValueError(
            f"Expected {meta_path} to record the {sorted(fields)} of the arrays {_array_names(meta)} but {unlisted} "
            "lack them; rebuild the cache."
        )
    return meta


class TeacherCache:
    """Read access to a cache folder written by :meth:`build`, checked when it is opened.

    Args:
        path: The cache folder.
        teacher: If given, its fingerprint must match the one the cache was built with.
        verify: Compare every array file's SHA-256 with the one ``meta.json`` records (reads every byte once;
            see ``docs/benchmarks.md`` for the cost). ``False`` still checks each file's shape, dtype and size.

    Raises:
        FileNotFoundError: If the folder holds no cache, or an array it lists is missing.
        ValueError: If ``meta.json`` or an array is damaged, truncated or changed since the build (the error names
            the file), or ``teacher`` is not the teacher the cache was built from.
    """

    def __init__(self, path: str | os.PathLike, teacher: nn.Module | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"Expected a teacher cache in {self.path} (meta.json, logits.npy) but found none; build it with "
                "`TeacherCache.build(teacher, dataloader, path)`."
            )
        self.meta = _read_meta(meta_path)
        self.top_k: int | None = self.meta["top_k"]
        self.hidden_layers: list[int] = list(self.meta["hidden_layers"])
        self.num_hidden_states: int | None = self.meta["num_hidden_states"]
        self.pad_token_id: int = int(self.meta["pad_token_id"])
        names = _array_names(self.meta)
        for name in names:
            _check_array(self.path / name, self.meta["arrays"][name], len(self))
        if verify:
            for name, found in zip(names, _checksums([self.path / n for n in names])):
                expected = self.meta["arrays"][name][_CHECKSUM]
                if found != expected:
                    raise ValueError(
                        f"Expected {self.path / name} to have the {_CHECKSUM} checksum recorded in meta.json "
                        f"({expected[:16]}...) but got {found[:16]}...: the file changed since the cache was built; "
                        "rebuild it."
                    )
        if self.top_k is None:
            self.logits = np.load(self.path / "logits.npy", mmap_mode="r")  # (N, ...)
        else:
            self.topk_logits = np.load(self.path / "topk_logits.npy", mmap_mode="r")  # (N, ..., k)
            self.topk_indices = np.load(self.path / "topk_indices.npy", mmap_mode="r")  # (N, ..., k)
            self.logsumexp = np.load(self.path / "logsumexp.npy", mmap_mode="r")  # (N, ...)
        self.logits_mask = (  # (N, L) positions stored, for token logits with a mask
            np.load(self.path / "logits_mask.npy", mmap_mode="r") if self.meta.get("logits_mask") else None
        )
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

    def lookup(
        self,
        index: Tensor,
        batch: Mapping[str, Any],
        like: Tensor,
        mask: Tensor | None = None,
        classes: bool = True,
    ) -> Tensor:
        """The cached teacher logits of a batch, checked against the batch's inputs and the student's logits.

        Args:
            index: (B,) sample indices (``batch["index"]``).
            batch: The teacher's part of the batch (its inputs are hashed and compared with the cache).
            like: The student's logits: the result is cut to their sequence length (the cached rows are right-padded)
                and put on their device; every other dimension must be the cached one.
            mask: The student's ``logits_mask`` (the positions it scores); with a cache that stored a
                ``logits_mask.npy``, every position it holds True must have been stored. ``None``: not checked.
            classes: Whether the last dimension of ``like`` is the classes (a vocabulary), which must equal the
                cached one; False for binary logits, whose last dimension may be a sequence.

        Raises:
            ValueError: If an index is out of range, a sample's inputs differ from those cached, the shapes or class
                counts differ (e.g. teacher vocabulary ``V_t`` and student ``V_s``), or ``mask`` scores a position the
                cache did not store.
        """
        idx = index.cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise ValueError(f"Expected sample indices in [0, {len(self)}) (the cache in {self.path}) but got {bad}.")
        mismatch = np.nonzero(sample_hashes(batch, self.pad_token_id) != self.hashes[idx])[0]
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
        self._check_like(rows, like, classes)
        if mask is not None and self.logits_mask is not None and tuple(mask.shape) == tuple(like.shape[:-1]):
            stored = torch.from_numpy(np.ascontiguousarray(self.logits_mask[idx]))  # (B, L_max)
            stored = stored[:, : mask.shape[1]].to(mask.device)  # (B, L)
            unstored = mask.bool() & ~stored  # (B, L)
            if bool(unstored.any()):
                row, pos = (int(i) for i in unstored.nonzero()[0])
                raise ValueError(
                    f"Expected the student to score only positions whose teacher logits the cache in {self.path} "
                    f"stored but it scores position {pos} of sample {int(idx[row])}, which was padding or ignored "
                    "(label -100) when the cache was built; pad the batches as at build time (same side) and use the "
                    "same adaptor, or rebuild the cache."
                )
        cut = rows[tuple(slice(0, n) for n in like.shape)]
        return cut.to(device=like.device, dtype=torch.float32)

    def _check_like(self, rows: Tensor, like: Tensor, classes: bool) -> None:
        """Refuse student logits ``like`` whose shape the cached ``rows`` cannot give by cutting sequence lengths."""
        cached = tuple(rows.shape[1:])
        if like.dim() != rows.dim() or like.shape[0] != rows.shape[0]:
            raise ValueError(
                f"Expected the student's logits to have the shape of the cached teacher logits ({rows.shape[0]}, "
                f"*{cached}) (up to sequence lengths) but got {tuple(like.shape)}; the cache in {self.path} was built "
                "for other outputs (another adaptor or model); rebuild it."
            )
        if classes and like.dim() >= 2 and like.shape[-1] != rows.shape[-1]:
            raise ValueError(
                f"Expected the student's logits to have the teacher's {rows.shape[-1]} classes (teacher vocabulary "
                f"V_t={rows.shape[-1]}, cached in {self.path}) but got V_s={like.shape[-1]} (student logits "
                f"{tuple(like.shape)}): the KD loss compares distributions over one shared vocabulary; give both "
                "models the same tokenizer/vocabulary (or a student head of V_t classes)."
            )
        seq_dims = range(1, like.dim() - 1 if classes else like.dim())
        longer = [d for d in seq_dims if like.shape[d] > rows.shape[d]]
        if longer:
            d = longer[0]
            raise ValueError(
                f"Expected the student's logits {tuple(like.shape)} to fit in the cached teacher logits "
                f"{tuple(rows.shape)} but dimension {d} is longer ({like.shape[d]} > {rows.shape[d]}): the batch is "
                f"longer than the samples cached in {self.path}; rebuild the cache from the same data and adaptor."
            )

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
        pad_token_id: int | None = None,
    ) -> TeacherCache:
        """Run ``teacher`` over every batch and write its outputs, by sample index, to ``path``.

        Args:
            teacher: The frozen teacher (put in eval mode).
            batches: Batches carrying ``index`` (e.g. a DataModule's ``train_dataloader()``; order does not matter,
                every index must appear once).
            path: The cache folder. It is written beside, in a temporary folder, and moved into place when complete;
                an existing cache there is replaced (a folder holding other files is refused).
            adaptor: Reads the teacher's outputs (default :func:`~lit_kd.adaptors.default_adaptor`); use the adaptor
                the distillation uses for the teacher (e.g. :func:`~lit_kd.adaptors.causal_lm_adaptor`, whose shifted
                (B, L-1, V) logits and ``logits_mask`` are what is stored).
            part: ``"teacher"`` when batches carry ``teacher``/``student`` parts.
            progress: Show a progress bar.
            top_k: Keep only the ``top_k`` largest logits of each row (plus the log-normaliser) instead of all
                ``C`` of them (the last dimension must be the classes; ``1 <= top_k < C``); ``None`` keeps all. For
                (N, L, V) token logits this is per token: ``8 * top_k + 4`` bytes per position instead of ``4V``.
            hidden_layers: Also store these hidden states of the teacher (indices into its adaptor's
                ``hidden_states``), for hidden-state matches.
            pad_token_id: The pad id of ``input_ids``, recorded in ``meta.json`` and used to hash batches that have
                no ``attention_mask``. ``None``: the id ``input_ids`` holds where ``attention_mask`` is 0, else the
                teacher's ``config.pad_token_id``, else 0.

        Returns:
            The cache, opened.

        Raises:
            ValueError: If a batch has no ``index`` or an index appears twice or is missing, if ``top_k`` is out of
                range, if a hidden layer does not exist, if ``pad_token_id`` is not the id the batches pad with, or
                if ``path`` holds files other than a cache's.
        """
        path = Path(path)
        _check_replaceable(path)
        adaptor = adaptor or default_adaptor
        teacher.eval()
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="teacher cache", unit="batch")
        device = next(teacher.parameters()).device
        hidden_layers = sorted(set(int(i) for i in hidden_layers))
        rows: dict[int, np.ndarray] = {}
        mask_rows: dict[int, np.ndarray] = {}  # (L,) positions stored, for token logits with a logits_mask
        hidden_rows: dict[int, dict[int, np.ndarray]] = {layer: {} for layer in hidden_layers}
        inputs_seen: list[dict[str, Any]] = []
        pad_ids: set[int] = set()
        num_hidden_states = None
        for batch in iterator:
            if not isinstance(batch, Mapping) or "index" not in batch:
                raise ValueError("Expected every batch to be a dict with an `index` entry (sample indices).")
            inputs = dict(batch[part]) if part else dict(batch)
            moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            view = as_view(adaptor(moved, call_model(teacher, moved, output_hidden_states=bool(hidden_layers))))
            logits = view.logits.float()  # (B, ..., C)
            masked = view.logits_mask is not None and logits.dim() >= 3
            if masked:
                if tuple(view.logits_mask.shape) != tuple(logits.shape[:-1]):
                    raise ValueError(
                        f"Expected the teacher's `logits_mask` to have the shape of its logits without the classes "
                        f"{tuple(logits.shape[:-1])} but got {tuple(view.logits_mask.shape)}."
                    )
                keep = view.logits_mask.bool()  # (B, L)
                logits = logits.masked_fill(~keep.unsqueeze(-1), 0.0)  # padding is not stored: zeros, any pad id
                keep = keep.cpu().numpy()
            logits = logits.cpu().numpy()
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
                if masked:
                    mask_rows[i] = keep[row]
            for layer in hidden_layers:
                states = view.hidden_states[layer].float().cpu().numpy()  # (B, L, D)
                for row, i in enumerate(index):
                    hidden_rows[layer][i] = states[row]
            inputs_seen.append({**inputs, "index": batch["index"]})
            pad_ids |= _pad_ids(inputs)
        n = len(rows)
        if n == 0:
            raise ValueError("Expected at least one batch to cache but got none.")
        missing = sorted(set(range(n)) - set(rows))
        if missing:
            raise ValueError(f"Expected sample indices 0..{n - 1} but {missing[:5]} are missing.")
        pad_token_id = _choose_pad_id(pad_token_id, pad_ids, teacher)
        hashes = np.empty(n, dtype=np.int64)
        for seen in inputs_seen:
            hashes[seen["index"].cpu().numpy()] = sample_hashes(seen, pad_token_id)
        shape = _max_shape(rows)
        if mask_rows and len(mask_rows) != n:
            raise ValueError(
                f"Expected the teacher's adaptor to give a `logits_mask` for every batch or for none but it gave one "
                f"for {len(mask_rows)} of {n} samples."
            )
        if top_k is not None and (not shape or not 1 <= top_k < shape[-1]):
            raise ValueError(
                f"Expected `top_k` in [1, {shape[-1] if shape else 0}) (the teacher's classes, the logits' last "
                f"dimension) but got {top_k}; use top_k=None to keep every logit."
            )
        meta = {
            "format": _FORMAT,
            "num_samples": n,
            "logits_shape": list(shape),
            "top_k": top_k,
            "logits_mask": bool(mask_rows),
            "hidden_layers": hidden_layers,
            "num_hidden_states": num_hidden_states,
            "teacher_fingerprint": teacher_fingerprint(teacher),
            "pad_token_id": pad_token_id,
            "checksum": _CHECKSUM,
        }
        target = path.resolve()  # a name to put the temporary folder beside, also for "." or "cache/"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.building-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            if top_k is None:
                _write_padded(tmp / "logits.npy", rows, shape, np.float32)
            else:
                full = {i: torch.from_numpy(r) for i, r in rows.items()}
                top = {i: r.topk(top_k, dim=-1) for i, r in full.items()}
                k_shape = (*shape[:-1], top_k)
                _write_padded(
                    tmp / "topk_logits.npy", {i: t.values.numpy() for i, t in top.items()}, k_shape, np.float32
                )
                _write_padded(
                    tmp / "topk_indices.npy", {i: t.indices.numpy() for i, t in top.items()}, k_shape, np.int32
                )
                lse = {i: r.logsumexp(-1).numpy() for i, r in full.items()}
                _write_padded(tmp / "logsumexp.npy", lse, shape[:-1], np.float32)
            if mask_rows:
                _write_padded(tmp / "logits_mask.npy", mask_rows, shape[:-1], np.bool_)
            for layer in hidden_layers:
                states = hidden_rows[layer]
                _write_padded(tmp / f"hidden_{layer}.npy", states, _max_shape(states), np.float32)
            np.save(tmp / "sample_hashes.npy", hashes)
            names = _array_names(meta)
            records = [_array_record(tmp / name) for name in names]
            for record, checksum in zip(records, _checksums([tmp / name for name in names])):
                record[_CHECKSUM] = checksum
            meta["arrays"] = dict(zip(names, records))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, verify=False)  # the checksums were just computed from these files


def _choose_pad_id(given: int | None, found: set[int], teacher: nn.Module) -> int:
    """The pad id to record: ``given`` (checked against the padding the batches show), else the one they show,
    else the teacher's ``config.pad_token_id``, else 0."""
    if given is not None:
        if found - {given}:
            raise ValueError(
                f"Expected `input_ids` to hold pad_token_id={given} where `attention_mask` is 0 but got ids "
                f"{sorted(found)[:5]} there; pass the tokenizer's pad id."
            )
        return int(given)
    if len(found) == 1:
        return found.pop()
    config_pad = getattr(getattr(teacher, "config", None), "pad_token_id", None)
    return int(config_pad) if isinstance(config_pad, int) else 0


def _cache_file(name: str) -> bool:
    """Whether a file name is one a cache folder holds."""
    fixed = {
        "meta.json",
        "logits.npy",
        "topk_logits.npy",
        "topk_indices.npy",
        "logsumexp.npy",
        "logits_mask.npy",
        "sample_hashes.npy",
    }
    return name in fixed or (name.startswith("hidden_") and name.endswith(".npy") and name[7:-4].isdigit())


def _check_replaceable(path: Path) -> None:
    """Refuse to build over anything but nothing, an empty folder or a cache (a replace deletes the folder)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"Expected `path` to be a folder for the teacher cache but {path} is a file.")
    others = sorted(p.name for p in path.iterdir() if not _cache_file(p.name)) if path.is_dir() else []
    if others:
        raise ValueError(
            f"Expected `path` to be a new folder or a teacher cache to replace but {path} holds other files "
            f"{others[:5]}; choose another folder (building replaces the whole folder)."
        )


def _replace_folder(new: Path, path: Path) -> None:
    """Move the complete folder ``new`` to ``path``; an old folder there is moved aside first, then deleted.

    ``os.replace`` is atomic but cannot replace a non-empty folder, hence two moves: killed between them, ``path``
    holds no cache (the old one waits in ``.<name>.old-*`` beside it) rather than a mix of old and new files.
    """
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
