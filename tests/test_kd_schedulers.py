"""lit_kd.schedulers: weight schedules at fixed progress points; flsw/cwsm against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_kd.losses import kd_ce
from lit_kd.schedulers import (
    WEIGHT_SCHEDULES,
    constant,
    constant_temperature,
    cwsm_temperature,
    flsw_temperature,
    linear_decay,
    linear_growth,
    temperature_schedule,
    weight_schedule,
)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [(constant, (1.0, 1.0, 1.0)), (linear_decay, (1.0, 0.75, 0.0)), (linear_growth, (0.0, 0.25, 1.0))],
)
def test_weight_schedules_at_fixed_progress(fn, expected):
    assert tuple(fn(p) for p in (0.0, 0.25, 1.0)) == expected
    assert weight_schedule(fn.__name__) is fn
    assert (fn(-0.5), fn(1.5)) == (fn(0.0), fn(1.0))  # progress is clipped to [0, 1]


def test_weight_schedule_rejects_unknown_names():
    message = (
        "Expected the weight schedule to be one of 'constant', 'linear_decay', 'linear_growth', 'first_stage', "
        "'second_stage' but got 'cosine'."
    )
    with pytest.raises(ValueError) as error:
        weight_schedule("cosine")
    assert str(error.value) == message
    assert set(WEIGHT_SCHEDULES) == {"constant", "linear_decay", "linear_growth", "first_stage", "second_stage"}


def test_constant_temperature_is_per_sample():
    logits = torch.randn(2, 3, 5)
    t = constant_temperature(logits, logits, 4.0)
    assert t.shape == (2, 3) and torch.all(t == 4.0)


def test_flsw_hand_computed():
    # cos(s, t) = 1, 0 and 1/2, so w = (1 - cos) ** 2 = 0, 1 and 1/4; mean(w) = 5/12.
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, math.sqrt(3.0)]], dtype=torch.float64)
    t = flsw_temperature(zs, zt, base_temperature=4.0, beta=2.0, gamma=2.0)
    expected = [4 + 2 * (5 / 12 - w) for w in (0.0, 1.0, 0.25)]
    assert t.shape == (3,)
    assert t.tolist() == pytest.approx(expected, rel=1e-12)
    assert t.mean().item() == pytest.approx(4.0)  # the batch mean stays at the base
    # gamma = 1: w = 0, 1, 1/2.
    t = flsw_temperature(zs, zt, base_temperature=4.0, beta=1.0, gamma=1.0)
    assert t.tolist() == pytest.approx([4 + 0.5, 4 - 0.5, 4.0], rel=1e-12)


def test_flsw_token_level_with_mask_against_a_loop():
    zs, zt = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s, t = zs.numpy(), zt.numpy()
    w = np.array(
        [
            [(1 - s[b, i] @ t[b, i] / (np.linalg.norm(s[b, i]) * np.linalg.norm(t[b, i]))) ** 1.5 for i in range(4)]
            for b in range(2)
        ]
    )
    mean = w[mask.numpy()].mean()
    temps = flsw_temperature(zs, zt, 3.0, beta=0.5, gamma=1.5, mask=mask)
    assert temps.shape == (2, 4)
    np.testing.assert_allclose(temps.numpy(), 3.0 + 0.5 * (mean - w), rtol=1e-12)
    # Padded tokens do not move the valid tokens' temperatures.
    zs_garbage = zs.masked_fill(~mask[..., None], 5.0)
    valid_before = temps[mask]
    assert torch.allclose(flsw_temperature(zs_garbage, zt, 3.0, 0.5, 1.5, mask=mask)[mask], valid_before)


def test_cwsm_hand_computed():
    # Student top probabilities 1/2 and 3/4: w = 2 and 4/3 (eps = 0), mean 5/3.
    zs = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    zt = torch.randn(2, 2, dtype=torch.float64)
    t = cwsm_temperature(zs, zt, base_temperature=4.0, beta=1.0, eps=0.0)
    assert t.tolist() == pytest.approx([4 - 1 / 3, 4 + 1 / 3], rel=1e-12)
    # TextBrewer's eps = 1e-3 by default; the teacher's logits are not used.
    w = [1 / (0.5 + 1e-3), 1 / (0.75 + 1e-3)]
    expected = [4 + 3 * (np.mean(w) - x) for x in w]
    assert cwsm_temperature(zs, zt, 4.0, beta=3.0).tolist() == pytest.approx(expected, rel=1e-12)
    assert cwsm_temperature(zs, -zt, 4.0, beta=3.0).tolist() == pytest.approx(expected, rel=1e-12)


def test_temperatures_are_detached_floored_and_usable_by_the_losses():
    zs = torch.randn(4, 3, 5, requires_grad=True)
    zt = torch.randn(4, 3, 5)
    for fn in (flsw_temperature, cwsm_temperature):
        t = fn(zs, zt, 2.0, 1.0) if fn is cwsm_temperature else fn(zs, zt, 2.0, 1.0, 2.0)
        assert t.shape == (4, 3) and not t.requires_grad
        kd_ce(zs, zt, t).backward()
        assert torch.isfinite(zs.grad).all()
    # Identical then opposite logits: w = 0 and 2, so TextBrewer's formula gives T = 2.5 and 1 + 1.5 * (1 - 2) < 0.
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    zt = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    t = flsw_temperature(zs, zt, 1.0, beta=1.5, gamma=1.0, min_temperature=0.1)
    assert t.tolist() == pytest.approx([2.5, 0.1])


def test_temperature_schedule_binds_parameters():
    zs, zt = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(temperature_schedule("constant")(zs, zt, 2.0), torch.full((3,), 2.0))
    flsw = temperature_schedule("flsw", flsw_beta=0.5, flsw_gamma=3.0)
    assert torch.equal(flsw(zs, zt, 2.0), flsw_temperature(zs, zt, 2.0, beta=0.5, gamma=3.0))
    cwsm = temperature_schedule("cwsm", cwsm_beta=0.7)
    mask = torch.tensor([True, True, False])
    assert torch.equal(cwsm(zs, zt, 2.0, mask=mask), cwsm_temperature(zs, zt, 2.0, beta=0.7, mask=mask))
    with pytest.raises(ValueError, match="Expected the temperature schedule to be one of 'constant', 'flsw', 'cwsm'"):
        temperature_schedule("annealing")
    with pytest.raises(ValueError, match=r"Expected `mask` to have shape \(3,\)"):
        cwsm(zs, zt, 2.0, mask=torch.ones(4, dtype=torch.bool))


def test_flsw_eps_normalises_as_textbrewer():
    zs = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[4.0, 3.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    eps = 1e-4
    # v = z / (|z| + eps): <v, t> = 24 / ((5 + eps) * (5 + eps)), 0 (a zero row stays finite), 0
    w = [(1 - 24 / (5 + eps) ** 2) ** 2, 1.0, 1.0]
    t = flsw_temperature(zs, zt, base_temperature=4.0, beta=1.0, gamma=2.0, eps=eps)
    assert t.tolist() == pytest.approx([4 + (sum(w) / 3 - wi) for wi in w], rel=1e-12)
    exact = flsw_temperature(zs, zt, base_temperature=4.0, beta=1.0, gamma=2.0)  # unit vectors: 24 / 25
    w = [(1 - 24 / 25) ** 2, 1.0, 1.0]
    assert exact.tolist() == pytest.approx([4 + (sum(w) / 3 - wi) for wi in w], rel=1e-12)
    bound = temperature_schedule("flsw", flsw_beta=1.0, flsw_gamma=2.0, flsw_eps=eps)
    assert torch.equal(bound(zs, zt, 4.0), t)
