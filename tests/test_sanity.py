"""End-to-end sanity: no leakage on random responses; SAKT near the oracle on the built-in simulated students."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import torch

from lit_kt import SAKT, KTDataModule, SAKTModule, StudentSequence, write_three_line


def fit_and_test(dm: KTDataModule, model: SAKT, epochs: int, root, lr: float = 3e-3) -> float:
    module = SAKTModule(model, optimizer=partial(torch.optim.Adam, lr=lr))
    best = L.pytorch.callbacks.ModelCheckpoint(monitor="val/auc", mode="max")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[best],
        default_root_dir=root,
    )
    trainer.fit(module, dm)
    return trainer.test(module, dm, ckpt_path="best", verbose=False)[0]["test/auc"]


def test_random_responses_give_chance_auc(tmp_path):
    """Responses drawn independently of everything: any AUC far from 0.5 would mean the model sees the answer."""
    rng = np.random.default_rng(0)

    def students(n):
        return [StudentSequence(rng.integers(1, 21, 60), rng.integers(0, 2, 60)) for _ in range(n)]

    write_three_line(students(400), tmp_path / "train.csv")
    write_three_line(students(300), tmp_path / "test.csv")
    L.seed_everything(0, verbose=False)
    dm = KTDataModule(data_dir=str(tmp_path), max_len=30, batch_size=64)
    auc = fit_and_test(dm, SAKT(dm.num_exercises, d_model=32, num_heads=4, max_len=30, dropout=0.0), 3, tmp_path)
    # 18,000 test interactions: the AUC's standard error under no signal is about 0.004.
    assert abs(auc - 0.5) < 0.02


@pytest.mark.slow  # 12 epochs on 4,000 students: several minutes on 2 CPU cores
def test_sakt_reaches_the_oracle_on_simulated_students(tmp_path):
    """4,000 simulated students (half for testing): SAKT's test AUC within 0.05 of the best reachable AUC."""
    L.seed_everything(42, verbose=False)
    dm = KTDataModule(synthetic_students=4000, max_len=50, batch_size=64, seed=42)
    model = SAKT(dm.num_exercises, d_model=32, num_heads=4, max_len=50, dropout=0.2)
    auc = fit_and_test(dm, model, 12, tmp_path)
    oracle, bound = dm.oracle_auc(), dm.true_probability_auc()
    print(f"SAKT test AUC {auc:.4f}; oracle {oracle:.4f}; true-probability bound {bound:.4f}")
    assert oracle < bound
    assert auc > oracle - 0.05
    assert auc < oracle + 0.01  # above the oracle by more than noise would mean a leak
