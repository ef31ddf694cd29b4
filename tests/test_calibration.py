"""Calibration: ECE/Brier math against hand computations and torchmetrics, temperature fitting against a grid, the
module's temperature buffer (metrics, predict paths, stream, old checkpoints), TemperatureScaling, the reliability
diagram and scripts/plot_reliability.py."""

from __future__ import annotations

import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError
from torchmetrics.functional import mean_squared_error

from lit_kt import (
    SAKT,
    KTDataModule,
    KTModule,
    SAKTStream,
    TemperatureScaling,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    predict_next,
)
from lit_kt.calibration import (
    calibrate,
    calibrated_probabilities,
    calibration_bins,
    collect_logits,
    fit_logit_shift,
)

REPO = Path(__file__).resolve().parents[1]


def test_expected_calibration_error_against_hand_computation_and_torchmetrics():
    probs = [0.05, 0.15, 0.3, 0.35, 0.7, 0.95, 1.0]
    labels = [0, 0, 1, 0, 1, 1, 1]
    # 3 bins [0, 1/3), [1/3, 2/3), [2/3, 1), and p == 1 apart (as torchmetrics):
    # bin 0: {0.05, 0.15, 0.3} conf 0.5/3, acc 1/3; bin 1: {0.35} conf 0.35, acc 0; bin 2: {0.7, 0.95}, acc 1;
    # p == 1: acc 1, gap 0.
    expected = (abs(1 - 0.5) + abs(0 - 0.35) + abs(2 - 1.65) + 0) / 7
    assert expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1], n_bins=2) == pytest.approx(0.25)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5000, generator=gen)
    y = (torch.rand(5000, generator=gen) < p**2).long()
    for n_bins in (1, 10, 15):
        reference = BinaryCalibrationError(n_bins=n_bins, norm="l1")(p, y)
        assert expected_calibration_error(p, y, n_bins) == pytest.approx(float(reference), abs=1e-6)
    with pytest.raises(ValueError, match="between 0 and 1"):
        expected_calibration_error([0.2, 1.5], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        expected_calibration_error([0.2, 0.5], [0, 2])
    with pytest.raises(ValueError, match="as many"):
        expected_calibration_error([0.2, 0.5], [0])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.2], [0], n_bins=0)


def test_calibration_bins_count_and_average_each_bin():
    conf, acc, count = calibration_bins([0.05, 0.15, 0.3, 0.35, 0.7, 0.95, 1.0], [0, 0, 1, 0, 1, 1, 1], n_bins=3)
    assert count.tolist() == [3, 1, 3]  # p == 1 joins the last bin here
    torch.testing.assert_close(conf, torch.tensor([0.5 / 3, 0.35, 2.65 / 3], dtype=torch.float64))
    torch.testing.assert_close(acc, torch.tensor([1 / 3, 0.0, 1.0], dtype=torch.float64))
    conf, acc, count = calibration_bins([0.9], [1], n_bins=2)
    assert count.tolist() == [0, 1] and math.isnan(conf[0]) and math.isnan(acc[0])


def test_brier_score_against_hand_computation_and_torchmetrics():
    assert brier_score([0.8, 0.4, 1.0, 0.0], [1, 0, 0, 0]) == pytest.approx((0.04 + 0.16 + 1 + 0) / 4)
    p = torch.rand(100, generator=torch.Generator().manual_seed(1))
    y = (p > 0.3).long()
    assert brier_score(p, y) == pytest.approx(float(mean_squared_error(p, y.float())), abs=1e-7)
    with pytest.raises(ValueError, match="between 0 and 1"):
        brier_score([float("nan")], [1])


def _nll(z, y, t):
    return torch.nn.functional.binary_cross_entropy_with_logits(z.double() / t, y.double()).item()


def test_fit_temperature_matches_a_brute_force_grid():
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(2000, generator=gen) * 1.5
    y = (torch.rand(2000, generator=gen) < torch.sigmoid(true)).long()
    for scale in (3.0, 0.5, 1.0):  # over-confident, under-confident, calibrated
        z = true * scale
        t = fit_temperature(z, y)
        grid = np.exp(np.linspace(math.log(0.05), math.log(20), 4001))
        best = grid[int(np.argmin([_nll(z, y, g) for g in grid]))]
        assert t == pytest.approx(best, rel=2e-3)
        assert _nll(z, y, t) <= min(_nll(z, y, t * 1.01), _nll(z, y, t / 1.01))
    assert fit_temperature(true * 3, y) == pytest.approx(3.0, rel=0.15)  # recovers the scaling
    # Hand-made: equal logits +-2 right 3 times out of 4: the fitted probability sigmoid(2 / T) is 3/4.
    z = torch.tensor([2.0, 2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0])
    y = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    assert fit_temperature(z, y) == pytest.approx(2 / math.log(3), rel=1e-5)


def test_fit_temperature_bounds_and_errors():
    z, y = torch.tensor([3.0, -3.0, 3.0, -3.0]), torch.tensor([1, 0, 0, 1])  # uninformative: flattest allowed
    assert fit_temperature(z, y) == pytest.approx(100.0)
    assert fit_temperature(z, y, max_temperature=5.0) == pytest.approx(5.0)
    assert fit_temperature(torch.tensor([1.0, -1.0]), torch.tensor([1, 0])) == pytest.approx(0.01)  # separable
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([1.0, float("inf")], [1, 0])
    with pytest.raises(ValueError, match="none"):
        fit_temperature([], [])
    with pytest.raises(ValueError, match="min_temperature"):
        fit_temperature([1.0], [1], min_temperature=0.0)
    with pytest.raises(ValueError, match="min_temperature"):
        TemperatureScaling(min_temperature=2.0, max_temperature=1.0)


def tiny_module(max_len=20):
    torch.manual_seed(0)
    return KTModule(SAKT(50, d_model=16, num_heads=2, max_len=max_len, dropout=0.0), partial(torch.optim.Adam, lr=1e-2))


def trainer(**kw):
    opts = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**opts, **kw})


def test_module_logs_ece_and_brier_over_scored_positions_at_its_temperature():
    dm = KTDataModule(synthetic_students=60, synthetic_seq_len=23, max_len=10, eval_stride=4, batch_size=7)
    module = tiny_module(max_len=10)
    module.temperature.fill_(2.0)
    metrics = trainer().test(module, dm, verbose=False)[0]
    dm.setup("test")
    logits, labels = collect_logits(module, dm.test_dataloader())
    assert len(labels) == 30 * 23  # every test interaction once
    probs = torch.sigmoid(logits / 2.0)
    assert metrics["test/ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)
    assert metrics["test/brier"] == pytest.approx(brier_score(probs, labels), abs=1e-6)
    assert metrics["test/rmse"] == pytest.approx(math.sqrt(brier_score(probs, labels)), abs=1e-6)
    assert metrics["test/ece"] != pytest.approx(expected_calibration_error(torch.sigmoid(logits), labels), abs=1e-4)


def test_temperature_scaling_keeps_auc_and_lowers_ece_of_an_over_confident_model(tmp_path):
    dm = KTDataModule(synthetic_students=300, max_len=50, batch_size=32)
    module = tiny_module(max_len=50)
    t = trainer(max_epochs=2)
    t.fit(module, dm)
    with torch.no_grad():  # deliberately over-confident: every logit times 3
        module.model.head.weight.mul_(3.0)
        module.model.head.bias.mul_(3.0)
    before = t.test(module, dm, verbose=False)[0]
    temperature = calibrate(module, dm.val_dataloader())
    assert float(module.temperature) == pytest.approx(temperature) and temperature > 1.5
    after = t.test(module, dm, verbose=False)[0]
    # T > 0 is monotone: the ranking is unchanged, up to float32 ties among saturated probabilities.
    assert after["test/auc"] == pytest.approx(before["test/auc"], abs=1e-6)
    assert after["test/acc"] == pytest.approx(before["test/acc"], abs=1e-7)
    assert after["test/ece"] < before["test/ece"] / 2
    assert after["test/brier"] < before["test/brier"]


def test_temperature_scaling_callback_fits_on_validation_and_refits_for_a_restored_checkpoint(tmp_path):
    dm = KTDataModule(synthetic_students=120, max_len=20, batch_size=32)
    module = tiny_module()
    callback = TemperatureScaling(shift_on_train=False)
    t = trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path)
    t.fit(module, dm)
    logits, labels = collect_logits(module, dm.val_dataloader())
    expected = fit_temperature(logits, labels)
    assert float(module.temperature) == pytest.approx(expected, rel=1e-6) and expected != 1.0
    assert float(t.callback_metrics["val/temperature"]) == pytest.approx(expected, rel=1e-6)
    # A checkpoint saved with T = 1 (as those written during fit): testing it refits T for its weights.
    module.temperature.fill_(1.0)
    t.save_checkpoint(tmp_path / "t1.ckpt")
    module.temperature.fill_(7.0)
    t.test(module, dm, ckpt_path=tmp_path / "t1.ckpt", verbose=False, weights_only=True)
    assert float(module.temperature) == pytest.approx(expected, rel=1e-6)


def test_temperature_is_saved_and_old_checkpoints_load_with_one(tmp_path):
    module = tiny_module()
    module.temperature.fill_(2.5)
    t = trainer(max_epochs=0, default_root_dir=tmp_path)
    t.fit(module, KTDataModule(synthetic_students=40, max_len=20, batch_size=32))
    t.save_checkpoint(tmp_path / "m.ckpt")
    assert float(KTModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).temperature) == 2.5
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    del ckpt["state_dict"]["temperature"]  # as written before the buffer existed
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = KTModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert float(old.temperature) == 1.0
    torch.testing.assert_close(old.model.head.weight, module.model.head.weight)


def test_predict_paths_and_stream_divide_the_logits_by_the_temperature():
    module = tiny_module().eval()
    ex, resp, cand = [3, 4, 3, 9], [0, 1, 1, 0], [3, 7, 11]
    p1 = predict_next(module.model, ex, resp, cand)
    module.temperature.fill_(2.0)
    expected = torch.sigmoid(torch.logit(p1.double()) / 2.0).float()
    torch.testing.assert_close(module.predict_next(ex, resp, cand), expected)
    torch.testing.assert_close(predict_next(module.model, ex, resp, cand, temperature=2.0), expected)
    stream = SAKTStream(module, ex, resp)  # a KTModule: its temperature
    assert stream.temperature == 2.0
    torch.testing.assert_close(stream.predict(cand), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(SAKTStream(module.model, ex, resp).predict(cand), p1, atol=1e-5, rtol=1e-4)
    batch = {
        "exercises": torch.tensor([ex]),
        "responses": torch.tensor([resp]),
        "mask": torch.ones(1, 4, dtype=torch.bool),
        "index": torch.tensor([0]),
    }
    with torch.no_grad():
        out = module.predict_step(batch, 0)["probabilities"]
        torch.testing.assert_close(out, torch.sigmoid(module(batch["exercises"], batch["responses"]) / 2.0))
    with pytest.raises(ValueError, match="temperature"):
        predict_next(module.model, ex, resp, cand, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SAKTStream(module.model, temperature=-1.0)


def test_fit_logit_shift_matches_the_base_rate_and_refuses_one_class():
    rng = np.random.default_rng(0)
    z = rng.normal(1.0, 2.0, size=5000)
    y = (rng.random(5000) < 0.4).astype(float)
    b = fit_logit_shift(z, y)
    assert float(torch.sigmoid(torch.tensor(z + b)).mean()) == pytest.approx(0.4 * 0 + y.mean(), abs=1e-8)
    # A brute-force reference: the root of mean(sigmoid(z + b)) - rate on a fine grid.
    grid = np.linspace(-5, 5, 100001)
    means = np.array([(1 / (1 + np.exp(-(z + g)))).mean() for g in grid[::100]])
    coarse = grid[::100][np.argmin(np.abs(means - y.mean()))]
    assert abs(b - coarse) < 0.011
    assert fit_logit_shift([0.0, 0.0], [1, 0]) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="every label is 1"):
        fit_logit_shift([0.3, -2.0], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        fit_logit_shift([float("nan")], [1])
    torch.testing.assert_close(
        calibrated_probabilities(torch.tensor([1.0, -1.0]), 2.0, 0.5), torch.sigmoid(torch.tensor([0.75, -0.25]))
    )


def test_shift_on_train_removes_a_shift_that_the_temperature_cannot_and_keeps_auc(tmp_path):
    """A model whose every logit is raised by 1.5 (as dropout shifts eval-mode logits, in a larger way): the
    temperature alone cannot undo a shift; the shift fitted on the training split does, and the AUC is unchanged."""
    dm = KTDataModule(synthetic_students=300, max_len=50, batch_size=32)
    module = tiny_module(max_len=50)
    t = trainer(max_epochs=3)
    t.fit(module, dm)
    with torch.no_grad():
        module.model.head.bias.add_(1.5)
    before = t.test(module, dm, verbose=False)[0]
    calibrate(module, dm.val_dataloader())
    assert float(module.logit_shift) == 0.0
    temperature_only = t.test(module, dm, verbose=False)[0]
    t_shift = calibrate(module, dm.val_dataloader(), dm.train_dataloader())
    train_z, train_y = collect_logits(module, dm.train_dataloader())
    b = float(module.logit_shift)
    assert b == pytest.approx(fit_logit_shift(train_z, train_y), abs=1e-6) and -2.0 < b < -1.0
    val_z, val_y = collect_logits(module, dm.val_dataloader())
    assert t_shift == pytest.approx(fit_temperature(val_z + b, val_y), rel=1e-6)
    shifted = t.test(module, dm, verbose=False)[0]
    assert shifted["test/auc"] == pytest.approx(before["test/auc"], abs=1e-6)
    assert shifted["test/ece"] < temperature_only["test/ece"] / 2 and shifted["test/ece"] < before["test/ece"] / 2
    # The shift reaches every prediction path: predict_next, the stream, predict_step.
    ex, resp, cand = [3, 4, 3, 9], [0, 1, 1, 0], [3, 7, 11]
    raw = predict_next(module.model, ex, resp, cand)
    expected = torch.sigmoid((torch.logit(raw.double()) + b) / t_shift).float()
    torch.testing.assert_close(module.predict_next(ex, resp, cand), expected)
    stream = SAKTStream(module, ex, resp)
    assert stream.logit_shift == pytest.approx(b)
    torch.testing.assert_close(stream.predict(cand), expected, atol=1e-5, rtol=1e-4)
    # Saved in checkpoints; checkpoints without the buffer load with no shift.
    t.save_checkpoint(tmp_path / "m.ckpt")
    assert float(KTModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).logit_shift) == pytest.approx(b)
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    del ckpt["state_dict"]["logit_shift"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert float(KTModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).logit_shift) == 0.0


def test_temperature_scaling_callback_with_shift_on_train(tmp_path):
    dm = KTDataModule(synthetic_students=120, max_len=20, batch_size=32)
    module = tiny_module()
    t = trainer(max_epochs=1, callbacks=[TemperatureScaling()], default_root_dir=tmp_path)  # shift_on_train default
    t.fit(module, dm)
    b = fit_logit_shift(*collect_logits(module, dm.train_dataloader()))
    val_z, val_y = collect_logits(module, dm.val_dataloader())
    expected = fit_temperature(val_z + b, val_y)
    assert float(module.logit_shift) == pytest.approx(b, abs=1e-6) and b != 0.0
    assert float(module.temperature) == pytest.approx(expected, rel=1e-6)
    assert float(t.callback_metrics["val/logit_shift"]) == pytest.approx(b, abs=1e-6)
    # A checkpoint without calibration (as written during fit): testing it fits both again for its weights.
    module.temperature.fill_(1.0)
    module.logit_shift.fill_(0.0)
    t.save_checkpoint(tmp_path / "raw.ckpt")
    module.temperature.fill_(7.0)
    module.logit_shift.fill_(3.0)
    t.test(module, dm, ckpt_path=tmp_path / "raw.ckpt", verbose=False, weights_only=True)
    assert float(module.logit_shift) == pytest.approx(b, abs=1e-6)
    assert float(module.temperature) == pytest.approx(expected, rel=1e-6)
    only_t = torch.nn.Module()  # a temperature buffer but no shift buffer: asked to fit a shift, it says so
    only_t.register_buffer("temperature", torch.tensor(1.0))
    with pytest.raises(AttributeError, match="logit_shift"):
        calibrate(only_t, dm.val_dataloader(), dm.train_dataloader())


def test_reliability_diagram_returns_a_figure_with_the_ece():
    pytest.importorskip("matplotlib")
    from lit_kt.plotting import reliability_diagram

    p = torch.rand(500, generator=torch.Generator().manual_seed(0))
    y = (p > 0.5).long()
    fig = reliability_diagram(p, y, n_bins=10, calibrated_probs=p.sqrt())
    ece = expected_calibration_error(p, y, 10)
    assert f"{ece:.4f}" in fig.axes[0].get_title() and len(fig.axes) == 2
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    assert reliability_diagram(p, y, ax=ax).axes[0] is ax
    plt.close("all")


def test_plot_reliability_script_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    module = KTModule(SAKT(50, d_model=8, num_heads=2, max_len=20, dropout=0.0))
    t = trainer(max_epochs=0, default_root_dir=tmp_path)
    t.fit(module, KTDataModule(synthetic_students=40, max_len=20, batch_size=32))
    t.save_checkpoint(tmp_path / "m.ckpt")
    spec = importlib.util.spec_from_file_location("plot_reliability", REPO / "scripts" / "plot_reliability.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The default simulated students (4000) are more than a test needs: a smaller set, same code path.
    monkeypatch.setattr(script, "KTDataModule", partial(KTDataModule, synthetic_students=200))
    out = script.main(["--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "r.png"), "--n-bins", "10"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_report_from_saved_logits(tmp_path):
    """scripts/calibration_report.py on logits drawn from a known model: labels ~ Bernoulli(sigmoid(z / 2 - 0.5)).
    Platt on the validation split recovers (a, c) = (0.5, -0.5); the shift-then-temperature calibration and the
    temperature alone are the lit_kt.calibration functions applied as documented."""
    spec = importlib.util.spec_from_file_location("calibration_report", REPO / "scripts" / "calibration_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    split = {}
    for name, n in (("train", 40000), ("val", 40000), ("test", 40000)):
        z = torch.randn(n, generator=g) * 3
        split[f"{name}_logits"] = z
        split[f"{name}_labels"] = torch.bernoulli(torch.sigmoid(z / 2 - 0.5), generator=g)
    torch.save(split, tmp_path / "run.pt")
    (r,) = script.main([str(tmp_path / "run.pt"), "--json", str(tmp_path / "r.json")])
    assert r["platt_val"] == pytest.approx([0.5, -0.5], abs=0.05)
    tz, ty = split["test_logits"], split["test_labels"]
    t = fit_temperature(split["val_logits"], split["val_labels"])
    assert r["ece"]["temperature"] == pytest.approx(expected_calibration_error(torch.sigmoid(tz / t), ty), abs=1e-4)
    b = fit_logit_shift(split["train_logits"], split["train_labels"])
    tb = fit_temperature(split["val_logits"] + b, split["val_labels"])
    shifted = expected_calibration_error(calibrated_probabilities(tz, tb, b), ty)
    assert r["ece"]["shift_temperature"] == pytest.approx(shifted, abs=1e-4)
    # The data are calibrated by (a, c), not by a temperature alone: Platt and the shift beat the temperature.
    assert r["ece"]["platt_val"] < r["ece"]["temperature"] and r["ece"]["shift_temperature"] < r["ece"]["temperature"]
    assert r["ece"]["oracle_temperature"] <= r["ece"]["temperature"] + 1e-4
    assert r["bias"]["test"] == pytest.approx(float(torch.sigmoid(tz).mean() - ty.mean()), abs=1e-4)
    assert json.loads((tmp_path / "r.json").read_text())[0]["ece"] == r["ece"]
