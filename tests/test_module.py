"""KTModule: loss math, metrics over scored positions only, predict_step, checkpoints, inference API."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch

from lit_kt import DKT, SAKT, KTDataModule, KTModule, SAKTModule, masked_bce_with_logits, predict_next, roc_auc


def test_masked_bce_against_hand_computation():
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.5, 9.0]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(math.log(sig(0.0)) + math.log(1 - sig(2.0)) + math.log(sig(0.5))) / 3
    assert masked_bce_with_logits(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_bce_with_logits(logits, targets, torch.zeros_like(mask)).item() == 0.0


def tiny_module(num_exercises=50, max_len=20, **kw):
    torch.manual_seed(0)
    model = SAKT(num_exercises, d_model=16, num_heads=2, max_len=max_len, dropout=0.0)
    return SAKTModule(model, optimizer=partial(torch.optim.Adam, lr=1e-2), **kw)


def trainer(**kw):
    opts = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def test_test_metrics_cover_scored_positions_only():
    dm = KTDataModule(synthetic_students=80, synthetic_seq_len=23, max_len=10, eval_stride=4, batch_size=7)
    module = tiny_module(max_len=10)
    metrics = trainer().test(module, dm, verbose=False)[0]
    # Independent evaluation: run each test window, keep its scored positions, compute AUC/accuracy with numpy.
    probs, labels = [], []
    module.eval()
    with torch.no_grad():
        for b in dm.test_dataloader():
            p = torch.sigmoid(module(b["exercises"], b["responses"]))
            probs.append(p[b["mask"]].numpy())
            labels.append(b["responses"][b["mask"]].numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert len(labels) == 40 * 23  # every test interaction exactly once
    assert metrics["test/auc"] == pytest.approx(roc_auc(probs, labels), abs=1e-6)
    assert metrics["test/acc"] == pytest.approx(np.mean((probs > 0.5) == labels), abs=1e-6)
    assert metrics["test/rmse"] == pytest.approx(np.sqrt(np.mean((probs - labels) ** 2)), abs=1e-6)


def test_training_lowers_the_loss_and_predict_step_returns_probabilities():
    dm = KTDataModule(synthetic_students=400, max_len=50, batch_size=32)
    module = tiny_module(max_len=50)
    t = trainer(max_epochs=3)
    before = t.validate(module, dm, verbose=False)[0]["val/loss"]
    t.fit(module, dm)
    after = t.validate(module, dm, verbose=False)[0]["val/loss"]
    assert after < before
    out = t.predict(module, dm)
    assert sum(len(o["index"]) for o in out) == 200
    p = torch.cat([o["probabilities"][o["mask"]] for o in out])
    assert p.numel() == 200 * 50 and torch.all((p > 0) & (p < 1))


@pytest.mark.parametrize("make", [lambda: SAKT(30, 16, 2, 1, 12), lambda: DKT(30, 16, embedding_dim=8)])
def test_checkpoint_round_trip_from_python(tmp_path, make):
    dm = KTDataModule(synthetic_students=60, synthetic_exercises=30, max_len=12, batch_size=16)
    module = KTModule(make())
    t = trainer(max_epochs=1, default_root_dir=tmp_path)
    t.fit(module, dm)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = KTModule.load_from_checkpoint(path)
    assert type(loaded.model) is type(module.model) and loaded.model.config == module.model.config
    b = next(iter(dm.test_dataloader()))
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(b["exercises"], b["responses"]), module(b["exercises"], b["responses"]))


def test_lr_scheduler_callable_is_used():
    module = tiny_module(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    conf = module.configure_optimizers()
    assert isinstance(conf["lr_scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["optimizer"].param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("model", [SAKT(20, 16, 2, 1, max_len=6), DKT(20, 16, embedding_dim=8)])
def test_predict_next_matches_a_full_forward(model):
    torch.manual_seed(0)
    model.eval()
    hist_ex, hist_resp = [3, 5, 3, 7, 1, 2, 9, 4], [1, 0, 1, 1, 0, 0, 1, 1]
    cands = [3, 20, 1]
    got = predict_next(model, hist_ex, hist_resp, cands)
    keep = len(hist_ex) if model.max_len is None else model.max_len - 1  # SAKT: the most recent window
    for i, c in enumerate(cands):
        ex = torch.tensor([hist_ex[-keep:] + [c]])
        resp = torch.tensor([hist_resp[-keep:] + [0]])
        assert got[i].item() == pytest.approx(torch.sigmoid(model(ex, resp)[0, -1]).item(), abs=1e-6)
    # empty history works (start token only)
    assert predict_next(model, [], [], 5).shape == (1,)


def test_predict_next_errors():
    model = SAKT(20, 16, 2, 1, max_len=6)
    with pytest.raises(ValueError, match=r"`candidates` ids between 1 and num_exercises \(20\) but got 21 at pos"):
        predict_next(model, [1], [1], [2, 21])
    with pytest.raises(ValueError, match=r"`exercises` ids .* got 0 at position 0"):
        predict_next(model, [0, 2], [1, 1], 2)
    with pytest.raises(ValueError, match="same length"):
        predict_next(model, [1, 2], [1], 2)
    with pytest.raises(ValueError, match="`responses` to be 0 or 1 but got 2"):
        predict_next(model, [1, 2], [1, 2], 2)
    with pytest.raises(TypeError, match="integers"):
        predict_next(model, [1.5], [1], 2)


def test_module_predict_next_keeps_training_mode():
    module = tiny_module()
    module.train()
    p = module.predict_next([1, 2], [1, 0], [3, 4])
    assert module.training and p.shape == (2,)


def test_compile_switch_compiles_in_place_with_the_same_outputs(tmp_path):
    dm = KTDataModule(synthetic_students=60, max_len=20, batch_size=16)
    eager = tiny_module(max_len=20).eval()
    compiled = tiny_module(max_len=20, compile=True, compile_backend="aot_eager").eval()
    compiled.load_state_dict(eager.state_dict())
    t = trainer(max_epochs=1, default_root_dir=tmp_path)
    t.test(compiled, dm, verbose=False)  # the trainer's set-up compiles the model
    assert compiled.model._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    b = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(compiled(b["exercises"], b["responses"]), eager(b["exercises"], b["responses"]))


def test_compiled_model_trains_with_the_eager_gradients():
    dm = KTDataModule(synthetic_students=60, max_len=20, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    eager, compiled = tiny_module(max_len=20), tiny_module(max_len=20, compile=True, compile_backend="aot_eager")
    compiled.configure_model()  # what the trainer's set-up calls: compiles in place (the padded path is traced)
    assert compiled.model._compiled_call_impl is not None
    grads = []
    for module in (eager, compiled):
        loss, _ = module._shared_step(batch)
        grads.append(torch.autograd.grad(loss, list(module.model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
