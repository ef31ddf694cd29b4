"""Mastery over time: rows are predict_next on each prefix, causal, exact on a hand-written model, the module's
temperature; the heatmap and the plot_mastery script."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lit_kt import SAKT, KTDataModule, SAKTModule, mastery, predict_next, write_three_line

REPO = Path(__file__).resolve().parents[1]


class CountingModel(nn.Module):
    """Logit at position i = (#correct) - (#wrong) on exercise ``exercises[i]`` at earlier positions."""

    def __init__(self, num_exercises: int = 6, max_len: int | None = None) -> None:
        super().__init__()
        self.num_exercises, self.max_len = num_exercises, max_len
        self.unused = nn.Parameter(torch.zeros(1))  # predict_next reads the device from the parameters

    def forward(self, exercises: Tensor, responses: Tensor) -> Tensor:
        same = exercises.unsqueeze(2) == exercises.unsqueeze(1)  # (B, L, L): [b, i, j] = ex[j] == ex[i]
        earlier = torch.ones_like(same[0]).tril(-1)  # (L, L): j < i
        sign = (2 * responses - 1).unsqueeze(1).float()  # (B, 1, L): +1 correct, -1 wrong
        return ((same & earlier) * sign).sum(-1)  # (B, L)


def sakt(num_exercises: int = 10, max_len: int = 8) -> SAKT:
    torch.manual_seed(0)
    return SAKT(num_exercises, d_model=16, num_heads=2, max_len=max_len, dropout=0.3)


def test_mastery_shape_and_rows_are_predict_next_on_each_prefix():
    model = sakt()
    ex, resp = [3, 4, 3, 9, 1, 3, 7, 2, 2, 5, 3], [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1]  # longer than max_len - 1
    probs = mastery(model, ex, resp, concepts=[3, 7, 10])
    assert probs.shape == (11, 3) and probs.dtype == np.float32
    for t in range(len(ex)):
        expected = predict_next(model, ex[: t + 1], resp[: t + 1], [3, 7, 10])
        np.testing.assert_allclose(probs[t], expected.numpy(), rtol=1e-6)
    assert mastery(model, ex, resp).shape == (11, 10)  # default: all concepts 1..num_exercises, in order
    np.testing.assert_allclose(mastery(model, ex, resp)[:, [2, 6, 9]], probs, rtol=1e-6)
    assert model.training  # restored
    assert mastery(model, [], [], concepts=[1, 2]).shape == (0, 2)


def test_mastery_is_causal():
    model = sakt(max_len=20)
    ex, resp = [1, 2, 3, 2, 1, 4, 5, 2], [1, 0, 1, 1, 0, 1, 0, 1]
    before = mastery(model, ex, resp)
    for t in range(len(ex) - 1):
        flipped = list(resp)
        flipped[t + 1] = 1 - flipped[t + 1]
        after = mastery(model, ex, flipped)
        np.testing.assert_array_equal(after[: t + 1], before[: t + 1])
        assert not np.allclose(after[t + 1], before[t + 1])  # the changed interaction does count from its own row


@pytest.mark.parametrize("max_len", [None, 4])
def test_mastery_values_on_a_counting_model(max_len):
    model = CountingModel(num_exercises=4, max_len=max_len)
    ex, resp = [1, 1, 2, 1, 3, 3], [1, 1, 0, 0, 1, 1]
    probs = mastery(model, ex, resp, concepts=[1, 2, 3, 4])
    window = len(ex) if max_len is None else max_len - 1  # the model sees the last max_len - 1 interactions
    expected = np.zeros((len(ex), 4))
    for t in range(len(ex)):
        for j, c in enumerate([1, 2, 3, 4]):
            seen = range(max(0, t + 1 - window), t + 1)
            expected[t, j] = sum(2 * resp[i] - 1 for i in seen if ex[i] == c)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-expected)), rtol=1e-6)
    if max_len is None:  # by hand: after step 3, concept 1 has 2 correct and 1 wrong
        assert probs[3, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    np.testing.assert_allclose(
        mastery(model, ex, resp, concepts=[1], temperature=2.0)[:, 0], 1 / (1 + np.exp(-expected[:, 0] / 2)), rtol=1e-6
    )


def test_mastery_uses_the_module_temperature():
    module = SAKTModule(sakt())
    ex, resp = [3, 4, 3, 9], [0, 1, 1, 0]
    plain = mastery(module, ex, resp, concepts=[3, 5])
    np.testing.assert_allclose(plain, mastery(module.model, ex, resp, concepts=[3, 5]), rtol=1e-6)
    module.temperature.fill_(2.5)
    logits = np.log(plain / (1 - plain))
    np.testing.assert_allclose(mastery(module, ex, resp, concepts=[3, 5]), 1 / (1 + np.exp(-logits / 2.5)), rtol=1e-4)
    np.testing.assert_allclose(mastery(module, ex, resp, concepts=[3, 5], temperature=1.0), plain, rtol=1e-6)


def test_mastery_rejects_bad_inputs_naming_the_argument():
    model = sakt()
    with pytest.raises(ValueError, match="`concepts` ids between 1 and num_exercises"):
        mastery(model, [1, 2], [1, 0], concepts=[1, 11])
    with pytest.raises(ValueError, match="at least one id in `concepts`"):
        mastery(model, [1, 2], [1, 0], concepts=[])
    with pytest.raises(ValueError, match="`exercises` ids .* got 12 at position 9"):
        mastery(model, [1] * 9 + [12], [1] * 10)  # position in the caller's history, not the model's window
    with pytest.raises(ValueError, match="same length"):
        mastery(model, [1, 2], [1])
    with pytest.raises(ValueError, match="`responses` to be 0 or 1"):
        mastery(model, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="`temperature`"):
        mastery(model, [1, 2], [1, 0], temperature=0.0)
    with pytest.raises(TypeError, match="`model`"):
        mastery(nn.Linear(2, 2), [1], [1])


def test_mastery_heatmap_returns_a_figure_with_the_marks():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lit_kt.plotting import mastery_heatmap

    ex, resp = [3, 4, 3, 9, 1], [0, 1, 1, 0, 1]
    probs = mastery(sakt(), ex, resp, concepts=[1, 3, 4])
    fig = mastery_heatmap(probs, ex, resp, concepts=[1, 3, 4], concept_names={3: "fractions"})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(image, probs.T)  # (C, L): concepts are rows
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "fractions", "4"]
    correct, wrong = ax.collections  # exercise 9 is not shown: no mark
    np.testing.assert_array_equal(correct.get_offsets(), [[1, 2], [2, 1], [4, 0]])
    np.testing.assert_array_equal(wrong.get_offsets(), [[0, 1]])
    with pytest.raises(ValueError, match="`concepts` to have C = 3"):
        mastery_heatmap(probs, ex, resp, concepts=[1, 3])
    with pytest.raises(ValueError, match="`exercises` and `responses` to have L = 5"):
        mastery_heatmap(probs, ex[:4], resp)


@pytest.mark.filterwarnings("ignore:.*never seen in training")
def test_plot_mastery_script_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    dm = KTDataModule(synthetic_students=20, synthetic_seq_len=30, max_len=10, batch_size=8)
    torch.manual_seed(0)
    module = SAKTModule(SAKT(50, d_model=8, num_heads=2, max_len=10), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    write_three_line(dm.sequences("train"), tmp_path / "train.csv")
    write_three_line(dm.sequences("test"), tmp_path / "test.csv")
    spec = importlib.util.spec_from_file_location("plot_mastery", REPO / "scripts" / "plot_mastery.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--ckpt", str(tmp_path / "m.ckpt"), "--data-dir", str(tmp_path), "--student", "1", "--length", "12"]
    out = script.main([*common, "--top", "4", "--out", str(tmp_path / "top.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = script.main([*common, "--concepts", "1,2,3", "--out", str(tmp_path / "pick.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        script.main([*common, "--concepts", "1,99"])
