"""lit_kd.fused.fused_linear_divergence: the same values and gradients as the divergence of ``hidden @ weight.T``,
computed a chunk of tokens at a time, with the teacher given as logits or as hidden states and an LM head."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from lit_kd.fused import fused_linear_divergence
from lit_kd.losses import DIVERGENCES, forward_kl, generalized_jsd, reverse_kl, total_variation


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tensors here are tiny, and waking a thread pool on a busy shared CPU costs more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FNS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "tvd": total_variation}


def rand(*shape, seed=0, scale=1.0, dtype=torch.float64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unfused(name, hidden_s, weight_s, logits_t, mask=None, beta=0.5, temperature=1.0, bias_s=None):
    """The reference: the student's full logits, then the unchunked divergence."""
    logits_s = F.linear(hidden_s, weight_s, bias_s)  # (..., V)
    kwargs = dict(mask=mask, temperature=temperature)
    if name == "jsd":
        kwargs["beta"] = beta
    return FNS[name](logits_s, logits_t, **kwargs)


MASK = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])


@pytest.mark.parametrize("name", DIVERGENCES)
def test_equals_the_unfused_divergence_values_and_gradients(name):
    h, w, b = rand(2, 5, 4, seed=1), rand(7, 4, seed=2, scale=2.0), rand(7, seed=3)
    z_t = rand(2, 5, 7, seed=4, scale=2.0)
    inputs = [x.clone().requires_grad_() for x in (h, w, b)]
    expected = unfused(name, *inputs[:2], z_t, MASK, 0.3, 1.5, bias_s=inputs[2])
    expected_grads = torch.autograd.grad(expected, inputs)
    for chunk_size in (1, 3, 64):
        got = fused_linear_divergence(
            inputs[0], inputs[1], z_t, mask=MASK, divergence=name, beta=0.3, temperature=1.5, chunk_size=chunk_size,
            bias_s=inputs[2],
        )  # fmt: skip
        grads = torch.autograd.grad(got, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_with_teacher_logits_and_bias(name):
    h = rand(2, 5, 2, seed=5).requires_grad_()
    w = rand(4, 2, seed=6, scale=2.0).requires_grad_()
    b = rand(4, seed=7).requires_grad_()
    z_t = rand(2, 5, 4, seed=8, scale=2.0)
    temperature = torch.tensor([[0.8, 1.0, 1.2, 2.0, 1.0], [1.0, 0.6, 1.5, 1.0, 1.0]], dtype=torch.float64)
    assert gradcheck(
        lambda h, w, b: fused_linear_divergence(
            h, w, z_t, mask=MASK, divergence=name, beta=0.4, temperature=temperature, chunk_size=2, bias_s=b
        ),
        (h, w, b),
    )


def test_teacher_as_hidden_states_and_lm_head_equals_its_logits():
    h_s, w_s = rand(3, 4, 5, seed=9).requires_grad_(), rand(11, 5, seed=10).requires_grad_()
    h_t, w_t, b_t = rand(3, 4, 6, seed=11), rand(11, 6, seed=12), rand(11, seed=13)
    from_logits = fused_linear_divergence(h_s, w_s, F.linear(h_t, w_t, b_t), chunk_size=5, temperature=2.0)
    from_hidden = fused_linear_divergence(
        h_s, w_s, hidden_t=h_t, weight_t=w_t, bias_t=b_t, chunk_size=5, temperature=2.0
    )
    torch.testing.assert_close(from_hidden, from_logits, rtol=1e-12, atol=1e-14)
    grads_logits = torch.autograd.grad(from_logits, (h_s, w_s))
    grads_hidden = torch.autograd.grad(from_hidden, (h_s, w_s))
    for a, b in zip(grads_hidden, grads_logits):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    small_s, small_w = rand(3, 2, seed=28).requires_grad_(), rand(4, 2, seed=29).requires_grad_()
    small_t, small_w_t = rand(3, 3, seed=30), rand(4, 3, seed=31)
    assert gradcheck(
        lambda h, w: fused_linear_divergence(h, w, hidden_t=small_t, weight_t=small_w_t, chunk_size=2),
        (small_s, small_w),
    )


def test_teacher_inputs_get_no_gradient():
    h_s, w_s = rand(4, 3, seed=14).requires_grad_(), rand(5, 3, seed=15).requires_grad_()
    h_t, w_t = rand(4, 2, seed=16).requires_grad_(), rand(5, 2, seed=17).requires_grad_()
    fused_linear_divergence(h_s, w_s, hidden_t=h_t, weight_t=w_t, chunk_size=3).backward()
    assert h_s.grad is not None and w_s.grad is not None and h_t.grad is None and w_t.grad is None


def test_masked_tokens_do_not_count_and_all_false_gives_zero_with_a_gradient_path():
    w, z_t = rand(6, 4, seed=18).requires_grad_(), rand(2, 5, 6, seed=19)
    h1 = rand(2, 5, 4, seed=20)
    h2 = h1.clone()
    h2[~MASK] = rand(int((~MASK).sum()), 4, seed=21, scale=30.0)
    h1.requires_grad_(), h2.requires_grad_()
    l1 = fused_linear_divergence(h1, w, z_t, mask=MASK, chunk_size=2)
    l2 = fused_linear_divergence(h2, w, z_t, mask=MASK, chunk_size=2)
    assert torch.equal(l1.detach(), l2.detach())
    g1, gw1 = torch.autograd.grad(l1, (h1, w))
    g2, gw2 = torch.autograd.grad(l2, (h2, w))
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(gw1, gw2, rtol=0, atol=0)
    assert torch.count_nonzero(g1[~MASK]) == 0
    empty = fused_linear_divergence(h1, w, z_t, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.count_nonzero(h1.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_no_grad_gives_the_same_value():
    h, w, z_t = rand(6, 3, seed=22).requires_grad_(), rand(5, 3, seed=23).requires_grad_(), rand(6, 5, seed=24)
    with torch.no_grad():
        value = fused_linear_divergence(h, w, z_t, chunk_size=4)
    assert not value.requires_grad
    torch.testing.assert_close(value, fused_linear_divergence(h, w, z_t, chunk_size=4).detach())


def test_bfloat16_inputs_give_a_float32_loss_and_bfloat16_gradients():
    h32, w32, z32 = rand(8, 16, seed=25, dtype=torch.float32), rand(40, 16, seed=26, dtype=torch.float32), None
    z32 = rand(8, 40, seed=27, dtype=torch.float32)
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    loss = fused_linear_divergence(h, w, z32.bfloat16(), chunk_size=3)
    assert loss.dtype == torch.float32
    reference = generalized_jsd(F.linear(h.detach(), w.detach()).float(), z32.bfloat16().float())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "Expected either `logits_t` or both `hidden_t` and `weight_t` for the teacher but got neither."),
        (
            dict(logits_t=rand(2, 5, 6), hidden_t=rand(2, 5, 3), weight_t=rand(6, 3)),
            "Expected either `logits_t` or both `hidden_t` and `weight_t` for the teacher but got both.",
        ),
        (dict(hidden_t=rand(2, 5, 3)), "Expected both `hidden_t` and `weight_t` for the teacher but got only one"),
        (dict(logits_t=rand(2, 5, 7)), "Expected `logits_t` to have shape (2, 5, 6) (`hidden_s` without D, then V"),
        (dict(logits_t=rand(2, 5, 6), mask=torch.ones(2, 4, dtype=torch.bool)), "Expected `mask` to have shape (2, 5)"),
        (dict(logits_t=rand(2, 5, 6), chunk_size=0), "Expected `chunk_size` to be None or an integer > 0 but got 0."),
        (dict(logits_t=rand(2, 5, 6), chunk_size=None), "Expected `chunk_size` to be an integer > 0 but got None."),
        (dict(logits_t=rand(2, 5, 6), beta=2.0), "Expected `beta` to be a float in [0, 1] but got 2.0."),
        (dict(logits_t=rand(2, 5, 6), divergence="kl"), "Expected `divergence` to be one of 'forward_kl'"),
        (dict(logits_t=rand(2, 5, 6), bias_s=rand(5)), "Expected `bias_s` to have shape (6,) (the rows of `weight_s`)"),
        (
            dict(hidden_t=rand(2, 5, 3), weight_t=rand(7, 3)),
            "Expected `hidden_t` and `weight_t` to give logits of the student's shape (2, 5, 6) but got (2, 5, 3) and "
            "(7, 3).",
        ),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fused_linear_divergence(rand(2, 5, 4), rand(6, 4), **kwargs)


def test_width_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"with the same D but got \(2, 5, 4\) and \(6, 3\)"):
        fused_linear_divergence(rand(2, 5, 4), rand(6, 3), rand(2, 5, 6))
