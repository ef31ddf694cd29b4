"""Fault injection for tests/test_faults.py: callbacks that ``SIGKILL`` their own process at a chosen point, record
where each training attempt started, record every validation, and make predictions worthless; a prediction writer
that dies half-way; a subprocess runner with timeouts.

The callbacks are named in ``--trainer.callbacks+`` of ``lit-kt`` subprocesses (``tests.fault_helpers.KillAt``), so
they need the repository on ``PYTHONPATH`` (:func:`subprocess_env`). Nothing here reads ``RANK``: the trainer gives the
rank; the restart count comes from ``torchrun`` (``TORCHELASTIC_RESTART_COUNT``, absent outside ``torchrun``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_kt.writer import PredictionWriter
from tests.ddp_helpers import subprocess_env

__all__ = [
    "ConstantPredictions",
    "KillAt",
    "KillingPredictionWriter",
    "RecordStart",
    "RecordValidation",
    "attempt",
    "run",
    "subprocess_env",
]


def attempt() -> int:
    """Which attempt of a ``torchrun`` job this process is (0 for the first, and outside ``torchrun``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """Kills this process with ``SIGKILL`` (no clean-up, no checkpoint) right after the optimizer step ``step``.

    Args:
        step: The ``trainer.global_step`` after which to die.
        rank: Only the process of this global rank dies (``None``: every process).
        attempt: Only in this ``torchrun`` attempt (``TORCHELASTIC_RESTART_COUNT``; ``None``: in every attempt).
        marker: A file written just before dying (with the step); while it exists the callback does nothing, so the
            same command run again resumes instead of dying again (``None``: no marker).
    """

    def __init__(
        self, step: int, rank: int | None = None, attempt: int | None = None, marker: str | None = None
    ) -> None:
        if step < 1:
            raise ValueError(f"Expected `step` >= 1 but got {step}.")
        self.step = step
        self.rank = rank
        self.attempt = attempt
        self.marker = Path(marker) if marker is not None else None

    def armed(self, trainer: L.Trainer) -> bool:
        """Whether this process dies at :attr:`step`."""
        if self.rank is not None and trainer.global_rank != self.rank:
            return False
        if self.attempt is not None and attempt() != self.attempt:
            return False
        return self.marker is None or not self.marker.exists()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.armed(trainer):
            if self.marker is not None:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text(json.dumps({"step": self.step, "epoch": trainer.current_epoch}))
            _kill_self()


class RecordStart(Callback):
    """Writes ``{out_dir}/start-rank{r}-attempt{a}.json`` when training starts: where this attempt began.

    Recorded: ``global_step`` and ``current_epoch`` at ``on_train_start`` (the restored ones when resuming), the
    global rank, the world size and the ``torchrun`` attempt.

    Args:
        out_dir: Folder of the files (created).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_step": trainer.global_step,
            "current_epoch": trainer.current_epoch,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "attempt": attempt(),
        }
        (self.out_dir / f"start-rank{trainer.global_rank}-attempt{attempt()}.json").write_text(json.dumps(record))


def read_starts(out_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The records of :class:`RecordStart` by ``(rank, attempt)``."""
    records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("start-rank*-attempt*.json"))]
    return {(r["global_rank"], r["attempt"]): r for r in records}


class RecordValidation(Callback):
    """Appends ``{"epoch", "global_step", <metric>}`` to the JSON-lines file ``path`` after every validation (not the
    sanity check), on global rank 0.

    Args:
        path: The file (created, appended to).
        metric: The logged metric to record.
    """

    def __init__(self, path: str, metric: str = "val/auc") -> None:
        self.path = Path(path)
        self.metric = metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = float(trainer.callback_metrics[self.metric])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                                self.metric: value}) + "\n")  # fmt: skip


def read_validations(path: Path) -> list[dict[str, Any]]:
    """The records of :class:`RecordValidation`, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


class ConstantPredictions(Callback):
    """From epoch ``from_epoch`` on, zeroes every parameter before validation: the model then predicts the same
    probability for every interaction, an AUC of exactly 0.5, worse than any trained epoch.

    Args:
        from_epoch: The first epoch whose validation sees the zeroed model.
    """

    def __init__(self, from_epoch: int) -> None:
        self.from_epoch = from_epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < self.from_epoch:
            return
        with torch.no_grad():
            for parameter in pl_module.parameters():
                parameter.zero_()


class KillingPredictionWriter(PredictionWriter):
    """A :class:`~lit_kt.writer.PredictionWriter` that ``SIGKILL``\\ s its process after generating ``kill_after``
    rows (header included), mid-way through writing the file.

    Args:
        output_path: The CSV file to write.
        kill_after: Rows written before dying.
    """

    def __init__(self, output_path: str = "predictions.csv", kill_after: int = 10) -> None:
        super().__init__(output_path)
        self.kill_after = kill_after

    def rows(self, dataset: Any, predictions: Sequence[dict[str, Any]]) -> Iterator[list[Any]]:
        for i, row in enumerate(super().rows(dataset, predictions)):
            if i == self.kill_after:
                _kill_self()
            yield row


def run(cmd: Sequence[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None):
    """Runs ``cmd`` in its own session with :func:`subprocess_env` (plus ``env``) and returns the completed process.

    The whole process group is killed after ``timeout`` seconds (``torchrun`` and its workers included).

    Raises:
        AssertionError: On a timeout, with the output so far.
    """
    full_env = subprocess_env()
    full_env.update(env or {})
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timeout after {timeout} s: {' '.join(cmd)}\n{out[-6000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)
