"""SAKT and DKT: shapes, causality, padding invariance, attention weights, argument errors."""

from __future__ import annotations

import pytest
import torch

from lit_kt.models import DKT, SAKT

E, B, L = 20, 3, 12


def make_models():
    torch.manual_seed(0)
    return {
        "sakt": SAKT(E, d_model=16, num_heads=4, num_layers=2, max_len=L, dropout=0.1).eval(),
        "dkt": DKT(E, hidden_size=16, embedding_dim=8, num_layers=2, dropout=0.1).eval(),
    }


@pytest.fixture(params=["sakt", "dkt"])
def model(request):
    return make_models()[request.param]


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, E + 1, (B, L), generator=g), torch.randint(0, 2, (B, L), generator=g)


def test_shapes(model):
    ex, resp = batch()
    assert model(ex, resp).shape == (B, L)


@pytest.mark.parametrize("t", [0, 1, 5, L - 1])
def test_response_at_t_and_anything_later_does_not_reach_positions_up_to_t(model, t):
    ex, resp = batch()
    before = model(ex, resp)
    ex2, resp2 = ex.clone(), resp.clone()
    resp2[:, t] = 1 - resp2[:, t]
    ex2[:, t + 1 :] = torch.randint(1, E + 1, ex2[:, t + 1 :].shape)
    resp2[:, t + 1 :] = 1 - resp2[:, t + 1 :]
    after = model(ex2, resp2)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    if t + 1 < L:  # and the change is visible afterwards, so the test can fail
        assert not torch.allclose(after[:, t + 1], before[:, t + 1])


@pytest.mark.parametrize("t", [0, 4, L - 1])
def test_exercise_at_t_does_not_reach_earlier_positions(model, t):
    ex, resp = batch()
    before = model(ex, resp)
    ex2 = ex.clone()
    ex2[:, t] = ex2[:, t] % E + 1  # a different valid id
    after = model(ex2, resp)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t], before[:, t])  # position t itself depends on its exercise


def test_padding_never_changes_real_positions(model):
    ex, resp = batch()
    lengths = [L, 7, 1]
    padded_ex, padded_resp = ex.clone(), resp.clone()
    for row, n in enumerate(lengths):
        padded_ex[row, n:] = 0
        padded_resp[row, n:] = 0
    out = model(padded_ex, padded_resp)
    for row, n in enumerate(lengths):  # each row alone, unpadded
        alone = model(ex[row : row + 1, :n], resp[row : row + 1, :n])
        torch.testing.assert_close(out[row : row + 1, :n], alone, rtol=0, atol=1e-5)


def test_sakt_attention_weights_are_causal_distributions_and_match_fused_path():
    model = make_models()["sakt"]
    ex, resp = batch()
    logits, weights = model(ex, resp, return_attention=True)
    torch.testing.assert_close(logits, model(ex, resp), rtol=0, atol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (B, 4, L, L)
    w = weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones(B, 4, L))
    assert torch.all(w.triu(diagonal=1) == 0)  # no weight on the future


def test_sakt_first_block_weights_against_hand_computation():
    torch.manual_seed(3)
    model = SAKT(E, d_model=8, num_heads=2, num_layers=1, max_len=L, dropout=0.0).eval()
    ex, resp = batch()
    _, (w,) = model(ex, resp, return_attention=True)
    # Independent recomputation of the block's weights from the parameters.
    inter = ex + E * resp
    kv = torch.cat([model.start.expand(B, 1, -1), model.interaction_emb(inter[:, :-1])], 1) + model.position_emb.weight
    q = model.exercise_emb(ex) @ model.blocks[0].q_proj.weight.T + model.blocks[0].q_proj.bias
    k = (kv @ model.blocks[0].kv_proj.weight.T + model.blocks[0].kv_proj.bias)[..., :8]
    for h in range(2):
        qh, kh = q[..., h * 4 : (h + 1) * 4], k[..., h * 4 : (h + 1) * 4]
        scores = qh @ kh.transpose(1, 2) / 2.0
        scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(w[:, h], scores.softmax(-1), rtol=1e-5, atol=1e-6)


def test_sakt_rejects_too_long_sequences_and_bad_arguments():
    model = make_models()["sakt"]
    ex = torch.ones(1, L + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"max_len \(12\).*length 13"):
        model(ex, ex)
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        SAKT(E, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="`num_exercises`"):
        DKT(0)


def test_dkt_reads_the_predicted_exercise_logit():
    """DKT's logit at t is the output unit of exercises[t]: swapping only that id changes only position t."""
    model = make_models()["dkt"]
    ex, resp = batch()
    h, _ = model.lstm(torch.cat([model.start.expand(B, 1, -1), model.interaction_emb((ex + E * resp)[:, :-1])], dim=1))
    expected = (model.head(h)).gather(-1, ex.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model(ex, resp), expected)


def test_sakt_attention_dropout_is_its_own_setting():
    ex, resp = batch()
    only_attention = SAKT(E, d_model=16, num_heads=4, max_len=L, dropout=0.0, attention_dropout=0.5).train()
    assert not torch.allclose(only_attention(ex, resp), only_attention(ex, resp))  # the attention draws masks
    none = SAKT(E, d_model=16, num_heads=4, max_len=L, dropout=0.0, attention_dropout=0.0).train()
    torch.testing.assert_close(none(ex, resp), none(ex, resp))
    inherits = SAKT(E, d_model=16, num_heads=4, max_len=L, dropout=0.3)
    assert inherits.blocks[0].attention_dropout == 0.3 and inherits.config["attention_dropout"] is None
