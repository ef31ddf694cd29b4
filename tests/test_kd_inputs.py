"""Explicit model inputs (key maps, input functions, no silent ``**kwargs``), user losses inside DistillationModule,
and a DistillationModule loaded for inference without its teacher."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_kd import ClassifierModule, DistillationConfig, DistillationModule, call_model
from lit_kd.adaptors import ModelView


class Named(nn.Module):
    """Logits from inputs named ``tokens``/``mask`` (not the batch's names)."""

    def __init__(self, labels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 4)
        self.head = nn.Linear(4, labels)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(tokens) * mask.unsqueeze(-1)  # (B, L, D)
        return self.head(h.sum(1))  # (B, C)


class Greedy(nn.Module):
    """A model whose ``forward`` takes ``**kwargs`` and records what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 3)
        self.seen: list[str] = []

    def forward(self, input_ids: Tensor, **kwargs) -> Tensor:
        self.seen = sorted(kwargs)
        return self.head(input_ids.float().mean(1, keepdim=True))


def batch(n: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 20, (n, 5), generator=g),
        "attention_mask": torch.ones(n, 5),
        "labels": torch.randint(0, 3, (n,), generator=g),
        "index": torch.arange(n),
        "extra": torch.zeros(n),
    }


def test_key_maps_and_input_functions_feed_the_named_arguments():
    model, b = Named(), batch()
    expected = model(b["input_ids"], b["attention_mask"])
    by_map = call_model(model, b, inputs={"tokens": "input_ids", "mask": "attention_mask"})
    by_fn = call_model(model, b, inputs=lambda x: (x["input_ids"], x["attention_mask"]))
    torch.testing.assert_close(by_map, expected)
    torch.testing.assert_close(by_fn, expected)
    with pytest.raises(KeyError, match=r"Expected the batch to hold \['ids'\] .* but its keys are \["):
        call_model(model, b, inputs={"tokens": "ids", "mask": "attention_mask"}, who="student")


def test_unknown_keys_never_reach_kwargs_and_errors_list_keys_and_parameters():
    greedy, b = Greedy(), batch()
    call_model(greedy, b)
    assert greedy.seen == []  # not labels, index or extra
    with pytest.raises(TypeError) as info:
        call_model(Named(), b, who="student")
    message = str(info.value)
    assert "`Named.forward(tokens, mask)`" in message
    assert "['attention_mask', 'extra', 'index', 'input_ids', 'labels']" in message
    assert "student_inputs={parameter: batch_key}" in message


def test_distillation_module_with_input_maps_and_a_user_hard_loss():
    seen = {}

    def my_hard(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
        seen["shapes"] = (tuple(logits.shape), tuple(labels.shape), mask)
        return F.cross_entropy(logits, labels, label_smoothing=0.1)

    def my_kd(logits_s: Tensor, logits_t: Tensor, temperature: Tensor, mask: Tensor | None) -> Tensor:
        seen["temperature"] = temperature
        return (logits_s / temperature - logits_t / temperature).pow(2).mean()

    config = DistillationConfig(temperature=2.0, kd_loss_type=my_kd, hard_label_weight=1.0, hard_label_loss=my_hard)
    inputs = {"tokens": "input_ids", "mask": "attention_mask"}
    teacher, student = Named(seed=0), Named(seed=1)
    module = DistillationModule(teacher, student, config, num_labels=3, teacher_inputs=inputs, student_inputs=inputs)
    b = batch(3)  # batch size == class count: a (N,) temperature would broadcast over classes instead of samples
    d = module.distiller
    s_view = d.student_view(b, *d.call_student(student, b))
    terms = d.loss_terms(s_view, d.teacher_views(b), progress=0.0)
    z_s = student(b["input_ids"], b["attention_mask"])
    z_t = teacher(b["input_ids"], b["attention_mask"])
    assert seen["temperature"].shape == (3, 1)
    torch.testing.assert_close(terms["kd"][0], ((z_s - z_t) / 2.0).pow(2).mean())
    torch.testing.assert_close(terms["kd/my_kd"][0], terms["kd"][0])
    torch.testing.assert_close(terms["hard"][0], F.cross_entropy(z_s, b["labels"], label_smoothing=0.1))
    assert seen["shapes"] == ((3, 3), (3,), None)
    assert set(terms) == {"kd", "kd/my_kd", "hard", "hard/my_hard"}


def test_textbrewer_style_kd_loss_without_mask_is_accepted_and_refused_with_a_mask():
    def tb_kd(logits_s, logits_t, temperature):
        return -(F.softmax(logits_t / temperature, -1) * F.log_softmax(logits_s / temperature, -1)).sum(-1).mean()

    config = DistillationConfig(temperature=3.0, kd_loss_type=tb_kd)
    z_s, z_t = torch.randn(4, 5), torch.randn(4, 5)
    t = torch.full((4,), 3.0)
    torch.testing.assert_close(config.kd_loss(z_s, z_t, t, None), tb_kd(z_s, z_t, 3.0))
    with pytest.raises(ValueError, match="to take a `mask`"):
        config.kd_loss(z_s, z_t, t, torch.ones(4, dtype=torch.bool))


def test_classifier_module_label_key_and_inputs():
    b = batch()
    b["y"] = b.pop("labels")
    inputs = {"tokens": "input_ids", "mask": "attention_mask"}
    module = ClassifierModule(Named(), num_labels=3, label_key="y", inputs=inputs)
    logits = Named()(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(module.loss(b), F.cross_entropy(logits, b["y"]))


def test_classifier_module_takes_num_labels_from_the_model_or_refuses():
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                   num_labels=4)
    )  # fmt: skip
    assert ClassifierModule(bert).hparams.num_labels == 4
    with pytest.raises(ValueError, match="Expected `num_labels` .*Named has no `config.num_labels`"):
        ClassifierModule(Named())


def test_distillation_module_loads_for_inference_without_a_teacher(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    inputs = {"tokens": "input_ids", "mask": "attention_mask"}
    module = DistillationModule(
        Named(seed=0), Named(seed=1), num_labels=3, teacher_inputs=inputs, student_inputs=inputs,
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch(), batch()], batch_size=None))
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt", student=Named(seed=5), student_inputs=inputs)
    assert loaded.all_teachers() == []
    b = batch()
    torch.testing.assert_close(loaded(b), module.student(b["input_ids"], b["attention_mask"]))
    with pytest.raises(RuntimeError, match="built with `teacher=None`"):
        loaded.distiller.teacher_views(b)
    assert isinstance(loaded.distiller.student_view(b, loaded(b)), ModelView)
