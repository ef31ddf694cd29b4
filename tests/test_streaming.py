"""Streaming SAKT: equal to a full forward at every step, windows included; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_kt import SAKT, predict_next
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
