"""Teacher cache: same loss as the live teacher, stale caches refused, KT sequence logits padded and cut."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lit_kd import DistillationConfig, DistillationModule, kt_adaptor
from lit_kd.cache import TeacherCache, sample_hashes
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
