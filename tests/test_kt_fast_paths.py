"""The CPU fast paths of the KT models compute what the plain paths compute (issue 5)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lit_kt.models.dkt as dkt_module
from lit_kt import DKT, SAKT, KTModule
from lit_kt.models import attention
from lit_kt.models.attention import ChunkedCausalAttention, causal_attention, packed_causal_attention
from lit_kt.models.dropout import FastDropout, dropout_mask, fast_dropout, quantized_drop_probability
from lit_kt.models.padding import row_lengths


def test_quantized_drop_probability_is_p_rounded_to_16_bits():
    assert quantized_drop_probability(0.2) == 13107 / 65536
    assert quantized_drop_probability(0.5) == 0.5
    assert quantized_drop_probability(0.0) == 0.0


def test_fast_dropout_keeps_each_element_with_the_right_probability_in_every_lane():
    torch.manual_seed(0)
    p = 0.3
    n = 1 << 22
    kept = fast_dropout(torch.ones(n), p) != 0  # (n,)
    p_used = quantized_drop_probability(p)
    sigma = (p_used * (1 - p_used) / (n / 4)) ** 0.5
    # Four elements share one 64-bit draw: each of the four 16-bit lanes must be unbiased on its own.
    for lane in range(4):
        assert abs(kept[lane::4].float().mean().item() - (1 - p_used)) < 5 * sigma


def test_fast_dropout_scales_kept_elements_so_the_expectation_is_unchanged():
    torch.manual_seed(1)
    x = torch.full((1 << 20,), 2.0)
    out = fast_dropout(x, 0.2)
    p_used = quantized_drop_probability(0.2)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1].item() == pytest.approx(2.0 / (1 - p_used), rel=1e-6)
    assert abs(out.mean().item() - 2.0) < 0.01


@pytest.mark.parametrize("shape", [(7,), (3, 5, 9), (1000,)])
def test_keep_mask_is_16_bit_lanes_of_full_range_randint_words_compared_to_the_threshold(shape):
    from lit_kt.models.dropout import keep_mask

    p, numel = 0.2, torch.Size(shape).numel()
    mask = keep_mask(shape, p, torch.device("cpu"), torch.Generator().manual_seed(11))
    # The definition the masks (and the recorded training runs) have used: 64 random bits per four elements.
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(11))  # fmt: skip
    expected = words.view(torch.int16)[:numel].view(shape) >= round(p * 65536) - 32768
    assert torch.equal(mask, expected)


def test_fast_dropout_identity_zeros_reproducibility_and_errors():
    x = torch.randn(100)
    assert fast_dropout(x, 0.5, training=False) is x
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros(100))
    torch.manual_seed(3)
    a = fast_dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, fast_dropout(x, 0.5))
    with pytest.raises(ValueError, match="`p` in \\[0, 1\\]"):
        fast_dropout(x, 1.5)
    with pytest.raises(ValueError, match="`p` in \\[0, 1\\]"):
        FastDropout(-0.1)
    layer = FastDropout(0.5).eval()
    assert layer(x) is x


def _reference(q, k, v, lengths, p, seed):
    """Plain autograd attention with the masks ChunkedCausalAttention draws, piece by piece, in its order."""
    B, H, L, D = q.shape
    generator = attention._generator(seed, q.device)
    out = torch.zeros(B, H, L, D, dtype=q.dtype)
    pieces = []
    for b, h0, h1, n in attention._chunks(lengths, H, q.element_size()):
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        w = ((q[b, h0:h1, :n] * D**-0.5) @ k[b, h0:h1, :n].transpose(1, 2)).masked_fill(causal, float("-inf"))
        w = w.softmax(-1)
        if p > 0:
            w = w * dropout_mask(w.shape, p, w.dtype, w.device, generator)
        pieces.append(((b, h0, h1, n), w @ v[b, h0:h1, :n]))
    for (b, h0, h1, n), o in pieces:
        out = out.index_put((torch.tensor(b), torch.arange(h0, h1)[:, None], torch.arange(n)[None, :]), o)
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_chunked_attention_matches_autograd_reference_in_value_and_gradient(monkeypatch, p):
    monkeypatch.setattr(attention, "CACHE_BYTES", 2 * 9 * 9 * 8)  # two heads per piece at n = 9: several pieces
    torch.manual_seed(0)
    B, H, L, D = 3, 4, 9, 5
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = [9, 4, 0]  # a full row, a padded row and an empty one
    out = ChunkedCausalAttention.apply(q, k, v, lengths, p, 123)
    ref = _reference(q, k, v, lengths, p, 123)
    torch.testing.assert_close(out, ref)
    assert out[1, :, 4:].abs().sum() == 0 and out[2].abs().sum() == 0  # padding skipped: zero outputs
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_packed_attention_equals_the_padded_chunked_attention_with_the_same_masks(monkeypatch, p):
    monkeypatch.setattr(attention, "CACHE_BYTES", 2 * 9 * 9 * 8)  # two heads per piece at n = 9: several pieces
    torch.manual_seed(0)
    B, H, L, Dh = 4, 4, 9, 5
    lengths = [9, 4, 0, 6]  # a full row, padded rows and an empty one
    real = torch.arange(L) < torch.tensor(lengths)[:, None]  # (B, L)
    q, k, v = (torch.randn(B, L, H * Dh, dtype=torch.float64) for _ in range(3))
    packed_in = [x[real].requires_grad_() for x in (q, k, v)]  # (N, D) each
    padded_in = [x.unflatten(-1, (H, Dh)).transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, ()))  # the seed packed_causal_attention draws after manual_seed(7)
    torch.manual_seed(7)
    out = packed_causal_attention(*packed_in, lengths, H, p, training=True)  # (N, D)
    ref = ChunkedCausalAttention.apply(*padded_in, lengths, p, seed)  # (B, H, L, Dh)
    ref_rows = ref.transpose(1, 2).flatten(2)[real]  # (N, D)
    torch.testing.assert_close(out, ref_rows)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, packed_in, grad)
    want = torch.autograd.grad(ref_rows, padded_in, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.transpose(1, 2).flatten(2)[real])
    assert torch.autograd.gradcheck(
        lambda q, k, v: packed_causal_attention(q, k, v, [3, 2], 2, 0.0),
        [torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)],
    )
    with pytest.raises(ValueError, match="`lengths` to sum to the 19 packed rows but got 18"):
        packed_causal_attention(*packed_in, [9, 4, 5], H)
    with pytest.raises(ValueError, match="`num_heads` to divide the width 20 but got 3"):
        packed_causal_attention(*packed_in, lengths, 3)


@pytest.mark.slow  # float64 gradcheck: ~25 s
def test_chunked_attention_passes_gradcheck_and_equals_sdpa_without_dropout(monkeypatch):
    monkeypatch.setattr(attention, "CACHE_BYTES", 6 * 6 * 8)  # one head per piece
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: ChunkedCausalAttention.apply(q, k, v, [6, 6], 0.25, 7), (q, k, v))
    torch.testing.assert_close(
        ChunkedCausalAttention.apply(q, k, v, [6, 6], 0.0, 7), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_attention_dropout_out_of_range_is_refused():
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"`dropout_p` in \[0, 1\] but got 1.5"):
        causal_attention(q, q, q, 1.5, training=True)
    with pytest.raises(ValueError, match=r"`attention_dropout` in \[0, 1\] but got -0.1"):
        SAKT(5, d_model=4, num_heads=2, attention_dropout=-0.1)


def test_causal_attention_is_sdpa_when_not_dropping_and_reproducible_when_dropping():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 7, 4) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, 0.3, training=False), expected)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0, training=True), expected)
    torch.manual_seed(5)
    a = causal_attention(q, k, v, 0.3, training=True)
    torch.manual_seed(5)
    assert torch.equal(a, causal_attention(q, k, v, 0.3, training=True))
    assert not torch.allclose(a, expected)


def _batch(B=6, L=15, num_exercises=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    exercises = torch.randint(1, num_exercises + 1, (B, L), generator=g)
    responses = torch.randint(0, 2, (B, L), generator=g)
    exercises[1, 9:] = 0  # right padding
    exercises[2, 2:] = 0
    exercises[3, :] = 0  # an empty row
    exercises[4, 5] = 0  # a gap inside a row stays part of it
    return exercises, responses


def test_sakt_packed_cpu_path_equals_padded_path_in_logits_and_gradients():
    torch.manual_seed(0)
    model = SAKT(20, d_model=16, num_heads=4, num_layers=2, max_len=15, dropout=0.0).train()
    exercises, responses = _batch()
    real = exercises > 0
    packed = model(exercises, responses)  # CPU, no attention weights asked: the packed path
    padded, _ = model(exercises, responses, return_attention=True)  # the plain padded path
    torch.testing.assert_close(packed[real], padded[real])
    after_last = torch.arange(15) >= torch.tensor([15, 9, 2, 0, 15, 15])[:, None]  # (B, L) after each row's last real
    assert packed[after_last].abs().sum() == 0  # skipped: 0 (the contract only says "unspecified")
    grads = [torch.autograd.grad(out[real].sum(), list(model.parameters())) for out in (packed, padded)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sakt_training_with_dropout_is_reproducible_and_causal():
    model = SAKT(20, d_model=16, num_heads=4, max_len=15, dropout=0.3).train()
    exercises, responses = _batch()
    torch.manual_seed(9)
    a = model(exercises, responses)
    torch.manual_seed(9)
    assert torch.equal(a, model(exercises, responses))
    # Changing the last real response of row 0 cannot change any of row 0's logits (it is never seen).
    flipped = responses.clone()
    flipped[0, -1] = 1 - flipped[0, -1]
    torch.manual_seed(9)
    torch.testing.assert_close(model(exercises, flipped), a)


@pytest.mark.parametrize("stage_cost", [1e9, 3.0, 0.0])
def test_dkt_staged_cpu_path_equals_plain_lstm_in_logits_and_gradients(stage_cost, monkeypatch):
    # 1e9: one stage, every row runs to the longest; 3: rows run past their ends to a stage end; 0: a stage per length.
    monkeypatch.setattr(dkt_module, "STAGE_COST", stage_cost)
    torch.manual_seed(0)
    model = DKT(20, hidden_size=12, embedding_dim=8, num_layers=2, dropout=0.0)
    exercises, responses = _batch(B=7)
    real = torch.arange(15) < row_lengths(exercises)[:, None]  # up to each row's last real position
    fast = model(exercises, responses)
    interactions = exercises + 20 * responses * (exercises > 0)
    x = torch.cat([model.start.expand(7, 1, -1), model.interaction_emb(interactions[:, :-1])], dim=1)
    plain = model.head(model.lstm(x)[0]).gather(-1, exercises.unsqueeze(-1)).squeeze(-1)  # the textbook path
    torch.testing.assert_close(fast[real], plain[real])
    assert not fast[~real].any()  # 0 after each row's end
    grads = [torch.autograd.grad(out[real].sum(), list(model.parameters())) for out in (fast, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_stage_ends_is_the_cheapest_plan():
    # Rows of lengths 5, 3, 3, 1; plans and their row-steps by hand: [5] 4*5 = 20, [3, 5] 4*3 + 1*2 = 14,
    # [1, 5] 4*1 + 3*4 = 16, [1, 3, 5] 4*1 + 3*2 + 1*2 = 12; each stage also costs `stage_cost`.
    lengths = [5, 3, 3, 1]
    assert dkt_module.stage_ends(lengths, 0.0) == [1, 3, 5]
    assert dkt_module.stage_ends(lengths, 1.0) == [1, 3, 5]  # 15 against 16 and 21
    assert dkt_module.stage_ends(lengths, 3.0) == [3, 5]  # 20 against 21, 22 and 23
    assert dkt_module.stage_ends(lengths, 7.0) == [5]  # 27 against 28
    assert dkt_module.stage_ends([0, 0], 1.0) == []


def test_stage_ends_matches_an_exhaustive_search():
    from itertools import combinations

    def cost(lengths, ends, stage_cost):
        total, t0 = 0.0, 0
        for t1 in ends:
            total += sum(n > t0 for n in lengths) * (t1 - t0) + stage_cost
            t0 = t1
        return total

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(0, 30, (9,), generator=g).tolist()
        distinct = sorted({n for n in lengths if n > 0})
        plans = [[*c, distinct[-1]] for k in range(len(distinct)) for c in combinations(distinct[:-1], k)]
        for stage_cost in (0.5, 4.0, 25.0):
            best = min(cost(lengths, p, stage_cost) for p in plans)
            assert cost(lengths, dkt_module.stage_ends(lengths, stage_cost), stage_cost) == best


def test_dkt_staged_cpu_path_on_a_batch_of_padding_gives_zeros():
    exercises = torch.zeros(3, 5, dtype=torch.long)
    logits = DKT(20, hidden_size=8, embedding_dim=8)(exercises, exercises)
    assert logits.shape == (3, 5) and not logits.any()


def test_dkt_staged_cpu_path_drops_the_real_positions_as_they_come_in_row_major_order(monkeypatch):
    # The dropout before the head draws one mask over the real positions in row-major order, whatever the stages,
    # so a run's masks (and a recorded training run) do not depend on how the LSTM was cut.
    torch.manual_seed(0)
    model = DKT(20, hidden_size=12, embedding_dim=8, dropout=0.5).train()
    exercises, responses = _batch(B=7)
    runs = []
    for stage_cost in (1e9, 3.0, 0.0):
        monkeypatch.setattr(dkt_module, "STAGE_COST", stage_cost)
        torch.manual_seed(5)
        runs.append(model(exercises, responses))
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0])


def test_dkt_staged_cpu_path_draws_the_dropout_masks_of_the_real_rows_of_the_plain_lstm():
    # The masks a run drew before the staged path (dropout over h[real], row-major) are the ones it draws now.
    torch.manual_seed(0)
    model = DKT(20, hidden_size=12, embedding_dim=8, dropout=0.5).train()
    exercises, responses = _batch(B=7)
    real = torch.arange(15) < row_lengths(exercises)[:, None]
    interactions = exercises + 20 * responses * (exercises > 0)
    x = torch.cat([model.start.expand(7, 1, -1), model.interaction_emb(interactions[:, :-1])], dim=1)
    torch.manual_seed(5)
    expected = model._logits(model.lstm(x)[0][real], exercises[real])  # (N,)
    torch.manual_seed(5)
    torch.testing.assert_close(model(exercises, responses)[real], expected)


def _flushes() -> bool:
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0  # a denormal read as zero


class _Probe(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(_flushes())


@pytest.mark.parametrize("flush", [True, False])
def test_ktmodule_flushes_denormals_only_while_fitting_on_cpu(flush, tmp_path):
    from lit_kt import KTDataModule

    dm = KTDataModule(synthetic_students=40, synthetic_exercises=10, max_len=10, batch_size=16)
    probe = _Probe()
    module = KTModule(SAKT(10, d_model=8, num_heads=2, max_len=10), flush_denormal=flush)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    assert not _flushes()
    trainer.fit(module, dm)
    assert probe.seen == [flush, flush]
    assert not _flushes()
