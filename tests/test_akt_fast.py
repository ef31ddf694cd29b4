"""AKT's CPU fast path (length-sorted packed rows, ChunkedMonotonicAttention) against a plain reference.

The reference below is written from the equations on padded tensors, with autograd doing the backward pass; the
fast path's forward and its hand-written backward must give the same logits and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_kt import AKT
from lit_kt.models.akt import ChunkedMonotonicAttention, length_chunks
from lit_kt.models.dropout import keep_mask, kept_scale

E, Q = 20, 30
LENGTHS = [9, 13, 1, 0, 13, 5, 6, 2]  # a batch of right-padded rows, one empty, unsorted
L = 16  # padded beyond the longest row


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    strict: bool,
    keep=None,
    p: float = 0.0,
    sqrt_distance: bool = False,
) -> torch.Tensor:
    """AKT's monotonic attention, eq. 2-3, term by term: (B, H, L, Dh) inputs, (H,) theta -> (B, H, L, Dh).

    ``keep`` (B, H, L, L) bool: attention dropout with that mask, kept weights scaled by ``1 / (1 - p)``.
    ``sqrt_distance``: the decay reads the square root of the distance (the authors' code).
    """
    n = q.shape[-2]
    t = torch.arange(n)
    allowed = t[None, :] < t[:, None] if strict else t[None, :] <= t[:, None]  # (L, L) [query t, key tau]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, L, L)
    lowest = torch.finfo(scores.dtype).min
    with torch.no_grad():  # the paper: no gradient through the distance
        gamma = scores.masked_fill(~allowed, lowest).softmax(-1) * allowed
        later = (t[:, None] > t[None, :]).to(q.dtype)  # (L, L) [t', tau]: t' after tau
        mass_after = gamma @ later  # sum of gamma[t, t'] over allowed t' > tau
        distance = (t[:, None] - t[None, :]).abs().to(q.dtype) * mass_after
        if sqrt_distance:
            distance = distance.clamp(min=0).sqrt()
    decayed = scores * torch.exp(-theta.view(-1, 1, 1) * distance)
    weights = decayed.masked_fill(~allowed, lowest).softmax(-1) * allowed  # strict row 0: all zero
    if keep is not None:
        weights = weights * keep / (1 - p)
    return weights @ v


def reference_block(block, query: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One AKTBlock on padded (B, L, D) tensors, from its parameters (eval mode: no dropout)."""
    B, n, D = query.shape
    H = block.num_heads
    qk = block.qk_proj(query).view(B, n, H, D // H).transpose(1, 2)
    v = block.v_proj(values).view(B, n, H, D // H).transpose(1, 2)
    attn = reference_attention(qk, qk, v, F.softplus(block.theta_raw), block.strict, sqrt_distance=block.sqrt_distance)
    x = block.attn_norm(query + block.out_proj(attn.transpose(1, 2).reshape(B, n, D)))
    return block.ffn_norm(x + block.ffn(x))


def reference_akt(model: AKT, exercises, responses, questions=None) -> torch.Tensor:
    """AKT's logits (B, L) on the padded batch, every block through :func:`reference_block`."""
    interactions = exercises + model.num_exercises * responses * (exercises > 0)
    x, y = model.concept_emb(exercises), model.interaction_emb(interactions)
    if questions is not None:
        mu = model.difficulty(questions)
        x = x + mu * model.concept_var(exercises)
        y = y + mu * model.interaction_var(interactions)
    q_enc, y_enc = x, y
    for block in model.question_encoder:
        q_enc = reference_block(block, q_enc, q_enc)
    for block in model.interaction_encoder:
        y_enc = reference_block(block, y_enc, y_enc)
    h = q_enc
    for block in model.retriever:
        h = reference_block(block, h, y_enc)
    return model.head(torch.cat([h, x], dim=-1)).squeeze(-1)


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    ex = torch.randint(1, E + 1, (B, L), generator=g)
    resp = torch.randint(0, 2, (B, L), generator=g)
    q = torch.randint(1, Q + 1, (B, L), generator=g)
    real = torch.arange(L) < torch.tensor(LENGTHS)[:, None]  # (B, L)
    ex[~real], resp[~real], q[~real] = 0, 0, 0
    ex[5, 2], q[5, 2] = 0, 0  # a zero before a row's last real id stays part of the row
    return ex, resp, q, real


@pytest.mark.parametrize("with_questions", [False, True])
@pytest.mark.parametrize("retriever_layers", [1, 2])
@pytest.mark.parametrize("sqrt_distance", [False, True])
def test_fast_forward_and_backward_equal_the_reference(with_questions, retriever_layers, sqrt_distance):
    torch.manual_seed(0)
    model = AKT(
        E,
        num_questions=Q,
        d_model=16,
        num_heads=4,
        d_ff=32,
        num_retriever_layers=retriever_layers,
        sqrt_distance=sqrt_distance,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # larger than the init, so that every term (decay, difficulties) matters
    ex, resp, q, real = padded_batch()
    q = q if with_questions else None
    # The fast path gets the mass after the last allowed key as 1 - cumsum (about 1e-7 off 0 in float32) where the
    # reference sums an empty set (exactly 0); the square root lifts that round-off to about 3e-4 of distance.
    tol = 1e-4 if sqrt_distance else 1e-5
    grads = []
    for forward in (model, lambda *a: reference_akt(model, *a)):
        model.zero_grad()
        logits = forward(ex, resp, q)
        # A weighted sum of the real logits, so that every position's gradient differs.
        (logits[real] * torch.linspace(-1, 1, int(real.sum()))).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        if forward is model:
            fast = logits
            assert torch.all(fast[~real] == 0)  # the CPU path leaves 0 after each row's last real position
        else:
            torch.testing.assert_close(fast[real], logits[real], rtol=tol, atol=tol)
            padded, _ = model(ex, resp, q, return_attention=True)  # the padded path: monotonic_attention
            torch.testing.assert_close(padded[real], logits[real], rtol=tol, atol=tol)
    assert grads[0].keys() == grads[1].keys()
    assert any(name.endswith("theta_raw") for name in grads[0])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=tol, msg=name)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_attention_with_dropout_equals_the_reference_with_the_same_masks(strict, p):
    torch.manual_seed(0)
    B, n, H, Dh = 5, 9, 3, 4
    lengths = [9, 9, 6, 4, 1]
    chunks = [(0, 2, 9), (2, 4, 6), (4, 5, 1)]  # as length_chunks would cut them with a small cache
    qk, v = (torch.randn(B, n, H, Dh, dtype=torch.float64, requires_grad=True) for _ in range(2))
    theta = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    seed = 1234
    out = ChunkedMonotonicAttention.apply(qk, qk, v, theta, chunks, strict, p, seed)  # (B, n, H, Dh)
    # The masks, drawn piece by piece as the attention does: (rows * H, m', m') from one generator.
    keep = torch.zeros(B, H, n, n, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    off = int(strict)
    for i0, i1, m in chunks:
        if p > 0 and m > off:
            piece = keep_mask(((i1 - i0) * H, m - off, m - off), p, qk.device, generator)
            keep[i0:i1, :, off:m, : m - off] = piece.view(i1 - i0, H, m - off, m - off)
    real = torch.arange(n) < torch.tensor(lengths)[:, None]  # (B, n)
    weight = torch.randn(B, n, H, Dh, dtype=torch.float64) * real[:, :, None, None]
    (out * weight).sum().backward()
    fast = [out.detach()] + [x.grad.clone() for x in (qk, v, theta)]
    for x in (qk, v, theta):
        x.grad = None
    q_h, v_h = qk.transpose(1, 2), v.transpose(1, 2)
    ref = reference_attention(q_h, q_h, v_h, theta, strict, keep if p > 0 else None, 1 - 1 / kept_scale(p))
    ref = ref.transpose(1, 2)
    (ref * weight).sum().backward()
    torch.testing.assert_close(fast[0][real], ref.detach()[real])
    for got, x in zip(fast[1:], (qk, v, theta), strict=True):
        torch.testing.assert_close(got, x.grad)


def test_length_chunks_cover_the_non_empty_rows_in_order():
    lengths = [200, 180, 90, 90, 40, 3, 0, 0]
    chunks = length_chunks(lengths, num_heads=4, element_bytes=4)
    assert chunks[0][0] == 0 and chunks[-1][1] == 6  # all-padding rows left out
    for (_, end, _), (start, _, _) in zip(chunks, chunks[1:]):
        assert end == start
    for i0, i1, m in chunks:
        assert m == lengths[i0] == max(lengths[i0:i1])


def test_training_mode_runs_and_full_attention_dropout_gives_no_attention():
    torch.manual_seed(0)
    ex, resp, q, real = padded_batch()
    model = AKT(E, num_questions=Q, d_model=16, num_heads=4, d_ff=32, dropout=0.3).train()
    logits = model(ex, resp, q)
    logits[real].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for block in [*model.question_encoder, *model.interaction_encoder, *model.retriever]:
        assert block.theta_raw.grad is not None and torch.all(block.theta_raw.grad != 0)
    # Attention dropout 1 drops every weight: the attention's output is 0 and only out_proj's bias remains.
    model = AKT(E, d_model=16, num_heads=4, d_ff=32, dropout=0.0).train()
    for block in [*model.question_encoder, *model.interaction_encoder, *model.retriever]:
        block.dropout = 1.0
    fast = model(ex, resp)
    with torch.no_grad():
        for block in [*model.question_encoder, *model.interaction_encoder, *model.retriever]:
            block.qk_proj.weight.zero_(), block.qk_proj.bias.zero_(), block.v_proj.weight.zero_()
            block.v_proj.bias.zero_()
        torch.testing.assert_close(fast[real], model(ex, resp)[real])


def test_sqrt_distance_changes_the_decay():
    torch.manual_seed(0)
    linear = AKT(E, d_model=16, num_heads=4, d_ff=32).eval()
    with torch.no_grad():
        for p in linear.parameters():
            p.normal_(0, 0.5)
    root = AKT(E, d_model=16, num_heads=4, d_ff=32, sqrt_distance=True).eval()
    root.load_state_dict(linear.state_dict())
    ex, resp, _, real = padded_batch()
    with torch.no_grad():
        assert not torch.allclose(linear(ex, resp)[real], root(ex, resp)[real], atol=1e-4)
    assert root.config["sqrt_distance"] and not linear.config["sqrt_distance"]
