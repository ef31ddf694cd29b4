"""Faults: a ``lit-kt fit`` killed with ``SIGKILL`` resumes from ``last.ckpt`` and ends where an uninterrupted run ends,
so does a torchrun job whose worker is killed and restarted; a resumed run keeps the best checkpoint; a killed
``lit-kt predict`` leaves the previous predictions intact; every shipped config writes ``best`` and ``last``.

The faults come from tests/fault_helpers.py, named in ``--trainer.callbacks+`` of ``lit-kt`` subprocesses: a process
kills itself after a chosen optimizer step (:class:`~tests.fault_helpers.KillAt`) or while writing predictions
(:class:`~tests.fault_helpers.KillingPredictionWriter`). Every run is tiny: SAKT of width 16 on a few hundred
simulated students.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lit_kt.cli import build_cli
from lit_kt.writer import PredictionWriter
from tests.ddp_helpers import kt_config, torchrun, write_config
from tests.fault_helpers import read_starts, read_validations, run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SAKT_SYNTHETIC = REPO / "configs" / "sakt_synthetic.yaml"
TIMEOUT = 300  # seconds per launch; one takes ~10-20 s on 2 busy cores
CHECKPOINTS = Path("runs/sakt_synthetic/checkpoints")  # of configs/sakt_synthetic.yaml, under the working directory

# configs/sakt_synthetic.yaml in miniature: 100 training students - 10 for validation = 90 windows of 20, in batches of
# 16: 6 optimizer steps per epoch. No dropout, so that a resumed run computes what an uninterrupted one does.
STEPS_PER_EPOCH = 6
SMALL = [
    "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.synthetic_students", "200",
    "--data.synthetic_seq_len", "20",
    "--data.max_len", "20",
    "--data.batch_size", "16",
    "--model.init_args.model.init_args.max_len", "20",
    "--model.init_args.model.init_args.d_model", "16",
    "--model.init_args.model.init_args.num_heads", "2",
    "--model.init_args.model.init_args.dropout", "0",
    "--model.init_args.optimizer.init_args.lr", "0.03",
]  # fmt: skip


def callback(name: str, **init_args) -> list[str]:
    """``--trainer.callbacks+ {"class_path": "tests.fault_helpers.<name>", "init_args": ...}``."""
    return ["--trainer.callbacks+", json.dumps({"class_path": f"tests.fault_helpers.{name}", "init_args": init_args})]


def lit_kt(*args: str) -> list[str]:
    """``lit-kt ARGS`` with this interpreter."""
    return [sys.executable, "-m", "lit_kt.cli", *args]


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def best_checkpoint_state(ckpt: dict) -> dict:
    """The state of the ``ModelCheckpoint`` that monitors ``val/auc``, saved in a checkpoint."""
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"]]
    assert state["monitor"] == "val/auc"
    return state


def printed_test_auc(output: str) -> float:
    """The test AUC that ``fit --test_after_fit true`` prints."""
    match = re.search(r"^test AUC: (\d\.\d+)", output, flags=re.MULTILINE)
    assert match, f"no test AUC in the output:\n{output[-4000:]}"
    return float(match.group(1))


def assert_exit(proc, code: int) -> None:
    assert proc.returncode == code, f"exit code {proc.returncode}, expected {code}:\n{proc.stdout[-6000:]}"


# ---------------------------------------------------------------------------------------------------- configs
def model_checkpoints(config: dict) -> list[dict]:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [c.get("init_args") or {} for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_keep_the_best_checkpoint_and_rewrite_the_last(path):
    """First the best by validation (``trainer.checkpoint_callback``, what ``test_after_fit`` tests), then one that
    rewrites last.ckpt at every validation, whatever the score (what ``--ckpt_path last`` finds)."""
    best, last = model_checkpoints(yaml.safe_load(path.read_text()))
    # the direction follows the metric: perplexity is minimised, AUC and accuracy maximised
    expected_mode = "min" if best.get("monitor") in ("val/ppl", "val/loss") else "max"
    assert best.get("monitor", "").startswith("val/") and best.get("mode") == expected_mode
    assert not best.get("save_last")  # Lightning 2.6 would write last.ckpt only when the best improves
    assert last == {"filename": "last", "enable_version_counter": False}  # no monitor: the latest is the top 1


def test_every_shipped_config_has_model_checkpoints():
    """The parametrized test above checks something: the training recipes all checkpoint."""
    assert CONFIGS and all(model_checkpoints(yaml.safe_load(p.read_text())) for p in CONFIGS)


# ---------------------------------------------------------------------------------------------------- resuming
@pytest.mark.slow
def test_resume_from_last_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    """``--ckpt_path last`` starts fresh when there is no last checkpoint, resumes when there is one, and the resumed
    run does not replace best.ckpt by a worse epoch: ModelCheckpoint's best score comes back from last.ckpt."""
    monkeypatch.chdir(tmp_path)  # the shipped config writes to runs/ under the working directory
    args = ["fit", "--config", str(SAKT_SYNTHETIC), *SMALL, "--test_after_fit", "false", "--ckpt_path", "last"]
    args += callback("RecordValidation", path=str(tmp_path / "val.jsonl"))
    with pytest.warns(UserWarning, match="there is no last checkpoint available"):
        build_cli([*args, "--trainer.max_epochs", "2"])
    # epoch 2 (resumed) validates a zeroed model: AUC 0.5, worse than epochs 0 and 1
    cli = build_cli([*args, "--trainer.max_epochs", "3", *callback("ConstantPredictions", from_epoch=2)])
    assert cli.trainer.global_step == 3 * STEPS_PER_EPOCH

    validations = read_validations(tmp_path / "val.jsonl")
    assert [v["epoch"] for v in validations] == [0, 1, 2]  # the resumed run redid no epoch
    aucs = [v["val/auc"] for v in validations]
    assert min(aucs[:2]) > 0.5 and aucs[2] == 0.5, aucs
    best_epoch = max(range(3), key=aucs.__getitem__)
    assert best_epoch < 2

    best = checkpoint_state(tmp_path / CHECKPOINTS / "best.ckpt")
    assert best["epoch"] == best_epoch and best["global_step"] == (best_epoch + 1) * STEPS_PER_EPOCH
    assert float(best_checkpoint_state(best)["current_score"]) == pytest.approx(aucs[best_epoch], abs=1e-6)
    last = checkpoint_state(tmp_path / CHECKPOINTS / "last.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * STEPS_PER_EPOCH
    state = best_checkpoint_state(last)
    assert float(state["best_model_score"]) == pytest.approx(max(aucs), abs=1e-6)
    assert Path(state["best_model_path"]).name == "best.ckpt"
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_from_last_and_ends_like_an_uninterrupted_run(tmp_path):
    """With ``group_by_length`` the shuffles are seeded by the epoch (not by the global random state, which Lightning
    does not restore), so the resumed run redoes epoch 1 exactly and ends with the same weights."""
    epochs, kill_step = 3, STEPS_PER_EPOCH + 2  # 2 steps into epoch 1
    args = ["fit", "--config", str(SAKT_SYNTHETIC), *SMALL, "--trainer.max_epochs", str(epochs)]
    args += ["--data.group_by_length", "true"]

    for name in ("reference", "faulty"):
        (tmp_path / name).mkdir()
    reference = run(lit_kt(*args), cwd=tmp_path / "reference")
    assert_exit(reference, 0)

    # the same command twice: the first dies after `kill_step`, the second finds the marker and resumes
    faulty = [*args, "--ckpt_path", "last", *callback("KillAt", step=kill_step, marker="killed.json")]
    first = run(lit_kt(*faulty, *callback("RecordStart", out_dir="first")), cwd=tmp_path / "faulty")
    assert_exit(first, -signal.SIGKILL)
    assert json.loads((tmp_path / "faulty/killed.json").read_text()) == {"step": kill_step, "epoch": 1}
    # the partial epoch is lost: last.ckpt is the end of epoch 0
    assert checkpoint_state(tmp_path / "faulty" / CHECKPOINTS / "last.ckpt")["global_step"] == STEPS_PER_EPOCH

    second = run(lit_kt(*faulty, *callback("RecordStart", out_dir="second")), cwd=tmp_path / "faulty")
    assert_exit(second, 0)
    (start,) = read_starts(tmp_path / "faulty" / "second").values()
    assert (start["current_epoch"], start["global_step"]) == (1, STEPS_PER_EPOCH)

    expected, resumed = (checkpoint_state(tmp_path / r / CHECKPOINTS / "last.ckpt") for r in ("reference", "faulty"))
    assert expected["global_step"] == resumed["global_step"] == epochs * STEPS_PER_EPOCH
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert printed_test_auc(second.stdout) == pytest.approx(printed_test_auc(reference.stdout), abs=0.01)


# ---------------------------------------------------------------------------------------------------- predictions
class FailingWriter(PredictionWriter):
    """Raises after yielding ``fail_after`` rows of ``rows_to_write``."""

    def __init__(self, output_path: str, rows_to_write: list[list[str]], fail_after: int) -> None:
        super().__init__(output_path)
        self.rows_to_write, self.fail_after = rows_to_write, fail_after

    def rows(self, dataset, predictions):
        for i, row in enumerate(self.rows_to_write):
            if i == self.fail_after:
                raise RuntimeError("disk on fire")
            yield row


def write(writer: PredictionWriter, world_size: int = 1, global_rank: int = 0) -> None:
    trainer = SimpleNamespace(
        predict_dataloaders=SimpleNamespace(dataset=None), world_size=world_size, global_rank=global_rank
    )
    writer.write_on_epoch_end(trainer, None, [], [])


def test_prediction_writer_replaces_the_file_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "pred.csv"
    rows = [["a", "b"], ["1", "2"], ["3", "4"]]
    write(FailingWriter(str(out), rows, fail_after=len(rows)))
    assert out.read_bytes() == b"a,b\r\n1,2\r\n3,4\r\n"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # as open(path, "w") would create it, not tempfile's 0600

    with pytest.raises(RuntimeError, match="disk on fire"):
        write(FailingWriter(str(out), [["x", "y"]] * 1000, fail_after=500))
    assert out.read_bytes() == b"a,b\r\n1,2\r\n3,4\r\n"  # untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.csv"]  # no temporary file left

    write(FailingWriter(str(out), [["z"]], fail_after=1), world_size=2, global_rank=1)
    assert (out.parent / "pred.rank1.csv").read_bytes() == b"z\r\n"


@pytest.mark.slow
def test_predict_killed_while_writing_leaves_the_previous_predictions_intact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(SAKT_SYNTHETIC), *SMALL, "--trainer.max_epochs", "1", "--test_after_fit", "false"]
    build_cli(fit)
    predict = ["predict", "--config", str(SAKT_SYNTHETIC), *SMALL, "--ckpt_path", str(CHECKPOINTS / "best.ckpt")]
    build_cli(predict)  # the shipped config's PredictionWriter
    out = tmp_path / "runs/sakt_synthetic/predictions.csv"
    before = out.read_bytes()
    assert before.count(b"\n") == 1 + 100 * 20  # header + every interaction of the 100 test students

    killing = {"class_path": "tests.fault_helpers.KillingPredictionWriter",
               "init_args": {"output_path": str(out), "kill_after": 1000}}  # fmt: skip
    proc = run(lit_kt(*predict, "--trainer.callbacks", json.dumps([killing])), cwd=tmp_path)
    assert_exit(proc, -signal.SIGKILL)
    assert out.read_bytes() == before
    # the temporary file being written when the process died stays (`.predictions.csv.<random>.tmp`)
    leftovers = [p.name for p in out.parent.iterdir() if "predictions" in p.name and p != out]
    assert len(leftovers) == 1 and re.fullmatch(r"\.predictions\.csv\.\w+\.tmp", leftovers[0]), leftovers


# ---------------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path):
    """2 processes; rank 1 dies mid-epoch 1 in the first attempt; torchrun restarts both, which resume from last.ckpt
    (the end of epoch 0) and finish. SAKT of tests/ddp_helpers.py: 2 x batch 2, 8 steps per epoch."""
    steps_per_epoch, epochs, kill_step = 8, 3, 12
    config = kt_config(tmp_path / "record", batch_size=2, max_epochs=epochs, test_after_fit=False)
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"] = {"filename": "last", "enable_version_counter": False}  # as in configs/
    write_config(tmp_path / "config.yaml", config)
    cmd = torchrun(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
        "-m", "lit_kt.cli", "fit", "--config", str(tmp_path / "config.yaml"),
        "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--ckpt_path", "last",
        *callback("KillAt", step=kill_step, rank=1, attempt=0),
        *callback("RecordStart", out_dir=str(tmp_path / "starts")),
    )  # fmt: skip
    # The c10d rendezvous of --standalone shares the agent's store with the workers by default, and a restarted
    # attempt may read the failed one's addresses from it (pytorch/pytorch#135712): one store per attempt instead.
    proc = run(cmd, cwd=tmp_path, timeout=2 * TIMEOUT, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert_exit(proc, 0)

    starts = read_starts(tmp_path / "starts")
    assert set(starts) == {(0, 0), (1, 0), (0, 1), (1, 1)}, starts  # 2 ranks x 2 attempts
    for rank in (0, 1):
        assert starts[rank, 0]["global_step"] == 0
        assert (starts[rank, 1]["current_epoch"], starts[rank, 1]["global_step"]) == (1, steps_per_epoch)
        assert starts[rank, 1]["world_size"] == 2
    last = checkpoint_state(tmp_path / "run/checkpoints/last.ckpt")
    assert (last["epoch"], last["global_step"]) == (epochs - 1, epochs * steps_per_epoch)
    records = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in records] == [epochs * steps_per_epoch] * 2
    assert [r["start_step"] for r in records] == [steps_per_epoch] * 2  # the records of the second attempt
