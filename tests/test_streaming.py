"""Streaming SAKT: equal to a full forward at every step, windows included; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_kt import SAKT, KTModule, predict_next
from lit_kt.streaming import SAKTStream


@pytest.mark.parametrize("num_layers, max_len", [(1, 6), (2, 9), (1, 1)])
def test_every_step_equals_a_full_forward(num_layers, max_len):
    torch.manual_seed(0)
    model = SAKT(12, d_model=16, num_heads=4, num_layers=num_layers, max_len=max_len, dropout=0.3)
    rng = np.random.default_rng(0)
    ex, resp = rng.integers(1, 13, 40).tolist(), rng.integers(0, 2, 40).tolist()
    stream = SAKTStream(model)
    cands = [1, 7, 12]
    torch.testing.assert_close(stream.predict(cands), predict_next(model, [], [], cands), rtol=0, atol=1e-5)
    for t in range(40):  # past the window many times: exercises the slide of the buffer
        got = stream.step(ex[t], resp[t], cands)
        expected = predict_next(model, ex[: t + 1], resp[: t + 1], cands)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert len(stream) == min(t + 1, max_len - 1)


def test_starting_history_and_reset():
    torch.manual_seed(1)
    model = SAKT(12, d_model=8, num_heads=2, max_len=10)
    stream = SAKTStream(model, [3, 4, 5], [1, 0, 1])
    torch.testing.assert_close(stream.predict(6), predict_next(model, [3, 4, 5], [1, 0, 1], 6), rtol=0, atol=1e-5)
    stream.reset()
    assert len(stream) == 0
    torch.testing.assert_close(stream.predict(6), predict_next(model, [], [], 6), rtol=0, atol=1e-5)


def test_errors():
    stream = SAKTStream(SAKT(12, d_model=8, num_heads=2, max_len=10))
    with pytest.raises(ValueError, match=r"`exercise` ids between 1 and num_exercises \(12\) but got 13"):
        stream.append(13, 1)
    with pytest.raises(ValueError, match="`response` to be 0 or 1 but got 2"):
        stream.append(3, 2)
    with pytest.raises(ValueError, match="`candidates` ids .* got 0 at position 1"):
        stream.predict([1, 0])
    with pytest.raises(TypeError, match="SAKT"):
        SAKTStream(torch.nn.Linear(2, 2))


def test_the_block_methods_compose_to_its_forward():
    torch.manual_seed(2)
    block = SAKT(12, d_model=16, num_heads=4, max_len=7).blocks[0].eval()
    query, interactions = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    k, v = block.project_kv(interactions)  # 2 x (2, 7, 16)
    attn, weights = block.attend(block.project_q(query), k, v, need_weights=True)  # (2, 7, 4, 4), (2, 4, 7, 7)
    assert attn.shape == (2, 7, 4, 4) and weights.shape == (2, 4, 7, 7)
    expected, expected_weights = block(query, interactions, need_weights=True)
    torch.testing.assert_close(block.finish(query, attn), expected)
    torch.testing.assert_close(weights, expected_weights)
    # The affine split the stream relies on: project_kv(a + b) = project_kv(a, bias=False) + project_kv(b).
    for whole, part_a, part_b in zip(block.project_kv(k + v), block.project_kv(k, bias=False), block.project_kv(v)):
        torch.testing.assert_close(whole, part_a + part_b)
    # Non-causal attention of the last position equals the causal attention's last row.
    last, _ = block.attend(block.project_q(query[:, -1:]), k, v, causal=False)  # (2, 1, 4, 4)
    torch.testing.assert_close(last, attn[:, -1:])


def test_a_ktmodule_wrapping_a_sakt_is_accepted():
    torch.manual_seed(3)
    model = SAKT(12, d_model=8, num_heads=2, max_len=10)
    stream = SAKTStream(KTModule(model), [3, 4, 5], [1, 0, 1])
    assert stream.model is model
    torch.testing.assert_close(
        stream.predict([6, 7]), predict_next(model, [3, 4, 5], [1, 0, 1], [6, 7]), rtol=0, atol=1e-5
    )


def test_candidates_must_be_integers():
    stream = SAKTStream(SAKT(12, d_model=8, num_heads=2, max_len=10), [3], [1])
    expected = stream.predict([2, 5])
    for bad, where in [(2.9, ""), ([2, 5.0], " at position 1"), (np.array([2.5]), " at position 0")]:
        with pytest.raises(TypeError, match=rf"`candidates` to hold integer exercise ids but got .*{where}\.$"):
            stream.predict(bad)
    with pytest.raises(TypeError, match="`candidates`"):
        stream.predict(torch.tensor(2.9))
    with pytest.raises(TypeError, match="`candidates`"):
        stream.predict([True])
    with pytest.raises(TypeError, match="`exercise` to hold integer exercise ids but got 3.5.$"):
        stream.append(3.5, 1)
    # Integer types of NumPy and torch, iterables, and one scalar all work.
    for good in [np.array([2, 5]), torch.tensor([2, 5]), [np.int64(2), torch.tensor(5)], iter([2, 5])]:
        torch.testing.assert_close(stream.predict(good), expected)
    torch.testing.assert_close(stream.predict(np.int32(5)), expected[1:])


def test_errors_name_the_right_position():
    stream = SAKTStream(SAKT(12, d_model=8, num_heads=2, max_len=10))
    with pytest.raises(ValueError, match=r"`candidates` ids .* got 13 at position 2\.$"):
        stream.predict([1, 2, 13])
    with pytest.raises(ValueError, match=r"`candidates` ids .* got 0\.$"):  # one id: no position
        stream.predict(0)
    with pytest.raises(ValueError, match=r"`exercise` ids .* got 13\.$"):
        stream.append(13, 1)
    with pytest.raises(ValueError, match="at least one id in `candidates`"):
        stream.predict([])


def test_changed_weights_are_detected_and_refresh_recomputes_the_cache():
    torch.manual_seed(4)
    model = SAKT(12, d_model=8, num_heads=2, max_len=4)
    ex, resp = [3, 4, 5, 6, 7], [1, 0, 1, 1, 0]  # longer than the window: refresh keeps the last max_len - 1
    stream = SAKTStream(model, ex, resp)
    before = stream.predict([2, 9])

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(torch.tensor([ex[:4]]), torch.tensor([resp[:4]])).sum().backward()
    opt.step()
    model.eval()
    with pytest.raises(RuntimeError, match=r"weights changed.*refresh\(\)"):
        stream.predict([2, 9])
    with pytest.raises(RuntimeError, match=r"refresh\(\)"):
        stream.append(2, 1)
    stream.refresh()
    after = stream.predict([2, 9])
    torch.testing.assert_close(after, predict_next(model, ex, resp, [2, 9]), rtol=0, atol=1e-5)
    assert not torch.allclose(after, before)
    assert len(stream) == 3

    with torch.no_grad():  # an in-place edit of one weight, and load_state_dict, are caught too
        model.blocks[0].kv_proj.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="refresh"):
        stream.predict(2)
    stream.refresh()
    model.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="refresh"):
        stream.predict(2)
    stream.refresh()
    torch.testing.assert_close(stream.predict(2), predict_next(model, ex, resp, 2), rtol=0, atol=1e-5)

    model.train()  # training mode would bring dropout in: refused, and refresh puts the model back in eval mode
    with pytest.raises(RuntimeError, match="training mode"):
        stream.predict(2)
    stream.refresh()
    assert not model.training
