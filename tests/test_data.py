"""Windowing, collation and KTDataModule (files and simulated students)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_kt.data import KTDataModule, KTDataset, collate_kt, window_spans
from lit_kt.formats import StudentSequence, write_three_line


@pytest.mark.parametrize(
    "length, max_len, stride, expected",
    [
        (5, 10, None, [(0, 5, 0)]),
        (10, 10, None, [(0, 10, 0)]),
        (23, 10, None, [(0, 10, 0), (10, 20, 10), (13, 23, 20)]),
        (23, 10, 5, [(0, 10, 0), (5, 15, 10), (10, 20, 15), (13, 23, 20)]),
        (3, 1, None, [(0, 1, 0), (1, 2, 1), (2, 3, 2)]),
    ],
)
def test_window_spans_by_hand(length, max_len, stride, expected):
    assert window_spans(length, max_len, stride) == expected


@pytest.mark.parametrize("length", [1, 7, 50, 99, 100, 101, 257])
@pytest.mark.parametrize("stride", [None, 1, 33, 100])
def test_every_position_is_scored_exactly_once_and_windows_fit(length, stride):
    counts = np.zeros(length, dtype=int)
    for start, end, score_from in window_spans(length, 100, stride):
        assert 0 <= start <= score_from < end <= length and end - start <= 100
        counts[score_from:end] += 1
    assert np.all(counts == 1)


def test_window_spans_rejects_bad_stride():
    with pytest.raises(ValueError, match="`stride`.*between 1 and max_len \\(10\\).*11"):
        window_spans(5, 10, 11)


def _seq(ex, resp):
    return StudentSequence(np.array(ex), np.array(resp))


def test_dataset_and_collate_pad_right_and_mask_scored_positions():
    seqs = [_seq(range(1, 8), [1, 0, 1, 1, 0, 0, 1]), _seq([4, 2], [0, 1])]
    ds = KTDataset(seqs, max_len=5, stride=3)
    # sequence 0 (7 long): windows (0,5,0), (2,7,5); sequence 1: (0,2,0)
    spans = [(w.sequence, w.start, w.end, w.score_from) for w in ds.windows]
    assert spans == [(0, 0, 5, 0), (0, 2, 7, 5), (1, 0, 2, 0)]
    b = collate_kt([ds[i] for i in range(3)])
    assert b["exercises"].tolist() == [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7], [4, 2, 0, 0, 0]]
    assert b["responses"].tolist() == [[1, 0, 1, 1, 0], [1, 1, 0, 0, 1], [0, 1, 0, 0, 0]]
    assert b["mask"].tolist() == [[True] * 5, [False, False, False, True, True], [True, True, False, False, False]]
    assert b["index"].tolist() == [0, 1, 2]
    assert int(b["mask"].sum()) == ds.num_interactions == 9


def _write_dir(tmp_path, n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)

    def students(n):
        out = []
        for _ in range(n):
            length = int(rng.integers(1, 40))
            out.append(_seq(rng.integers(1, 13, length), rng.integers(0, 2, length)))
        return out

    train, test = students(n_train), students(n_test)
    write_three_line(train, tmp_path / "train.csv")
    write_three_line(test, tmp_path / "test.csv")
    return train, test


def test_datamodule_holds_out_validation_students_without_loss_or_overlap(tmp_path):
    train, test = _write_dir(tmp_path)
    dm = KTDataModule(data_dir=str(tmp_path), max_len=10, val_fraction=0.2, seed=1)
    dm.setup("fit")
    tr, va = dm.sequences("train"), dm.sequences("val")
    assert len(tr) == 24 and len(va) == 6
    key = lambda s: (tuple(s.exercises), tuple(s.responses))  # noqa: E731
    assert sorted(map(key, tr + va)) == sorted(map(key, train))  # nothing lost, nothing twice
    assert dm.num_exercises == max(int(s.exercises.max()) for s in train + test)
    batch = next(iter(dm.train_dataloader()))
    assert batch["exercises"].shape[1] <= 10 and batch["exercises"].dtype == torch.long
    # the same seed gives the same split, another seed another one
    again = KTDataModule(data_dir=str(tmp_path), max_len=10, val_fraction=0.2, seed=1)
    assert list(map(key, again.sequences("val"))) == list(map(key, va))
    other = KTDataModule(data_dir=str(tmp_path), max_len=10, val_fraction=0.2, seed=2)
    assert list(map(key, other.sequences("val"))) != list(map(key, va))
    scored = sum(int(b["mask"].sum()) for b in dm.test_dataloader())
    assert scored == sum(len(s) for s in test)


def test_datamodule_folds(tmp_path):
    train, test = _write_dir(tmp_path)
    write_three_line(train[:20], tmp_path / "train1.csv")
    write_three_line(train[20:], tmp_path / "valid1.csv")
    dm = KTDataModule(data_dir=str(tmp_path), fold=1)
    assert len(dm.sequences("train")) == 20 and len(dm.sequences("val")) == 10 and len(dm.sequences("test")) == 10


def test_datamodule_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        KTDataModule(data_dir=str(tmp_path)).num_exercises
    _write_dir(tmp_path)
    with pytest.raises(ValueError, match="`num_exercises`.*largest exercise id"):
        KTDataModule(data_dir=str(tmp_path), num_exercises=3).num_exercises
    with pytest.raises(ValueError, match="`val_fraction`"):
        KTDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="`stride`"):
        KTDataModule(max_len=10, eval_stride=20)


def test_long_format_datamodule(tmp_path):
    rows = ["user_id,skill_id,correct,order_id"]
    for f in ("train.csv", "test.csv"):
        body = rows + ["a,3,1,2", "a,5,0,1", "b,1,1,1", "c,2,0,4", "c,2,1,3", "d,4,1,1"]
        (tmp_path / f).write_text("\n".join(body) + "\n")
    dm = KTDataModule(data_dir=str(tmp_path), format="long", val_fraction=0.25, seed=0)
    assert dm.num_exercises == 5
    assert len(dm.sequences("train")) == 3 and len(dm.sequences("val")) == 1


def test_synthetic_default_is_deterministic_and_split_in_halves():
    a = KTDataModule(synthetic_students=200, val_fraction=0.1, seed=5)
    b = KTDataModule(synthetic_students=200, val_fraction=0.1, seed=5)
    assert a.num_exercises == 50
    assert len(a.sequences("test")) == 100 and len(a.sequences("train")) == 90 and len(a.sequences("val")) == 10
    for split in ("train", "val", "test"):
        assert all(np.array_equal(x.responses, y.responses) for x, y in zip(a.sequences(split), b.sequences(split)))
    assert 0.5 < a.oracle_auc() < a.true_probability_auc() <= 1.0


def test_length_grouped_sampler_covers_every_window_once_with_little_padding():
    from lit_kt.data import LengthGroupedSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 201, 1003)
    sampler = LengthGroupedSampler(lengths, batch_size=16, group_batches=8, seed=3)
    first, second = list(sampler), list(sampler)  # the epoch advances by itself
    assert sorted(first) == list(range(1003)) and sorted(second) == list(range(1003))
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first  # deterministic by seed and epoch

    def padded_positions(order):
        batches = [order[i : i + 16] for i in range(0, len(order), 16)]
        return sum(len(b) * max(lengths[b]) for b in batches)

    shuffled = rng.permutation(1003).tolist()
    assert padded_positions(first) < 0.7 * padded_positions(shuffled)


def test_datamodule_group_by_length(tmp_path):
    _write_dir(tmp_path, n_train=60)
    dm = KTDataModule(data_dir=str(tmp_path), max_len=10, batch_size=4, group_by_length=True, val_fraction=0.0)
    dm.setup("fit")
    seen = [int(i) for b in dm.train_dataloader() for i in b["index"]]
    assert sorted(seen) == list(range(len(dm.train_set)))
    with pytest.raises(ValueError, match="`shuffle` to be True with `group_by_length`"):
        KTDataModule(group_by_length=True, shuffle=False)
