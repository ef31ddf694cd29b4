"""The GPU-ready paths, run on CPU: DKT's packed LSTM, automatic ``pin_memory``, the sync-free evaluation loss weight,
and the benchmark scripts' device handling and model-step measurement (issue 16; the GPU figures need a GPU)."""

from __future__ import annotations

import importlib
import mmap
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator

import lit_kt.models.dkt as dkt_module
from lit_kd.data import resolve_pin_memory as kd_resolve_pin_memory
from lit_kt import DKT, KTDataModule, KTModule, masked_bce_with_logits
from lit_kt.data import resolve_pin_memory
from tests.conftest import cpu_trainer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def ragged_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) exercises, responses and mask of rows of different lengths, one of them all padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 0, 7, 1, 9])
    L = int(lengths.max())
    mask = torch.arange(L) < lengths[:, None]  # (B, L)
    exercises = torch.randint(1, 21, (len(lengths), L), generator=g) * mask
    responses = torch.randint(0, 2, (len(lengths), L), generator=g) * mask
    return exercises, responses, mask


def logits_and_grads(model: DKT, exercises, responses, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(exercises, responses)  # (B, L)
    masked_bce_with_logits(logits, responses, mask).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_dkt_packed_path_matches_the_padded_and_staged_paths(monkeypatch):
    torch.manual_seed(0)
    staged = DKT(num_exercises=20, hidden_size=12, embedding_dim=8, num_layers=2, dropout=0.0)
    packed = DKT(num_exercises=20, hidden_size=12, embedding_dim=8, num_layers=2, dropout=0.0, packed=True)
    packed.load_state_dict(staged.state_dict())  # same keys: `packed` changes the path, not the parameters
    assert list(packed.state_dict()) == list(staged.state_dict())
    batch = ragged_batch()
    mask = batch[2]

    z_staged, g_staged = logits_and_grads(staged, *batch)
    z_packed, g_packed = logits_and_grads(packed, *batch)
    monkeypatch.setattr(dkt_module, "may_skip_padding", lambda x: False)  # the padded path, as on a GPU before
    z_padded, g_padded = logits_and_grads(staged, *batch)

    torch.testing.assert_close(z_packed[mask], z_padded[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_packed, z_staged, atol=1e-5, rtol=1e-5)  # both 0 after each row's end
    assert not z_packed[~mask].any()
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(g_packed[name], g_staged[name], atol=1e-5, rtol=1e-5, msg=name)


def test_dkt_packs_only_on_cuda_by_default(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("packed path taken")

    monkeypatch.setattr(dkt_module, "pack_padded_sequence", refuse)
    exercises, responses, _ = ragged_batch()
    DKT(num_exercises=20, hidden_size=8, embedding_dim=8)(exercises, responses)  # None: staged on CPU
    DKT(num_exercises=20, hidden_size=8, embedding_dim=8, packed=False)(exercises, responses)
    with pytest.raises(AssertionError, match="packed path taken"):
        DKT(num_exercises=20, hidden_size=8, embedding_dim=8, packed=True)(exercises, responses)


def test_pin_memory_follows_the_trainer_unless_set():
    gpu = SimpleNamespace(accelerator=CUDAAccelerator())  # no GPU needed to build the accelerator object
    for resolve in (resolve_pin_memory, kd_resolve_pin_memory):
        assert resolve(None, None) is False
        assert resolve(None, cpu_trainer()) is False
        assert resolve(None, gpu) is True
        assert resolve(False, gpu) is False
        assert resolve(True, None) is True


def students(n: int = 12, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, n)
    return [(rng.integers(1, 11, k), rng.integers(0, 2, k)) for k in lengths]


def test_kt_loaders_pin_only_when_asked_or_on_gpu():
    data = KTDataModule(sequences={"train": students(), "test": students(4, 1)}, max_len=10, batch_size=4)
    data.setup("fit")
    assert data.train_dataloader().pin_memory is False  # no trainer: not pinned
    data.trainer = SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1, global_rank=0)
    assert data.train_dataloader().pin_memory is True
    pinned = KTDataModule(sequences=students(), max_len=10, batch_size=4, pin_memory=False)
    pinned.setup("fit")
    pinned.trainer = data.trainer
    assert pinned.train_dataloader().pin_memory is False


def test_validation_loss_is_weighted_by_scored_positions():
    torch.manual_seed(0)
    data = KTDataModule(sequences={"train": students(), "val": students(6, 2)}, max_len=10, batch_size=4)
    module = KTModule(DKT(num_exercises=10, hidden_size=8, embedding_dim=8, dropout=0.0))
    logged = cpu_trainer().validate(module, data, verbose=False)[0]["val/loss"]
    total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for b in data.val_dataloader():
            n = int(b["mask"].sum())
            logits = module(b["exercises"], b["responses"])  # (B, L)
            total += float(masked_bce_with_logits(logits, b["responses"], b["mask"])) * n
            count += n
    assert logged == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("name", ["bench_vs_pykt", "bench_vs_textbrewer"])
def test_bench_scripts_refuse_cuda_without_a_gpu(scripts, name):
    bench = scripts(name)
    assert bench.resolve_device("cpu") == torch.device("cpu")
    assert bench.device_name(torch.device("cpu")).endswith("cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="`--device cuda`"):
        bench.resolve_device("cuda")


def test_bench_kt_model_step_leaves_the_fitted_model_alone(scripts):
    bench_kt = scripts("bench_kt")
    torch.manual_seed(0)
    data = KTDataModule(sequences=students(), max_len=10, batch_size=4)
    module = KTModule(DKT(num_exercises=10, hidden_size=8, embedding_dim=8))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    throughput = bench_kt.model_step_throughput(module, trainer, data, batches=4, warmup=1)  # cycles the 3 batches
    assert throughput > 0
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_sakt_fast_path_runs_under_bf16_autocast():
    """The CPU fast path scatters the head's logits in the head's own dtype (bf16 under autocast)."""
    from lit_kt import SAKT

    torch.manual_seed(0)
    model = SAKT(20, max_len=16, d_model=32, num_heads=4).eval()
    ex = torch.randint(1, 21, (4, 16))
    ex[1, 8:] = 0
    resp = torch.randint(0, 2, (4, 16))
    real = ex > 0
    with torch.no_grad():
        full = model(ex, resp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ex, resp)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float()[real], full[real], atol=0.1, rtol=0.05)


def test_dkt_staged_path_trains_under_bf16_autocast():
    """The staged LSTM passes its state from stage to stage under autocast too; logits close to float32's."""
    torch.manual_seed(0)
    model = DKT(num_exercises=20, hidden_size=16, embedding_dim=8, dropout=0.0)
    exercises, responses, mask = ragged_batch()
    full = model(exercises, responses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(exercises, responses)
    masked_bce_with_logits(half, responses, mask).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(half.float()[mask], full.detach()[mask], atol=0.05, rtol=0.05)


def test_bench_kt_time_budget_stops_the_fit_and_tests_the_best_epoch(scripts, tmp_path):
    from lit_kt import generate_students, write_three_line

    students = generate_students(num_students=60, num_exercises=8, num_concepts=2, seq_len=12, seed=0).sequences
    write_three_line(students[:40], tmp_path / "train.csv")
    write_three_line(students[40:], tmp_path / "test.csv")
    bench_kt = scripts("bench_kt")
    common = ["--data-dir", str(tmp_path), "--model", "akt", "--d-model", "8", "--num-heads", "2", "--threads", "1"]
    common += ["--step-batches", "1", "--step-warmup", "0", "--max-len", "12"]
    saved = tmp_path / "logits.pt"
    free = bench_kt.main([*common, "--epochs", "2", "--max-minutes", "10", "--save-logits", str(saved)])
    assert free["epochs"] == 2 and not free["stopped_by_time"] and free["settings"]["max_minutes"] == 10
    # --save-logits: the tested model's raw logits; the test split's reproduce the reported AUC and ECE.
    from torchmetrics.functional.classification import binary_auroc

    from lit_kt.calibration import calibrated_probabilities, expected_calibration_error, fit_logit_shift

    logits = torch.load(saved, weights_only=True)
    z, y, t = logits["test_logits"], logits["test_labels"], logits["temperature"]
    assert z.shape == y.shape and z.numel() == sum(len(s.responses) for s in students[40:])
    assert logits["val_logits"].numel() > 0 and logits["train_logits"].numel() > 0
    assert t == pytest.approx(free["temperature"], abs=1e-4)
    assert float(binary_auroc(z, y.long())) == pytest.approx(free["auc"], abs=1e-4)
    b = logits["logit_shift"]  # fitted on the training split's eval-mode logits, saved beside them
    assert b == pytest.approx(fit_logit_shift(logits["train_logits"], logits["train_labels"]), abs=1e-6)
    assert b == pytest.approx(free["logit_shift"], abs=1e-4) and free["settings"]["shift_on_train"] is True
    assert expected_calibration_error(calibrated_probabilities(z, t, b), y) == pytest.approx(free["ece"], abs=1e-4)
    # A budget of 1 ms: the fit stops after its first batch, before any epoch ends.
    bounded = bench_kt.main([*common, "--epochs", "50", "--max-minutes", "0.00002"])
    assert bounded["stopped_by_time"] and bounded["epochs"] < 50


def test_bench_vs_pykt_counts_each_sides_fresh_pages(scripts):
    if sys.platform == "win32":
        pytest.skip("minor page faults are counted through the Unix `resource` module")
    bench = scripts("bench_vs_pykt")
    pages = 300

    def touches_fresh_pages(i):  # a new anonymous mapping each step: every page written faults once
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            for p in range(pages):
                m[p * mmap.PAGESIZE] = 1

    measured = bench.alternate(lambda i: time.sleep(0.002), touches_fresh_pages, steps=3, warmup=1)
    assert len(measured["times"]["ours"]) == len(measured["faults"]["pykt"]) == 3
    summary = bench.summarize(measured, interactions=10.0)
    assert summary["pykt"]["minor_faults_per_step"] >= pages
    assert summary["ours"]["minor_faults_per_step"] < pages
    assert summary["speedup"] == round(summary["pykt"]["s_per_step"] / summary["ours"]["s_per_step"], 3)
