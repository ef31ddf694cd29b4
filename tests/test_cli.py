"""lit-kt: every shipped config parses; a CLI run writes a checkpoint that loads back in plain Python."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_kt import KTModule
from lit_kt.cli import KTCLI, build_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
KT_CONFIGS = [c for c in CONFIGS if c.name.startswith(("sakt_", "dkt_"))]


class ParseOnly(KTCLI):
    """Parses and validates a config without reading data or building anything."""

    def instantiate_classes(self) -> None:
        pass


def test_the_four_issue_configs_are_shipped():
    names = {c.name for c in KT_CONFIGS}
    assert {"sakt_synthetic.yaml", "sakt_assist2009.yaml", "dkt_assist2009.yaml", "sakt_statics2011.yaml"} <= names


@pytest.mark.parametrize("config", KT_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(config):
    cli = build_cli(["--config", str(config)], run=False, cli_class=ParseOnly)
    model = cli.config.model
    assert model.class_path in ("lit_kt.SAKTModule", "lit_kt.DKTModule")
    assert model.init_args.model.class_path in ("lit_kt.SAKT", "lit_kt.DKT")


def test_cli_fit_links_num_exercises_and_checkpoint_loads_in_python(tmp_path, capsys):
    config = next(c for c in KT_CONFIGS if c.name == "sakt_synthetic.yaml")
    build_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.synthetic_students",
            "100",
            "--data.synthetic_exercises",
            "17",
            "--model.init_args.model.init_args.d_model",
            "16",
        ]
    )
    assert "test AUC:" in capsys.readouterr().out
    ckpt = next(tmp_path.rglob("*.ckpt"))
    module = KTModule.load_from_checkpoint(ckpt)
    assert module.model.num_exercises == 17 and module.model.config["d_model"] == 16
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(module.model.head.weight, state["model.head.weight"])


def test_resuming_from_a_checkpoint_file_keeps_the_configured_optimizer(tmp_path):
    text = next(c for c in KT_CONFIGS if c.name == "sakt_synthetic.yaml").read_text()
    text = text.replace("class_path: torch.optim.Adam", "class_path: torch.optim.SGD").replace(
        "lr: 0.003", "lr: 0.05\n        momentum: 0.9"
    )
    config = tmp_path / "sgd.yaml"
    config.write_text(text)
    args = [
        "--config", str(config),
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--data.synthetic_students", "60",
        "--test_after_fit", "false",
    ]  # fmt: skip
    build_cli(["fit", *args, "--trainer.max_epochs", "1"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    cli = build_cli(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert cli.trainer.current_epoch == 2


def test_cli_predict_writes_one_row_per_test_interaction(tmp_path, monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)  # the config's own PredictionWriter writes to the relative runs/sakt_synthetic/
    config = next(c for c in KT_CONFIGS if c.name == "sakt_synthetic.yaml")
    common = ["--config", str(config), "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path), "--data.synthetic_students", "40",
              "--data.synthetic_seq_len", "23", "--data.max_len", "10", "--data.eval_stride", "4",
              "--model.init_args.model.init_args.max_len", "10"]  # fmt: skip
    build_cli(["fit", *common, "--trainer.max_epochs", "1", "--test_after_fit", "false"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "pred.csv"
    writer = f'{{"class_path": "lit_kt.writer.PredictionWriter", "init_args": {{"output_path": "{out}"}}}}'
    build_cli(["predict", *common, "--ckpt_path", str(ckpt), "--trainer.callbacks+", writer])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 20 * 23  # 20 test students, every interaction once despite overlapping windows
    assert {(r["sequence"], r["position"]) for r in rows} == {(str(s), str(p)) for s in range(20) for p in range(23)}
    assert all(0.0 < float(r["probability"]) < 1.0 for r in rows)
