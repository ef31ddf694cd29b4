"""lit_kd.losses' token-level LM divergences (forward/reverse KL, generalised JSD, total variation): hand-written
references, TRL's ``generalized_jsd_loss``, masks, the chunked path's values and gradients, and the config names."""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from lit_kd.config import DistillationConfig
from lit_kd.losses import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    kd_kl,
    per_token_divergence,
    per_token_divergence_grad,
    reverse_kl,
    total_variation,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tensors here are tiny, and waking a thread pool on a busy shared CPU costs more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FNS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "tvd": total_variation}


def rand(*shape, seed=0, scale=2.0, dtype=torch.float64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def call(name, logits_s, logits_t, beta=0.5, **kwargs):
    if name == "jsd":
        return generalized_jsd(logits_s, logits_t, beta=beta, **kwargs)
    return FNS[name](logits_s, logits_t, **kwargs)


# Independent per-token references (numpy, one token at a time).
def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def kl(p, q):
    return float((p * (np.log(p) - np.log(q))).sum())


def divergence_one(name, zs, zt, t, beta=0.5):
    p_s, p_t = softmax(np.asarray(zs) / t), softmax(np.asarray(zt) / t)
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return kl(p_t, p_s)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return kl(p_s, p_t)
    if name == "tvd":
        return 0.5 * float(np.abs(p_t - p_s).sum())
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def reference(name, zs, zt, mask, temperature, beta=0.5):
    """Mean over valid tokens of (B, L, V) logits; ``temperature`` a float or a (B, L) array."""
    values = []
    for b in range(zs.shape[0]):
        for i in range(zs.shape[1]):
            if mask is None or mask[b, i]:
                t = temperature if isinstance(temperature, float) else float(temperature[b, i])
                values.append(divergence_one(name, zs[b, i].numpy(), zt[b, i].numpy(), t, beta))
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------------------ hand-written values
def test_hand_computed_three_class_example():
    # P_t = (1/2, 1/4, 1/4) and a uniform student P_s = (1/3, 1/3, 1/3).
    logits_t = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]], dtype=torch.float64)
    logits_s = torch.zeros(1, 3, dtype=torch.float64)
    forward = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)
    reverse = 3 * (1 / 3) * math.log(1 / 3) - (1 / 3) * (math.log(0.5) + 2 * math.log(0.25))
    # beta = 1/2: M = (5/12, 7/24, 7/24).
    m = (5 / 12, 7 / 24, 7 / 24)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 2 * 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        (1 / 3) * math.log((1 / 3) / m[0]) + 2 * (1 / 3) * math.log((1 / 3) / m[1])
    )
    assert float(forward_kl(logits_s, logits_t)) == pytest.approx(forward, rel=1e-12)
    assert float(reverse_kl(logits_s, logits_t)) == pytest.approx(reverse, rel=1e-12)
    assert float(generalized_jsd(logits_s, logits_t)) == pytest.approx(jsd, rel=1e-12)
    assert float(total_variation(logits_s, logits_t)) == pytest.approx(1 / 6, rel=1e-12)  # (1/6 + 1/12 + 1/12) / 2


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_match_a_loop_over_valid_tokens(name, chunk_size):
    zs, zt = rand(2, 4, 5, seed=1), rand(2, 4, 5, seed=2)
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    temperatures = torch.tensor([[0.5, 1.0, 2.0, 3.0], [1.5, 0.7, 2.0, 1.0]], dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):
        for t in (1.0, 2.0, temperatures):
            expected = reference(name, zs, zt, mask.numpy(), t if isinstance(t, float) else t.numpy(), beta)
            got = call(name, zs, zt, beta=beta, mask=mask, temperature=t, chunk_size=chunk_size)
            assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12), (beta, t)
    unmasked = reference(name, zs, zt, None, 1.5, 0.3)
    assert float(call(name, zs, zt, beta=0.3, temperature=1.5, chunk_size=chunk_size)) == pytest.approx(unmasked)


def test_jsd_ends_are_exactly_the_kls_and_forward_kl_is_kd_kl():
    zs, zt = rand(3, 6, seed=3), rand(3, 6, seed=4)
    assert torch.equal(generalized_jsd(zs, zt, beta=0.0, temperature=2.0), forward_kl(zs, zt, temperature=2.0))
    assert torch.equal(generalized_jsd(zs, zt, beta=1.0, temperature=2.0), reverse_kl(zs, zt, temperature=2.0))
    assert torch.allclose(forward_kl(zs, zt, temperature=2.0), kd_kl(zs, zt, temperature=2.0))
    # Not scaled by T**2, unlike kd_kl(scale_by_temperature_squared=True).
    scaled = kd_kl(zs, zt, 2.0, scale_by_temperature_squared=True)
    assert torch.allclose(4 * forward_kl(zs, zt, temperature=2.0), scaled)


def test_divergences_are_zero_for_equal_distributions_and_tvd_is_at_most_one():
    z = rand(4, 7, seed=5)
    for name in DIVERGENCES:
        assert float(call(name, z, z + 3.0)) == pytest.approx(0.0, abs=1e-12)  # a shift leaves softmax unchanged
    far_s = torch.tensor([[100.0, 0.0]], dtype=torch.float64)
    assert float(total_variation(far_s, far_s.flip(-1))) == pytest.approx(1.0)


@pytest.mark.parametrize("form", ["(B, L)", "(B, L, 1)", "(B,)", "0-d"])
def test_temperature_forms_agree(form):
    zs, zt = rand(2, 3, 5, seed=6), rand(2, 3, 5, seed=7)
    per_sample = torch.tensor([0.5, 2.0], dtype=torch.float64)
    full = per_sample[:, None].expand(2, 3)
    given = {
        "(B, L)": full,
        "(B, L, 1)": full.unsqueeze(-1),
        "(B,)": per_sample,
        "0-d": torch.tensor(2.0, dtype=torch.float64),
    }[form]
    expected = full if form != "0-d" else torch.full((2, 3), 2.0, dtype=torch.float64)
    for chunk_size in (None, 4):
        got = generalized_jsd(zs, zt, beta=0.2, temperature=given, chunk_size=chunk_size)
        assert float(got) == pytest.approx(reference("jsd", zs, zt, None, expected.numpy(), 0.2), rel=1e-10)


# ----------------------------------------------------------------------------------------------------- TRL parity
@pytest.fixture(scope="module")
def trl_jsd():
    pytest.importorskip("trl", reason="TRL not installed (pip install trl); the parity test needs its GKDTrainer")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # TRL 1.x keeps the GKD trainer under trl.experimental
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            try:
                from trl import GKDTrainer
            except ImportError as e:  # e.g. TRL installed with --no-deps: no accelerate or datasets
                pytest.skip(f"TRL's GKDTrainer cannot be imported ({e}); pip install trl with its dependencies")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_trl(trl_jsd, beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature * 100))
    logits_s = (3 * torch.randn(2, 6, 50, generator=g)).requires_grad_()
    logits_t = 3 * torch.randn(2, 6, 50, generator=g)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[0, 4:] = -100  # padding and prompt tokens: TRL drops them and averages over the others
    labels[1, :2] = -100
    expected = trl_jsd(logits_s, logits_t, labels, beta=beta, temperature=temperature)
    (expected_grad,) = torch.autograd.grad(expected, logits_s)
    for chunk_size in (None, 5):
        got = generalized_jsd(logits_s, logits_t, labels != -100, beta, temperature, chunk_size)
        (grad,) = torch.autograd.grad(got, logits_s)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # (N, V) logits without labels: TRL's "batchmean" divides by N, the number of tokens here.
    flat_s, flat_t = logits_s.detach().reshape(12, 50), logits_t.reshape(12, 50)
    assert float(generalized_jsd(flat_s, flat_t, beta=beta, temperature=temperature)) == pytest.approx(
        float(trl_jsd(flat_s, flat_t, beta=beta, temperature=temperature)), rel=1e-5, abs=1e-5
    )


# ------------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_logits_change_neither_value_nor_gradient(name, chunk_size):
    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    zt = rand(2, 4, 6, seed=8)
    values, grads = [], []
    for seed in (9, 10):
        zs = rand(2, 4, 6, seed=11)
        zs[~mask] = rand(int((~mask).sum()), 6, seed=seed, scale=50.0)  # only the masked positions differ
        zs.requires_grad_()
        loss = call(name, zs, zt, beta=0.4, mask=mask, chunk_size=chunk_size)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, zs)[0])
    assert torch.equal(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert torch.count_nonzero(grads[0][~mask]) == 0


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_all_false_mask_gives_zero_with_a_gradient_path(name, chunk_size):
    zs = rand(2, 3, 4, seed=12).requires_grad_()
    loss = call(name, zs, rand(2, 3, 4, seed=13), mask=torch.zeros(2, 3, dtype=torch.bool), chunk_size=chunk_size)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(zs.grad) == 0


# ------------------------------------------------------------------------------------------------ chunked path
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_whole_and_chunked(name):
    zs, zt = rand(2, 3, 4, seed=14).requires_grad_(), rand(2, 3, 4, seed=15).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, False, True]])
    temperature = torch.tensor([[0.7, 1.0, 2.0], [1.3, 1.0, 0.9]], dtype=torch.float64)
    for chunk_size in (None, 2):
        # The teacher's logits get gradients too (the chunked path's backward computes them only when asked).
        assert gradcheck(
            lambda s, t: call(name, s, t, beta=0.3, mask=mask, temperature=temperature, chunk_size=chunk_size),
            (zs, zt),
        ), chunk_size


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_equals_unchunked_values_and_gradients(name):
    zs, zt = rand(3, 7, 11, seed=16).requires_grad_(), rand(3, 7, 11, seed=17)
    mask = rand(3, 7, seed=18) > -0.5
    whole = call(name, zs, zt, beta=0.7, mask=mask, temperature=1.7)
    (whole_grad,) = torch.autograd.grad(whole, zs)
    for chunk_size in (1, 4, 21, 1000):
        chunked = call(name, zs, zt, beta=0.7, mask=mask, temperature=1.7, chunk_size=chunk_size)
        (chunked_grad,) = torch.autograd.grad(chunked, zs)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-10, atol=1e-14)


def test_chunked_path_gives_the_teacher_a_gradient_only_when_asked_and_the_temperature_none():
    zs, zt = rand(4, 5, seed=19).requires_grad_(), rand(4, 5, seed=20)
    temperature = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    generalized_jsd(zs, zt, temperature=temperature, chunk_size=3).backward()
    assert zs.grad is not None and zt.grad is None and temperature.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast_chunk_by_chunk(dtype):
    zs32, zt32 = rand(2, 5, 9, seed=21, dtype=torch.float32), rand(2, 5, 9, seed=22, dtype=torch.float32)
    zs, zt = zs32.to(dtype).requires_grad_(), zt32.to(dtype)
    reference_loss = generalized_jsd(zs.detach().float(), zt.float())
    for chunk_size in (None, 4):
        loss = generalized_jsd(zs, zt, chunk_size=chunk_size)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, zs)
        assert grad.dtype == dtype


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_closed_form_gradient_equals_autograd(name, beta):
    zs, zt = rand(4, 6, seed=25).requires_grad_(), rand(4, 6, seed=26)
    temperature = torch.tensor([[0.5], [1.0], [2.0], [1.3]], dtype=torch.float64)
    per_token = per_token_divergence(zs, zt, name, beta, temperature)  # (4,)
    (expected,) = torch.autograd.grad(per_token.sum(), zs)  # row n: d per_token[n] / d zs[n]
    got = per_token_divergence_grad(zs.detach(), zt, name, beta, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    if name == "forward_kl":  # the textbook form (P_s - P_t) / T
        by_hand = (torch.softmax(zs.detach() / temperature, -1) - torch.softmax(zt / temperature, -1)) / temperature
        torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(beta=1.5), "Expected `beta` to be a float in [0, 1] but got 1.5."),
        (dict(beta=-0.1), "Expected `beta` to be a float in [0, 1] but got -0.1."),
        (dict(chunk_size=0), "Expected `chunk_size` to be None or an integer > 0 but got 0."),
        (dict(chunk_size=2.0), "Expected `chunk_size` to be None or an integer > 0 but got 2.0."),
        (dict(temperature=0.0), "Expected `temperature` to be > 0 but got 0.0."),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "Expected `mask` to have shape (2, 3)"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generalized_jsd(rand(2, 3, 4), rand(2, 3, 4), **kwargs)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"`logits_s` and `logits_t` to have the same shape but got \(2, 3, 4\) and "):
        forward_kl(rand(2, 3, 4), rand(2, 3, 5))
    with pytest.raises(ValueError, match="Expected `divergence` to be one of 'forward_kl', "):
        per_token_divergence(rand(2, 4), rand(2, 4), "js")


# ------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", DIVERGENCES)
def test_config_names_call_the_divergences_without_a_temperature_squared_factor(name):
    zs, zt = rand(2, 3, 6, seed=23, dtype=torch.float32), rand(2, 3, 6, seed=24, dtype=torch.float32)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    temperature = torch.full((2, 3), 2.0)  # what the temperature schedules give: one per token
    expected = call(name, zs, zt, beta=0.25, mask=mask, temperature=2.0)
    for chunk_size in (None, 2):
        cfg = DistillationConfig(
            kd_loss_type=name,
            temperature=2.0,
            jsd_beta=0.25,
            kd_chunk_size=chunk_size,
            scale_by_temperature_squared=True,  # ignored by the token-level divergences (TRL's convention)
        )
        torch.testing.assert_close(cfg.kd_loss(zs, zt, temperature, mask), expected)
        torch.testing.assert_close(cfg.kd_loss_fn()(zs, zt, temperature, mask), expected)
        # Per-token temperatures from a schedule, as the Distiller passes them: (B, L).
        flsw = DistillationConfig(kd_loss_type=name, temperature_scheduler="flsw", kd_chunk_size=chunk_size)
        per_token = flsw.temperature_fn()(zs, zt, flsw.temperature, mask=mask)
        assert per_token.shape == (2, 3)
        torch.testing.assert_close(
            flsw.kd_loss(zs, zt, per_token, mask), call(name, zs, zt, mask=mask, temperature=per_token)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(jsd_beta=1.2), "Expected `jsd_beta` to be in [0, 1] but got 1.2."),
        (dict(jsd_beta=True), "Expected `jsd_beta` to be in [0, 1] but got True."),
        (dict(kd_chunk_size=0), "Expected `kd_chunk_size` to be None or an integer > 0 but got 0."),
        (dict(kd_chunk_size=1.5), "Expected `kd_chunk_size` to be None or an integer > 0 but got 1.5."),
        (
            dict(kd_loss_type="ce", kd_chunk_size=64),
            "Expected `kd_chunk_size` to be None when `kd_loss_type` is not one of 'forward_kl', 'reverse_kl', 'jsd', "
            "'tvd' (only those are chunked) but got 64 with 'ce'.",
        ),
    ],
)
def test_config_validates_jsd_beta_and_chunk_size(kwargs, message):
    kwargs = {"kd_loss_type": "jsd", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillationConfig(**kwargs)
