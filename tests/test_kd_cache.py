"""Teacher cache: same loss as the live teacher, stale caches refused, KT sequence logits padded and cut."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lit_kd import DistillationConfig, DistillationModule
from lit_kd.cache import TeacherCache, sample_hashes
from lit_kt import kt_adaptor
from tests.test_kd_module import batches, bert


def test_cached_teacher_gives_the_live_loss(tmp_path):
    teacher, student = bert(4, 16, 0).eval(), bert(2, 8, 1).eval()
    data = batches(4)
    TeacherCache.build(teacher, DataLoader(data, batch_size=None), tmp_path / "cache", progress=False)
    config = DistillationConfig(temperature=2.0, hard_label_weight=0.5)
    live = DistillationModule(teacher, student, config, num_labels=3).eval()
    cached = DistillationModule(teacher, student, config, num_labels=3, teacher_cache=str(tmp_path / "cache")).eval()
    for b in data[::-1]:  # any order: the lookup is by index
        torch.testing.assert_close(cached.training_step(b, 0), live.training_step(b, 0), rtol=1e-5, atol=1e-6)


def test_stale_or_mismatched_caches_are_refused(tmp_path):
    teacher = bert(4, 16, 0)
    data = batches(2)
    cache = TeacherCache.build(teacher, data, tmp_path / "c", progress=False)
    assert json.loads((tmp_path / "c/meta.json").read_text())["num_samples"] == 8
    with pytest.raises(ValueError, match="stale"):
        DistillationModule(bert(4, 16, 5), bert(2, 8, 1), num_labels=3, teacher_cache=str(tmp_path / "c"))
    changed = dict(data[0])
    changed["input_ids"] = changed["input_ids"].clone()
    changed["input_ids"][1, 2] += 1
    with pytest.raises(ValueError, match="inputs of sample 1 .* differ"):
        cache.lookup(changed["index"], changed, like=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"indices in \[0, 8\)"):
        cache.lookup(torch.tensor([8]), data[0], like=torch.zeros(1, 3))
    with pytest.raises(FileNotFoundError, match="no"):
        TeacherCache(tmp_path / "nothing")


def test_hashes_ignore_dynamic_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    mask = (ids != 0).long()
    wide = {
        "input_ids": torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1),
        "attention_mask": torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1),
    }
    assert (sample_hashes({"input_ids": ids, "attention_mask": mask}) == sample_hashes(wide)).all()
    assert sample_hashes({"input_ids": ids})[0] != sample_hashes({"input_ids": ids + 1})[0]


def test_knowledge_tracing_windows_of_different_lengths(tmp_path):
    from lit_kt import SAKT, KTDataModule

    dm = KTDataModule(synthetic_students=40, synthetic_seq_len=23, max_len=10, batch_size=8)
    dm.setup("fit")
    teacher = SAKT(dm.num_exercises, d_model=16, num_heads=2, max_len=10).eval()
    student = SAKT(dm.num_exercises, d_model=8, num_heads=2, max_len=10).eval()
    TeacherCache.build(teacher, dm.train_dataloader(), tmp_path / "kt", adaptor=kt_adaptor, progress=False)
    config = DistillationConfig(kd_loss_type="bce", temperature=1.0, hard_label_weight=1.0)
    kw = dict(teacher_adaptor=kt_adaptor, student_adaptor=kt_adaptor, metric_task="binary")
    live = DistillationModule(teacher, student, config, **kw).eval()
    cached = DistillationModule(teacher, student, config, teacher_cache=str(tmp_path / "kt"), **kw).eval()
    for b in dm.train_dataloader():
        torch.testing.assert_close(cached.training_step(b, 0), live.training_step(b, 0), rtol=1e-5, atol=1e-6)


def test_topk_logits_keep_the_top_probabilities_and_share_the_rest():
    from lit_kd.cache import topk_to_logits

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])  # C = 5
    top = logits.topk(2, dim=-1)
    rebuilt = topk_to_logits(top.values, top.indices, logits.logsumexp(-1), 5)
    p, q = logits.softmax(-1)[0], rebuilt.softmax(-1)[0]
    torch.testing.assert_close(q[[0, 2]], p[[0, 2]])  # the two largest: exact
    rest = (1 - p[0] - p[2]) / 3  # by hand: the other three share what is left
    torch.testing.assert_close(q[[1, 3, 4]], torch.full((3,), rest.item()))


def test_cache_with_top_k_and_hidden_states_gives_the_live_loss(tmp_path):
    from lit_kd import IntermediateMatch

    teacher, student = bert(4, 16, 0).eval(), bert(2, 8, 1).eval()
    data = batches(4)
    TeacherCache.build(
        teacher, DataLoader(data, batch_size=None), tmp_path / "cache", progress=False, top_k=2, hidden_layers=[2, 4]
    )
    meta = json.loads((tmp_path / "cache/meta.json").read_text())
    assert (meta["top_k"], meta["hidden_layers"], meta["num_hidden_states"]) == (2, [2, 4], 5)
    assert not (tmp_path / "cache/logits.npy").exists()
    config = DistillationConfig(
        temperature=2.0,
        hard_label_weight=0.5,
        intermediate_matches=[IntermediateMatch(layer_t=4, layer_s=2, projection=("linear", 8, 16))],
    )
    live = DistillationModule(teacher, student, config, num_labels=3).eval()
    cached = DistillationModule(teacher, student, config, num_labels=3, teacher_cache=str(tmp_path / "cache"))
    cached.projections.load_state_dict(live.projections.state_dict())
    cached.eval()
    for b in data:
        live_terms = live.loss_terms(*_views(live, b), 0.0)
        cached_terms = cached.loss_terms(*_views(cached, b), 0.0)
        # Hidden states and the hard loss are cached exactly; with 3 classes and top-2, the KD term is exact too:
        # the one class left gets all the remaining probability.
        for name in live_terms:
            torch.testing.assert_close(cached_terms[name][0], live_terms[name][0], rtol=1e-5, atol=1e-6)


def _views(module, batch):
    """The (student view, teacher views) that ``training_step`` builds for ``batch``."""
    d = module.distiller
    s_view = d.student_view(batch, *d.call_student(module.student, batch))
    return s_view, d.teacher_views(batch, s_view)


def test_cache_refuses_configs_it_cannot_serve(tmp_path):
    from lit_kd import IntermediateMatch

    teacher, student = bert(4, 16, 0), bert(2, 8, 1)
    data = batches(2)
    TeacherCache.build(teacher, data, tmp_path / "c", progress=False, top_k=1, hidden_layers=[2])
    hidden_4 = DistillationConfig(
        intermediate_matches=[IntermediateMatch(layer_t=4, layer_s=2, projection=("linear", 8, 16))]
    )
    with pytest.raises(ValueError, match=r"lacks \[4\].*hidden_layers=\[4\]"):
        DistillationModule(teacher, student, hidden_4, num_labels=3, teacher_cache=str(tmp_path / "c"))
    attention = DistillationConfig(
        intermediate_matches=[IntermediateMatch(layer_t=1, layer_s=1, feature="attention", loss="attention_mse")]
    )
    with pytest.raises(ValueError, match="no attention matches"):
        DistillationModule(teacher, student, attention, num_labels=3, teacher_cache=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="for `kd_loss_type='bce'`"):
        DistillationModule(
            teacher, student, DistillationConfig(kd_loss_type="bce"), num_labels=3, teacher_cache=str(tmp_path / "c")
        )
    with pytest.raises(ValueError, match=r"`top_k` in \[1, 3\)"):
        TeacherCache.build(teacher, data, tmp_path / "d", progress=False, top_k=3)
    with pytest.raises(ValueError, match="index the teacher's 5 hidden states"):
        TeacherCache.build(teacher, data, tmp_path / "e", progress=False, hidden_layers=[5])
