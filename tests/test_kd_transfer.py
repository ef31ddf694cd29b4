"""Transfer sets: unlabelled sentences (a file, or noisy copies of the training sentences) feed the KD term; their
absent labels never reach the hard-label term; the labelled batches stay those of a run without a transfer set."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_kd import DistillationConfig, Distiller
from lit_kd.data import (
    UNLABELLED,
    TextClassificationDataModule,
    TextFormatError,
    augment_sentence,
    read_unlabelled_text,
)
from tests.ddp_helpers import KD_TRAIN_SIZE, tiny_bert, write_text_data

UNLABELLED_SENTENCES = ["a very good film", "dull and long", "the plot was fun", "not great"]


@pytest.fixture()
def folder(tmp_path):
    data = write_text_data(tmp_path / "data")
    (data / "unlabelled.txt").write_text("\n".join(UNLABELLED_SENTENCES) + "\n\n")
    return data


def module(folder, **kw) -> TextClassificationDataModule:
    dm = TextClassificationDataModule(str(folder), tokenizer=str(folder / "tokenizer"), batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_transfer_rows_are_unlabelled_sentences_beside_the_same_labelled_batches(folder):
    plain = module(folder)
    mixed = module(folder, transfer_file=str(folder / "unlabelled.txt"), transfer_per_sample=1)
    torch.manual_seed(0)
    plain_batches = list(plain.train_dataloader())
    torch.manual_seed(0)
    mixed_batches = list(mixed.train_dataloader())
    assert len(mixed_batches) == len(plain_batches) == KD_TRAIN_SIZE // 2
    transfer = mixed.transfer_dataset().encoding["input_ids"]
    assert len(transfer) == len(UNLABELLED_SENTENCES)
    seen = set()
    for p, m in zip(plain_batches, mixed_batches):
        labelled = m["labels"] != UNLABELLED
        assert labelled.sum() == 2 and (~labelled).sum() == 2  # batch_size labelled + batch_size transfer rows
        assert m["index"][labelled].tolist() == p["index"].tolist()  # the same labelled samples, in the same order
        assert m["labels"][labelled].tolist() == p["labels"].tolist()
        for row in (~labelled).nonzero().flatten().tolist():
            j = int(m["index"][row]) - KD_TRAIN_SIZE  # transfer row j of the file
            n = int(m["attention_mask"][row].sum())
            assert m["input_ids"][row, :n].tolist() == transfer[j]
            seen.add(j)
    assert seen == set(range(len(UNLABELLED_SENTENCES)))  # every unlabelled sentence was used


def test_the_kd_term_reads_transfer_rows_and_the_hard_term_never_does(folder):
    dm = module(folder, transfer_file=str(folder / "unlabelled.txt"))
    batch = next(iter(dm.train_dataloader()))
    labelled = batch["labels"] != UNLABELLED
    teacher, student = tiny_bert(layers=2, width=32, seed=0).eval(), tiny_bert(layers=1, width=16, seed=1).eval()
    for hard_label_loss in (None, "ce"):  # the student's own (transformers) loss, and lit_kd's cross-entropy
        config = DistillationConfig(temperature=2.0, hard_label_weight=1.0, hard_label_loss=hard_label_loss)
        d = Distiller(teacher, config)
        terms = d.loss_terms(d.student_view(batch, d.call_student(student, batch)[0]), d.teacher_views(batch), 0.0)
        with torch.no_grad():
            z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kd = 4.0 * -(F.softmax(z_t / 2, -1) * F.log_softmax(z_s / 2, -1)).sum(-1).mean()  # over all 4 rows
        hard = F.cross_entropy(z_s[labelled], batch["labels"][labelled])  # labelled rows only
        torch.testing.assert_close(terms["kd"][0], kd)
        torch.testing.assert_close(terms["hard"][0], hard)


def test_augmented_copies_and_file_formats(folder, tmp_path):
    dm = module(folder, transfer_augment=2, transfer_seed=3)
    transfer = dm.transfer_dataset()
    assert len(transfer) == 2 * KD_TRAIN_SIZE and set(transfer.labels) == {UNLABELLED}
    again = module(folder, transfer_augment=2, transfer_seed=3).transfer_dataset()
    assert transfer.encoding["input_ids"] == again.encoding["input_ids"]  # reproducible
    # per_sample None: enough rows per labelled sample to use every transfer row once per epoch
    assert module(folder, transfer_augment=2, transfer_per_sample=None).train_dataset().per_sample == 2

    rng = random.Random(0)
    copies = [augment_sentence("a b c d e f g h", rng, ["z"], p=0.3) for _ in range(50)]
    assert any(c != "a b c d e f g h" for c in copies) and all(c for c in copies)
    assert all(set(c.split()) <= set("abcdefghz") for c in copies)

    table = tmp_path / "more.tsv"
    table.write_text("label\tsentence\n9\tgreat fun\n\tdull\n")
    assert read_unlabelled_text(table) == ["great fun", "dull"]  # labels ignored, even missing ones
    (tmp_path / "bad.tsv").write_text("text\nfine\n")
    with pytest.raises(TextFormatError, match=r"bad.tsv:1: Expected a header with column 'sentence'"):
        read_unlabelled_text(tmp_path / "bad.tsv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TextFormatError, match="empty.txt: Expected at least one sentence"):
        read_unlabelled_text(tmp_path / "empty.txt")


def test_transfer_batches_train_a_distillation_module(folder, tmp_path):
    import lightning as L

    from lit_kd import DistillationModule

    dm = module(folder, transfer_augment=1)
    kd = DistillationModule(
        tiny_bert(layers=2, width=32, seed=0), tiny_bert(layers=1, width=16, seed=1),
        DistillationConfig(temperature=2.0, hard_label_weight=1.0),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(kd, dm)
    assert torch.isfinite(trainer.callback_metrics["train/hard"]) and torch.isfinite(
        trainer.callback_metrics["train/kd"]
    )
    assert isinstance(dm.train_dataloader(), DataLoader)


def test_unused_training_rows_become_unlabelled_transfer_rows(folder):
    limit = KD_TRAIN_SIZE // 2
    texts = module(folder).dataset("train")
    dm = module(folder, train_limit=limit, transfer_unused_train=True, transfer_per_sample=2)
    assert len(dm.dataset("train")) == limit  # the labelled budget
    transfer = dm.transfer_dataset()
    # The rows beyond the limit, in file order, as they were tokenised for the full split; their labels dropped.
    assert transfer.encoding["input_ids"] == texts.encoding["input_ids"][limit:]
    assert set(transfer.labels) == {UNLABELLED}
    for batch in dm.train_dataloader():
        labelled = batch["labels"] != UNLABELLED
        assert (batch["index"][labelled] < limit).all() and (batch["index"][~labelled] >= limit).all()
        assert labelled.sum() * 2 == (~labelled).sum()
    with pytest.raises(ValueError, match="Expected `train_limit` with `transfer_unused_train=True`"):
        TextClassificationDataModule(str(folder), tokenizer=str(folder / "tokenizer"), transfer_unused_train=True)
    with pytest.raises(ValueError, match="Expected rows beyond `train_limit=.*` in .*train.tsv"):
        module(folder, train_limit=KD_TRAIN_SIZE, transfer_unused_train=True).transfer_dataset()


def test_cache_loader_holds_every_training_row_once_under_the_index_training_batches_give_it(folder):
    limit = KD_TRAIN_SIZE // 2
    dm = module(
        folder, train_limit=limit, transfer_unused_train=True, transfer_file=str(folder / "unlabelled.txt"),
        transfer_per_sample=2, eval_batch_size=3,
    )  # fmt: skip
    labelled, transfer = dm.dataset("train"), dm.transfer_dataset()
    rows = {}
    lengths = []
    for batch in dm.cache_dataloader():
        assert len(batch["index"]) <= 3
        for row, i in enumerate(batch["index"].tolist()):
            assert i not in rows  # once
            n = int(batch["attention_mask"][row].sum())
            rows[i] = (batch["input_ids"][row, :n].tolist(), int(batch["labels"][row]))
            lengths.append(n)
    assert sorted(rows) == list(range(limit + len(transfer)))  # labelled 0..n-1, then transfer n+j
    for i in range(limit):
        assert rows[i] == (labelled.encoding["input_ids"][i], labelled.labels[i])
    for j in range(len(transfer)):
        assert rows[limit + j] == (transfer.encoding["input_ids"][j], UNLABELLED)
    assert lengths == sorted(lengths)  # similar lengths together
    # The training batches carry the same rows under the same indices.
    for batch in dm.train_dataloader():
        for row, i in enumerate(batch["index"].tolist()):
            n = int(batch["attention_mask"][row].sum())
            assert (batch["input_ids"][row, :n].tolist(), int(batch["labels"][row])) == rows[i]
    plain = module(folder, eval_batch_size=4)  # no transfer set: the labelled rows alone
    assert sorted(i for b in plain.cache_dataloader() for i in b["index"].tolist()) == list(range(KD_TRAIN_SIZE))
    with pytest.raises(ValueError, match="Expected `batch_size` >= 1 \\(or None\\) but got 0"):
        plain.cache_dataloader(batch_size=0)


def test_a_cache_built_from_the_cache_loader_serves_transfer_batches_as_the_live_teacher(folder, tmp_path):
    from lit_kd import IntermediateMatch
    from lit_kd.cache import TeacherCache

    dm = module(folder, train_limit=KD_TRAIN_SIZE // 2, transfer_unused_train=True, transfer_per_sample=2)
    teacher, student = tiny_bert(layers=2, width=32, seed=0).eval(), tiny_bert(layers=1, width=32, seed=1).eval()
    TeacherCache.build(teacher, dm.cache_dataloader(), tmp_path / "cache", progress=False, hidden_layers=[2])
    config = DistillationConfig(
        temperature=2.0, hard_label_weight=1.0, intermediate_matches=[IntermediateMatch(layer_t=2, layer_s=1)]
    )
    live, cached = Distiller(teacher, config), Distiller(teacher, config, teacher_cache=str(tmp_path / "cache"))
    batches = list(dm.train_dataloader())
    assert any((b["labels"] == UNLABELLED).any() for b in batches)
    for batch in batches:
        terms = []
        for d in (live, cached):
            s_view = d.student_view(batch, *d.call_student(student, batch))
            terms.append(d.loss_terms(s_view, d.teacher_views(batch, s_view), 0.0))
        assert terms[0].keys() == terms[1].keys()
        for name in terms[0]:
            torch.testing.assert_close(terms[1][name][0], terms[0][name][0], rtol=1e-5, atol=1e-6)
