"""The CPU fast paths of the KT models compute what the plain paths compute (issue 5)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_kt import DKT, SAKT, KTModule
from lit_kt.models import attention
from lit_kt.models.attention import ChunkedCausalAttention, causal_attention, packed_causal_attention
from lit_kt.models.dropout import FastDropout, dropout_mask, fast_dropout, quantized_drop_probability
from lit_kt.models.lstm import packed_lstm


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


def _dkt_textbook(model: DKT, exercises, responses):
    """DKT written out with nn.LSTM over the whole padded batch (no fast path)."""
    B = exercises.shape[0]
    interactions = exercises + model.num_exercises * responses * (exercises > 0)
    x = torch.cat([model.start.expand(B, 1, -1), model.interaction_emb(interactions[:, :-1])], dim=1)
    return model.head(model.lstm(x)[0]).gather(-1, exercises.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("num_layers", [1, 2])  # 1: the packed recurrence; 2: nn.LSTM on groups of rows
def test_dkt_cpu_paths_equal_plain_lstm_in_logits_and_gradients(num_layers):
    torch.manual_seed(0)
    model = DKT(20, hidden_size=12, embedding_dim=8, num_layers=num_layers, dropout=0.0)
    exercises, responses = _batch(B=7)
    real = exercises > 0
    real[4, 5] = True  # the gap inside row 4 is part of it (scored here, though a loss would skip it)
    fast = model(exercises, responses)
    plain = _dkt_textbook(model, exercises, responses)
    torch.testing.assert_close(fast[real], plain[real])
    after = torch.arange(15) >= torch.tensor([15, 9, 2, 0, 15, 15, 15])[:, None]
    assert (fast[after] == 0).all()  # 0 after each row's last real position
    grads = [torch.autograd.grad(out[real].sum(), list(model.parameters())) for out in (fast, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    names = [name for name, _ in model.named_parameters()]
    emb_grad = grads[0][names.index("interaction_emb.weight")]
    assert (emb_grad[0] == 0).all() and (emb_grad[1:] != 0).any()  # no gradient to the padding id, as nn.Embedding


def test_dkt_recurrence_path_runs_and_alternatives_stay_available(monkeypatch):
    from lit_kt.models import dkt

    calls = []
    monkeypatch.setattr(dkt, "packed_lstm", lambda *args: calls.append(1) or packed_lstm(*args))
    exercises, responses = _batch()
    DKT(20, hidden_size=8, embedding_dim=8)(exercises, responses)
    assert calls == [1]
    DKT(20, hidden_size=8, embedding_dim=8, num_layers=2)(exercises, responses)  # grouped nn.LSTM
    DKT(20, hidden_size=8, embedding_dim=8, packed=True)(exercises, responses)  # pack_padded_sequence
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: nn.LSTM's own bfloat16 path
        DKT(20, hidden_size=8, embedding_dim=8)(exercises, responses)
    empty = torch.zeros(2, 5, dtype=torch.long)
    assert DKT(20, hidden_size=8, embedding_dim=8)(empty, empty).eq(0).all()
    assert calls == [1]


def _packed_reference(lengths, V=6, E=5, H=7, seed=0):
    """nn.LSTM over embedded tokens, packed by torch; and the same inputs in packed_lstm's form."""
    g = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(E, H, batch_first=True).double()
    emb = torch.randn(V, E, dtype=torch.double, generator=g)
    tokens = torch.randint(0, V, (len(lengths), max(lengths)), generator=g)
    packed = torch.nn.utils.rnn.pack_padded_sequence(emb[tokens], torch.tensor(lengths), batch_first=True,
                                                     enforce_sorted=False)  # fmt: skip
    # The same permutation applied to the token ids: pack them as a float feature and read them back.
    ids = torch.nn.utils.rnn.pack_padded_sequence(tokens[..., None].double(), torch.tensor(lengths), batch_first=True,
                                                  enforce_sorted=False).data[:, 0].long()  # fmt: skip
    table = F.linear(emb, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().requires_grad_()
    weight = lstm.weight_hh_l0.detach().clone().requires_grad_()
    return lstm, emb, packed, table, ids, weight, packed.batch_sizes.tolist()


@pytest.mark.parametrize("lengths", [[9, 7, 7, 3, 1, 5], [1, 1], [4]])
def test_packed_lstm_equals_nn_lstm_on_packed_sequences_in_value_and_gradient(lengths):
    lstm, emb, packed, table, ids, weight, batch_sizes = _packed_reference(lengths)
    out = packed_lstm(table, ids, weight, batch_sizes)
    reference = lstm(packed)[0].data
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    # Gradients against nn.LSTM's, through the table's product (W_ih x + b) to its weights.
    upstream = torch.randn_like(reference)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, lstm.weight_hh_l0.grad, rtol=0, atol=1e-12)
    # table = emb W_ih^T + b, so dL/dW_ih = dL/dtable^T emb and dL/db = the column sums of dL/dtable.
    torch.testing.assert_close(table.grad.T @ emb, lstm.weight_ih_l0.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(table.grad.sum(0), lstm.bias_ih_l0.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t, w: packed_lstm(t, ids, w, batch_sizes), (table, weight))


def test_packed_lstm_refuses_inconsistent_inputs():
    table, weight, ids = torch.zeros(5, 8), torch.zeros(8, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="`table` \\(V, 4H\\)"):
        packed_lstm(torch.zeros(5, 7), ids, weight, [2, 1])
    with pytest.raises(ValueError, match="`ids`"):
        packed_lstm(table, ids.float(), weight, [2, 1])
    for bad in ([1, 2], [2, 2], [3, 0], []):  # increasing, wrong sum, a zero, empty
        with pytest.raises(ValueError, match="`batch_sizes`"):
            packed_lstm(table, ids, weight, bad)


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
