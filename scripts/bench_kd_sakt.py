"""SAKT-to-SAKT distillation on the built-in simulated students: is the distilled student closer to its teacher?

    python scripts/bench_kd_sakt.py --json out/kd_sakt.json

Trains a SAKT teacher (d_model 64, 4 heads), then, for each seed, the same small SAKT student (d_model 8) alone
(binary cross-entropy on the answers) and distilled (``kd_loss_type="bce"``, T = 1, KD weight 1, hard-label weight
1) for the same epochs, and tests all of them on the held-out simulated students. The student's checkpoint is the
last epoch (no selection on any split). Prints and writes the AUCs, their means and the gaps to the teacher.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit

from lit_kd import DistillationConfig, DistillationModule
from lit_kt import SAKT, KTDataModule, KTModule, kt_adaptor


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_auc(module: L.LightningModule, data: KTDataModule) -> float:
    return float(trainer(1).test(module, data, verbose=False)[0]["test/auc"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-epochs", type=int, default=15)
    p.add_argument("--student-d-model", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    start = time.perf_counter()
    adam = partial(torch.optim.Adam, lr=3e-3)
    data = KTDataModule(max_len=50, batch_size=64, seed=42)
    L.seed_everything(0, verbose=False)
    teacher = KTModule(SAKT(data.num_exercises, d_model=64, num_heads=4, max_len=50, dropout=0.2), optimizer=adam)
    trainer(a.teacher_epochs).fit(teacher, data)
    teacher_auc = test_auc(teacher, data)
    print(f"teacher test AUC {teacher_auc:.4f}", flush=True)
    alone, distilled = [], []
    for seed in range(a.seeds):

        def student() -> SAKT:
            L.seed_everything(seed, verbose=False)
            return SAKT(data.num_exercises, d_model=a.student_d_model, num_heads=2, max_len=50, dropout=0.2)

        module = KTModule(student(), optimizer=adam)
        trainer(a.student_epochs).fit(module, data)
        alone.append(test_auc(module, data))
        kd = DistillationModule(
            teacher.model,
            student(),
            DistillationConfig(kd_loss_type="bce", temperature=1.0, kd_loss_weight=1.0, hard_label_weight=1.0),
            teacher_adaptor=kt_adaptor,
            student_adaptor=kt_adaptor,
            metric_task="binary",
            optimizer=adam,
        )
        trainer(a.student_epochs).fit(kd, data)
        distilled.append(test_auc(kd, data))
        print(f"seed {seed}: student alone {alone[-1]:.4f}, distilled {distilled[-1]:.4f}", flush=True)
    result = {
        "teacher_auc": round(teacher_auc, 4),
        "student_alone_auc": [round(x, 4) for x in alone],
        "student_kd_auc": [round(x, 4) for x in distilled],
        "student_alone_mean": round(statistics.mean(alone), 4),
        "student_kd_mean": round(statistics.mean(distilled), 4),
        "gap_alone": round(teacher_auc - statistics.mean(alone), 4),
        "gap_kd": round(teacher_auc - statistics.mean(distilled), 4),
        "oracle_auc": round(data.oracle_auc(), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "settings": vars(a) | {"json": str(a.json) if a.json else None},
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
