"""Writes ``lit-kt predict`` output: one CSV row per scored interaction of the prediction split."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

COLUMNS = ["sequence", "student", "position", "exercise", "response", "probability"]


class PredictionWriter(BasePredictionWriter):
    """Writes the probabilities of ``KTModule.predict_step`` to a CSV file.

    Columns: ``sequence`` (the student's index in the split), ``student`` (their id when the data has one),
    ``position`` (0-based, in the student's whole sequence), ``exercise``, ``response`` (the actual answer) and
    ``probability`` (the predicted probability of a correct answer). Each interaction appears once (context-only
    positions of overlapping windows are skipped). Under DDP every process writes ``<stem>.rank<r><suffix>``.

    Question-level data add columns after ``exercise``: ``question`` when the sequences have questions, and
    ``interaction`` (the 0-based index of the original interaction, shared by the rows expanded from one
    multi-concept question) when they have ``interaction_ids``. Each expanded row gets its own leak-free probability
    (see :func:`lit_kt.module.leak_free_logits`); the question's score in the metrics is their mean.

    The file is replaced atomically: the rows go to a temporary file in the same folder
    (``.<name>.<random>.tmp``), which is flushed to disk and then renamed onto the target, so a run that dies while
    writing leaves the previous file (or none) intact, never a truncated one. A temporary file that was being written
    when the process was killed (e.g. ``SIGKILL``) stays behind and may be deleted; on an exception it is removed.

    Args:
        output_path: The CSV file to write.
    """

    def __init__(self, output_path: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module, predictions, batch_indices) -> None:
        dataset = trainer.predict_dataloaders.dataset
        path = self.output_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        write_csv_atomically(path, self.rows(dataset, predictions))

    def rows(self, dataset: Any, predictions: Sequence[dict[str, Any]]) -> Iterator[list[Any]]:
        """The CSV rows, header first.

        Args:
            dataset: The prediction dataset (a ``KTDataset``: ``windows`` and ``sequences``).
            predictions: The outputs of ``predict_step``, one dict per batch with ``probabilities``, ``mask`` and
                ``index`` (the dataset index of each row).

        Yields:
            The header, then one row per scored interaction.
        """
        first = dataset.sequences[0] if len(dataset.sequences) else None
        questions = first is not None and first.questions is not None
        groups = first is not None and first.interaction_ids is not None
        extra = ["question"] * questions + ["interaction"] * groups
        yield [*COLUMNS[:4], *extra, *COLUMNS[4:]]
        for batch in predictions:
            probs, mask = batch["probabilities"].float().cpu(), batch["mask"].cpu()
            for row, index in enumerate(batch["index"].tolist()):
                window = dataset.windows[index]
                seq = dataset.sequences[window.sequence]
                for j in mask[row].nonzero().flatten().tolist():
                    pos = window.start + j
                    ids = ([int(seq.questions[pos])] if questions else []) + (
                        [int(seq.interaction_ids[pos])] if groups else []
                    )
                    yield [window.sequence, seq.student or "", pos, int(seq.exercises[pos]), *ids,
                           int(seq.responses[pos]), f"{float(probs[row, j]):.6f}"]  # fmt: skip


def write_csv_atomically(path: Path, rows: Iterable[Sequence[Any]]) -> None:
    """Writes ``rows`` as CSV to ``path`` through a temporary file in the same folder, then renames it onto ``path``.

    Readers see the old file or the whole new one, never a part. The folder is created if needed; the new file gets
    the permissions a plain ``open(path, "w")`` would give it.

    Args:
        path: The file to write (replaced if it exists).
        rows: The rows, header included.

    Raises:
        OSError: If the folder or the file cannot be written; the temporary file is removed and ``path`` is unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(
        "w", newline="", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with tmp as f:
            csv.writer(f).writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp.name, 0o666 & ~_umask())  # NamedTemporaryFile creates 0600
        os.replace(tmp.name, path)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Makes the rename durable where the platform allows opening a folder (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
