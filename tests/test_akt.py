"""AKT: causality, padding invariance, Rasch embeddings, the monotonic attention, and AKT in the Lightning system."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_kt import AKT, AKTModule, KTDataModule, KTModule, kt_adaptor, predict_next
from lit_kt.cli import KTCLI, build_cli
from lit_kt.models import monotonic_attention

E, Q, B, T = 20, 30, 3, 12
AKT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("akt_*.yaml"))


def make_model(num_questions: int = Q, seed: int = 0) -> AKT:
    torch.manual_seed(seed)
    model = AKT(E, num_questions=num_questions, d_model=16, num_heads=4, d_ff=32, dropout=0.1).eval()
    if num_questions:  # non-zero difficulties, so that the question ids matter
        with torch.no_grad():
            model.difficulty.weight[1:].normal_()
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(1, E + 1, (B, T), generator=g)
    resp = torch.randint(0, 2, (B, T), generator=g)
    return ex, resp, torch.randint(1, Q + 1, (B, T), generator=g)


def test_shapes_attributes_and_config():
    model = make_model()
    ex, resp, q = batch()
    assert model(ex, resp, q).shape == (B, T) and model(ex, resp).shape == (B, T)
    assert model.num_exercises == E and model.num_questions == Q and model.max_len is None
    rebuilt = AKT(**model.config)
    assert rebuilt.config == model.config
    logits, weights = model(ex, resp, q, return_attention=True)
    assert len(weights) == 2 and weights[0].shape == (B, 4, T, T)
    assert AKT(E).num_questions == 0 and not hasattr(AKT(E), "difficulty")


@pytest.mark.parametrize("t", [0, 1, 5, T - 1])
@pytest.mark.parametrize("with_questions", [False, True])
def test_response_at_t_and_anything_later_does_not_reach_positions_up_to_t(t, with_questions):
    model = make_model()
    ex, resp, q = batch()
    q = q if with_questions else None
    before = model(ex, resp, q)
    ex2, resp2 = ex.clone(), resp.clone()
    resp2[:, t:] = 1 - resp2[:, t:]
    ex2[:, t + 1 :] = ex2[:, t + 1 :] % E + 1
    q2 = None if q is None else torch.cat([q[:, : t + 1], q[:, t + 1 :] % Q + 1], dim=1)
    after = model(ex2, resp2, q2)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    if t + 1 < T:  # and the change is visible afterwards, so the test can fail
        assert not torch.allclose(after[:, t + 1], before[:, t + 1])


@pytest.mark.parametrize("t", [0, 4, T - 1])
def test_exercise_and_question_at_t_reach_t_but_no_earlier_position(t):
    model = make_model()
    ex, resp, q = batch()
    before = model(ex, resp, q)
    ex2, q2 = ex.clone(), q.clone()
    ex2[:, t] = ex2[:, t] % E + 1
    after = model(ex2, resp, q)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t], before[:, t])  # position t itself depends on its exercise
    q2[:, t] = q2[:, t] % Q + 1
    after = model(ex, resp, q2)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t], before[:, t])  # and on its question's difficulty


@pytest.mark.parametrize("with_questions", [False, True])
def test_padding_never_changes_real_positions(with_questions):
    model = make_model()
    ex, resp, q = batch()
    lengths = [T, 7, 1]
    padded = [x.clone() for x in (ex, resp, q)]
    for row, n in enumerate(lengths):
        for x in padded:
            x[row, n:] = 0
    out = model(padded[0], padded[1], padded[2] if with_questions else None)
    for row, n in enumerate(lengths):  # each row alone, unpadded
        alone = model(ex[row : row + 1, :n], resp[row : row + 1, :n], q[row : row + 1, :n] if with_questions else None)
        torch.testing.assert_close(out[row : row + 1, :n], alone, rtol=0, atol=1e-5)
    # A row padded far beyond its length, and a batch whose rows are all short, give the same real logits.
    longer = [torch.nn.functional.pad(x[1:2], (0, 20)) for x in padded]
    torch.testing.assert_close(model(*longer[:2])[:, :7], model(padded[0][1:2, :7], padded[1][1:2, :7]))
    short = model(padded[0][1:], padded[1][1:])
    assert torch.all(short[:, 7:] == 0)  # the CPU path cuts the batch at its longest row, 0 after it


def test_cut_fast_path_matches_the_padded_path():
    model = make_model()
    ex, resp, q = batch()
    ex[:, 8:], resp[:, 8:], q[:, 8:] = 0, 0, 0
    fast = model(ex, resp, q)
    full, _ = model(ex, resp, q, return_attention=True)  # return_attention runs on the padded tensors
    torch.testing.assert_close(fast[:, :8], full[:, :8], rtol=0, atol=1e-6)


def test_zero_difficulties_equal_the_concept_only_model():
    model = make_model(num_questions=Q)
    with torch.no_grad():
        model.difficulty.weight.zero_()
    ex, resp, q = batch()
    torch.testing.assert_close(model(ex, resp, q), model(ex, resp), rtol=0, atol=0)
    assert model.regularization().item() == 0.0
    fresh = AKT(E, num_questions=Q, d_model=16, num_heads=4)  # mu starts at 0
    assert torch.all(fresh.difficulty.weight == 0)
    with torch.no_grad():
        model.difficulty.weight[3] = 2.0
        model.difficulty.weight[5] = -1.0
    assert model.regularization().item() == pytest.approx(5.0)
    q[:, 0] = 3
    assert not torch.allclose(model(ex, resp, q)[:, 0], model(ex, resp)[:, 0])
    assert AKT(E).regularization().item() == 0.0


def test_rasch_gradients_reach_the_difficulties():
    model = make_model().train()
    ex, resp, q = batch()
    (model(ex, resp, q).sum() + model.regularization()).backward()
    used = torch.unique(q)
    assert torch.all(model.difficulty.weight.grad[used] != 0)
    assert torch.all(model.difficulty.weight.grad[0] == 0)  # padding id


def test_argument_errors():
    ex, resp, q = batch()
    with pytest.raises(ValueError, match="num_questions=0"):
        make_model(num_questions=0)(ex, resp, q)
    with pytest.raises(ValueError, match="shape"):
        make_model()(ex, resp, q[:, :-1])
    with pytest.raises(ValueError, match="divisible"):
        AKT(E, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="num_exercises"):
        AKT(0)
    with pytest.raises(ValueError, match="num_retriever_layers"):
        AKT(E, num_retriever_layers=0)


def test_gradient_flows_to_every_decay_rate():
    model = make_model().train()
    ex, resp, q = batch()
    model(ex, resp, q).sum().backward()
    blocks = [*model.question_encoder, *model.interaction_encoder, *model.retriever]
    for block in blocks:
        assert block.theta_raw.grad is not None and torch.all(block.theta_raw.grad != 0)
        assert torch.all(block.theta >= 0)


def test_attention_rows_are_causal_distributions_and_the_first_retriever_row_is_zero():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    theta = torch.tensor([0.0, 0.3, 2.0])
    for strict in (False, True):
        out, w = monotonic_attention(q, k, v, theta, strict=strict)
        allowed = torch.ones(9, 9, dtype=torch.bool).tril(-1 if strict else 0)
        assert torch.all(w[..., ~allowed] == 0)
        sums = w.sum(-1)
        expected = torch.ones(9)
        if strict:
            expected[0] = 0
            assert torch.all(out[:, :, 0] == 0)
        torch.testing.assert_close(sums, expected.expand_as(sums))


def test_attention_against_hand_computation():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 5, 2, generator=g, dtype=torch.float64) for _ in range(3))
    theta = torch.tensor([0.7], dtype=torch.float64)
    for strict in (False, True):
        _, w = monotonic_attention(q, k, v, theta, strict=strict)
        for t in range(1 if strict else 0, 5):
            keys = list(range(t if strict else t + 1))
            s = torch.stack([q[0, 0, t] @ k[0, 0, j] / 2**0.5 for j in keys])
            gamma = s.softmax(0)
            # d(t, tau) = |t - tau| * (attention mass on the allowed keys after tau)
            d = torch.stack([abs(t - j) * gamma[j + 1 :].sum() for j in keys])
            expected = (s * torch.exp(-theta * d)).softmax(0)
            torch.testing.assert_close(w[0, 0, t, keys], expected)


def test_a_large_decay_concentrates_attention_on_recent_positions():
    L_ = 16
    # Equal positive scores (4.5): without decay every allowed key weighs the same. The decay multiplies the
    # score, so it can only pull a key's score down to 0: how far attention concentrates depends on the score.
    q = k = torch.full((1, 2, L_, 4), 1.5)
    v = torch.randn(1, 2, L_, 4)
    _, w = monotonic_attention(q, k, v, torch.tensor([0.0, 50.0]), strict=True)
    last = w[0, :, -1, :-1]  # query L-1 over keys 0..L-2
    torch.testing.assert_close(last[0], torch.full((L_ - 1,), 1 / (L_ - 1)))  # theta = 0: uniform
    assert torch.all(last[1, 1:] >= last[1, :-1] - 1e-7)  # theta large: non-decreasing towards the most recent key
    # The most recent key has distance 0, the others' scores fall to 0: e^4.5 / (e^4.5 + 14) = 0.865 at most.
    assert last[1, -1] > 0.85 and last[1, -1] > 50 * last[1, 0]
    # and more decay, more weight on the most recent key
    recent = [monotonic_attention(q, k, v, torch.tensor([th, th]), strict=True)[1][0, 0, -1, -2] for th in (0.1, 1, 5)]
    assert recent[0] < recent[1] < recent[2]


def tiny_akt_module(**kwargs) -> AKTModule:
    torch.manual_seed(0)
    return AKTModule(AKT(50, d_model=16, num_heads=2, d_ff=32), **kwargs)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_akt_module_trains_logs_val_auc_and_round_trips_a_checkpoint(tmp_path):
    dm = KTDataModule(synthetic_students=120, synthetic_seq_len=30, max_len=20, batch_size=32)
    module = tiny_akt_module(l2=1e-3)
    before = [p.detach().clone() for p in module.model.parameters()]
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=4)
    t.fit(module, dm)
    assert 0.0 <= float(t.callback_metrics["val/auc"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))
    path = tmp_path / "akt.ckpt"
    t.save_checkpoint(path)
    b = next(iter(dm.test_dataloader()))
    module.eval()
    expected = module(b["exercises"], b["responses"])
    for cls in (KTModule, AKTModule):
        loaded = cls.load_from_checkpoint(path).eval()
        assert type(loaded.model) is AKT and loaded.model.config == module.model.config
        torch.testing.assert_close(loaded(b["exercises"], b["responses"]), expected)
    assert AKTModule.load_from_checkpoint(path).l2 == 1e-3
    # The logits fit the KD adaptor of lit_kt.distillation.
    out = kt_adaptor(b, expected)
    assert out["logits"].shape == out["logits_mask"].shape == b["mask"].shape


def test_akt_module_adds_the_l2_penalty_to_the_training_loss_only():
    torch.manual_seed(0)
    model = AKT(10, num_questions=5, d_model=8, num_heads=2)
    with torch.no_grad():
        model.difficulty.weight[1:] = 1.0  # sum(mu^2) = 5
    module = AKTModule(model, l2=0.1).eval()  # no dropout: the two losses below see the same logits
    assert module.penalty().item() == pytest.approx(0.5)
    batch_ = {
        "exercises": torch.randint(1, 11, (2, 6)),
        "responses": torch.randint(0, 2, (2, 6)),
        "mask": torch.ones(2, 6, dtype=torch.bool),
    }
    bce, _ = module._shared_step(batch_)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    assert float(module.training_step(batch_, 0)) == pytest.approx(float(bce) + 0.5)
    assert AKTModule(AKT(10), l2=0.0).penalty() == 0.0 and KTModule(AKT(10)).penalty() == 0.0
    with pytest.raises(ValueError, match="l2"):
        AKTModule(AKT(10), l2=-1.0)


def test_predict_next_reads_the_whole_history():
    model = make_model(num_questions=0)
    hist_ex, hist_resp = [3, 5, 3, 7, 1, 2, 9, 4], [1, 0, 1, 1, 0, 0, 1, 1]
    cands = [3, E, 1]
    got = predict_next(model, hist_ex, hist_resp, cands)
    for i, c in enumerate(cands):
        logits = model(torch.tensor([hist_ex + [c]]), torch.tensor([hist_resp + [0]]))
        assert got[i].item() == pytest.approx(torch.sigmoid(logits[0, -1]).item(), abs=1e-6)
    assert predict_next(model, [], [], 5).shape == (1,)  # empty history: the question alone


class ParseOnly(KTCLI):
    """Parses and validates a config without reading data or building anything."""

    def instantiate_classes(self) -> None:
        pass


def test_the_akt_configs_are_shipped_and_parse():
    assert {c.name for c in AKT_CONFIGS} == {"akt_assist2009.yaml", "akt_statics2011.yaml"}
    for config in AKT_CONFIGS:
        model = build_cli(["--config", str(config)], run=False, cli_class=ParseOnly).config.model
        assert model.class_path == "lit_kt.AKTModule" and model.init_args.model.class_path == "lit_kt.AKT"
