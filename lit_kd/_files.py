"""Private helpers of :mod:`lit_kd.data`: the data-file error, CSV rows with line numbers, the evaluation sampler.

``lit_kt`` keeps its own copies (``lit_kt.formats``, ``lit_kt.data``): the two packages never import each other, and
these helpers are small enough to live in both.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import lightning as L
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
