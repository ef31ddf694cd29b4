"""lit-kd: every shipped distillation/fine-tuning config parses; the SAKT recipe runs end to end from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_kd.cli import KDCLI, build_cli
from lit_kt.cli import build_cli as build_kt_cli

ROOT = Path(__file__).resolve().parents[1]
KD_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name.startswith(("distill_", "finetune_")))


class ParseOnly(KDCLI):
    """Parses and validates a config without building models or reading data."""

    def instantiate_classes(self) -> None:
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
