"""Private helpers of :mod:`lit_kd.data`: the data-file error, CSV rows with line numbers, the evaluation sampler.

``lit_kt`` keeps its own copies (``lit_kt.formats``, ``lit_kt.data``): the two packages never import each other, and
these helpers are small enough to live in both.

For :mod:`lit_kd.export` and :mod:`lit_kd.factories`: checkpoints read with ``weights_only=True`` and checked
(:func:`load_torch_file`, :func:`read_checkpoint`), and outputs written atomically (:func:`atomic_write`,
:func:`atomic_folder`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler


class FileFormatError(ValueError):
    """Raised for a malformed data file; the base of ``lit_kd.data.TextFormatError``.

    The message starts with ``"<path>:<line>: "`` (1-based line number), or ``"<path>: "`` when the problem concerns
    the file as a whole (e.g. it is empty).

    Attributes:
        path: The file, as given to the reader.
        line: The 1-based line number, or ``None``.
        message: The description without the location prefix.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        """Builds the error.

        Args:
            path: The file in which the problem was found.
            line: The 1-based line number, or ``None`` for a problem with the whole file.
            message: What was expected and what was found.
        """
        self.path = path
        self.line = line
        self.message = message
        location = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
        super().__init__(f"{location}: {message}")

    def __reduce__(self):  # keep the error picklable (e.g. raised inside DataLoader workers)
        return (type(self), (self.path, self.line, self.message))


def csv_rows(
    reader: Iterable[Any], path: str | os.PathLike[str], error: type[FileFormatError] = FileFormatError
) -> Iterator[Any]:
    """Yield the rows of a ``csv.reader``/``DictReader``, turning a ``csv.Error`` into ``error`` at its line."""
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            raise error(path, reader.line_num, f"Expected a well-formed CSV row but got a CSV error: {e}") from e
        yield row


def distributed_eval_sampler(dataset: Sized, trainer: L.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """The sampler of an evaluation loader under DDP: each sample goes to exactly one process.

    Lightning replaces the sampler of a plain evaluation loader with a ``DistributedSampler``, which pads the dataset
    with repeated samples until every process gets as many; those samples would be counted twice in the metrics.
    Lightning keeps a loader's sampler when it already is a ``DistributedSampler``, so the data module passes this
    one: process ``r`` of ``W`` reads samples ``r, r + W, r + 2W, ...`` in order. Evaluation steps call no collective
    per batch (torchmetrics gathers once in ``compute()``), so processes may run one batch fewer than others.

    Args:
        dataset: The evaluation dataset.
        trainer: The trainer the data module is attached to (``self.trainer``); world size and rank come from it.

    Returns:
        The sampler, or ``None`` outside a distributed run (no trainer, or a world size of 1).

    Raises:
        ValueError: If the dataset holds fewer samples than there are processes.
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    if len(dataset) < trainer.world_size:
        raise ValueError(
            f"Expected an evaluation set of at least as many samples as processes ({trainer.world_size}) but got"
            f" {len(dataset)}."
        )
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


def undecodable_error(
    path: str | os.PathLike[str], exc: UnicodeDecodeError, error: type[FileFormatError] = FileFormatError
) -> FileFormatError:
    """The format error for a file that is not valid UTF-8, at the first line holding an invalid byte sequence.

    The decoder's offset is relative to a buffered chunk, so the file is read again in binary and decoded line by
    line (lines end at ``\\n``, ``\\r`` or ``\\r\\n``, as the readers count them).

    Args:
        path: The file that failed to decode.
        exc: The decoding error.
        error: The error class to build.

    Returns:
        The error (for the caller to raise), naming the file, the 1-based line and the offending bytes.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError:
        lines = []
    for number, raw in enumerate(lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return error(
                path,
                number,
                f"Expected UTF-8 text but got the bytes {raw[e.start : e.end]!r} at byte {e.start + 1} of the line"
                f" ({e.reason})",
            )
    return error(path, None, f"Expected UTF-8 text but got an undecodable byte sequence ({exc.reason})")


@contextlib.contextmanager
def open_text(
    path: str | os.PathLike[str], error: type[FileFormatError] = FileFormatError, newline: str | None = None
) -> Iterator[TextIO]:
    """Opens a UTF-8 file (a byte-order mark is skipped) whose decoding errors become ``error`` at their line."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError as e:
        raise undecodable_error(path, e, error) from e


# ------------------------------------------------------------- checkpoints read safely, outputs written atomically
def _weights_only_reason(error: BaseException) -> str:
    """The telling part of a ``weights_only`` refusal (torch's message is many lines of advice)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return text.split(marker, 1)[1].strip().split("\n", 1)[0].split(". Please", 1)[0].rstrip(".") + "."
    return text.strip().split("\n", 1)[0]


def load_torch_file(path: str | os.PathLike[str], arg: str, expected: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, with an error naming ``arg``, the file and ``expected`` on failure.

    An empty, truncated or foreign file (text, a zip of something else) and a file holding pickled objects other
    than tensors and plain containers (a function, a class: loading those could run code) raise a ``ValueError``
    that reads "Expected `{arg}` to be {expected} that loads with `weights_only=True` but {path} ...".

    Args:
        path: The file.
        arg: The argument that gave the file, for the message.
        expected: What the file should be, e.g. ``"a Lightning checkpoint"``.
        mmap: Map the file rather than read it (tensors are read when used); ignored for a file that is not in
            torch's zip format, which ``mmap`` cannot read.

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `{arg}` to be {expected} file but got {str(path)!r}: no such file.")
    head = f"Expected `{arg}` to be {expected} that loads with `weights_only=True` but {path}"
    if path.stat().st_size == 0:
        raise ValueError(f"{head} is empty (0 bytes).")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6; mmap reads only that one
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{head} holds pickled objects other than tensors and plain containers, which are refused since loading "
            f"them could run code: {_weights_only_reason(e)}"
        ) from e
    except (MemoryError, PermissionError):
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for files it cannot parse
        raise ValueError(
            f"{head} is not a readable torch file (truncated, or another kind of file): {type(e).__name__}: "
            f"{_weights_only_reason(e)}"
        ) from e


def read_checkpoint(path: str | os.PathLike[str], arg: str = "checkpoint_path", mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``: a dict holding a ``state_dict`` mapping.

    Args:
        path: The checkpoint file.
        arg: The argument that gave the file, for the messages.
        mmap: See :func:`load_torch_file`.

    Returns:
        The checkpoint.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file is not a checkpoint that loads with ``weights_only=True`` (see
            :func:`load_torch_file`), or holds no ``state_dict``.
    """
    checkpoint = load_torch_file(path, arg, "a Lightning checkpoint", mmap=mmap)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        is_mapping = isinstance(checkpoint, Mapping)
        got = f"keys {sorted(map(str, checkpoint))[:5]}" if is_mapping else type(checkpoint).__name__
        raise ValueError(
            f"Expected `{arg}` to be a Lightning checkpoint (a dict with a `state_dict`) but {os.fspath(path)} holds "
            f"{got}."
        )
    return dict(checkpoint)


def _fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to ``path`` (same folder, hence same file system: ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{suffix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[Any]:
    """Opens a temporary file next to ``path`` for writing; on success it is fsynced and renamed onto ``path``.

    Readers see the old file or the whole new one, never a partial write (a crash or an error leaves ``path``
    untouched and the temporary file removed). The parent folder is created if missing.

    Args:
        path: The file to write.
        mode: ``"wb"`` or ``"w"``.
        encoding: The text encoding (``"w"`` only).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    # os.open with 0o666 leaves the permissions to the umask, as open(path, "w") would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary sibling folder to fill; on success its files are fsynced and moved to ``path``.

    When ``path`` does not exist (or is an empty folder) the whole folder is renamed into place at once, so a reader
    sees either no folder or a complete one. A folder that already holds files cannot be swapped in one rename (a
    rename onto a non-empty folder fails, and removing it first would leave a moment with no folder), so each new
    file replaces its namesake atomically and files of the old folder that are not rewritten stay. A failure
    removes the temporary folder and leaves ``path`` as it was.

    Args:
        path: The folder to write.

    Yields:
        The temporary folder (in the same parent, hence on the same file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmpdir")
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for file in files:
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            os.replace(tmp, path)
        else:
            if not path.is_dir():
                raise NotADirectoryError(f"Expected {str(path)!r} to be a folder to write into but it is a file.")
            for file in files:
                target = path / file.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
