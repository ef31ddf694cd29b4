"""Attention heatmaps: the matrix is the model's causal attention, the PNG is written."""

from __future__ import annotations

import pytest
import torch

from lit_kt.models import SAKT
from lit_kt.plotting import attention_matrix, plot_attention


def test_attention_matrix_is_the_mean_of_the_heads_and_causal():
    torch.manual_seed(0)
    model = SAKT(10, d_model=8, num_heads=2, num_layers=2, max_len=12, dropout=0.3)
    ex, resp = [1, 4, 4, 2, 9], [1, 0, 1, 1, 0]
    w = attention_matrix(model, ex, resp, layer=1)
    _, weights = model.eval()(torch.tensor([ex]), torch.tensor([resp]), return_attention=True)
    torch.testing.assert_close(w, weights[1][0].mean(0))
    torch.testing.assert_close(attention_matrix(model, ex, resp, layer=0, head=1), weights[0][0, 1])
    assert torch.all(w.triu(1) == 0) and torch.allclose(w.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="`layer` to be < 2"):
        attention_matrix(model, ex, resp, layer=2)
    with pytest.raises(ValueError, match="`head`"):
        attention_matrix(model, ex, resp, head=5)


def test_plot_attention_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = SAKT(10, d_model=8, num_heads=2, max_len=12)
    out = plot_attention(model, [1, 4, 4, 2], [1, 0, 1, 1], tmp_path / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
