"""Two-process CPU DDP (gloo): knowledge tracing and distillation train under ``strategy="ddp"``/``"ddp_spawn"``,
evaluation on 2 processes equals 1 process exactly, two "nodes" started by torchrun match one process with the same
global batch, checkpoints are written once and resume on another world size. See docs/distributed.md.

Processes are launched as subprocesses with timeouts; each writes what it saw
(:class:`tests.ddp_helpers.RecordRun`) and the tests compare. The knowledge-tracing runs share module-scoped fixtures:

- ``two_nodes``: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1} ... -m lit_kt.cli fit`` (2 x batch 2,
  1 epoch = 8 steps, then the test split on both processes);
- ``single``: the same config in this process, 1 x batch 4, 2 epochs (the reference);
- resumes 2 -> 1 (in this process) and 1 -> 2 (``ddp_spawn``) to epoch 2, compared with ``single``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from lit_kd._files import distributed_eval_sampler as kd_distributed_eval_sampler
from lit_kt import SAKT, KTDataModule, KTModule, collate_kt
from lit_kt.cli import build_cli
from lit_kt.data import distributed_eval_sampler
from tests.ddp_helpers import (
    KD_DEV_SIZE,
    KD_TRAIN_SIZE,
    KT_DATA,
    KT_MODEL,
    KT_TEST_SIZE,
    KT_TRAIN_SIZE,
    KT_VAL_SIZE,
    build_teacher_cache,
    free_port,
    helper_command,
    kd_parts,
    kt_config,
    read_ranks,
    run_all,
    tiny_bert,
    torchrun,
    write_config,
    write_text_data,
)

TIMEOUT = 240  # seconds per launch; a launch takes ~15 s on 2 cores
STEPS_PER_EPOCH = KT_TRAIN_SIZE // 4  # global batch 4: 2 processes x 2 or 1 process x 4


def kt_config_file(root: Path, batch_size: int, max_epochs: int, test_after_fit: bool = False) -> Path:
    """``root/config.yaml`` for ``lit-kt``; each process records to ``root/record``."""
    return write_config(root / "config.yaml", kt_config(root / "record", batch_size, max_epochs, test_after_fit))


def evaluation_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def kt_test_outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """P(correct) at every scored test position of the SAKT with these weights.

    Runs on 1 and 2 processes are compared by their outputs, not their weights: Adam divides by sqrt(v), so where a
    gradient is zero up to rounding (the key bias of attention: softmax ignores a constant added to every score) it
    turns rounding noise into steps of size lr, and the weights differ there while the function does not.
    """
    data = KTDataModule(**KT_DATA)
    data.setup("test")
    module = KTModule(SAKT(num_exercises=data.num_exercises, **KT_MODEL))
    module.load_state_dict(state)
    batch = collate_kt([data.test_set[i] for i in range(len(data.test_set))])
    with torch.no_grad():
        return torch.sigmoid(module.eval()(batch["exercises"], batch["responses"]))[batch["mask"]]


def assert_same_function(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(kt_test_outputs(a), kt_test_outputs(b), rtol=0, atol=1e-5)


def mean_losses(ranks) -> list[float]:
    """The loss of each step of a 2-process run: the mean of the processes' losses (DDP averages gradients)."""
    return [sum(step) / len(step) for step in zip(*(record["losses"] for record, _ in ranks))]


def checkpoint(run_dir: Path, epoch: int) -> Path:
    return run_dir / "run" / "checkpoints" / f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH}.ckpt"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """Two torchrun launches of one process each, "nodes" 0 and 1 on 127.0.0.1, running ``lit-kt fit``."""
    root = tmp_path_factory.mktemp("two_nodes")
    config = kt_config_file(root, batch_size=2, max_epochs=1, test_after_fit=True)
    port = str(free_port())
    commands = [
        torchrun(
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "-m",
            "lit_kt.cli",
            "fit",
            "--config",
            str(config),
            "--trainer.num_nodes",
            "2",
            "--trainer.strategy",
            "ddp",
        )  # fmt: skip
        for rank in (0, 1)
    ]
    run_all(commands, cwd=root, timeout=TIMEOUT, log_dir=root / "logs")
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, batch 4, 2 epochs, a checkpoint per epoch."""
    root = tmp_path_factory.mktemp("single")
    config = kt_config_file(root, batch_size=4, max_epochs=2)
    build_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(root / "run")])
    return root


# ---------------------------------------------------------------------------------------------------- unit
@pytest.mark.parametrize("distributed_eval_sampler", [distributed_eval_sampler, kd_distributed_eval_sampler])
def test_distributed_eval_sampler_splits_without_repeating(distributed_eval_sampler):
    """lit_kt's sampler and lit_kd's own copy (the packages do not import each other) behave the same."""
    dataset = list(range(7))
    assert distributed_eval_sampler(dataset, None) is None
    assert distributed_eval_sampler(dataset, SimpleNamespace(world_size=1, global_rank=0)) is None
    samplers = [distributed_eval_sampler(dataset, SimpleNamespace(world_size=3, global_rank=r)) for r in range(3)]
    assert all(isinstance(sampler, UnrepeatedDistributedSampler) for sampler in samplers)
    assert [list(sampler) for sampler in samplers] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match=r"at least as many samples as processes \(8\) but got 7"):
        distributed_eval_sampler(dataset, SimpleNamespace(world_size=8, global_rank=0))


def test_the_knowledge_tracing_splits_are_odd_and_the_training_set_fills_whole_steps():
    data = KTDataModule(**KT_DATA)
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (KT_TRAIN_SIZE, KT_VAL_SIZE, KT_TEST_SIZE)
    assert all(len(window["exercises"]) == KT_DATA["max_len"] for window in data.train_set)


# ---------------------------------------------------------------------------------------------------- knowledge tracing
@pytest.mark.slow  # the two-node launch of `two_nodes`, which the next three tests share: ~23 s
@pytest.mark.ddp
def test_two_nodes_train_like_one_process_with_the_same_global_batch(two_nodes, single):
    ranks = read_ranks(two_nodes / "record", 2)
    assert [(r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r, _ in ranks] == [
        (0, 0, 0, 2),
        (1, 1, 0, 2),
    ]
    reference, _ = read_ranks(single / "record", 1)[0]
    # step k: node r trains on windows 4k + r and 4k + 2 + r, the single process on 4k .. 4k + 3
    steps = list(zip(ranks[0][0]["train_indices"], ranks[1][0]["train_indices"]))
    assert [sorted(a + b) for a, b in steps] == reference["train_indices"][:STEPS_PER_EPOCH]
    torch.testing.assert_close(mean_losses(ranks), reference["losses"][:STEPS_PER_EPOCH], rtol=0, atol=1e-5)
    # the model is identical on both nodes, and computes what the single process's does after the same steps
    for key, value in ranks[0][1].items():
        assert torch.equal(value, ranks[1][1][key]), key
    after_epoch = torch.load(checkpoint(single, 0))["state_dict"]
    assert_same_function(ranks[0][1], after_epoch)


@pytest.mark.slow  # two_nodes
@pytest.mark.ddp
def test_checkpoint_is_written_once_by_rank_zero(two_nodes):
    (rank0, _), (rank1, _) = read_ranks(two_nodes / "record", 2)
    assert rank0["checkpoints_written"] == ["run/checkpoints/epoch=0-step=8.ckpt"]
    assert rank1["checkpoints_written"] == []
    assert sorted(p.name for p in (two_nodes / "run").rglob("*.ckpt")) == ["epoch=0-step=8.ckpt"]


@pytest.mark.slow  # two_nodes
@pytest.mark.ddp
def test_two_process_test_metrics_equal_one_process(two_nodes):
    ranks = read_ranks(two_nodes / "record", 2)
    # every test window scored by exactly one process (37 windows: 19 and 18, in 10 and 9 batches)
    indices = [record["test_indices"] for record, _ in ranks]
    assert sorted(indices[0] + indices[1]) == list(range(KT_TEST_SIZE))
    assert (len(indices[0]), len(indices[1])) == (19, 18)
    distributed = ranks[0][0]["test_metrics"]
    assert ranks[1][0]["test_metrics"]["test/auc"] == distributed["test/auc"]

    module = KTModule.load_from_checkpoint(checkpoint(two_nodes, 0))
    data = KTDataModule(**KT_DATA, batch_size=4)
    (one,) = evaluation_trainer().test(module, datamodule=data)
    for name in ("test/auc", "test/acc", "test/rmse"):
        assert distributed[name] == pytest.approx(one[name], abs=1e-6), name


@pytest.mark.slow  # two_nodes
@pytest.mark.ddp
def test_resume_from_two_processes_on_one(two_nodes, single, tmp_path):
    config = kt_config_file(tmp_path, batch_size=4, max_epochs=2)
    build_cli(
        ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
         "--ckpt_path", str(checkpoint(two_nodes, 0))]
    )  # fmt: skip
    ((record, weights),) = read_ranks(tmp_path / "record", 1)
    assert (record["start_step"], record["start_epoch"], record["global_step"]) == (8, 1, 16)
    reference, reference_weights = read_ranks(single / "record", 1)[0]
    torch.testing.assert_close(record["losses"], reference["losses"][STEPS_PER_EPOCH:], rtol=0, atol=1e-5)
    assert_same_function(weights, reference_weights)


@pytest.mark.slow  # ~35 s
@pytest.mark.ddp
def test_resume_from_one_process_on_two_with_ddp_spawn(single, tmp_path):
    config = kt_config_file(tmp_path, batch_size=2, max_epochs=2)
    command = [
        sys.executable, "-m", "lit_kt.cli", "fit", "--config", str(config), "--trainer.devices", "2",
        "--trainer.strategy", "ddp_spawn", "--ckpt_path", str(checkpoint(single, 0)),
    ]  # fmt: skip
    run_all([command], cwd=tmp_path, timeout=TIMEOUT, log_dir=tmp_path / "logs")
    ranks = read_ranks(tmp_path / "record", 2)
    assert [(r["start_step"], r["start_epoch"], r["global_step"]) for r, _ in ranks] == [(8, 1, 16)] * 2
    reference, reference_weights = read_ranks(single / "record", 1)[0]
    torch.testing.assert_close(mean_losses(ranks), reference["losses"][STEPS_PER_EPOCH:], rtol=0, atol=1e-5)
    for key, value in ranks[0][1].items():
        assert torch.equal(value, ranks[1][1][key]), key
    assert_same_function(ranks[0][1], reference_weights)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*.ckpt")) == ["epoch=1-step=16.ckpt"]


# ---------------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def helper_runs(tmp_path_factory) -> Path:
    """One torchrun launch of 2 processes: ``DistillationModule`` (2-layer BERT teacher, 1-layer student) trained
    and tested, then ``DKTModule`` trained, in the same processes."""
    root = tmp_path_factory.mktemp("helper_runs")
    write_text_data(root / "data")
    run_all([helper_command(root / "data", root / "out")], cwd=root, timeout=TIMEOUT, log_dir=root / "logs")
    return root


@pytest.mark.ddp
def test_dkt_trains_under_ddp_with_identical_replicas(helper_runs):
    ranks = read_ranks(helper_runs / "out" / "dkt" / "record", 2)
    assert [record["global_step"] for record, _ in ranks] == [KT_TRAIN_SIZE // 8] * 2  # 2 x batch 4
    for key, value in ranks[0][1].items():
        assert torch.equal(value, ranks[1][1][key]), key


@pytest.mark.ddp
def test_distillation_under_ddp_keeps_the_teacher_and_the_students_in_step(helper_runs):
    ranks = read_ranks(helper_runs / "out" / "kd" / "record", 2)
    assert [record["global_step"] for record, _ in ranks] == [2 * KD_TRAIN_SIZE // 4] * 2  # 2 epochs of 2 x batch 2
    teacher = tiny_bert(layers=2, width=32, seed=0).state_dict()
    student = tiny_bert(layers=1, width=16, seed=1).state_dict()
    for _, weights in ranks:
        for key, value in teacher.items():
            assert torch.equal(weights[f"teachers.default.0.{key}"], value), key  # bit-identical
    trained = [key for key in ranks[0][1] if not key.startswith("teachers.")]
    assert any(key.startswith("projections.") for key in trained)
    for key in trained:
        assert torch.equal(ranks[0][1][key], ranks[1][1][key]), key
    assert not torch.equal(ranks[0][1]["student.classifier.weight"], student["classifier.weight"])


@pytest.mark.ddp
def test_two_process_distillation_accuracy_equals_one_process(helper_runs):
    from lit_kd import DistillationModule

    ranks = read_ranks(helper_runs / "out" / "kd" / "record", 2)
    indices = [record["test_indices"] for record, _ in ranks]
    assert sorted(indices[0] + indices[1]) == list(range(KD_DEV_SIZE))
    assert (len(indices[0]), len(indices[1])) == (7, 6)

    parts = kd_parts(helper_runs / "data")
    (ckpt,) = (helper_runs / "out" / "kd" / "checkpoints").glob("*.ckpt")
    module = DistillationModule.load_from_checkpoint(
        ckpt, teacher=parts["teacher"], student=parts["student"], config=parts["config"]
    )
    (one,) = evaluation_trainer().test(module, datamodule=parts["data"])
    assert ranks[0][0]["test_metrics"]["test/acc"] == pytest.approx(one["test/acc"], abs=1e-6)
    assert ranks[1][0]["test_metrics"]["test/acc"] == pytest.approx(one["test/acc"], abs=1e-6)


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory) -> Path:
    """A teacher cache built in this process, then one torchrun launch of 2 processes distilling logits with the live
    teacher and then from the cache."""
    root = tmp_path_factory.mktemp("cache_runs")
    write_text_data(root / "data")
    build_teacher_cache(root / "data", root / "cache")
    command = torchrun(
        "--standalone", "--nproc-per-node", "2", str(Path(__file__).parent / "ddp_helpers.py"), "kdlive", "kdcache",
        "--data", str(root / "data"), "--out", str(root / "out"), "--cache", str(root / "cache"),
    )  # fmt: skip
    run_all([command], cwd=root, timeout=TIMEOUT, log_dir=root / "logs")
    return root


@pytest.mark.ddp
def test_cached_teacher_under_ddp_trains_like_the_live_teacher(cache_runs):
    live = read_ranks(cache_runs / "out" / "kdlive" / "record", 2)
    cached = read_ranks(cache_runs / "out" / "kdcache" / "record", 2)
    steps = KD_TRAIN_SIZE // 4  # per epoch: 2 processes x batch 2
    for epoch in range(2):
        shards = [
            {i for b in record["train_indices"][epoch * steps : (epoch + 1) * steps] for i in b} for record, _ in cached
        ]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == KD_TRAIN_SIZE  # every sample, once
    for (live_record, live_weights), (cached_record, cached_weights) in zip(live, cached):
        # Each process reads the cache rows of its own shard of samples, by index.
        assert cached_record["train_indices"] == live_record["train_indices"]
        assert len(cached_record["losses"]) == 2 * KD_TRAIN_SIZE // 4
        torch.testing.assert_close(cached_record["losses"], live_record["losses"], rtol=0, atol=1e-5)
        for key, value in live_weights.items():
            if key.startswith("student."):
                torch.testing.assert_close(cached_weights[key], value, rtol=0, atol=1e-5)
