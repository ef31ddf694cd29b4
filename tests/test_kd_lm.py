"""Token-level distillation of language models: the causal shift by hand, padding (whatever its token ids) out of the
KD loss, the hard-label loss and the metrics, next-token accuracy at chance for an untrained model, and a short fit
of a 2-layer GPT-2 teacher into a 1-layer GPT-2 student from YAML (``task_type: causal_lm``)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lit_kd import (
    DistillationCallback,
    DistillationConfig,
    DistillationModule,
    Distiller,
    ModelView,
    causal_lm_adaptor,
    default_adaptor,
    token_adaptor,
)

V, LEN = 50, 16


def tiny_gpt2(n_layer: int = 2, seed: int = 0, vocab_size: int = V) -> nn.Module:
    """A random GPT-2 without dropout (so training-mode logits can be checked by hand)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=64,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def lm_batch(
    size: int = 4, length: int = LEN, seed: int = 0, side: str = "right", pad_id: int = 0, index_start: int = 0
) -> dict[str, torch.Tensor]:
    """Random tokens, rows of random lengths padded on ``side`` with ``pad_id``; labels -100 at the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (size, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=g)
    lengths[0], lengths[-1] = length // 2, length  # at least one padded row and one full row
    pos = torch.arange(length)
    real = pos < lengths[:, None] if side == "right" else pos >= (length - lengths)[:, None]  # (B, L)
    ids = ids.masked_fill(~real, pad_id)
    return {
        "input_ids": ids,
        "attention_mask": real.long(),
        "labels": ids.masked_fill(~real, -100),
        "index": torch.arange(size) + index_start,
    }


def model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# ------------------------------------------------------------------------------------------------ adaptors by hand
def test_causal_lm_adaptor_pairs_position_t_with_token_t_plus_1_in_kd_and_hard_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)  # (B, L, V)
    batch = {
        "labels": torch.tensor([[1, 2, 3, -100], [-100, 4, 0, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    s_view, t_view = causal_lm_adaptor(batch, zs), causal_lm_adaptor(batch, {"logits": zt})
    assert s_view.logits.shape == (2, 3, 5)
    assert s_view.labels.tolist() == [[2, 3, -100], [4, 0, 2]]
    assert s_view.logits_mask.tolist() == [[True, True, False], [True, True, True]]
    # (row, position, next token) of every scored prediction, written out by hand
    pairs = [(0, 0, 2), (0, 1, 3), (1, 0, 4), (1, 1, 0), (1, 2, 2)]
    T = 2.0
    kl, ce = [], []
    for b, t, y in pairs:
        log_p_s, log_p_t = F.log_softmax(zs[b, t] / T, -1), F.log_softmax(zt[b, t] / T, -1)
        kl.append((log_p_t.exp() * (log_p_t - log_p_s)).sum())
        ce.append(-F.log_softmax(zs[b, t], -1)[y])
    config = DistillationConfig(
        kd_loss_type="kl", temperature=T, scale_by_temperature_squared=False, hard_label_weight=1.0
    )
    terms = Distiller(None, config).loss_terms(s_view, [t_view], progress=0.0)
    torch.testing.assert_close(terms["kd"][0], torch.stack(kl).mean())
    torch.testing.assert_close(terms["hard"][0], torch.stack(ce).mean())


def test_causal_lm_adaptor_without_labels_scores_real_tokens_predicting_real_tokens():
    logits = torch.zeros(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # right and left padding
    view = causal_lm_adaptor({"attention_mask": mask}, logits)
    assert view.labels is None
    # left padding: the first real token is predicted from a pad position, which never counts
    assert view.logits_mask.tolist() == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match=r"batch\['labels'\].*\(2, 4\)"):
        causal_lm_adaptor({"labels": torch.zeros(2, 3, dtype=torch.long)}, logits)
    with pytest.raises(ValueError, match=r"\(B, L, V\) token logits"):
        causal_lm_adaptor({}, torch.zeros(2, 3))


def test_token_and_default_adaptors_mask_labels_and_padding_without_a_shift():
    logits = torch.randn(2, 3, 4)  # (B, L, C)
    batch = {"labels": torch.tensor([[1, -100, 2], [0, 3, 3]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    expected = [[True, False, True], [True, True, False]]
    for adaptor in (token_adaptor, default_adaptor):
        view = adaptor(batch, logits)
        assert view.logits is logits and view.labels is batch["labels"]
        assert view.logits_mask.tolist() == expected
    assert token_adaptor({"attention_mask": batch["attention_mask"]}, logits).logits_mask.tolist() == [
        [True, True, True],
        [True, True, False],
    ]
    # sequence classification: (N, C) logits keep no mask
    assert (
        default_adaptor({"labels": torch.tensor([0, 1]), "attention_mask": torch.ones(2, 3)}, logits[:, 0]).logits_mask
        is None
    )


def test_token_logits_without_any_mask_warn_once():
    distiller = Distiller(None, DistillationConfig())
    s_view, t_view = ModelView(logits=torch.randn(2, 3, 5)), ModelView(logits=torch.randn(2, 3, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distiller.loss_terms(s_view, [t_view], 0.0)
        distiller.checked_first_batch = False  # a new task's first batch is checked again: still one warning
        distiller.loss_terms(s_view, [t_view], 0.0)
    unmasked = [
        w for w in caught if issubclass(w.category, UserWarning) and "without a `logits_mask`" in str(w.message)
    ]
    assert len(unmasked) == 1
    assert "task_type='causal_lm'" in str(unmasked[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Distiller(None, DistillationConfig()).loss_terms(
            ModelView(logits=torch.randn(2, 3, 5), logits_mask=torch.ones(2, 3, dtype=torch.bool)), [t_view], 0.0
        )


def test_task_type_picks_the_adaptors_and_is_checked():
    assert Distiller(None, task_type="causal_lm")._adaptor({"default": None}, "default") is causal_lm_adaptor
    assert Distiller(None, task_type="token")._adaptor({"default": None}, "default") is token_adaptor
    with pytest.raises(ValueError, match=r"`task_type` to be one of \['causal_lm', 'sequence', 'token'\].*'lm'"):
        DistillationModule(tiny_gpt2(1), tiny_gpt2(1), task_type="lm")
    with pytest.warns(UserWarning, match="looks like a causal language model.*task_type='causal_lm'"):
        DistillationModule(tiny_gpt2(1), tiny_gpt2(1), num_labels=V)
    with pytest.raises(ValueError, match="metric_task.*'multiclass' with task_type='causal_lm'"):
        DistillationModule(tiny_gpt2(1), tiny_gpt2(1), task_type="causal_lm", metric_task="binary")


# ------------------------------------------------------------------------------------------------ padding invariance
def _loss_terms(module: DistillationModule, batch: dict) -> dict[str, torch.Tensor]:
    d = module.distiller
    t_views = d.teacher_views(batch)
    s_view = d.student_view(batch, *d.call_student(module.student, batch))
    return {name: value for name, (value, _) in d.loss_terms(s_view, t_views, 0.0).items()}


def _val_metrics(module: DistillationModule, batch: dict) -> dict[str, torch.Tensor]:
    metrics = module.val_metrics["default"]
    metrics.reset()
    module.validation_step(batch, 0)
    out = metrics.compute()
    metrics.reset()
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_at_padded_positions_change_neither_the_losses_nor_the_metrics(side):
    teacher, student = tiny_gpt2(2, 0).eval(), tiny_gpt2(1, 1).eval()
    config = DistillationConfig(temperature=2.0, hard_label_weight=0.5)
    module = DistillationModule(teacher, student, config, task_type="causal_lm").eval()
    batch = lm_batch(size=6, seed=1, side=side, pad_id=0)
    pad = batch["attention_mask"] == 0  # (B, L); labels are -100 there
    assert pad.sum() >= 6
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(pad, 37)}
    with torch.no_grad():  # the new ids do change both models' logits at the padded positions themselves
        for model in (teacher, student):
            changed = (model(**model_inputs(batch)).logits - model(**model_inputs(other)).logits).abs().amax(-1)
            assert bool((changed[pad] > 1e-4).all())
    with torch.no_grad():
        terms, other_terms = _loss_terms(module, batch), _loss_terms(module, other)
        metrics, other_metrics = _val_metrics(module, batch), _val_metrics(module, other)
    assert set(terms) == {"kd", "hard"} and set(metrics) == {"val/ppl", "val/acc"}
    for name in terms:
        torch.testing.assert_close(other_terms[name], terms[name], rtol=1e-6, atol=1e-6)
    for name in metrics:
        torch.testing.assert_close(other_metrics[name], metrics[name], rtol=1e-6, atol=1e-6)
    # the hard-label loss is transformers' own shifted loss over the real tokens (right padding: the same pairs)
    if side == "right":
        with torch.no_grad():
            own = student(**model_inputs(batch), labels=batch["labels"]).loss
        torch.testing.assert_close(terms["hard"], own, rtol=1e-5, atol=1e-6)


def test_an_untrained_model_scores_chance_next_token_accuracy_over_real_tokens_only():
    student = tiny_gpt2(2, 3).eval()
    module = DistillationModule(tiny_gpt2(2, 0), student, task_type="causal_lm").eval()
    data = [lm_batch(size=16, length=33, seed=s) for s in range(4)]
    metrics = module.val_metrics["default"]
    with torch.no_grad():
        for b in data:
            module.validation_step(b, 0)
        got = metrics.compute()
        hits = unshifted_hits = total = 0
        nll = torch.tensor(0.0)
        for b in data:
            logits = student(**model_inputs(b)).logits  # (B, L, V)
            real = b["attention_mask"].bool()
            pairs = real[:, :-1] & real[:, 1:]  # (B, L-1): real token t predicting real token t+1
            predicted, target = logits[:, :-1].argmax(-1), b["input_ids"][:, 1:]
            hits += int((predicted == target)[pairs].sum())
            total += int(pairs.sum())
            nll += F.cross_entropy(logits[:, :-1][pairs], target[pairs], reduction="sum")
            unshifted_hits += int((logits.argmax(-1) == b["input_ids"])[real].sum())
    assert total > 1000
    torch.testing.assert_close(got["val/acc"], torch.tensor(hits / total))
    torch.testing.assert_close(got["val/ppl"], torch.exp(nll / total), rtol=1e-4, atol=1e-4)
    assert abs(got["val/acc"].item() - 1 / V) < 0.02  # chance: 1/50
    assert 40 < got["val/ppl"].item() < 60  # an untrained model is near uniform over 50 tokens
    # without the shift an untrained GPT-2 (tied embeddings) "predicts" its own input token: no chance level at all
    assert unshifted_hits / int(sum(b["attention_mask"].sum() for b in data)) > 0.2


def test_token_task_metrics_score_each_position_without_a_shift_where_the_label_counts():
    student = tiny_gpt2(1, 2).eval()  # any (B, L, V) model stands in for a masked LM here
    module = DistillationModule(tiny_gpt2(1, 0), student, task_type="token").eval()
    b = lm_batch(size=8, seed=3)
    g = torch.Generator().manual_seed(0)
    b["labels"] = b["labels"].masked_fill(torch.rand(b["labels"].shape, generator=g) < 0.5, -100)  # MLM-style
    with torch.no_grad():
        got = _val_metrics(module, b)
        logits = student(**model_inputs(b)).logits  # (B, L, V)
    scored = b["labels"] != -100
    expected_acc = (logits.argmax(-1) == b["labels"])[scored].float().mean()
    expected_ppl = torch.exp(F.cross_entropy(logits[scored], b["labels"][scored]))
    torch.testing.assert_close(got["val/acc"], expected_acc)
    torch.testing.assert_close(got["val/ppl"], expected_ppl, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ fit
class LMData(L.LightningDataModule):
    """Random-token batches, right-padded, for training and validation."""

    def __init__(self, n_batches: int = 3, batch_size: int = 4, length: int = LEN) -> None:
        super().__init__()
        self.n_batches, self.batch_size, self.length = n_batches, batch_size, length

    def _loader(self, seed: int) -> DataLoader:
        data = [
            lm_batch(self.batch_size, self.length, seed + i, index_start=i * self.batch_size)
            for i in range(self.n_batches)
        ]
        return DataLoader(data, batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(100)


def test_fit_of_a_gpt2_teacher_into_a_smaller_gpt2_from_yaml_logs_val_ppl(tmp_path):
    from lit_kd.cli import build_cli

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "lit_kd.DistillationModule",
            "init_args": {
                "teacher": {"class_path": "tests.test_kd_lm.tiny_gpt2", "init_args": {"n_layer": 2, "seed": 0}},
                "student": {"class_path": "tests.test_kd_lm.tiny_gpt2", "init_args": {"n_layer": 1, "seed": 1}},
                "config": {"temperature": 2.0, "hard_label_weight": 0.5},
                "task_type": "causal_lm",
            },
        },
        "data": {"class_path": "tests.test_kd_lm.LMData", "init_args": {"n_batches": 3}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    assert cli.model.hparams.task_type == "causal_lm" and cli.model.hparams.num_labels == V
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    for name in ("val/ppl", "val/acc", "train/kd", "train/hard"):
        assert torch.isfinite(metrics[name]), name
    assert 1 < metrics["val/ppl"].item() < 2 * V and 0 <= metrics["val/acc"].item() <= 1


class LMModule(L.LightningModule):
    """A user's own causal-LM module: its loss is the model's, the callback adds distillation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_gpt2(1, 1)

    def training_step(self, batch, batch_idx):
        return self.net(**model_inputs(batch), labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_with_task_type_causal_lm_distils_the_real_next_tokens(tmp_path):
    teacher = tiny_gpt2(2, 0).eval()
    module = LMModule()
    batch = lm_batch(size=4, seed=5, pad_id=0)
    with torch.no_grad():  # expected KD at the first step: KL over real tokens predicting real tokens, T=1
        zs, zt = module.net(**model_inputs(batch)).logits[:, :-1], teacher(**model_inputs(batch)).logits[:, :-1]
        real = batch["attention_mask"].bool()
        pairs = real[:, :-1] & real[:, 1:]
        log_p_s, log_p_t = F.log_softmax(zs[pairs], -1), F.log_softmax(zt[pairs], -1)  # (N, V)
        expected = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    callback = DistillationCallback(
        teacher, DistillationConfig(kd_loss_type="kl", temperature=1.0, hard_label_weight=0.0), "net",
        task_type="causal_lm",
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None))
    torch.testing.assert_close(trainer.callback_metrics["train/kd"], expected, rtol=1e-5, atol=1e-6)
    assert math.isfinite(expected.item()) and expected.item() > 0
