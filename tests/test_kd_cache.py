"""Teacher cache: same loss as the live teacher, stale caches refused, KT sequence logits padded and cut; damaged,
changed or half-written caches refused on open, naming the file; sample hashes independent of the padding."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import lit_kd.cache
from lit_kd import DistillationConfig, DistillationModule
from lit_kd.cache import TeacherCache, sample_hashes
from lit_kt import kt_adaptor
from tests.test_kd_module import LEN, VOCAB, batches, bert


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


# ---------------------------------------------------------------- a cache that verifies itself


def _built(tmp_path, seed: int = 0, name: str = "c"):
    """A cache of ``bert(4, 16, seed)``'s logits over ``batches(2)`` (8 samples, 3 classes) in ``tmp_path / name``."""
    return TeacherCache.build(bert(4, 16, seed), batches(2), tmp_path / name, progress=False)


def _flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def _negate(file):
    np.save(file, -np.load(file))  # same header and size, other values


def _truncate(file):
    file.write_bytes(file.read_bytes()[:-4])


def _empty(file):
    file.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_last_byte, "sha256 checksum recorded in meta.json .* the file changed since the cache was built"),
        (_negate, "sha256 checksum recorded in meta.json"),
        (_truncate, "to hold 224 bytes .* but it holds 220: the file is truncated"),
        (_empty, "could not read its header .* holds 0 bytes"),
    ],
)
def test_a_damaged_logits_file_is_refused_on_open_naming_it(tmp_path, damage, message):
    _built(tmp_path)
    file = tmp_path / "c" / "logits.npy"
    damage(file)
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*" + message):
        TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match=re.escape(str(file))):  # also when the module opens it
        DistillationModule(bert(4, 16, 0), bert(2, 8, 1), num_labels=3, teacher_cache=str(tmp_path / "c"))


def test_verify_false_skips_only_the_checksums(tmp_path):
    _built(tmp_path)
    file = tmp_path / "c" / "logits.npy"
    _negate(file)
    assert (TeacherCache(tmp_path / "c", verify=False).logits == np.load(file)).all()  # the flip goes unnoticed
    kw = dict(num_labels=3, teacher_cache=str(tmp_path / "c"))
    module = DistillationModule(bert(4, 16, 0), bert(2, 8, 1), teacher_cache_verify=False, **kw)  # passed through
    assert (module.distiller.cache.logits == np.load(file)).all()
    _truncate(file)
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*truncated"):  # the size is still checked
        TeacherCache(tmp_path / "c", verify=False)


def test_another_teachers_logits_swapped_in_are_refused(tmp_path):
    _built(tmp_path, seed=0, name="a")
    _built(tmp_path, seed=5, name="b")
    shutil.copy(tmp_path / "b" / "logits.npy", tmp_path / "a" / "logits.npy")  # same shape and dtype
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "a" / "logits.npy")) + ".*checksum"):
        TeacherCache(tmp_path / "a", teacher=bert(4, 16, 0))


def test_an_array_of_another_shape_or_a_missing_array_is_refused(tmp_path):
    _built(tmp_path)
    hashes = tmp_path / "c" / "sample_hashes.npy"
    np.save(hashes, np.load(hashes)[:4])
    with pytest.raises(ValueError, match=re.escape(str(hashes)) + r".*\(8,\) int64 array .* but got \(4,\) int64"):
        TeacherCache(tmp_path / "c")
    hashes.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(hashes)) + ".*does not exist"):
        TeacherCache(tmp_path / "c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "could not parse it .* holds 0 bytes"),
        ('{"format": 2, "num_samp', "could not parse it"),
        ("[1, 2]", "a JSON object but got list"),
        ('{"num_samples": 8}', "format 2 .* but got format None: the cache was written by another version"),
    ],
)
def test_a_broken_meta_json_is_refused_naming_it(tmp_path, text, message):
    _built(tmp_path)
    (tmp_path / "c" / "meta.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c" / "meta.json")) + ".*" + message):
        TeacherCache(tmp_path / "c")


def test_meta_json_records_each_arrays_shape_dtype_and_checksum(tmp_path):
    import hashlib

    TeacherCache.build(bert(4, 16, 0), batches(2), tmp_path / "c", progress=False, top_k=2, hidden_layers=[1])
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert "data_fingerprint" not in meta  # replaced by the per-batch input check (see the module docstring)
    assert sorted(meta["arrays"]) == sorted(
        ["topk_logits.npy", "topk_indices.npy", "logsumexp.npy", "hidden_1.npy", "sample_hashes.npy"]
    )
    for name, record in meta["arrays"].items():
        array = np.load(tmp_path / "c" / name)
        assert (tuple(record["shape"]), np.dtype(record["dtype"])) == (array.shape, array.dtype)
        assert record["sha256"] == hashlib.sha256((tmp_path / "c" / name).read_bytes()).hexdigest()  # = sha256sum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left beside


def _killed_after_first_array(monkeypatch):
    """Make the next build raise once its first array is written, as if the process died there."""
    write = lit_kd.cache._write_padded

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(lit_kd.cache, "_write_padded", write_then_die)


def test_a_rebuild_killed_between_its_writes_leaves_the_old_cache(tmp_path, monkeypatch):
    old = _built(tmp_path, seed=0)
    old_logits = np.array(old.logits)
    _killed_after_first_array(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        TeacherCache.build(bert(4, 16, 5), batches(2), tmp_path / "c", progress=False)
    reopened = TeacherCache(tmp_path / "c", teacher=bert(4, 16, 0))  # verified: still the old teacher's cache
    np.testing.assert_array_equal(reopened.logits, old_logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the half-written folder was removed


def test_a_rebuild_killed_without_cleanup_leaves_the_old_cache_and_a_folder_beside(tmp_path, monkeypatch):
    old_logits = np.array(_built(tmp_path, seed=0).logits)
    _killed_after_first_array(monkeypatch)
    monkeypatch.setattr(lit_kd.cache.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        TeacherCache.build(bert(4, 16, 5), batches(2), tmp_path / "c", progress=False)
    monkeypatch.undo()
    left = [p.name for p in tmp_path.iterdir() if p.name != "c"]
    assert len(left) == 1 and left[0].startswith(".c.building-")
    assert sorted(p.name for p in (tmp_path / left[0]).iterdir()) == ["logits.npy"]  # the new array, not in c/
    np.testing.assert_array_equal(TeacherCache(tmp_path / "c", teacher=bert(4, 16, 0)).logits, old_logits)


def test_a_rebuild_killed_between_its_two_moves_leaves_no_cache(tmp_path, monkeypatch):
    _built(tmp_path, seed=0)
    replace = lit_kd.cache.os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old cache is aside; the new one not yet in place
            raise KeyboardInterrupt("killed")
        replace(src, dst)

    monkeypatch.setattr(lit_kd.cache.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        TeacherCache.build(bert(4, 16, 5), batches(2), tmp_path / "c", progress=False)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="found none"):
        TeacherCache(tmp_path / "c")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".c.old-")]
    assert len(aside) == 1
    TeacherCache(aside[0], teacher=bert(4, 16, 0))  # the old cache, whole, beside


def test_a_complete_rebuild_replaces_the_old_cache(tmp_path):
    _built(tmp_path, seed=0)
    _built(tmp_path, seed=5)
    TeacherCache(tmp_path / "c", teacher=bert(4, 16, 5))
    with pytest.raises(ValueError, match="stale"):
        TeacherCache(tmp_path / "c", teacher=bert(4, 16, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_build_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \['notes.txt'\]"):
        _built(tmp_path)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def _roberta_batches(width: int, size: int, order: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> list:
    """Samples ``order`` of (ids, lengths), ``size`` a batch, right-padded with pad id 1 to ``width`` (RoBERTa)."""
    out = []
    for chunk in order.split(size):
        batch_ids = torch.ones(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk.tolist()):
            batch_ids[row, : lengths[i]] = ids[i, : lengths[i]]
            mask[row, : lengths[i]] = 1
        out.append(
            {"input_ids": batch_ids, "attention_mask": mask, "labels": torch.zeros(len(chunk)).long(), "index": chunk}
        )
    return out


def test_pad_id_1_cache_accepts_the_same_samples_under_another_padding_and_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 8
    ids = torch.randint(3, VOCAB, (n, LEN), generator=g)
    lengths = torch.tensor([LEN, 3, 5, LEN, 2, 4, 6, 1])
    teacher, student = bert(4, 16, 0).eval(), bert(2, 8, 1).eval()
    built = _roberta_batches(LEN, 4, torch.arange(n), lengths, ids)
    cache = TeacherCache.build(teacher, built, tmp_path / "c", progress=False)
    assert cache.meta["pad_token_id"] == 1  # read from the batches: input_ids where attention_mask == 0
    # Reshuffled, other batch sizes, padded to each batch's longest (dynamic) or wider than ever built.
    order = torch.randperm(n, generator=g)
    for width in (None, LEN + 5):
        for b in _roberta_batches(width or LEN, 3, order, lengths, ids):
            if width is None:
                keep = int(b["attention_mask"].sum(1).max())
                b = {**b, "input_ids": b["input_ids"][:, :keep], "attention_mask": b["attention_mask"][:, :keep]}
            like = torch.zeros(len(b["index"]), 3)
            np.testing.assert_array_equal(cache.lookup(b["index"], b, like).numpy(), cache.logits[b["index"].numpy()])
            # Without the attention mask the recorded pad id 1 marks the padding.
            without_mask = {"input_ids": b["input_ids"], "index": b["index"]}
            np.testing.assert_array_equal(
                cache.lookup(b["index"], without_mask, like).numpy(), cache.logits[b["index"].numpy()]
            )
    # The cached loss is the live one on the re-padded batches.
    config = DistillationConfig(temperature=2.0, hard_label_weight=0.5)
    live = DistillationModule(teacher, student, config, num_labels=3).eval()
    cached = DistillationModule(teacher, student, config, num_labels=3, teacher_cache=str(tmp_path / "c")).eval()
    for b in _roberta_batches(LEN + 5, 3, order, lengths, ids):
        torch.testing.assert_close(cached.training_step(b, 0), live.training_step(b, 0), rtol=1e-5, atol=1e-6)
    # Changed data is still refused: one real token, or a padding position turned into a token.
    b = _roberta_batches(LEN + 5, 3, order, lengths, ids)[0]
    changed = {**b, "input_ids": b["input_ids"].clone()}
    changed["input_ids"][0, 0] += 1
    with pytest.raises(ValueError, match=f"inputs of sample {int(b['index'][0])} .* differ"):
        cache.lookup(b["index"], changed, torch.zeros(3, 3))
    short = int(b["attention_mask"].sum(1).argmin())
    longer = {**b, "attention_mask": b["attention_mask"].clone()}
    longer["attention_mask"][short, lengths[b["index"][short]]] = 1
    with pytest.raises(ValueError, match=f"inputs of sample {int(b['index'][short])} .* differ"):
        cache.lookup(b["index"], longer, torch.zeros(3, 3))


def test_an_explicit_pad_id_must_be_the_one_the_batches_pad_with(tmp_path):
    ids, lengths = torch.randint(3, VOCAB, (4, LEN)), torch.tensor([LEN, 2, 3, 4])
    with pytest.raises(ValueError, match=r"pad_token_id=0 where `attention_mask` is 0 but got ids \[1\]"):
        TeacherCache.build(
            bert(4, 16, 0),
            _roberta_batches(LEN, 4, torch.arange(4), lengths, ids),
            tmp_path / "c",
            progress=False,
            pad_token_id=0,
        )
    assert not (tmp_path / "c").exists()


def test_hashes_ignore_the_padding_side_and_the_key_order():
    ids = torch.tensor([[5, 6, 7, 1], [8, 1, 1, 1]])
    mask = (ids != 1).long()
    tti = torch.zeros_like(ids)
    right = sample_hashes({"input_ids": ids, "token_type_ids": tti, "attention_mask": mask})
    left_ids = torch.tensor([[1, 5, 6, 7], [1, 1, 1, 8]])
    left = sample_hashes({"attention_mask": (left_ids != 1).long(), "token_type_ids": tti, "input_ids": left_ids})
    assert (right == left).all()
    assert (right == sample_hashes({"input_ids": ids, "token_type_ids": tti}, pad_token_id=1)).all()
    assert (right != sample_hashes({"input_ids": ids, "token_type_ids": tti}, pad_token_id=0)).all()


# ---------------------------------------------------------------- token logits (causal LMs): per-token top-k


def _lm_cache(tmp_path, name: str = "lm", top_k: int | None = 5, pad_id: int = 0):
    """A cache of a 2-layer GPT-2's shifted next-token logits over 2 right-padded batches of 4 samples."""
    from lit_kd.adaptors import causal_lm_adaptor
    from tests.test_kd_lm import lm_batch, tiny_gpt2

    teacher = tiny_gpt2(2, 0).eval()
    data = [lm_batch(size=4, seed=s, pad_id=pad_id, index_start=4 * s) for s in range(2)]
    cache = TeacherCache.build(
        teacher, data, tmp_path / name, adaptor=causal_lm_adaptor, top_k=top_k, progress=False, pad_token_id=pad_id
    )
    return teacher, data, cache


def test_topk_cache_of_causal_lm_logits_stores_real_tokens_only_and_gives_the_topk_loss(tmp_path):
    from lit_kd import Distiller, ModelView
    from lit_kd.adaptors import causal_lm_adaptor
    from lit_kd.cache import topk_to_logits
    from tests.test_kd_lm import LEN, V, model_inputs, tiny_gpt2

    k = 5
    teacher, data, _ = _lm_cache(tmp_path, top_k=k)
    path = tmp_path / "lm"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["logits_shape"] == [LEN - 1, V] and meta["top_k"] == k and meta["logits_mask"] is True
    arrays = [np.load(path / n) for n in ("topk_logits.npy", "topk_indices.npy", "logsumexp.npy")]
    n_positions = 8 * (LEN - 1)
    assert sum(a.nbytes for a in arrays) / n_positions == 8 * k + 4  # the docstring's bytes per token
    stored = np.load(path / "logits_mask.npy")  # (N, L-1)
    with torch.no_grad():
        for b in data:
            view = causal_lm_adaptor(b, teacher(**model_inputs(b)))
            assert (stored[b["index"].numpy()] == view.logits_mask.numpy()).all()
    assert (~stored).sum() > 0 and (arrays[0][~stored] == 0).all()  # padding is not stored
    # the same samples padded with another id give the same files (padding is not stored)
    _lm_cache(tmp_path, "lm7", top_k=k, pad_id=7)
    for name in ("topk_logits.npy", "topk_indices.npy", "logsumexp.npy", "logits_mask.npy"):
        assert np.array_equal(np.load(path / name), np.load(tmp_path / "lm7" / name)), name
    # the KD loss from the cache is the loss against the live teacher's top-k rebuilt logits
    student = tiny_gpt2(1, 1).eval()
    config = DistillationConfig(temperature=2.0)
    cached = DistillationModule(teacher, student, config, task_type="causal_lm", teacher_cache=str(path)).eval()
    reference = Distiller(None, config)
    with torch.no_grad():
        for b in data[::-1]:
            s_view = causal_lm_adaptor(b, student(**model_inputs(b)))
            z_t = causal_lm_adaptor(b, teacher(**model_inputs(b))).logits  # (B, L-1, V)
            top = z_t.topk(k, dim=-1)
            rebuilt = topk_to_logits(top.values, top.indices, z_t.logsumexp(-1), V)
            expected = reference.loss_terms(s_view, [ModelView(logits=rebuilt)], 0.0)["kd"][0]
            got = cached.loss_terms(*_views(cached, b), 0.0)["kd"][0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [5, None])
def test_token_cache_refuses_another_vocabulary_and_longer_sequences(tmp_path, top_k):
    from tests.test_kd_lm import LEN, V, tiny_gpt2

    teacher, data, cache = _lm_cache(tmp_path, top_k=top_k)
    b = data[0]
    student = tiny_gpt2(1, 1, vocab_size=V + 10).eval()
    module = DistillationModule(
        teacher, student, task_type="causal_lm", teacher_cache=str(tmp_path / "lm"), num_labels=V + 10
    ).eval()
    with pytest.raises(ValueError, match=rf"teacher's {V} classes .*V_t={V}.*V_s={V + 10}"):
        module.training_step(b, 0)
    with pytest.raises(ValueError, match=rf"V_t={V}.*V_s={V - 1}"):
        cache.lookup(b["index"], b, like=torch.zeros(4, LEN - 1, V - 1))
    with pytest.raises(ValueError, match=r"dimension 1 is longer \(16 > 15\)"):
        cache.lookup(b["index"], b, like=torch.zeros(4, LEN, V))
    with pytest.raises(ValueError, match=r"shape of the cached teacher logits"):
        cache.lookup(b["index"], b, like=torch.zeros(4, V))
    shorter = cache.lookup(b["index"], b, like=torch.zeros(4, LEN - 3, V))  # a batch padded less: cut
    assert shorter.shape == (4, LEN - 3, V)


def test_token_cache_refuses_a_student_scoring_positions_it_did_not_store(tmp_path):
    from lit_kd.adaptors import causal_lm_adaptor
    from tests.test_kd_lm import LEN, V

    _, data, cache = _lm_cache(tmp_path)
    b = data[0]
    real = b["attention_mask"].bool()
    # the same samples, left-padded: their inputs hash alike, but the positions moved
    order = torch.argsort(real.long(), dim=1, stable=True)  # pads first, then the real tokens in order
    left = {
        "input_ids": b["input_ids"].gather(1, order),
        "attention_mask": b["attention_mask"].gather(1, order),
        "labels": b["labels"].gather(1, order),
        "index": b["index"],
    }
    assert (sample_hashes(left) == sample_hashes(b)).all()
    mask = causal_lm_adaptor(left, torch.zeros(4, LEN, V)).logits_mask
    with pytest.raises(ValueError, match=r"scores position \d+ of sample 0, which was padding"):
        cache.lookup(left["index"], left, like=torch.zeros(4, LEN - 1, V), mask=mask)
    ok = causal_lm_adaptor(b, torch.zeros(4, LEN, V)).logits_mask  # the padding of the build
    assert cache.lookup(b["index"], b, like=torch.zeros(4, LEN - 1, V), mask=ok).shape == (4, LEN - 1, V)
