"""Writes ``lit-kt predict`` output: one CSV row per scored interaction of the prediction split."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes the probabilities of ``KTModule.predict_step`` to a CSV file.

    Columns: ``sequence`` (the student's index in the split), ``student`` (their id when the data has one),
    ``position`` (0-based, in the student's whole sequence), ``exercise``, ``response`` (the actual answer) and
    ``probability`` (the predicted probability of a correct answer). Each interaction appears once (context-only
    positions of overlapping windows are skipped). Under DDP every process writes ``<stem>.rank<r><suffix>``.

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
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["sequence", "student", "position", "exercise", "response", "probability"])
            for batch in predictions:
                probs, mask = batch["probabilities"].float().cpu(), batch["mask"].cpu()
                for row, index in enumerate(batch["index"].tolist()):
                    window = dataset.windows[index]
                    seq = dataset.sequences[window.sequence]
                    for j in mask[row].nonzero().flatten().tolist():
                        pos = window.start + j
                        out.writerow(
                            [window.sequence, seq.student or "", pos, int(seq.exercises[pos]),
                             int(seq.responses[pos]), f"{float(probs[row, j]):.6f}"]
                        )  # fmt: skip
