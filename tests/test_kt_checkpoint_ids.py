"""Exercise ids and ``max_len`` from the checkpoint, unseen-id warnings and the id sanity bound (issue 15, item 2)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_kt import SAKT, KTDataModule, SAKTModule
from lit_kt.cli import build_cli
from lit_kt.data import ExerciseIdError
from lit_kt.formats import StudentSequence, find_exercise_above, write_three_line

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
model:
  class_path: lit_kt.SAKTModule
  init_args:
    model:
      class_path: lit_kt.SAKT
      init_args:
        d_model: 8
        num_heads: 2
        max_len: 20
data:
  data_dir: {data}
  max_len: 20
  batch_size: 8
  val_fraction: 0.2
"""


def _students(n: int, high: int, seed: int, length: int = 15) -> list[StudentSequence]:
    """``n`` students with ids drawn from 1..high; the first student answers every id once, so ``high`` occurs."""
    rng = np.random.default_rng(seed)
    first = StudentSequence(np.arange(1, high + 1), rng.integers(0, 2, high))
    rest = [StudentSequence(rng.integers(1, high + 1, length), rng.integers(0, 2, length)) for _ in range(n - 1)]
    return [first, *rest]


def _data_dir(path: Path, train_high: int, test_high: int) -> Path:
    path.mkdir()
    write_three_line(_students(20, train_high, seed=1), path / "train.csv")
    write_three_line(_students(6, test_high, seed=2), path / "test.csv")
    return path


def _config(tmp_path: Path, data: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "run", data=data))
    return config


def _fit_checkpoint(tmp_path: Path, train_high: int = 12) -> tuple[Path, Path]:
    """Trains the tiny SAKT one epoch on ids 1..train_high; returns (config, checkpoint)."""
    config = _config(tmp_path, _data_dir(tmp_path / "fit_data", train_high, train_high))
    build_cli(["fit", "--config", str(config)])
    return config, next((tmp_path / "run").rglob("*.ckpt"))


# --------------------------------------------------------------------------------------------- (a) checkpoint sizes


def test_test_with_a_checkpoint_uses_its_num_exercises_and_max_len_and_rejects_larger_ids(tmp_path):
    config, ckpt = _fit_checkpoint(tmp_path, train_high=12)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["model"]["init_args"]["num_exercises"] == 12

    # Ids up to 5 only: the data alone would size the model to 5 (and fail to load the weights); the YAML's
    # max_len of 30 would not fit the checkpoint's position embedding of 20 either.
    small = _data_dir(tmp_path / "small", train_high=5, test_high=5)
    assert KTDataModule(data_dir=str(small)).num_exercises == 5
    cli = build_cli(
        ["test", "--config", str(config), "--data.data_dir", str(small), "--ckpt_path", str(ckpt),
         "--model.init_args.model.init_args.max_len", "30"]
    )  # fmt: skip
    model = cli.model.model
    assert model.num_exercises == 12 and model.max_len == 20 and cli.datamodule.num_exercises == 12
    torch.testing.assert_close(model.interaction_emb.weight, saved["state_dict"]["model.interaction_emb.weight"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/auc"]) <= 1.0

    # An id above the checkpoint's 12: the error names test.csv and the line of ids of the third student.
    big = _data_dir(tmp_path / "big", train_high=12, test_high=12)
    _write(big / "test.csv", [([1, 2], [0, 1]), ([12, 3], [1, 1]), ([4, 13, 5], [0, 1, 1])])
    with pytest.raises(ExerciseIdError, match=rf"test\.csv:8: .*`num_exercises` \(12\).*exercise id 13.*{ckpt.name}"):
        build_cli(["test", "--config", str(config), "--data.data_dir", str(big), "--ckpt_path", str(ckpt)])


def test_checkpoint_errors_name_the_file(tmp_path):
    config = _config(tmp_path, _data_dir(tmp_path / "data", 6, 6))
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        build_cli(["test", "--config", str(config), "--ckpt_path", str(missing)])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt.*torch\.load"):
        build_cli(["test", "--config", str(config), "--ckpt_path", str(empty)])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.ckpt.*KTModule checkpoint"):
        build_cli(["test", "--config", str(config), "--ckpt_path", str(foreign)])


def test_data_num_exercises_that_disagrees_with_the_checkpoint_is_an_error(tmp_path):
    config, ckpt = _fit_checkpoint(tmp_path, train_high=12)
    with pytest.raises(ValueError, match=r"`--data.num_exercises`.*\(12, in .*\) but got 40"):
        build_cli(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--data.num_exercises", "40"])


def test_python_model_smaller_than_the_test_ids_fails_in_setup_naming_file_and_line(tmp_path):
    data = _data_dir(tmp_path / "data", train_high=6, test_high=9)
    module = SAKTModule(SAKT(num_exercises=6, d_model=8, num_heads=2, max_len=20))
    dm = KTDataModule(data_dir=str(data), max_len=20)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ExerciseIdError, match=r"test\.csv:2: .*`num_exercises` \(6.*exercise id 7"):
            trainer.test(module, dm)  # the first student's ids 1..9 are on line 2


# ------------------------------------------------------------------------------------- (b) sanity bound on the ids


def test_an_id_of_10_to_the_12_is_an_error_naming_file_and_line_before_the_model_is_built(tmp_path, monkeypatch):
    data = _data_dir(tmp_path / "data", 6, 6)
    lines = (data / "train.csv").read_text().split("\n")
    lines[4] = f"{10**12}," + lines[4].split(",", 1)[1]  # the second student's ids
    (data / "train.csv").write_text("\n".join(lines))
    with pytest.raises(ExerciseIdError, match=rf"train\.csv:5: .*`max_exercise_id` \(10000000.*{10**12}"):
        KTDataModule(data_dir=str(data)).num_exercises

    @functools.wraps(SAKT.__init__)  # keeps the signature the CLI parses
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the ids were checked")

    monkeypatch.setattr(SAKT, "__init__", no_model)
    with pytest.raises(ExerciseIdError, match=r"train\.csv:5: "):
        build_cli(["fit", "--config", str(_config(tmp_path, data))])
    # The bound is an argument; above it, the ids are sized as before.
    assert KTDataModule(data_dir=str(data), max_exercise_id=10**12).num_exercises == 10**12


def test_long_table_ids_are_located_on_their_physical_line(tmp_path):
    rows = ["user_id,skill_id,correct,order_id", "a,3,1,2", "a,5,0,1", "b,1,1,1", "c,2,0,4", "c,2,1,3"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([*rows, "d,99,1,1", "d,120,1,0"]) + "\n")
    assert find_exercise_above(tmp_path / "test.csv", 5, "long") == (7, 99)  # file order, not the sorted order
    assert find_exercise_above(tmp_path / "test.csv", 120, "long") is None
    with pytest.raises(ExerciseIdError, match=r"test\.csv:7: .*`max_exercise_id` \(50,.*exercise id 99"):
        KTDataModule(data_dir=str(tmp_path), format="long", max_exercise_id=50).num_exercises
    with pytest.raises(ExerciseIdError, match=r"test\.csv:7: .*`num_exercises` \(5\).*exercise id 99"):
        KTDataModule(data_dir=str(tmp_path), format="long", num_exercises=5).num_exercises


# --------------------------------------------------------------------------------- (c) ids never seen in training


def _write(path: Path, students: list[tuple[list[int], list[int]]]) -> None:
    write_three_line([StudentSequence(np.array(e), np.array(r)) for e, r in students], path)


def test_ids_unseen_in_training_are_counted_in_a_warning_per_split(tmp_path):
    _write(tmp_path / "train1.csv", [([1, 2, 3, 4], [0, 1, 0, 1]), ([5, 6, 1], [1, 1, 0])])
    _write(tmp_path / "valid1.csv", [([1, 6, 2], [0, 1, 1])])  # all seen: no warning
    _write(
        tmp_path / "test.csv",
        [([7, 7, 8, 1, 9, 9], [1, 0, 1, 1, 0, 1]), ([8, 8, 8, 2, 7, 9, 9, 9], [0, 1, 0, 1, 1, 0, 1, 0])],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = KTDataModule(data_dir=str(tmp_path), fold=1)
        assert dm.num_exercises == 9  # sized over every split, as before
    messages = [str(w.message) for w in caught if "never seen in training" in str(w.message)]
    assert len(messages) == 1
    # independent count: ids 7, 8, 9 occur 3 + 4 + 5 = 12 times in test.csv
    assert messages[0].startswith(f"{tmp_path / 'test.csv'}: 3 exercise ids (12 interactions) never seen in training;")
    assert "scored with untrained embeddings" in messages[0]
    assert "3 of them above the training split's largest id, 6" in messages[0]

    _write(tmp_path / "valid1.csv", [([1, 10], [0, 1])])
    with pytest.warns(UserWarning, match=r"valid1\.csv: 1 exercise id \(1 interaction\) never seen in training"):
        KTDataModule(data_dir=str(tmp_path), fold=1).num_exercises


def test_no_warning_when_every_id_was_seen_in_training(tmp_path):
    _write(tmp_path / "train.csv", [([1, 2, 3], [0, 1, 0]), ([3, 2, 1], [1, 1, 0]), ([2, 2], [1, 0])])
    _write(tmp_path / "test.csv", [([3, 1], [1, 1])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KTDataModule(data_dir=str(tmp_path), val_fraction=0.0).num_exercises == 3


# ------------------------------------------------------------------------------------------------ (d) max_len


def test_data_max_len_above_the_model_max_len_fails_before_training(tmp_path):
    config = _config(tmp_path, _data_dir(tmp_path / "data", 6, 6))
    with pytest.raises(ValueError, match=r"--data\.max_len, 30\).*--model\.init_args\.model\.init_args\.max_len, 20"):
        build_cli(["fit", "--config", str(config), "--data.max_len", "30"])
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained

    # From Python, the data module's setup checks it before the first batch.
    module = SAKTModule(SAKT(num_exercises=6, d_model=8, num_heads=2, max_len=20))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"--data\.max_len, 30\)"):
        trainer.fit(module, KTDataModule(data_dir=str(tmp_path / "data"), max_len=30))
    assert trainer.global_step == 0


def test_dkt_has_no_max_len_limit(tmp_path):
    config = tmp_path / "dkt.yaml"
    text = _config(tmp_path, _data_dir(tmp_path / "data", 6, 6)).read_text()
    text = text.replace("SAKTModule", "DKTModule").replace("lit_kt.SAKT", "lit_kt.DKT")
    sakt_args = "d_model: 8\n        num_heads: 2\n        max_len: 20"
    text = text.replace(sakt_args, "hidden_size: 8\n        embedding_dim: 8")
    config.write_text(text)
    cli = build_cli(["--config", str(config), "--data.max_len", "200"], run=False)
    assert cli.model.model.max_len is None and cli.datamodule.hparams.max_len == 200


def test_explicit_num_exercises_below_the_simulated_ids_is_an_error():
    with pytest.raises(ValueError, match=r"`num_exercises`.*\(50, in the simulated .* students\) but got 10"):
        KTDataModule(synthetic_students=40, num_exercises=10).num_exercises
