"""lit_kd.losses: every loss against an independent computation (Python loops with numpy), masks, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_kd.losses import (
    attention_ce,
    attention_ce_textbrewer,
    attention_mse,
    attention_mse_textbrewer,
    cos,
    fsp,
    gram,
    hidden_mse,
    kd_bce,
    kd_ce,
    kd_kl,
    kd_mse,
    mmd,
    nst,
    pkd,
    shift_probability,
)

APPROX = dict(rel=1e-9, abs=1e-12)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Independent per-sample losses (numpy, one sample at a time).
def ce_one(zs, zt, t):
    return float(-(softmax(zt / t) * np.log(softmax(zs / t))).sum())


def kl_one(zs, zt, t):
    p, q = softmax(zt / t), softmax(zs / t)
    return float((p * (np.log(p) - np.log(q))).sum())


def mse_one(zs, zt, t):
    return [float((a / t - b / t) ** 2) for a, b in zip(zs, zt)]  # one term per class


def bce_one(zs, zt, t):
    q, p = sigmoid(zt / t), sigmoid(zs / t)
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# --------------------------------------------------------------------------------------------------- logits losses
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_ce_kl_mse_match_loops_over_samples(temperature):
    zs, zt = rand(6, 5, seed=1), rand(6, 5, seed=2)
    s, t = zs.numpy(), zt.numpy()
    assert kd_ce(zs, zt, temperature).item() == pytest.approx(
        np.mean([ce_one(s[n], t[n], temperature) for n in range(6)]), **APPROX
    )
    assert kd_kl(zs, zt, temperature).item() == pytest.approx(
        np.mean([kl_one(s[n], t[n], temperature) for n in range(6)]), **APPROX
    )
    terms = [v for n in range(6) for v in mse_one(s[n], t[n], temperature)]
    assert kd_mse(zs, zt, temperature).item() == pytest.approx(np.mean(terms), **APPROX)


def test_kd_ce_hand_computed_example():
    # Teacher [0, ln 3] -> p_t = (1/4, 3/4); student [0, 0] -> log p_s = log 1/2 for both classes.
    zt = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    zs = torch.zeros(1, 2, dtype=torch.float64)
    assert kd_ce(zs, zt).item() == pytest.approx(math.log(2.0), **APPROX)
    assert kd_kl(zs, zt).item() == pytest.approx(math.log(2.0) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert kd_kl(zt, zt).item() == pytest.approx(0.0, abs=1e-12)


def test_token_level_losses_honour_the_mask():
    zs, zt = rand(3, 4, 5, seed=3), rand(3, 4, 5, seed=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    valid = [(b, i) for b in range(3) for i in range(4) if mask[b, i]]
    s, t = zs.numpy(), zt.numpy()
    expected = {
        kd_ce: np.mean([ce_one(s[b, i], t[b, i], 2.0) for b, i in valid]),
        kd_kl: np.mean([kl_one(s[b, i], t[b, i], 2.0) for b, i in valid]),
        kd_mse: np.mean([v for b, i in valid for v in mse_one(s[b, i], t[b, i], 2.0)]),
    }
    garbage_s, garbage_t = zs.clone(), zt.clone()
    garbage_s[~mask], garbage_t[~mask] = 1e3, -1e3
    for fn, value in expected.items():
        assert fn(zs, zt, 2.0, mask).item() == pytest.approx(value, **APPROX)
        assert fn(garbage_s, garbage_t, 2.0, mask).item() == pytest.approx(value, **APPROX)


@pytest.mark.parametrize("fn", [kd_ce, kd_kl, kd_mse])
def test_per_sample_temperature_equals_looping_with_scalars(fn):
    zs, zt = rand(5, 4, seed=5), rand(5, 4, seed=6)
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    loop = np.mean([fn(zs[n : n + 1], zt[n : n + 1], float(temps[n])).item() for n in range(5)])
    assert fn(zs, zt, temps).item() == pytest.approx(loop, **APPROX)
    # Token level: (B,) and (B, L) temperatures with a mask.
    zs, zt = rand(2, 3, 4, seed=7), rand(2, 3, 4, seed=8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    loop = np.mean([fn(zs[b, i][None], zt[b, i][None], float(per_token[b, i])).item() for b, i in mask.nonzero()])
    assert fn(zs, zt, per_token, mask).item() == pytest.approx(loop, **APPROX)
    per_sequence = torch.tensor([2.0, 5.0], dtype=torch.float64)
    assert fn(zs, zt, per_sequence, mask).item() == pytest.approx(
        fn(zs, zt, per_sequence[:, None].expand(2, 3), mask).item(), **APPROX
    )


def test_kd_bce_binary_and_multi_label():
    # Knowledge tracing: one logit per position, (B, L), with a (B, L) mask.
    zs, zt = rand(2, 5, seed=9), rand(2, 5, seed=10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = np.mean([bce_one(float(zs[b, i]), float(zt[b, i]), 2.0) for b, i in mask.nonzero()])
    assert kd_bce(zs, zt, 2.0, mask).item() == pytest.approx(expected, **APPROX)
    zs_garbage = zs.masked_fill(~mask, 50.0)
    assert kd_bce(zs_garbage, zt, 2.0, mask).item() == pytest.approx(expected, **APPROX)
    temps = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loop = np.mean([bce_one(float(zs[b, i]), float(zt[b, i]), float(temps[b])) for b, i in mask.nonzero()])
    assert kd_bce(zs, zt, temps, mask).item() == pytest.approx(loop, **APPROX)
    # Multi-label: (B, L, C) with one flag per token.
    zs, zt = rand(2, 3, 4, seed=11), rand(2, 3, 4, seed=12)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    terms = [bce_one(float(zs[b, i, c]), float(zt[b, i, c]), 1.0) for b, i in mask.nonzero() for c in range(4)]
    assert kd_bce(zs, zt, mask=mask).item() == pytest.approx(np.mean(terms), **APPROX)
    # Its minimum is the teacher's entropy: the student equal to the teacher gets no gradient.
    zs = zt.clone().requires_grad_()
    kd_bce(zs, zt).backward()
    assert torch.allclose(zs.grad, torch.zeros_like(zs), atol=1e-12)


def test_empty_mask_gives_zero_with_a_gradient_path():
    zs = rand(2, 3, 4, seed=13).requires_grad_()
    loss = kd_ce(zs, rand(2, 3, 4, seed=14), 2.0, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(zs))


def test_logits_shape_errors():
    with pytest.raises(ValueError, match=r"Expected `logits_s` and `logits_t` to have the same shape but got \(2, 3\)"):
        kd_ce(rand(2, 3), rand(2, 4))
    with pytest.raises(ValueError, match="Expected `logits_s` to have a class dimension"):
        kd_kl(rand(5), rand(5))
    with pytest.raises(ValueError, match=r"Expected `mask` to have shape \(2, 3\) .* but got \(2, 4\)\."):
        kd_mse(rand(2, 3, 4), rand(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    message = r"Expected `temperature` to be a float or a tensor of shape \(2,\) or \(2, 3\) but got \(3,\)\."
    with pytest.raises(ValueError, match=message):
        kd_ce(rand(2, 3, 4), rand(2, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"tensor of shape \(2,\) but got \(2, 3\)\."):
        kd_ce(rand(2, 3), rand(2, 3), torch.ones(2, 3))


def test_shift_probability_swaps_top_and_gold_logits_where_the_teacher_is_wrong():
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    shifted = shift_probability(logits, labels)
    expected = torch.tensor([[5.0, 1.0, 2.0], [3.0, 0.0, 1.0], [0.0, 4.0, 1.0]])
    assert torch.equal(shifted, expected)
    assert torch.equal(logits[0], torch.tensor([1.0, 5.0, 2.0]))  # input untouched
    # Token level, with ignored (padded) positions left as they are.
    tokens = logits.reshape(1, 3, 3)
    shifted = shift_probability(tokens, torch.tensor([[0, -100, 1]]))
    assert torch.equal(shifted, torch.stack([expected[0], logits[1], expected[2]])[None])
    with pytest.raises(ValueError, match="Expected `labels` to have the shape of `logits_t`"):
        shift_probability(logits, torch.tensor([0, 1]))


def test_shift_probability_leaves_every_negative_label_alone():
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0]])
    for labels in (torch.tensor([-1, -1, -7]), torch.tensor([-100, -1, -2])):  # unlabelled rows, any negative id
        assert torch.equal(shift_probability(logits, labels), logits)
    shifted = shift_probability(logits, torch.tensor([0, -1, 1]))
    assert torch.equal(shifted, torch.tensor([[5.0, 1.0, 2.0], [3.0, 0.0, 1.0], [0.0, 4.0, 1.0]]))


# --------------------------------------------------------------------------------------------------- hidden losses
def test_hidden_mse_and_cos_match_loops_over_valid_tokens():
    hs, ht = rand(2, 4, 3, seed=15), rand(2, 4, 3, seed=16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    valid = mask.nonzero().tolist()
    s, t = hs.numpy(), ht.numpy()
    mse = np.mean([(s[b, i, d] - t[b, i, d]) ** 2 for b, i in valid for d in range(3)])
    cosine = np.mean([1 - s[b, i] @ t[b, i] / (np.linalg.norm(s[b, i]) * np.linalg.norm(t[b, i])) for b, i in valid])
    hs_garbage = hs.masked_fill(~mask[..., None], 7.0)
    for h in (hs, hs_garbage):
        assert hidden_mse(h, ht, mask).item() == pytest.approx(mse, **APPROX)
        assert cos(h, ht, mask).item() == pytest.approx(cosine, **APPROX)
    assert hidden_mse(hs, ht).item() == pytest.approx(np.mean((s - t) ** 2), **APPROX)
    assert cos(hs, 3 * hs).item() == pytest.approx(0.0, abs=1e-12)


def test_pkd_uses_the_normalised_first_token():
    hs, ht = rand(3, 4, 5, seed=17), rand(3, 4, 5, seed=18)
    s, t = hs.numpy(), ht.numpy()
    per_sample = [
        ((s[b, 0] / np.linalg.norm(s[b, 0]) - t[b, 0] / np.linalg.norm(t[b, 0])) ** 2).sum() for b in range(3)
    ]
    assert pkd(hs, ht).item() == pytest.approx(np.mean(per_sample), **APPROX)
    assert pkd(hs[:, 0], ht[:, 0]).item() == pytest.approx(np.mean(per_sample), **APPROX)
    hs_other_tokens = hs.clone()
    hs_other_tokens[:, 1:] = 0.0
    assert pkd(hs_other_tokens, ht).item() == pytest.approx(np.mean(per_sample), **APPROX)


def test_hidden_shape_error_suggests_a_projection():
    message = (
        "Expected `h_s` and `h_t` to have the same shape but got (2, 5, 8) and (2, 5, 16); add a projection to the "
        "IntermediateMatch."
    )
    for fn in (hidden_mse, cos):
        with pytest.raises(ValueError) as error:
            fn(rand(2, 5, 8), rand(2, 5, 16))
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        pkd(rand(2, 5, 8), rand(2, 5, 16))
    assert str(error.value) == (
        "Expected `h_s[:, 0]` and `h_t[:, 0]` to have the same shape but got (2, 8) and (2, 16); add a projection to "
        "the IntermediateMatch."
    )


def test_a_projection_is_suggested_only_when_the_widths_alone_differ():
    with pytest.raises(ValueError) as error:
        hidden_mse(rand(2, 5, 8), rand(2, 7, 8))  # other lengths (e.g. tokenizers): a projection would not help
    assert str(error.value) == "Expected `h_s` and `h_t` to have the same shape but got (2, 5, 8) and (2, 7, 8)."


def test_pkd_reads_the_first_token_only_so_the_lengths_may_differ():
    hs, ht = rand(3, 5, 8, seed=1), rand(3, 9, 8, seed=2)
    u_s = hs[:, 0].numpy() / np.linalg.norm(hs[:, 0].numpy(), axis=-1, keepdims=True)
    u_t = ht[:, 0].numpy() / np.linalg.norm(ht[:, 0].numpy(), axis=-1, keepdims=True)
    assert pkd(hs, ht).item() == pytest.approx(((u_s - u_t) ** 2).sum(-1).mean(), **APPROX)
    assert pkd(hs, ht[:, 0]).item() == pytest.approx(((u_s - u_t) ** 2).sum(-1).mean(), **APPROX)
    with pytest.raises(ValueError, match=r"Expected `h_s\[:, 0\]` and `h_t\[:, 0\]` .* \(3, 8\) and \(2, 8\)\.$"):
        pkd(hs, ht[:2])


# ------------------------------------------------------------------------------------------------ attention losses
def attention_probs(b, h, length, seed, key_mask=None, causal=False):
    """Softmaxed random scores, with -inf at padded keys (and future keys when causal), like a transformer."""
    scores = rand(b, h, length, length, seed=seed)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return scores, torch.softmax(scores, dim=-1)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def mse_loop(a_s, a_t, mask):
    """Mean of squared differences over heads and (query, key) pairs of real tokens, zeroing -inf."""
    a_s, a_t = np.nan_to_num(a_s, neginf=0.0), np.nan_to_num(a_t, neginf=0.0)
    terms = [
        (a_s[b, h, i, j] - a_t[b, h, i, j]) ** 2
        for b in range(a_s.shape[0])
        for h in range(a_s.shape[1])
        for i in range(a_s.shape[2])
        for j in range(a_s.shape[3])
        if mask[b, i] and mask[b, j]
    ]
    return np.mean(terms)


def test_attention_mse_on_probabilities_matches_a_loop():
    _, ps = attention_probs(2, 3, 4, seed=19, key_mask=MASK)
    _, pt = attention_probs(2, 3, 4, seed=20, key_mask=MASK)
    assert attention_mse(ps, pt, MASK).item() == pytest.approx(mse_loop(ps.numpy(), pt.numpy(), MASK), **APPROX)
    assert attention_mse(ps, pt).item() == pytest.approx(((ps - pt) ** 2).mean().item(), **APPROX)
    # Padded query rows hold a distribution too; the mask excludes them.
    ps_garbage = ps.masked_fill(~MASK[:, None, :, None] | ~MASK[:, None, None, :], 0.25)
    assert attention_mse(ps_garbage, pt, MASK).item() == pytest.approx(attention_mse(ps, pt, MASK).item(), **APPROX)


@pytest.mark.parametrize("head_reduce", ["sum", "mean"])
def test_attention_mse_head_reduce_compares_reduced_maps(head_reduce):
    _, ps = attention_probs(2, 2, 4, seed=21, key_mask=MASK)
    _, pt = attention_probs(2, 6, 4, seed=22, key_mask=MASK)  # different numbers of heads are fine once reduced
    reduce = np.sum if head_reduce == "sum" else np.mean
    rs, rt = reduce(ps.numpy(), axis=1, keepdims=True), reduce(pt.numpy(), axis=1, keepdims=True)
    got = attention_mse(ps, pt, MASK, head_reduce=head_reduce).item()
    assert got == pytest.approx(mse_loop(rs, rt, MASK), **APPROX)
    with pytest.raises(ValueError, match=r"same shape but got \(2, 2, 4, 4\) and \(2, 6, 4, 4\); use head_reduce"):
        attention_mse(ps, pt, MASK)


def test_attention_mse_on_scores_zeroes_masked_scores_and_skips_padding():
    ss, _ = attention_probs(2, 3, 4, seed=23, key_mask=MASK, causal=True)
    st, _ = attention_probs(2, 3, 4, seed=24, key_mask=MASK, causal=True)
    expected = mse_loop(ss.numpy(), st.numpy(), MASK)
    assert attention_mse(ss, st, MASK, scores=True).item() == pytest.approx(expected, **APPROX)
    # finfo.min or BERT's -10000 instead of -inf: same loss.
    assert attention_mse(ss.clamp_min(-1e4), st.clamp_min(torch.finfo(st.dtype).min), MASK, scores=True).item() == (
        pytest.approx(expected, **APPROX)
    )
    ss_garbage = ss.masked_fill(~MASK[:, None, :, None], 123.0)  # padded query rows
    assert attention_mse(ss_garbage, st, MASK, scores=True).item() == pytest.approx(expected, **APPROX)
    # Gradients stay finite despite the -inf entries.
    ss = ss.clone().requires_grad_()
    attention_mse(ss, st, MASK, scores=True, head_reduce="mean").backward()
    assert torch.isfinite(ss.grad).all()


def ce_loop(p_s, p_t, mask):
    terms = [
        -sum(p_t[b, h, i, j] * math.log(p_s[b, h, i, j]) for j in range(p_s.shape[3]) if mask[b, j])
        for b in range(p_s.shape[0])
        for h in range(p_s.shape[1])
        for i in range(p_s.shape[2])
        if mask[b, i]
    ]
    return np.mean(terms)


def test_attention_ce_matches_a_loop_and_scores_equal_probabilities():
    ss, ps = attention_probs(2, 3, 4, seed=25, key_mask=MASK)
    st, pt = attention_probs(2, 3, 4, seed=26, key_mask=MASK)
    expected = ce_loop(ps.numpy(), pt.numpy(), MASK)
    assert attention_ce(ps, pt, MASK).item() == pytest.approx(expected, **APPROX)
    assert attention_ce(ss, st, MASK, scores=True).item() == pytest.approx(expected, **APPROX)
    # Whatever sits in padded query rows and key columns is ignored.
    padded = ~MASK[:, None, :, None] | ~MASK[:, None, None, :]
    got = attention_ce(ps.masked_fill(padded, 0.3), pt.masked_fill(padded, 0.2), MASK).item()
    assert got == pytest.approx(expected, **APPROX)
    got = attention_ce(ss.masked_fill(padded, 5.0), st.masked_fill(padded, 6.0), MASK, scores=True).item()
    assert got == pytest.approx(expected, **APPROX)
    # Causal masking inside the valid tokens too.
    ss, ps = attention_probs(2, 3, 4, seed=27, key_mask=MASK, causal=True)
    st, pt = attention_probs(2, 3, 4, seed=28, key_mask=MASK, causal=True)
    assert attention_ce(ss, st, MASK, scores=True).item() == pytest.approx(attention_ce(ps, pt, MASK).item(), **APPROX)
    ss = ss.clone().requires_grad_()
    attention_ce(ss, st, MASK, scores=True).backward()
    assert torch.isfinite(ss.grad).all()
    # Without a mask: every row counts.
    _, ps = attention_probs(1, 2, 3, seed=29)
    _, pt = attention_probs(1, 2, 3, seed=30)
    everything = torch.ones(1, 3, dtype=torch.bool)
    assert attention_ce(ps, pt).item() == pytest.approx(ce_loop(ps.numpy(), pt.numpy(), everything), **APPROX)


def test_attention_ce_mean_over_heads():
    ss, ps = attention_probs(2, 4, 4, seed=31, key_mask=MASK)
    st, pt = attention_probs(2, 2, 4, seed=32, key_mask=MASK)
    # Probabilities: the average of the heads' distributions.
    mean_s, mean_t = ps.numpy().mean(axis=1, keepdims=True), pt.numpy().mean(axis=1, keepdims=True)
    assert attention_ce(ps, pt, MASK, head_reduce="mean").item() == pytest.approx(
        ce_loop(mean_s, mean_t, MASK), **APPROX
    )
    # Scores: softmax of the average of the heads' (masked) scores.
    valid_keys = MASK[:, None, None, :]
    ms = torch.softmax(ss.masked_fill(~valid_keys, 0).mean(1, keepdim=True).masked_fill(~valid_keys, -1e9), -1)
    mt = torch.softmax(st.masked_fill(~valid_keys, 0).mean(1, keepdim=True).masked_fill(~valid_keys, -1e9), -1)
    assert attention_ce(ss, st, MASK, scores=True, head_reduce="mean").item() == pytest.approx(
        ce_loop(ms.numpy(), mt.numpy(), MASK), **APPROX
    )
    with pytest.raises(ValueError, match="Expected `head_reduce` to be 'none' or 'mean' for attention_ce"):
        attention_ce(ps, pt, MASK, head_reduce="sum")


def test_attention_score_threshold_is_configurable():
    scores_s, scores_t = rand(2, 2, 4, 4, seed=60) * 3, rand(2, 2, 4, 4, seed=61) * 3
    zeroed = [np.where(x.numpy() <= -1.0, 0.0, x.numpy()) for x in (scores_s, scores_t)]
    expected = np.mean((zeroed[0] - zeroed[1]) ** 2)
    assert attention_mse(scores_s, scores_t, scores=True, score_threshold=-1.0).item() == pytest.approx(
        expected, **APPROX
    )
    assert attention_mse(scores_s, scores_t, scores=True).item() == pytest.approx(  # -1e3: nothing is masked here
        np.mean((scores_s.numpy() - scores_t.numpy()) ** 2), **APPROX
    )
    # attention_ce: keys scored at or below the threshold leave both softmaxes
    a_s, a_t = rand(1, 1, 5, 5, seed=66).abs(), rand(1, 1, 5, 5, seed=67).abs()  # scores > -1
    a_s[..., [1, 3]], a_t[..., [1, 3]] = -2.0, -2.0  # two keys masked by the "model"
    keep = [0, 2, 4]
    expected = -(torch.softmax(a_t[..., keep], -1) * torch.log_softmax(a_s[..., keep], -1)).sum(-1).mean()
    assert attention_ce(a_s, a_t, scores=True, score_threshold=-1.0).item() == pytest.approx(expected.item(), **APPROX)
    assert attention_ce(a_s, a_t, scores=True).item() != pytest.approx(expected.item(), **APPROX)  # -2 kept at -1e3


def textbrewer_ce_loop(a_s, a_t, mask):
    """Per query row: -sum_j softmax(a_t)_j log softmax(a_s)_j over all keys, then P_t zeroed where TextBrewer does."""
    rows = []
    for b in range(a_s.shape[0]):
        for h in range(a_s.shape[1]):
            for i in range(a_s.shape[2]):
                if mask is not None and not mask[b, i]:
                    continue
                p_t = np.exp(a_t[b, h, i]) / np.exp(a_t[b, h, i]).sum()
                log_p_s = a_s[b, h, i] - np.log(np.exp(a_s[b, h, i]).sum())
                keep = a_t[b, h, i] > -1e-3 if mask is None else mask[b].numpy()
                rows.append(-(np.where(keep, p_t, 0.0) * log_p_s).sum())
    return np.mean(rows)


def test_textbrewer_attention_variants_match_loops():
    _, p_s = attention_probs(2, 3, 4, seed=62, key_mask=MASK)
    _, p_t = attention_probs(2, 3, 4, seed=63, key_mask=MASK)
    scores_s, scores_t = rand(2, 3, 4, 4, seed=64), rand(2, 3, 4, 4, seed=65)
    for a_s, a_t in ((p_s, p_t), (scores_s, scores_t)):  # transformers' probabilities, raw scores
        for mask in (MASK, None):
            assert attention_ce_textbrewer(a_s, a_t, mask).item() == pytest.approx(
                textbrewer_ce_loop(a_s.numpy(), a_t.numpy(), mask), **APPROX
            )
            mean_s, mean_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            assert attention_ce_textbrewer(a_s, a_t, mask, head_reduce="mean").item() == pytest.approx(
                textbrewer_ce_loop(mean_s.numpy(), mean_t.numpy(), mask), **APPROX
            )
        # attention_mse: unmasked, every entry <= -1e-3 is zeroed (after the head sum); masked, nothing is
        for reduce, fn in (("none", lambda a: a), ("sum", lambda a: a.sum(1))):
            r_s, r_t = fn(a_s).numpy(), fn(a_t).numpy()
            zeroed = [np.where(x <= -1e-3, 0.0, x) for x in (r_s, r_t)]
            assert attention_mse_textbrewer(a_s, a_t, head_reduce=reduce).item() == pytest.approx(
                np.mean((zeroed[0] - zeroed[1]) ** 2), **APPROX
            )
            pairs = (MASK[:, :, None] & MASK[:, None, :]).numpy()
            if reduce == "none":
                pairs = np.broadcast_to(pairs[:, None], r_s.shape)
            expected = ((r_s - r_t) ** 2)[pairs].mean()
            assert attention_mse_textbrewer(a_s, a_t, MASK, head_reduce=reduce).item() == pytest.approx(
                expected, **APPROX
            )
    with pytest.raises(ValueError, match="Expected `head_reduce` to be 'none' or 'mean' for attention_ce"):
        attention_ce_textbrewer(p_s, p_t, head_reduce="sum")


def test_attention_input_errors():
    with pytest.raises(ValueError, match="Expected `head_reduce` to be one of"):
        attention_mse(rand(1, 2, 3, 3), rand(1, 2, 3, 3), head_reduce="max")
    with pytest.raises(
        ValueError, match=r"Expected `a_s` to have shape \(B, H, L, L\) or \(B, L, L\) but got \(1, 3\)"
    ):
        attention_mse(rand(1, 3), rand(1, 3))
    with pytest.raises(ValueError, match="same batch size and length"):
        attention_mse(rand(1, 2, 3, 3), rand(1, 2, 4, 4), head_reduce="mean")
    with pytest.raises(ValueError, match=r"Expected `mask` to have shape \(1, 3\)"):
        attention_ce(rand(1, 2, 3, 3), rand(1, 2, 3, 3), mask=torch.ones(1, 4, dtype=torch.bool))
    # (B, L, L) maps are one head.
    a_s, a_t = rand(2, 3, 3, seed=33), rand(2, 3, 3, seed=34)
    assert attention_mse(a_s, a_t).item() == pytest.approx(attention_mse(a_s[:, None], a_t[:, None]).item())


# ----------------------------------------------------------------------------------------------- two-layer losses
def gram_loop(a, b, valid):
    n = len(valid)
    return np.array([[sum(a[i, p] * b[i, q] for i in valid) / n for q in range(b.shape[1])] for p in range(a.shape[1])])


def test_fsp_matches_a_loop():
    sa, sb, ta, tb = (rand(2, 4, 3, seed=s) for s in (35, 36, 37, 38))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    for m in (mask, None):
        diffs = []
        for b in range(2):
            valid = [i for i in range(4) if m is None or m[b, i]]
            g_s = gram_loop(sa[b].numpy(), sb[b].numpy(), valid)
            g_t = gram_loop(ta[b].numpy(), tb[b].numpy(), valid)
            diffs.extend(((g_s - g_t) ** 2).ravel())
        assert fsp(sa, sb, ta, tb, m).item() == pytest.approx(np.mean(diffs), **APPROX)
    garbage = sa.masked_fill(~mask[..., None], 9.0)
    assert fsp(garbage, sb, ta, tb, mask).item() == pytest.approx(fsp(sa, sb, ta, tb, mask).item(), **APPROX)
    with pytest.raises(
        ValueError, match=r"`h_s_a` and `h_t_a` to have the same shape but got \(2, 4, 3\) and \(2, 4, 5\)"
    ):
        fsp(sa, sb, rand(2, 4, 5), rand(2, 4, 5))


def test_nst_matches_a_loop_across_widths():
    sa, sb = rand(2, 4, 3, seed=39), rand(2, 4, 3, seed=40)
    ta, tb = rand(2, 4, 6, seed=41), rand(2, 4, 6, seed=42)  # wider teacher: no projection needed
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s_a, s_b, t_a, t_b = (x.numpy() for x in (sa, sb, ta, tb))
    terms = [
        (s_a[b, i] @ s_b[b, j] / 3 - t_a[b, i] @ t_b[b, j] / 6) ** 2
        for b in range(2)
        for i in range(4)
        for j in range(4)
        if mask[b, i] and mask[b, j]
    ]
    assert nst(sa, sb, ta, tb, mask).item() == pytest.approx(np.mean(terms), **APPROX)
    assert mmd is nst and gram is fsp
    all_terms = [
        (s_a[b, i] @ s_b[b, j] / 3 - t_a[b, i] @ t_b[b, j] / 6) ** 2
        for b in range(2)
        for i in range(4)
        for j in range(4)
    ]
    assert nst(sa, sb, ta, tb).item() == pytest.approx(np.mean(all_terms), **APPROX)
    with pytest.raises(ValueError, match="Expected `h_s_a` and `h_s_b` to have the same shape"):
        nst(sa, rand(2, 4, 5), ta, tb)
    with pytest.raises(ValueError, match="Expected `h_s_a` and `h_t_a` to have the same batch size and length"):
        nst(sa, sb, rand(2, 5, 6), rand(2, 5, 6))


def test_nst_textbrewer_normalisation_divides_by_the_length_under_a_mask():
    sa, sb = rand(2, 4, 3, seed=39), rand(2, 4, 3, seed=40)
    ta, tb = rand(2, 4, 6, seed=41), rand(2, 4, 6, seed=42)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s_a, s_b, t_a, t_b = (x.numpy() for x in (sa, sb, ta, tb))
    terms = [
        (s_a[b, i] @ s_b[b, j] / 4 - t_a[b, i] @ t_b[b, j] / 4) ** 2  # / L = 4 for both models
        for b in range(2)
        for i in range(4)
        for j in range(4)
        if mask[b, i] and mask[b, j]
    ]
    assert nst(sa, sb, ta, tb, mask, normalise="textbrewer").item() == pytest.approx(np.mean(terms), **APPROX)
    assert nst(sa, sb, ta, tb, normalise="textbrewer").item() == nst(sa, sb, ta, tb).item()  # / D without a mask
    with pytest.raises(ValueError, match="Expected `normalise` to be 'width' or 'textbrewer' but got 'length'."):
        nst(sa, sb, ta, tb, normalise="length")


@pytest.mark.parametrize("name", ["kd_ce", "kd_kl", "kd_mse", "kd_bce"])
def test_scale_by_temperature_squared_is_per_item(name):
    from lit_kd import losses

    fn = getattr(losses, name)
    torch.manual_seed(0)
    z_s, z_t = torch.randn(5, 3), torch.randn(5, 3)
    temps = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    got = fn(z_s, z_t, temps, scale_by_temperature_squared=True)
    expected = sum(temps[i] ** 2 * fn(z_s[i : i + 1], z_t[i : i + 1], float(temps[i])) for i in range(5)) / 5
    torch.testing.assert_close(got, expected)
    assert fn(z_s, z_t, 2.0, scale_by_temperature_squared=True) == pytest.approx(4 * fn(z_s, z_t, 2.0).item())
