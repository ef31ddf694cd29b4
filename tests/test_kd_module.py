"""DistillationModule: frozen teacher, loss composition, errors at the first batch, checkpoints, several teachers."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lit_kd import DistillationConfig, DistillationModule, IntermediateMatch
from lit_kd.adaptors import ModelView
from lit_kd.students import BiGRUClassifier
from lit_kt import kt_adaptor

VOCAB, LEN = 40, 7


def bert(layers: int, width: int, seed: int, labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=32,
        num_labels=labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config)


def batches(n: int = 6, size: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (size, LEN), generator=g)
        mask = torch.ones(size, LEN, dtype=torch.long)
        mask[0, 5:] = 0  # one padded row
        ids[0, 5:] = 0
        labels = torch.randint(0, 3, (size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(size) + i * size})
    return out


def loader(n: int = 6) -> DataLoader:
    return DataLoader(batches(n), batch_size=None, shuffle=False)


def trainer(tmp_path=None, **kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def matches_config(**kw) -> DistillationConfig:
    return DistillationConfig(
        temperature=2.0,
        hard_label_weight=0.5,
        intermediate_matches=[
            IntermediateMatch(layer_t=4, layer_s=2, loss="hidden_mse", weight=0.3, projection=("linear", 8, 16)),
            IntermediateMatch(layer_t=3, layer_s=1, feature="attention", loss="attention_ce", weight=0.2),
        ],
        **kw,
    )


class TeacherWatch(L.Callback):
    """Records the teacher's mode at every training step."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.modes.append(any(m.training for t in module.all_teachers() for m in t.modules()))


def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer(tmp_path):
    teacher, student = bert(4, 16, 0), bert(2, 8, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(teacher, student, matches_config(), num_labels=3)
    watch = TeacherWatch()
    # validation between training steps switches modes back and forth: the teacher must stay in eval
    t = trainer(tmp_path, max_steps=6, val_check_interval=2, callbacks=[watch], num_sanity_val_steps=1)
    t.fit(module, train_dataloaders=loader(), val_dataloaders=loader(2))
    assert watch.modes == [False] * 6
    assert not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in student.parameters()} <= in_optimizer
    assert {id(p) for p in module.projections.parameters()} <= in_optimizer
    assert student.training  # the student is back in train mode after fit's last validation? (fit ends in train)


def test_loss_is_the_weighted_sum_of_independently_computed_terms():
    teacher, student = bert(4, 16, 0).eval(), bert(2, 8, 1).eval()
    module = DistillationModule(teacher, student, matches_config()).eval()
    b = batches(1)[0]
    d = module.distiller
    s_view = d.student_view(b, *d.call_student(student, b))
    (t_view,) = d.teacher_views(b)
    terms = module.loss_terms(s_view, [t_view], progress=0.0)
    assert set(terms) == {"kd", "hard", "match/hidden_2_4_hidden_mse", "match/attention_1_3_attention_ce"}
    T = 2.0
    zs, zt = s_view.logits, t_view.logits
    kd = T**2 * -(F.softmax(zt / T, -1) * F.log_softmax(zs / T, -1)).sum(-1).mean()
    hard = F.cross_entropy(zs, b["labels"])  # the model's own loss, from `labels`
    m = b["attention_mask"].bool()
    proj = module.projections["hidden_2_4_hidden_mse"]
    diff = (proj(s_view.hidden_states[2]) - t_view.hidden_states[4]) ** 2  # (B, L, 16)
    hidden = diff[m].mean()
    a_s, a_t = s_view.attentions[1], t_view.attentions[3]  # (B, H, L, L)
    rows = []
    for i in range(a_s.shape[0]):
        n = int(m[i].sum())
        for h in range(a_s.shape[1]):
            for q in range(n):
                rows.append(-(a_t[i, h, q, :n] * torch.log(a_s[i, h, q, :n].clamp_min(1e-12))).sum())
    attn = torch.stack(rows).mean()
    torch.testing.assert_close(terms["kd"][0], kd)
    torch.testing.assert_close(terms["hard"][0], hard)
    torch.testing.assert_close(terms["match/hidden_2_4_hidden_mse"][0], hidden)
    torch.testing.assert_close(terms["match/attention_1_3_attention_ce"][0], attn, rtol=1e-4, atol=1e-6)
    assert [w for _, w in terms.values()] == [1.0, 0.5, 0.3, 0.2]


def test_weight_schedules_follow_training_progress():
    config = DistillationConfig(
        kd_loss_weight=2.0,
        kd_loss_weight_scheduler="linear_decay",
        hard_label_weight=1.0,
        hard_label_weight_scheduler="linear_growth",
    )
    module = DistillationModule(bert(2, 8, 0), bert(2, 8, 1), config)
    view = ModelView(logits=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 0]))
    terms = module.loss_terms(view, [ModelView(logits=torch.randn(4, 3))], progress=0.25)
    assert terms["kd"][1] == pytest.approx(1.5) and terms["hard"][1] == pytest.approx(0.25)


def test_first_batch_errors_are_clear():
    bad_layer = DistillationConfig(intermediate_matches=[IntermediateMatch(layer_t=4, layer_s=6)])
    module = DistillationModule(bert(4, 8, 0), bert(2, 8, 1), bad_layer)
    with pytest.raises(ValueError, match=r"`layer_s` to be < 3 \(the student returns 3 hidden states\) but got 6"):
        trainer(max_steps=1).fit(module, loader(1))
    module = DistillationModule(bert(2, 8, 0, labels=3), bert(2, 8, 1, labels=2))
    with pytest.raises(ValueError, match=r"logits to have the same shape but got \(4, 3\) .* and \(4, 2\)"):
        trainer(max_steps=1).fit(module, loader(1))
    attention = DistillationConfig(
        intermediate_matches=[IntermediateMatch(layer_t=1, layer_s=0, feature="attention", loss="attention_mse")]
    )
    gru = BiGRUClassifier(VOCAB, num_labels=3, embedding_dim=8, hidden_size=8)
    module = DistillationModule(bert(2, 8, 0), gru, attention)
    with pytest.raises(ValueError, match="Expected the student to return attention maps"):
        trainer(max_steps=1).fit(module, loader(1))


def test_sdpa_models_are_switched_to_eager_only_for_attention_matches():
    plain = DistillationModule(bert(2, 8, 0), bert(2, 8, 1))
    assert plain.student.config._attn_implementation == "sdpa"
    with_attn = DistillationModule(bert(2, 8, 0), bert(2, 8, 1), matches_config())
    assert with_attn.student.config._attn_implementation == "eager"


def test_resume_from_a_mid_training_checkpoint_continues_exactly(tmp_path):
    def build():
        teacher, student = bert(4, 16, 0), bert(2, 8, 1)
        for m in (teacher, student):  # dropout off: the comparison is about state, not random draws
            m.config.hidden_dropout_prob = 0.0
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        return DistillationModule(
            teacher,
            student,
            matches_config(),
            optimizer=partial(torch.optim.AdamW, lr=1e-2),
            lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
            projection_lr=3e-2,
        )

    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    L.seed_everything(0)
    full, rec_full = build(), Losses()
    trainer(tmp_path / "a", max_epochs=2, callbacks=[rec_full]).fit(full, loader(3))
    L.seed_everything(0)
    first, rec_first = build(), Losses()
    t1 = trainer(tmp_path / "b", max_epochs=1, callbacks=[rec_first])
    t1.fit(first, loader(3))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    assert not any(k.startswith("teachers.") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    resumed, rec_resumed = build(), Losses()
    trainer(tmp_path / "c", max_epochs=2, callbacks=[rec_resumed]).fit(resumed, loader(3), ckpt_path=ckpt)
    assert rec_first.values == pytest.approx(rec_full.values[:3], rel=1e-6)
    assert rec_resumed.values == pytest.approx(rec_full.values[3:], rel=1e-5)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_several_teachers_average_logits_or_probabilities():
    t1, t2, s = bert(2, 8, 0), bert(2, 8, 1), bert(2, 8, 2)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    views = [ModelView(logits=z1), ModelView(logits=z2)]
    by_logits = DistillationModule([t1, t2], s, teacher_reduce="logits").distiller._teacher_logits(
        views, 2.0, binary=False
    )
    torch.testing.assert_close(by_logits, (z1 + z2) / 2)
    by_probs = DistillationModule([t1, t2], s, teacher_reduce="probs").distiller._teacher_logits(
        views, 2.0, binary=False
    )
    torch.testing.assert_close(F.softmax(by_probs / 2.0, -1), (F.softmax(z1 / 2, -1) + F.softmax(z2 / 2, -1)) / 2)
    b1, b2 = torch.randn(4, 5), torch.randn(4, 5)
    binary = DistillationModule([t1, t2], s, teacher_reduce="probs").distiller._teacher_logits(
        [ModelView(logits=b1), ModelView(logits=b2)], 2.0, binary=True
    )
    torch.testing.assert_close(torch.sigmoid(binary / 2), (torch.sigmoid(b1 / 2) + torch.sigmoid(b2 / 2)) / 2)


def test_tasks_pick_their_teacher_and_unknown_tasks_fail():
    ta, tb, s = bert(2, 8, 0), bert(2, 8, 1), bert(2, 8, 2)
    module = DistillationModule({"a": ta, "b": tb}, s, DistillationConfig(temperature=1.0)).eval()
    b = batches(1)[0]
    out = module.training_step({**b, "task": "b"}, 0)
    with torch.no_grad():
        zt, zs = (
            tb(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
            s(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
        )
    expected = -(F.softmax(zt, -1) * F.log_softmax(zs, -1)).sum(-1).mean()
    torch.testing.assert_close(out.detach(), expected)
    with pytest.raises(ValueError, match=r"`batch\['task'\]` to be one of \['a', 'b'\] but got 'c'"):
        module.training_step({**b, "task": "c"}, 0)


def test_teacher_and_student_parts_of_a_batch():
    teacher, student = bert(2, 8, 0), bert(2, 8, 1)
    module = DistillationModule(teacher, student, DistillationConfig(temperature=1.0, hard_label_weight=1.0)).eval()
    b = batches(1)[0]
    short = {"input_ids": b["input_ids"][:, :4], "attention_mask": b["attention_mask"][:, :4]}
    loss = module.training_step({"teacher": short, "student": b, "labels": b["labels"]}, 0)
    with torch.no_grad():
        zt = teacher(**short).logits
    zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected = -(F.softmax(zt, -1) * F.log_softmax(zs, -1)).sum(-1).mean() + F.cross_entropy(zs, b["labels"])
    torch.testing.assert_close(loss.detach(), expected.detach())


def rank_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC by the Mann-Whitney rank sum (no ties among float scores)."""
    ranks = scores.argsort().argsort().double() + 1
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_sakt_teacher_to_sakt_student_with_the_kt_adaptor(tmp_path):
    from lit_kt import SAKT, KTDataModule

    dm = KTDataModule(synthetic_students=120, max_len=20, batch_size=16)
    torch.manual_seed(0)
    teacher = SAKT(dm.num_exercises, d_model=32, num_heads=4, max_len=20)

    def fit(kd_loss_weight: float) -> tuple[DistillationModule, dict]:
        L.seed_everything(0)  # the same student initialisation, data order and dropout in both runs
        module = DistillationModule(
            teacher,
            SAKT(dm.num_exercises, d_model=8, num_heads=2, max_len=20),
            DistillationConfig(kd_loss_type="bce", temperature=1.0, kd_loss_weight=kd_loss_weight, hard_label_weight=1),
            teacher_adaptor=kt_adaptor,
            student_adaptor=kt_adaptor,
            metric_task="binary",
            optimizer=partial(torch.optim.AdamW, lr=0.01),
        )
        t = trainer(tmp_path, max_epochs=2)
        t.fit(module, dm)
        return module, t.test(module, dm, verbose=False)[0]

    def predictions(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """P(correct) and the answers at the scored positions of the test windows."""
        model.eval()
        with torch.no_grad():
            pairs = [
                (torch.sigmoid(model(b["exercises"], b["responses"]))[b["mask"]], b["responses"][b["mask"]])
                for b in dm.test_dataloader()
            ]
        return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])

    distilled, metrics = fit(1.0)
    alone, _ = fit(0.0)  # the hard-label term only: the same student trained without its teacher
    p_t, answers = predictions(teacher)
    p_distilled, p_alone = predictions(distilled.student)[0], predictions(alone.student)[0]
    # The KD term pulls the student's predictions towards the teacher's: closer on average (0.58-0.71 of the gap over
    # teacher seeds 0-4) and, position by position, correlated with them (0.20-0.43 against -0.24-0.16 alone). Soft
    # targets that ignore the teacher's position-wise predictions (another row's, their mean, 0.5) shrink the gap as
    # well, towards the teacher's mean, but leave the correlation at or below the lone student's.
    gap_distilled, gap_alone = (p_distilled - p_t).abs().mean(), (p_alone - p_t).abs().mean()
    assert gap_distilled < 0.85 * gap_alone, (float(gap_distilled), float(gap_alone))
    corr_distilled, corr_alone = (float(torch.corrcoef(torch.stack([p, p_t]))[0, 1]) for p in (p_distilled, p_alone))
    assert corr_distilled > corr_alone + 0.1, (corr_distilled, corr_alone)
    assert metrics["test/auc"] == pytest.approx(rank_auc(p_distilled, answers), abs=1e-5)
    accuracy = ((p_distilled > 0.5) == answers.bool()).double().mean()
    assert metrics["test/acc"] == pytest.approx(float(accuracy), abs=1e-5)


def test_export_student(tmp_path):
    module = DistillationModule(bert(2, 8, 0), bert(2, 8, 1))
    out = module.export_student(tmp_path / "student")
    reloaded = BertForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(reloaded.classifier.weight, module.student.classifier.weight)
    gru = BiGRUClassifier(VOCAB, num_labels=3, embedding_dim=8, hidden_size=8)
    path = DistillationModule(bert(2, 8, 0), gru).export_student(tmp_path / "gru.pt")
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(
        state["classifier.weight"] if "classifier.weight" in state else next(iter(state.values())),
        gru.state_dict()["classifier.weight"]
        if "classifier.weight" in state
        else next(iter(gru.state_dict().values())),
    )


def test_bfloat16_teacher_and_projection_learning_rate():
    teacher, student = bert(4, 16, 0), bert(2, 8, 1)
    module = DistillationModule(
        teacher,
        student,
        matches_config(),
        teacher_dtype="bfloat16",
        projection_lr=0.5,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_labels=3,
    )
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [0.1, 0.5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.projections.parameters()}
    loss = module.eval().training_step(batches(1)[0], 0)
    assert torch.isfinite(loss) and loss.dtype == torch.float32


def test_compile_switch_gives_the_same_loss(tmp_path):
    teacher, student = bert(2, 8, 0).eval(), bert(2, 8, 1).eval()
    b = batches(1)[0]
    eager = DistillationModule(teacher, student, DistillationConfig(hard_label_weight=1.0), num_labels=3).eval()
    expected = eager.training_step(b, 0)
    compiled = DistillationModule(
        teacher,
        student,
        DistillationConfig(hard_label_weight=1.0),
        num_labels=3,
        compile=True,
        compile_backend="aot_eager",
    ).eval()
    compiled.configure_model()
    assert student._compiled_call_impl is not None
    torch.testing.assert_close(compiled.training_step(b, 0), expected, rtol=1e-5, atol=1e-6)
