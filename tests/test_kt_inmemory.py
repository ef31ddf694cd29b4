"""In-memory data (``KTDataModule(sequences=...)``) and ``limit`` (issue 14, item 6)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_kt import SAKT, KTDataModule, SAKTModule
from lit_kt.cli import build_cli
from lit_kt.data import ExerciseIdError, collate_kt
from lit_kt.formats import StudentSequence, read_three_line, write_three_line


def _students(n: int, seed: int, high: int = 9, longest: int = 20) -> list[StudentSequence]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, longest))
        out.append(StudentSequence(rng.integers(1, high + 1, length), rng.integers(0, 2, length)))
    return out


def _as(form: str, students: list[StudentSequence]) -> list:
    """The students in one of the accepted in-memory forms."""
    if form == "student_sequence":
        return list(students)
    if form == "lists":
        return [(s.exercises.tolist(), s.responses.tolist()) for s in students]
    if form == "numpy":
        return [(s.exercises.astype(np.int32), s.responses.astype(np.uint8)) for s in students]
    if form == "integral_floats":
        return [[s.exercises.astype(np.float64), s.responses.astype(np.float32)] for s in students]
    assert form == "tensors"
    return [(torch.from_numpy(s.exercises.copy()), torch.from_numpy(s.responses.copy()).bool()) for s in students]


def _files(folder: Path, train: list[StudentSequence], test: list[StudentSequence]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_three_line(train, folder / "train.csv")
    write_three_line(test, folder / "test.csv")
    return folder


def _tensors(dataset) -> dict[str, torch.Tensor]:
    return collate_kt([dataset[i] for i in range(len(dataset))])


def _assert_same_data(a: KTDataModule, b: KTDataModule) -> None:
    a.setup(), b.setup()
    assert a.num_exercises == b.num_exercises
    for name in ("train_set", "val_set", "test_set"):
        x, y = _tensors(getattr(a, name)), _tensors(getattr(b, name))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
    for x, y in zip(a.train_dataloader(), b.train_dataloader(), strict=True):  # shuffle=False: same batches
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


ARGS = {"max_len": 8, "eval_stride": 4, "val_fraction": 0.25, "seed": 3, "batch_size": 4, "shuffle": False}


# ------------------------------------------------------------------------------------------- same data as the files


@pytest.mark.parametrize("form", ["student_sequence", "lists", "numpy", "integral_floats", "tensors"])
def test_in_memory_students_give_the_same_batches_as_the_same_data_in_files(tmp_path, form):
    train, test = _students(12, seed=1), _students(5, seed=2)
    folder = _files(tmp_path / "data", train, test)
    # Independent reference: the files as the reader sees them, not the objects written.
    assert read_three_line(folder / "train.csv") == train
    from_files = KTDataModule(data_dir=str(folder), **ARGS)
    in_memory = KTDataModule(sequences={"train": _as(form, train), "test": _as(form, test)}, **ARGS)
    _assert_same_data(in_memory, from_files)
    assert len(in_memory.sequences("train")) == 9 and len(in_memory.sequences("val")) == 3  # 0.25 of 12 carved


def test_a_list_is_the_training_split_and_has_no_test_split(tmp_path):
    train = _students(12, seed=1)
    dm = KTDataModule(sequences=_as("lists", train), **ARGS)
    reference = KTDataModule(data_dir=str(_files(tmp_path / "data", train, _students(1, seed=9))), **ARGS)
    dm.setup("fit"), reference.setup("fit")
    for name in ("train_set", "val_set"):
        x, y = _tensors(getattr(dm, name)), _tensors(getattr(reference, name))
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
    for stage in ("test", "predict"):
        with pytest.raises(ValueError, match=rf"Expected test students for `{stage}` but `sequences` has none"):
            dm.setup(stage)
    with pytest.raises(ValueError, match="Expected test students for `test`"):
        dm.test_dataloader()


def test_an_explicit_validation_split_is_used_as_it_is():
    train, val, test = _students(6, seed=1), _students(3, seed=2), _students(2, seed=3)
    dm = KTDataModule(sequences={"train": train, "val": val, "test": test}, val_fraction=0.5)
    assert dm.sequences("train") == train and dm.sequences("val") == val and dm.sequences("test") == test


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("form", ["lists", "student_sequence"])
def test_in_memory_students_train_and_test_a_tiny_sakt(tmp_path, form):
    data = {"train": _as(form, _students(16, seed=4)), "test": _as(form, _students(6, seed=5))}
    dm = KTDataModule(sequences=data, max_len=10, batch_size=4)
    module = SAKTModule(SAKT(num_exercises=dm.num_exercises, d_model=8, num_heads=2, max_len=10))
    trainer = _trainer(max_steps=3, limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few batches / workers
        trainer.fit(module, dm)
        assert trainer.global_step == 3
        (metrics,) = trainer.test(module, dm, verbose=False)
    assert 0.0 <= metrics["test/auc"] <= 1.0
    # The sequences stay out of the hyperparameters, so out of checkpoints.
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    assert "sequences" not in saved["datamodule_hyper_parameters"] and "sequences" not in dm.hparams
    assert saved["datamodule_hyper_parameters"]["limit"] is None


# ---------------------------------------------------------------------------------------------------- validation

GOOD = ([1, 2, 3], [0, 1, 1])


@pytest.mark.parametrize(
    "student, error, message",
    [
        (([1, 2, 3], [0, 1]), ValueError, "Expected exercises and responses of equal length but got 3 exercises and 2"),
        (([1, 2, 3], [0, 2, 1]), ValueError, r"Expected responses 0 or 1 but got 2 at position 1"),
        (([1, -4, 3], [0, 1, 1]), ValueError, r"Expected exercise ids >= 1 \(0 is reserved.*got -4 at position 1"),
        (([1, 2, 0], [0, 1, 1]), ValueError, r"Expected exercise ids >= 1 .* but got 0 at position 2"),
        ((np.array([1.0, 2.5]), [0, 1]), ValueError, r"Expected integer exercises but got 2\.5 at position 1"),
        (([1, 2], torch.tensor([0.0, float("nan")])), ValueError, r"Expected integer responses but got nan at"),
        (([1, 2], np.array([0.0, 0.5])), ValueError, r"Expected integer responses but got 0\.5 at position 1"),
        ((["a", "b"], [0, 1]), TypeError, r"Expected integer exercises but got an array of dtype <U1"),
        (([1, None], [0, 1]), TypeError, r"Expected integer exercises but got an array of dtype object"),
        (([], []), ValueError, r"Expected at least one interaction but got an empty student"),
        (([[1, 2]], [[0, 1]]), ValueError, r"Expected 1-D exercises but got an array of shape \(1, 2\)"),
        (([1, 2, 3],), TypeError, r"Expected a StudentSequence or an \(exercises, responses\) pair .* of length 1"),
        ({"exercises": [1]}, TypeError, r"Expected a StudentSequence or an \(exercises, responses\) pair .* a dict"),
        (([1, 51], [0, 1]), ExerciseIdError, r"Expected .*`max_exercise_id` \(50, .* id 51 at position 1"),
        (([10**20], [1]), ExerciseIdError, rf"Expected .*`max_exercise_id` \(50, .* id {10**20} at position 0"),
    ],
)
def test_invalid_students_are_errors_naming_split_student_and_position(student, error, message):
    good = [GOOD, GOOD]
    with pytest.raises(error, match=r"^sequences\['test'\]\[1\]: " + message):
        KTDataModule(sequences={"train": good, "test": [GOOD, student]}, max_exercise_id=50)
    with pytest.raises(error, match=r"^sequences\[2\]: " + message):
        KTDataModule(sequences=[GOOD, GOOD, student], max_exercise_id=50)


def test_an_empty_student_sequence_object_is_refused_too():
    empty = StudentSequence(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=r"^sequences\['val'\]\[0\]: Expected at least one interaction"):
        KTDataModule(sequences={"train": [GOOD], "val": [empty]})


def test_ids_above_an_explicit_num_exercises_are_an_error():
    with pytest.raises(ExerciseIdError, match=r"^sequences\['train'\]\[0\]: Expected `num_exercises` \(2\).*id 3 at"):
        KTDataModule(sequences={"train": [GOOD], "test": [GOOD]}, num_exercises=2)
    dm = KTDataModule(sequences={"train": [GOOD], "test": [GOOD]}, num_exercises=5, val_fraction=0.0)
    assert dm.num_exercises == 5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"data_dir": "x", "sequences": [GOOD]}, ValueError, r"either `data_dir` .* or `sequences` .* but got both"),
        ({"sequences": [GOOD], "fold": 1}, ValueError, r"`fold` to be None with `sequences`.* but got 1"),
        ({"sequences": {"test": [GOOD]}}, ValueError, r"a 'train' list .* but got the keys \['test'\]"),
        ({"sequences": {"train": [GOOD], "dev": []}}, ValueError, r"but got the keys \['train', 'dev'\]"),
        ({"sequences": np.zeros((2, 3))}, TypeError, r"`sequences` to be a list .* but got a ndarray"),
        ({"sequences": {"train": GOOD[0][0]}}, TypeError, r"`sequences\['train'\]` to be a list .* but got a int"),
        ({"sequences": {"train": [], "test": [GOOD]}}, ValueError, r"at least one student in `sequences\['train'\]`"),
        ({"sequences": {"train": [GOOD], "test": []}}, ValueError, r"at least one student in `sequences\['test'\]`"),
        ({"limit": 0}, ValueError, r"`limit` to be an int >= 1 or None but got 0"),
        ({"limit": 2.5}, ValueError, r"`limit` to be an int >= 1 or None but got 2\.5"),
        ({"limit": True}, ValueError, r"`limit` to be an int >= 1 or None but got True"),
    ],
)
def test_bad_arguments_are_errors_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        KTDataModule(**kwargs)


def test_ids_above_the_model_are_named_by_the_students_index_in_the_input():
    seed, n = 7, 10
    train = [StudentSequence(np.array([1, 2, 3]), np.array([0, 1, 1])) for _ in range(n)]
    held = set(np.random.default_rng(seed).permutation(n)[:2].tolist())  # the carve, computed independently
    kept_bad, held_bad = max(set(range(n)) - held), max(held)
    train[kept_bad] = StudentSequence(np.array([1, 8, 2]), np.array([0, 1, 1]))
    module = SAKTModule(SAKT(num_exercises=6, d_model=8, num_heads=2, max_len=10))
    dm = KTDataModule(sequences=train, max_len=10, val_fraction=0.2, seed=seed)
    with pytest.raises(ExerciseIdError, match=rf"^sequences\[{kept_bad}\]: .*`num_exercises` \(6.*id 8 at position 1"):
        _trainer(max_steps=1).fit(module, dm)

    train[kept_bad] = train[0]
    train[held_bad] = StudentSequence(np.array([9, 1]), np.array([0, 1]))
    dm = KTDataModule(sequences=train, max_len=10, val_fraction=0.2, seed=seed)
    with pytest.raises(ExerciseIdError, match=rf"^sequences\[{held_bad}\]: .*held out from `sequences`.*id 9 at pos"):
        _trainer(max_steps=1).fit(module, dm)


def test_unseen_ids_are_reported_for_the_in_memory_split():
    data = {"train": [([1, 2], [0, 1])] * 4, "test": [([1, 7, 7], [0, 1, 1])]}
    with pytest.warns(UserWarning, match=r"^`sequences\['test'\]`: 1 exercise id \(2 interactions\) never seen"):
        assert KTDataModule(sequences=data, val_fraction=0.0).num_exercises == 7


# --------------------------------------------------------------------------------------------------------- limit


def test_limit_keeps_the_first_students_of_each_file_before_the_validation_carve(tmp_path):
    train, test = _students(30, seed=1), _students(12, seed=2)
    full = _files(tmp_path / "full", train, test)
    cut = _files(tmp_path / "cut", train[:10], test[:10])  # the same students, cut by hand
    limited = KTDataModule(data_dir=str(full), limit=10, **ARGS)
    _assert_same_data(limited, KTDataModule(data_dir=str(cut), **ARGS))
    assert len(limited.sequences("train")) + len(limited.sequences("val")) == 10  # carved from the kept 10
    assert len(limited.sequences("val")) == 2 == round(10 * ARGS["val_fraction"])
    assert limited.sequences("test") == test[:10]
    # The same data in memory, limited the same way; a larger limit keeps everything.
    in_memory = KTDataModule(sequences={"train": train, "test": test}, limit=10, **ARGS)
    _assert_same_data(in_memory, KTDataModule(data_dir=str(cut), **ARGS))
    _assert_same_data(KTDataModule(data_dir=str(full), limit=100, **ARGS), KTDataModule(data_dir=str(full), **ARGS))


def test_limit_applies_to_folds_and_to_an_explicit_validation_split(tmp_path):
    train, val, test = _students(8, seed=1), _students(7, seed=2), _students(6, seed=3)
    write_three_line(train, tmp_path / "train1.csv")
    write_three_line(val, tmp_path / "valid1.csv")
    write_three_line(test, tmp_path / "test.csv")
    dm = KTDataModule(data_dir=str(tmp_path), fold=1, limit=3)
    assert (dm.sequences("train"), dm.sequences("val"), dm.sequences("test")) == (train[:3], val[:3], test[:3])
    dm = KTDataModule(sequences={"train": train, "val": val, "test": test}, limit=3)
    assert (dm.sequences("train"), dm.sequences("val"), dm.sequences("test")) == (train[:3], val[:3], test[:3])


def test_limit_applies_to_the_simulated_students():
    full = KTDataModule(synthetic_students=40, val_fraction=0.2)
    limited = KTDataModule(synthetic_students=40, val_fraction=0.2, limit=5)
    assert len(limited.sequences("train")) == 4 and len(limited.sequences("val")) == 1
    assert limited.sequences("test") == full.sequences("test")[:5]
    kept = limited.sequences("train") + limited.sequences("val")
    everything = full.sequences("train") + full.sequences("val")
    assert all(any(s == t for t in everything) for s in kept)
    assert limited.oracle_auc() is not None


# ------------------------------------------------------------------------------------------------------ the CLI


def test_the_cli_builds_the_data_module_with_limit_and_without_sequences(tmp_path):
    folder = _files(tmp_path / "data", _students(20, seed=1), _students(6, seed=2))
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  logger: false\n  default_root_dir: " + str(tmp_path / "run") + "\n"
        "model:\n  class_path: lit_kt.SAKTModule\n  init_args:\n    model:\n      class_path: lit_kt.SAKT\n"
        "      init_args:\n        d_model: 8\n        num_heads: 2\n        max_len: 20\n"
        f"data:\n  data_dir: {folder}\n  max_len: 20\n"
    )
    cli = build_cli(["--config", str(config), "--data.limit", "5"], run=False)
    assert cli.datamodule.hparams.limit == 5 and "sequences" not in cli.datamodule.hparams
    assert len(cli.datamodule.sequences("test")) == 5
