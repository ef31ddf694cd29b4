"""ClassifierModule: its loss, learning a toy task, its accuracy metric, exporting the model."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lit_kd.finetune import ClassifierModule
from lit_kd.students import BiGRUClassifier

VOCAB, LEN, MARK = 20, 8, 5


def bert(seed: int = 0, labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def toy_batches(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """Label 1 iff token ``MARK`` occurs; about half the rows get one planted at a random position."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB - 1, (size, LEN), generator=g)
        ids[ids >= MARK] += 1  # ids in [1, VOCAB) without MARK
        plant = torch.rand(size, generator=g) < 0.5
        where = torch.randint(0, LEN, (size,), generator=g)
        ids[plant, where[plant]] = MARK
        mask = torch.ones(size, LEN, dtype=torch.long)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": plant.long()})
    return out


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_loss_is_cross_entropy_of_the_logits_not_the_models_own_loss():
    model = bert().eval()
    module = ClassifierModule(model).eval()
    b = toy_batches(1, size=6)[0]
    b["labels"] = torch.tensor([0, 1, 1, 0, 1, 0])
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected = F.cross_entropy(logits, b["labels"])
    torch.testing.assert_close(module.loss(b), expected)
    torch.testing.assert_close(module(b), logits)

    class Tensorish(nn.Module):  # returns bare logits and ignores labels: the module still computes the loss
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.EmbeddingBag(VOCAB, 3)

        def forward(self, input_ids):
            return self.emb(input_ids)

    plain = ClassifierModule(Tensorish(), num_labels=3)
    b["labels"] = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(plain.loss(b), F.cross_entropy(plain.model(b["input_ids"]), b["labels"]))

    class OwnLoss(Tensorish):  # reports a loss of its own, which the module ignores
        def forward(self, input_ids, labels=None):
            return {"logits": self.emb(input_ids), "loss": torch.tensor(123.0)}

    own = ClassifierModule(OwnLoss(), num_labels=3)
    torch.testing.assert_close(own.loss(b), F.cross_entropy(own.model.emb(b["input_ids"]), b["labels"]))


def test_a_few_steps_learn_a_toy_task(tmp_path):
    L.seed_everything(0)
    model = BiGRUClassifier(VOCAB, embedding_dim=16, hidden_size=16, dropout=0.0)
    module = ClassifierModule(
        model,
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.1, total_iters=40),
    )
    val = DataLoader(toy_batches(4, seed=1), batch_size=None)
    t = trainer(tmp_path, max_steps=40, num_sanity_val_steps=0)
    before = t.validate(module, val, verbose=False)[0]["val/acc"]  # then fit: metric states must be reset
    t.fit(module, DataLoader(toy_batches(40), batch_size=None), val)
    after = t.validate(module, val, verbose=False)[0]["val/acc"]
    assert before < 0.7 and after > 0.9, (before, after)
    assert t.lr_scheduler_configs[0].interval == "step"
    assert t.optimizers[0].param_groups[0]["lr"] < 1e-2  # the scheduler stepped per optimizer step


def test_accuracy_metric_matches_an_independent_count(tmp_path):
    module = ClassifierModule(bert(seed=3, labels=3), num_labels=3)
    data = toy_batches(3, size=10, seed=2)
    g = torch.Generator().manual_seed(0)
    for b in data:
        b["labels"] = torch.randint(0, 3, (10,), generator=g)
    got = trainer(tmp_path).test(module, DataLoader(data, batch_size=None), verbose=False)[0]
    module.eval()
    with torch.no_grad():
        correct = sum(int((module(b).argmax(-1) == b["labels"]).sum()) for b in data)
    assert 0 < correct < 30  # a non-trivial count
    assert got["test/acc"] == pytest.approx(correct / 30)
    assert set(got) == {"test/acc", "test/loss"}


def test_export_round_trip(tmp_path):
    module = ClassifierModule(bert(seed=4))
    out = module.export_model(tmp_path / "model")
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    b = toy_batches(1, size=4)[0]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=b["input_ids"]).logits, module(b))
    gru = BiGRUClassifier(VOCAB, embedding_dim=8, hidden_size=8)
    path = ClassifierModule(gru).export_model(tmp_path / "gru" / "model.pt")
    fresh = BiGRUClassifier(VOCAB, embedding_dim=8, hidden_size=8)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for (k, a), b in zip(gru.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
