"""Text-classification data for distillation: a TSV/CSV reader, a tokenised dataset, its collate function and
``TextClassificationDataModule``.

A batch is a dict of tensors, right-padded to the longest sequence of the batch (dynamic padding):

- ``input_ids`` (B, L) int64 token ids, padded with the tokenizer's pad id;
- ``attention_mask`` (B, L) int64, 1 at real tokens and 0 at padding;
- ``token_type_ids`` (B, L) int64, only when the tokenizer returns them (BERT does), padded with 0;
- ``labels`` (B,) int64 class ids;
- ``index`` (B,) int64, the sample's index in its split (a key for caching, e.g. teacher logits).

With a ``student_tokenizer`` (teacher and student read different vocabularies) the batch is instead
``{"teacher": {...}, "student": {...}, "labels", "index"}``: each part holds its own ``input_ids`` /
``attention_mask`` (/ ``token_type_ids``), padded to the longest sequence *of that part*, plus a copy of ``labels``,
so that either part can be passed straight to a Hugging Face model (``model(**batch["teacher"])``) which then also
returns its loss.

With a transfer set (``TextClassificationDataModule(transfer_file=..., transfer_augment=...)``) every training batch
also holds unlabelled rows: their ``labels`` are ``-100`` (:data:`UNLABELLED`), so the distillation (KD) term reads
them while every hard-label loss ignores them (``ignore_index=-100`` of ``F.cross_entropy``, and
:class:`~lit_kd.distiller.Distiller`'s hard-label term counts labelled rows only).
"""

from __future__ import annotations

import csv
import functools
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_kd._files import FileFormatError, csv_rows, distributed_eval_sampler, open_text
from lit_kd.sampling import LengthGroupedSampler, TransferMixSampler
from lit_kd.students import resolve_name_or_path

__all__ = [
    "UNLABELLED",
    "TextClassificationDataModule",
    "TrainingRowsDataset",
    "TransferMixDataset",
    "augment_sentence",
    "read_unlabelled_text",
    "TextFormatError",
    "TokenizedTextDataset",
    "collate_text",
    "pad_encodings",
    "read_labelled_text",
]

_INT = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1
_DELIMITERS = {".tsv": "\t", ".csv": ","}
_ENCODING_KEYS = ("input_ids", "token_type_ids")
UNLABELLED = -100
"""The label of transfer-set rows: ``F.cross_entropy``'s default ``ignore_index``, so no hard-label loss reads them."""


def _to_int(text: str) -> int:
    """``int(text)`` for text matching ``_INT``, free of Python's limit on the digits of a conversion.

    A value beyond int64 comes back as ``_INT64_MAX + 1`` (or its negative), which the reader rejects.
    """
    if len(text.lstrip("+-").lstrip("0")) > 19:
        return -(_INT64_MAX + 1) if text.startswith("-") else _INT64_MAX + 1
    return int(text)


class TextFormatError(FileFormatError):
    """Raised for a malformed text-classification file (message ``"<path>:<line>: ..."``; see ``FileFormatError``)."""


def read_labelled_text(
    path: str | os.PathLike[str],
    text_col: str = "sentence",
    label_col: str = "label",
    delimiter: str | None = None,
    num_labels: int | None = None,
) -> tuple[list[str], list[int]]:
    """Reads a table of texts and integer class labels with a header row (e.g. GLUE's ``SST-2/train.tsv``).

    Tab-separated files are read with ``csv.QUOTE_NONE``: quote characters are ordinary text (sentences may hold an
    unbalanced ``"``, as in some SST-2 exports), so a row is exactly one line and a field cannot contain a tab.
    Comma-separated files use the usual CSV quoting (``"a, b"``). Other columns are ignored, blank lines are skipped,
    header names and labels are stripped of surrounding whitespace and so is the text.

    Args:
        path: The file to read (UTF-8; a byte-order mark is ignored).
        text_col: Column holding the text (must not be empty).
        label_col: Column holding the class label, an integer ``>= 0``.
        delimiter: Field delimiter; ``None`` infers it from the extension (``.tsv``: tab, ``.csv``: comma).
        num_labels: When given, every label must also be ``< num_labels`` (the classes of the model that will read
            them); ``None`` accepts any label ``>= 0``.

    Returns:
        ``(texts, labels)``, two lists in file order.

    Raises:
        ValueError: If ``delimiter`` is ``None`` and the extension is neither ``.tsv`` nor ``.csv``, or
            ``num_labels`` is ``< 1``.
        TextFormatError: If the file is empty or has no data rows, lacks a column, a row has a different number of
            fields than the header, a text is empty or a label is not an integer ``>= 0`` (and ``< num_labels`` when
            given); the message names the file and the 1-based line.
        OSError: If the file cannot be read.

    Example:
        >>> texts, labels = read_labelled_text("../shared/data/nlp/sst2/dev.tsv")  # doctest: +SKIP
        >>> len(texts), labels[:3]  # doctest: +SKIP
        (872, [1, 0, 1])
    """
    if delimiter is None:
        suffix = Path(path).suffix.lower()
        if suffix not in _DELIMITERS:
            raise ValueError(
                f"Expected `path` to end in .tsv or .csv (or `delimiter` to be given) but got {os.fspath(path)!r}."
            )
        delimiter = _DELIMITERS[suffix]
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"Expected `num_labels` to be >= 1 but got {num_labels}.")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    texts: list[str] = []
    labels: list[int] = []
    with open_text(path, TextFormatError, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next((row for row in reader if row), None)
        except csv.Error as e:
            raise TextFormatError(path, reader.line_num or 1, f"Expected a header row but got a CSV error: {e}")
        if header is None:
            raise TextFormatError(path, None, "Expected a header row but got an empty file")
        header_line = reader.line_num
        header = [name.strip() for name in header]
        missing = [col for col in (text_col, label_col) if col not in header]
        if missing:
            raise TextFormatError(
                path,
                header_line,
                f"Expected column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
                f" in the header but got columns {header}",
            )
        text_at, label_at = header.index(text_col), header.index(label_col)
        for row in csv_rows(reader, path, TextFormatError):
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise TextFormatError(
                    path,
                    line,
                    f"Expected {len(header)} fields (as in the header) separated by {delimiter!r} but got {len(row)}",
                )
            text = row[text_at].strip()
            if not text:
                raise TextFormatError(
                    path, line, f"Expected a non-empty text in column {text_col!r} but got an empty field"
                )
            label = row[label_at].strip()
            if not _INT.fullmatch(label) or _to_int(label) < 0:
                found = "an empty field" if not label else repr(label)
                raise TextFormatError(
                    path, line, f"Expected an integer label >= 0 in column {label_col!r} but got {found}"
                )
            value = _to_int(label)
            if value > _INT64_MAX:
                raise TextFormatError(
                    path, line, f"Expected a label that fits in int64 in column {label_col!r} but got {label!r}"
                )
            if num_labels is not None and value >= num_labels:
                raise TextFormatError(
                    path, line, f"Expected a label < num_labels ({num_labels}) in column {label_col!r} but got {value}"
                )
            texts.append(text)
            labels.append(value)
    if not texts:
        raise TextFormatError(path, header_line, "Expected at least one data row after the header but got none")
    return texts, labels


def read_unlabelled_text(path: str | os.PathLike[str], text_col: str = "sentence") -> list[str]:
    """Reads the sentences of a transfer set: a ``.tsv``/``.csv`` table with a header naming ``text_col`` (any other
    column, labels included, is ignored), or any other file as one sentence per line (UTF-8).

    Blank lines are skipped; an empty text field in a table is an error.

    Raises:
        TextFormatError: If the table lacks ``text_col``, a row's field count differs from the header's, a text is
            empty, or the file holds no sentence; the message names the file and the line.
    """
    suffix = Path(path).suffix.lower()
    texts: list[str] = []
    with open_text(path, TextFormatError, newline="") as f:
        if suffix not in _DELIMITERS:
            texts = [line.strip() for line in f if line.strip()]
        else:
            delimiter = _DELIMITERS[suffix]
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            try:
                header = next((row for row in reader if row), None)
            except csv.Error as e:
                raise TextFormatError(
                    path, reader.line_num or 1, f"Expected a header row but got a CSV error: {e}"
                ) from e
            if header is None or text_col not in [h.strip() for h in header]:
                raise TextFormatError(
                    path, reader.line_num or None, f"Expected a header with column {text_col!r} but got {header}"
                )
            at = [h.strip() for h in header].index(text_col)
            for row in csv_rows(reader, path, TextFormatError):
                if not row:
                    continue
                if len(row) != len(header):
                    raise TextFormatError(
                        path, reader.line_num, f"Expected {len(header)} fields (as in the header) but got {len(row)}"
                    )
                if not row[at].strip():
                    raise TextFormatError(path, reader.line_num, f"Expected a non-empty text in column {text_col!r}")
                texts.append(row[at].strip())
    if not texts:
        raise TextFormatError(path, None, "Expected at least one sentence but got none")
    return texts


def augment_sentence(sentence: str, rng: random.Random, vocabulary: Sequence[str], p: float = 0.1) -> str:
    """A noisy copy of a sentence for a transfer set (no model, no download): each word is dropped with probability
    ``p`` or replaced by a random word of ``vocabulary`` with probability ``p``, then one pair of neighbouring words
    is swapped with probability ``p``. The teacher labels the copy; its label is never used.

    Args:
        sentence: Whitespace-separated words.
        rng: The random source (seed it for reproducible copies).
        vocabulary: Words to draw replacements from (e.g. every word of the training sentences).
        p: Probability of each edit.

    Returns:
        The copy (never empty: a sentence whose words were all dropped keeps its first word).

    Example:
        >>> augment_sentence("a fine film", random.Random(0), ["dull"], p=0.0)
        'a fine film'
    """
    words = sentence.split()
    out = []
    for word in words:
        draw = rng.random()
        if draw < p:
            continue
        out.append(rng.choice(vocabulary) if draw < 2 * p else word)
    out = out or words[:1]
    if len(out) > 1 and rng.random() < p:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


class TokenizedTextDataset(Dataset):
    """Token ids and labels of one split, each item a dict of plain Python lists and ints.

    Args:
        encoding: Columns from a tokenizer, ``"input_ids"`` and optionally ``"token_type_ids"``, one list per sample.
        labels: Class label of each sample.
        student_encoding: The same columns from the student's tokenizer, or ``None`` when both read the same ids.

    Raises:
        ValueError: If the columns and labels differ in length or ``input_ids`` is missing.
    """

    def __init__(
        self,
        encoding: dict[str, Sequence[Sequence[int]]],
        labels: Sequence[int],
        student_encoding: dict[str, Sequence[Sequence[int]]] | None = None,
    ) -> None:
        for name, enc in (("encoding", encoding), ("student_encoding", student_encoding)):
            if enc is None:
                continue
            if "input_ids" not in enc:
                raise ValueError(f"Expected `{name}` to hold 'input_ids' but got keys {sorted(enc)}.")
            lengths = {key: len(column) for key, column in enc.items()}
            if any(n != len(labels) for n in lengths.values()):
                raise ValueError(
                    f"Expected every column of `{name}` to hold {len(labels)} samples (one per label)"
                    f" but got {lengths}."
                )
        self.encoding = encoding
        self.labels = list(labels)
        self.student_encoding = student_encoding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "encoding": {key: column[index] for key, column in self.encoding.items()},
            "label": self.labels[index],
            "index": index,
        }
        if self.student_encoding is not None:
            item["student_encoding"] = {key: column[index] for key, column in self.student_encoding.items()}
        return item


class TransferMixDataset(Dataset):
    """Labelled training samples, each paired with ``per_sample`` rows of an unlabelled transfer set.

    An item is a list: a labelled sample first, then its transfer rows (label :data:`UNLABELLED`, index
    ``len(labelled) + j`` for transfer row ``j``); :func:`collate_text` flattens the lists. Keys are
    ``(i, (j_1, ..., j_k))`` pairs from a :class:`~lit_kd.sampling.TransferMixSampler` (what
    ``TextClassificationDataModule.train_dataloader`` uses): the transfer rows then come from a stream that uses
    every row once before any twice, across epochs. A plain integer key ``i`` pairs sample ``i`` with fixed rows (a
    seeded permutation of the transfer set): with ``per_sample = ceil(len(transfer) / len(labelled))`` every transfer
    row is used once per epoch, with fewer only ``len(labelled) * per_sample`` of them ever are. Either way the
    labelled samples, their order and their batches are those of the labelled sampler alone, so a run without the
    transfer set sees the same labelled batches.

    Args:
        labelled: The labelled training samples.
        transfer: The transfer rows (their labels are ignored).
        per_sample: Transfer rows per labelled sample, >= 1.
        seed: Seed of the pairing.
    """

    def __init__(
        self, labelled: TokenizedTextDataset, transfer: TokenizedTextDataset, per_sample: int = 1, seed: int = 0
    ) -> None:
        if per_sample < 1:
            raise ValueError(f"Expected `per_sample` to be >= 1 but got {per_sample}.")
        if len(transfer) == 0:
            raise ValueError("Expected a non-empty transfer set but got 0 rows.")
        self.labelled, self.transfer, self.per_sample = labelled, transfer, per_sample
        self.order = torch.randperm(len(transfer), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, key: int | tuple[int, Sequence[int]]) -> list[dict[str, Any]]:
        if isinstance(key, tuple):  # (labelled index, transfer rows) from a TransferMixSampler
            index, rows = key
        else:
            index = key
            rows = [self.order[(index * self.per_sample + k) % len(self.order)] for k in range(self.per_sample)]
        return [self.labelled[index], *(self.transfer_item(j) for j in rows)]

    def transfer_item(self, j: int) -> dict[str, Any]:
        """Transfer row ``j`` as training batches carry it: label :data:`UNLABELLED`, index ``len(labelled) + j``."""
        return {**self.transfer[j], "label": UNLABELLED, "index": len(self.labelled) + j}


class TrainingRowsDataset(Dataset):
    """Every row training batches can carry, once, under the ``index`` they carry it with: the labelled samples
    (``0 .. n - 1``), then the transfer rows of a :class:`TransferMixDataset` (``n + j``). What
    :meth:`lit_kd.cache.TeacherCache.build` reads to serve a transfer set from the cache.

    Args:
        train: The training dataset: a :class:`TokenizedTextDataset` (labelled samples only) or a
            :class:`TransferMixDataset`.
    """

    def __init__(self, train: TokenizedTextDataset | TransferMixDataset) -> None:
        self.mix = train if isinstance(train, TransferMixDataset) else None
        self.labelled = train if self.mix is None else self.mix.labelled

    def __len__(self) -> int:
        return len(self.labelled) + (len(self.mix.transfer) if self.mix is not None else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"Expected a row index in [0, {len(self)}) but got {index}.")
        if index < len(self.labelled):
            return self.labelled[index]
        return self.mix.transfer_item(index - len(self.labelled))

    def lengths(self) -> list[int]:
        """Token count of every row (the teacher's ids), in index order."""
        rows = _lengths(self.labelled)
        return rows + (_lengths(self.mix.transfer) if self.mix is not None else [])


def _lengths(dataset: TokenizedTextDataset) -> list[int]:
    """Token count of every sample (the teacher's ids: the longer side sets the padding in the usual case)."""
    return [len(ids) for ids in dataset.encoding["input_ids"]]


def pad_encodings(encodings: Sequence[dict[str, Sequence[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads token-id lists to the longest one and builds the attention mask.

    Args:
        encodings: One dict per sample with ``"input_ids"`` and optionally ``"token_type_ids"``.
        pad_token_id: Id written at padded positions of ``input_ids`` (``token_type_ids`` are padded with 0).

    Returns:
        ``input_ids``, ``attention_mask`` and (when given) ``token_type_ids``, each (B, L) int64 with L the longest.
    """
    longest = max(len(enc["input_ids"]) for enc in encodings)
    batch = {"input_ids": torch.full((len(encodings), longest), pad_token_id, dtype=torch.long)}
    batch["attention_mask"] = torch.zeros(len(encodings), longest, dtype=torch.long)
    if "token_type_ids" in encodings[0]:
        batch["token_type_ids"] = torch.zeros(len(encodings), longest, dtype=torch.long)
    for row, enc in enumerate(encodings):
        n = len(enc["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key in _ENCODING_KEYS:
            if key in batch:
                batch[key][row, :n] = torch.tensor(enc[key], dtype=torch.long)
    return batch


def collate_text(
    items: Sequence[dict[str, Any]], pad_token_id: int = 0, student_pad_token_id: int = 0
) -> dict[str, Any]:
    """Collates :class:`TokenizedTextDataset` items into a batch (see the module docstring for its layout).

    Use ``functools.partial(collate_text, pad_token_id=..., student_pad_token_id=...)`` as a DataLoader's
    ``collate_fn``; it pickles, so it works with worker processes.

    Args:
        items: Dataset items.
        pad_token_id: Pad id of the (teacher's) tokenizer.
        student_pad_token_id: Pad id of the student's tokenizer (used only when items carry a student encoding).

    Returns:
        A flat batch, or ``{"teacher": ..., "student": ..., "labels", "index"}`` when the items carry a student
        encoding.
    """
    if items and isinstance(items[0], list):  # TransferMixDataset: a labelled sample and its transfer rows
        items = [item for group in items for item in group]
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)  # (B,)
    index = torch.tensor([item["index"] for item in items], dtype=torch.long)  # (B,)
    teacher = pad_encodings([item["encoding"] for item in items], pad_token_id)
    if "student_encoding" not in items[0]:
        return {**teacher, "labels": labels, "index": index}
    student = pad_encodings([item["student_encoding"] for item in items], student_pad_token_id)
    return {
        "teacher": {**teacher, "labels": labels},
        "student": {**student, "labels": labels},
        "labels": labels,
        "index": index,
    }


def resolve_pin_memory(pin_memory: bool | None, trainer: L.Trainer | None) -> bool:
    """A DataLoader's ``pin_memory``: the user's choice, or (``None``) whether ``trainer`` trains on a CUDA GPU.

    Pinned (page-locked) batches let the host-to-GPU copy run asynchronously: Lightning's ``transfer_batch_to_device``
    already copies with ``non_blocking=True`` on CUDA, which overlaps with compute only from pinned memory. Decided
    when the loader is built, so a module attached to a GPU trainer later still gets pinned loaders.
    """
    if pin_memory is not None:
        return pin_memory
    return trainer is not None and isinstance(getattr(trainer, "accelerator", None), CUDAAccelerator)


class TextClassificationDataModule(L.LightningDataModule):
    """Train/validation/test data for sentence classification, tokenised once and padded per batch.

    ``data_dir`` holds ``train.tsv`` and ``dev.tsv`` (and optionally ``test.tsv``), each with a header naming
    ``text_col`` and ``label_col`` (GLUE layout, see :func:`read_labelled_text`). ``dev.tsv`` is the validation
    split and, when there is no ``test.tsv``, also the test and predict split: GLUE's SST-2 hides its test labels,
    so its dev set is the usual reported test set. A ``test.tsv`` must therefore carry labels.

    The texts are tokenised once per split on first use (``setup``) with a batched call to a fast tokenizer,
    truncated to ``max_length`` and not padded; batches are padded to their longest sequence by
    :func:`collate_text`. With ``student_tokenizer`` every sample is tokenised by both tokenizers and batches carry
    a ``"teacher"`` and a ``"student"`` part. A BiGRU student that reads the teacher's ids needs no
    ``student_tokenizer``: it uses ``input_ids`` with ``vocab_size`` and ``pad_token_id``.

    Labels are checked against the number of classes when a split is read, before any training step: every label
    of a split must be ``< num_labels``, else :class:`TextFormatError` names the file, the 1-based line and
    ``num_labels``. With ``num_labels`` given (``lit-kd`` sets it to the model's classes) this holds for
    ``train.tsv`` too; with ``None`` the number of classes is inferred from the whole ``train.tsv`` (largest label
    plus one) and ``dev.tsv``/``test.tsv`` are checked against it. ``setup("fit")`` reads and checks ``train.tsv``,
    ``dev.tsv`` and also ``test.tsv`` when there is one, so that ``fit --test_after_fit`` cannot fail on a label
    after training; ``setup("validate")`` checks the validation split and ``setup("test"/"predict")`` the test split.

    Args:
        data_dir: Folder with ``train.tsv``, ``dev.tsv`` and optionally ``test.tsv``.
        tokenizer: Name or local path of the (teacher's) tokenizer for ``AutoTokenizer.from_pretrained``; must be a
            fast tokenizer.
        student_tokenizer: Name or local path of a second fast tokenizer for the student, or ``None`` when teacher
            and student read the same ids.
        max_length: Longest tokenised sequence (special tokens included) of the (teacher's) tokenizer.
        student_max_length: Longest sequence of the student's tokenizer; ``None`` for ``max_length``.
        batch_size: Training samples per batch.
        eval_batch_size: Validation/test/predict samples per batch; ``None`` for ``batch_size``.
        num_workers: DataLoader worker processes; 0 collates batches in the training process, between steps. On a
            GPU a few workers (2 to 4) collate the next batches while the GPU runs the current step; workers persist
            across epochs.
        train_limit: Use only the first ``train_limit`` rows of ``train.tsv`` (file order, before shuffling) for quick
            runs; ``None`` for all. ``num_labels`` is still inferred from (or checked on) the whole file.
        text_col: Column holding the text.
        label_col: Column holding the integer label (``0 .. num_labels - 1``).
        num_labels: Number of classes of the model; every label of every split must be below it. ``None``: inferred
            from ``train.tsv``. ``lit-kd`` links it with the model's ``num_labels`` (see :mod:`lit_kd.cli`).
        transfer_file: A transfer set for distillation: unlabelled sentences (a ``.tsv``/``.csv`` with ``text_col``,
            labels ignored, or one sentence per line; see :func:`read_unlabelled_text`). Training batches then also
            hold transfer rows, labelled :data:`UNLABELLED`: the teacher labels them for the KD term, no hard-label
            loss reads them. ``None`` for none.
        transfer_augment: Also add this many noisy copies of every (used) training sentence to the transfer set
            (:func:`augment_sentence`: word dropout, replacement from the training vocabulary, a swap); 0 for none.
        transfer_unused_train: Also add the sentences of the training rows beyond ``train_limit`` to the transfer
            set, their labels dropped: a labelled budget of ``train_limit`` rows and the rest of ``train.tsv`` as
            unlabelled in-domain text (the setting where distillation pays most, see ``docs/distillation.md``).
            Needs ``train_limit``.
        transfer_per_sample: Transfer rows per labelled sample in a training batch (a batch holds ``batch_size``
            labelled and ``batch_size * transfer_per_sample`` transfer rows); ``None`` for enough to use every
            transfer row once per epoch.
        transfer_seed: Seed of the augmentation and of the pairing of transfer rows with labelled samples.
        group_by_length: Training batches of similar-length samples (:class:`~lit_kd.sampling.LengthGroupedSampler`,
            random mega-batches of 50 batches sorted by length), so that little of each batch is padding; transfer
            rows are grouped too. ``False``: a plain random order.
        pin_memory: Pin the loaders' batches in page-locked host memory, so that their copy to the GPU runs
            asynchronously (:func:`resolve_pin_memory`); ``None`` pins when the attached trainer's accelerator is a
            CUDA GPU and not otherwise.

    Example:
        >>> dm = TextClassificationDataModule("../shared/data/nlp/sst2", tokenizer=minilm_path())  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> dm.num_labels, batch["input_ids"].shape  # doctest: +SKIP
        (2, torch.Size([32, 47]))
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str,
        student_tokenizer: str | None = None,
        max_length: int = 128,
        student_max_length: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_limit: int | None = None,
        text_col: str = "sentence",
        label_col: str = "label",
        num_labels: int | None = None,
        transfer_file: str | None = None,
        transfer_augment: int = 0,
        transfer_unused_train: bool = False,
        transfer_per_sample: int | None = 1,
        transfer_seed: int = 0,
        group_by_length: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"Expected `data_dir` to be a folder path but got {data_dir!r}.")
        for name, value, least in (
            ("max_length", max_length, 1),
            ("student_max_length", student_max_length, 1),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("train_limit", train_limit, 1),
            ("num_labels", num_labels, 1),
            ("transfer_augment", transfer_augment, 0),
            ("transfer_per_sample", transfer_per_sample, 1),
        ):
            if value is not None and value < least:
                raise ValueError(f"Expected `{name}` to be >= {least} but got {value}.")
        if transfer_unused_train and train_limit is None:
            raise ValueError(
                "Expected `train_limit` with `transfer_unused_train=True` (the rows beyond it form the transfer set)"
                " but got `train_limit=None`."
            )
        self.save_hyperparameters()
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._texts: dict[str, tuple[list[str], list[int]]] = {}
        self._datasets: dict[str, TokenizedTextDataset] = {}
        self._num_labels: int | None = num_labels
        self._transfer: TokenizedTextDataset | None = None

    # ------------------------------------------------------------------ loading
    def load_tokenizer(self, part: Literal["teacher", "student"] = "teacher") -> PreTrainedTokenizerBase:
        """The fast tokenizer of one part (loaded once); ``"student"`` falls back to the teacher's tokenizer.

        Raises:
            ValueError: If the tokenizer is not a fast tokenizer.
        """
        if part == "student" and self.hparams.student_tokenizer is None:
            part = "teacher"
        if part not in self._tokenizers:
            name = self.hparams.tokenizer if part == "teacher" else self.hparams.student_tokenizer
            tok = AutoTokenizer.from_pretrained(resolve_name_or_path(name), trust_remote_code=False)
            arg = "tokenizer" if part == "teacher" else "student_tokenizer"
            if not tok.is_fast:
                raise ValueError(
                    f"Expected `{arg}` to name a fast tokenizer but got {type(tok).__name__} for {name!r}."
                )
            if tok.pad_token_id is None:
                raise ValueError(f"Expected `{arg}` to define a pad token but {name!r} has none.")
            self._tokenizers[part] = tok
        return self._tokenizers[part]

    def _path(self, split: Literal["train", "val", "test"]) -> Path:
        folder = Path(self.hparams.data_dir)
        if split == "test" and (folder / "test.tsv").is_file():
            return folder / "test.tsv"
        path = folder / {"train": "train.tsv", "val": "dev.tsv", "test": "dev.tsv"}[split]
        if not path.is_file():
            raise FileNotFoundError(f"Expected a data file at {path} but it does not exist.")
        return path

    def _read(self, split: Literal["train", "val", "test"]) -> tuple[list[str], list[int]]:
        path = self._path(split)
        key = os.fspath(path)
        if key not in self._texts:
            # Without a given `num_labels`, train.tsv defines it (largest label + 1): only the other files are checked.
            bound = None if split == "train" and self.hparams.num_labels is None else self.num_labels
            self._texts[key] = read_labelled_text(path, self.hparams.text_col, self.hparams.label_col, num_labels=bound)
        return self._texts[key]

    def _tokenize(self, texts: list[str], part: Literal["teacher", "student"]) -> dict[str, list[list[int]]]:
        h = self.hparams
        max_length = h.max_length if part == "teacher" or h.student_max_length is None else h.student_max_length
        enc = self.load_tokenizer(part)(texts, truncation=True, max_length=max_length, return_attention_mask=False)
        return {key: enc[key] for key in _ENCODING_KEYS if key in enc}

    def dataset(self, split: Literal["train", "val", "test"]) -> TokenizedTextDataset:
        """The tokenised dataset of one split (built on first use, cached).

        Raises:
            TextFormatError: If the split's file is malformed or one of its labels is ``>= num_labels`` (with the
                file and the line).
        """
        path = self._path(split)
        key = "train" if split == "train" else os.fspath(path)  # dev.tsv serves val and test: tokenise it once
        if key not in self._datasets:
            texts, labels = self._read(split)
            if split == "train":
                texts, labels = texts[: self.hparams.train_limit], labels[: self.hparams.train_limit]
            student = self._tokenize(texts, "student") if self.hparams.student_tokenizer is not None else None
            self._datasets[key] = TokenizedTextDataset(self._tokenize(texts, "teacher"), labels, student)
        return self._datasets[key]

    @property
    def has_transfer_set(self) -> bool:
        """Whether training batches carry transfer rows (``transfer_file``, ``transfer_augment`` or
        ``transfer_unused_train``)."""
        h = self.hparams
        return h.transfer_file is not None or h.transfer_augment > 0 or h.transfer_unused_train

    def transfer_dataset(self) -> TokenizedTextDataset:
        """The tokenised transfer set (built on first use): ``transfer_file``'s sentences, then the augmented copies
        of the used training sentences, then (``transfer_unused_train``) the sentences of the training rows beyond
        ``train_limit``; every label :data:`UNLABELLED`.

        Raises:
            ValueError: If there is no transfer set (see :attr:`has_transfer_set`).
        """
        if not self.has_transfer_set:
            raise ValueError(
                "Expected `transfer_file`, `transfer_augment` > 0 or `transfer_unused_train` for a transfer set but"
                " got none of them."
            )
        if self._transfer is None:
            h = self.hparams
            texts = read_unlabelled_text(h.transfer_file, h.text_col) if h.transfer_file is not None else []
            if h.transfer_augment:
                train = self._read("train")[0][: h.train_limit]
                rng = random.Random(h.transfer_seed)
                vocabulary = sorted({w for t in train for w in t.split()})
                texts += [augment_sentence(t, rng, vocabulary) for _ in range(h.transfer_augment) for t in train]
            if h.transfer_unused_train:
                unused = self._read("train")[0][h.train_limit :]
                if not unused:
                    raise ValueError(
                        f"Expected rows beyond `train_limit={h.train_limit}` in {self._path('train')} for"
                        " `transfer_unused_train` but the file has no more."
                    )
                texts += unused
            student = self._tokenize(texts, "student") if h.student_tokenizer is not None else None
            labels = [UNLABELLED] * len(texts)
            self._transfer = TokenizedTextDataset(self._tokenize(texts, "teacher"), labels, student)
        return self._transfer

    def train_sampler(self, generator: torch.Generator | None = None, transfer: bool = True) -> Sampler:
        """The order of the training samples: random (``group_by_length``: length-grouped), each labelled sample
        paired with its transfer rows (:class:`~lit_kd.sampling.TransferMixSampler`) when there is a transfer set.
        The labelled order depends only on ``generator``, with or without a transfer set.

        Args:
            generator: Random source of the labelled order; ``None`` for torch's global one.
            transfer: Pair the labelled samples with transfer rows when there is a transfer set; ``False`` for the
                labelled order alone (the same order: e.g. a comparison run without distillation).
        """
        labelled = self.dataset("train")
        h = self.hparams
        if h.group_by_length:
            order: Sampler = LengthGroupedSampler(_lengths(labelled), h.batch_size, generator)
        else:
            order = RandomSampler(labelled, generator=generator)
        if not (transfer and self.has_transfer_set):
            return order
        rows = self.transfer_dataset()
        return TransferMixSampler(
            order,
            len(rows),
            self._transfer_per_sample(),
            h.transfer_seed,
            transfer_lengths=_lengths(rows) if h.group_by_length else None,
            batch_size=h.batch_size,
        )

    def _transfer_per_sample(self) -> int:
        """``transfer_per_sample``, or (``None``) enough rows per labelled sample to use each transfer row once per
        epoch."""
        return self.hparams.transfer_per_sample or -(-len(self.transfer_dataset()) // len(self.dataset("train")))

    def train_dataset(self) -> Dataset:
        """What training batches are drawn from: the labelled training split, paired with its transfer rows when
        there is a transfer set (:class:`TransferMixDataset`)."""
        labelled = self.dataset("train")
        if not self.has_transfer_set:
            return labelled
        return TransferMixDataset(
            labelled, self.transfer_dataset(), self._transfer_per_sample(), self.hparams.transfer_seed
        )

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_labels(self) -> int:
        """Number of classes: the ``num_labels`` given, else the largest label of the whole ``train.tsv`` plus one
        (reading ``train.tsv`` only; no tokenizer is loaded)."""
        if self._num_labels is None:
            labels = self._read("train")[1]
            self._num_labels = max(labels) + 1
            missing = sorted(set(range(self._num_labels)) - set(labels))
            if missing:
                rank_zero_warn(
                    f"Labels {missing} never occur in {self._path('train')} (num_labels = {self._num_labels})."
                )
        return self._num_labels

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (added tokens included) of the ids the student reads (``student_tokenizer``, else
        ``tokenizer``)."""
        return len(self.load_tokenizer("student"))

    @property
    def pad_token_id(self) -> int:
        """Pad id of the ids the student reads (``student_tokenizer``, else ``tokenizer``)."""
        return self.load_tokenizer("student").pad_token_id

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        by_stage = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        splits = by_stage.get(stage, ("train", "val", "test"))
        # Read and check every file before tokenising any; when fitting also test.tsv, so that a bad label there
        # stops the run now rather than after training (`fit --test_after_fit`).
        for split in (*splits, "test") if stage == "fit" else splits:
            self._read(split)
        for split in splits:
            self.dataset(split)
        if "train" in splits and self.has_transfer_set:
            self.transfer_dataset()

    def _collate(self) -> functools.partial:
        """:func:`collate_text` with both tokenizers' pad ids (a picklable partial, for worker processes)."""
        return functools.partial(
            collate_text,
            pad_token_id=self.load_tokenizer("teacher").pad_token_id,
            student_pad_token_id=self.load_tokenizer("student").pad_token_id,
        )

    def _loader(self, split: Literal["train", "val", "test"]) -> DataLoader:
        h = self.hparams
        collate = self._collate()
        dataset = self.train_dataset() if split == "train" else self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=h.batch_size if split == "train" or h.eval_batch_size is None else h.eval_batch_size,
            # Under DDP each validation/test sample goes to exactly one process (Lightning's sampler would repeat some).
            sampler=self.train_sampler() if split == "train" else distributed_eval_sampler(dataset, self.trainer),
            num_workers=h.num_workers,
            collate_fn=collate,
            pin_memory=resolve_pin_memory(h.pin_memory, self.trainer),
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def cache_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Every row training batches can carry, once, with the ``index`` they carry it with (the labelled training
        samples, then the transfer rows: :class:`TrainingRowsDataset`), in batches of similar lengths: what
        :meth:`lit_kd.cache.TeacherCache.build` reads, so that ``DistillationModule(teacher_cache=...)`` serves the
        training batches, transfer rows included, without running the teacher.

        Args:
            batch_size: Rows per batch; ``None`` for ``eval_batch_size`` (else ``batch_size``).
        """
        h = self.hparams
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1 (or None) but got {batch_size}.")
        size = batch_size or h.eval_batch_size or h.batch_size
        rows = TrainingRowsDataset(self.train_dataset())
        lengths = rows.lengths()
        order = sorted(range(len(rows)), key=lengths.__getitem__)  # similar lengths together: little padding
        collate = self._collate()
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        return DataLoader(rows, batch_sampler=batches, collate_fn=collate, num_workers=h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
