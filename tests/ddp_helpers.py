"""Helpers of the two-process CPU DDP tests (tests/test_ddp.py): a callback that records what each process saw, a
checkpoint writer that counts its writes, launchers with timeouts, the ``lit-kt`` config of the knowledge-tracing runs,
and the distillation and DKT runs that ``torchrun`` starts from this file.

Run by ``torchrun`` (see :func:`helper_command`)::

    torchrun --standalone --nproc-per-node 2 tests/ddp_helpers.py kd dkt --data DIR --out DIR

Nothing here reads ``RANK``/``LOCAL_RANK`` or creates a process group: Lightning does, from the launcher's
environment, and the callback asks the trainer for the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

REPO = Path(__file__).resolve().parents[1]

# A tiny text-classification task: a 1-layer BERT student distils a 2-layer BERT teacher (random weights, no files).
WORDS = "good bad fine dull great awful film movie plot actors long short fun boring the a was is very not".split()
KD_TRAIN_SIZE, KD_DEV_SIZE = 8, 13  # dev is odd: 2 processes get 7 and 6 samples (4 and 3 batches of 2)


class CountingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that remembers the files this process wrote (Lightning writes from global rank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.written.append(os.fspath(path))
        super().save_checkpoint(checkpoint, path, storage_options)


class RecordRun(Callback):
    """Writes what this process saw to ``{out_dir}/rank{global_rank}.json`` and its final weights to ``.pt``.

    Recorded: ranks and world size (from the trainer), the step and epoch training started at (restored ones when
    resuming), the loss and the sample indices of every training step, the checkpoints this process wrote (with
    :class:`CountingCheckpointIO`), the ``index`` of every test sample it scored, and the test metrics.

    Args:
        out_dir: Folder for the files (created).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {"losses": [], "train_indices": [], "test_indices": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(
            world_size=trainer.world_size,
            global_rank=trainer.global_rank,
            local_rank=trainer.local_rank,
            node_rank=trainer.node_rank,
            start_step=trainer.global_step,
            start_epoch=trainer.current_epoch,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["losses"].append(float(outputs["loss"]))
        if "index" in batch:
            self.record["train_indices"].append(batch["index"].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["global_step"] = trainer.global_step
        self.record["checkpoints_written"] = list(getattr(trainer.strategy.checkpoint_io, "written", []))
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self._path(trainer, ".pt"))
        self._dump(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["test_indices"] += batch["index"].tolist()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.record["test_metrics"] = {k: float(v) for k, v in metrics.items() if k.startswith("test/")}
        self._dump(trainer)

    def _path(self, trainer: L.Trainer, suffix: str) -> Path:
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        return Path(self.out_dir) / f"rank{trainer.global_rank}{suffix}"

    def _dump(self, trainer: L.Trainer) -> None:
        self._path(trainer, ".json").write_text(json.dumps(self.record))


def read_ranks(out_dir: Path, world_size: int) -> list[tuple[dict[str, Any], dict[str, torch.Tensor] | None]]:
    """``[(record, final weights or None), ...]`` of every rank written by :class:`RecordRun`."""
    out = []
    for rank in range(world_size):
        record = json.loads((out_dir / f"rank{rank}.json").read_text())
        weights = out_dir / f"rank{rank}.pt"
        out.append((record, torch.load(weights) if weights.is_file() else None))
    return out


# ---------------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the system pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The environment of launched processes: the repository importable (``tests.ddp_helpers``), one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_all(commands: list[list[str]], cwd: Path, timeout: float, log_dir: Path) -> None:
    """Runs the commands concurrently (each in its own session) and waits; kills them all after ``timeout`` s.

    Raises:
        AssertionError: If a command times out or exits with a non-zero code; the message holds the log tails.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, cmd in enumerate(commands):
        log = open(log_dir / f"launch{i}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    failed = []
    try:
        for i, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = f"timeout after {timeout} s"
            if code != 0:
                failed.append((i, code))
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the workers it started
                proc.wait()
        for log in logs:
            log.close()
    if failed:
        tails = "\n".join(
            f"--- {' '.join(cmd)}\n{(log_dir / f'launch{i}.log').read_text()[-4000:]}" for i, cmd in enumerate(commands)
        )
        raise AssertionError(f"launch failed: {failed}\n{tails}")


def torchrun(*args: str) -> list[str]:
    """``torchrun ARGS`` with this interpreter (``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def helper_command(data_dir: Path, out_dir: Path) -> list[str]:
    """2 processes running distillation, then DKT: ``torchrun --standalone --nproc-per-node 2 ddp_helpers.py ...``."""
    return torchrun(
        "--standalone", "--nproc-per-node", "2", str(Path(__file__)), "kd", "dkt", "--data", str(data_dir),
        "--out", str(out_dir),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- knowledge tracing
# 74 simulated students of 10 interactions, windows of 10: every window has 10 scored positions, so the mean loss of
# each process's half batch averages to the loss of the whole batch. Splits: 37 test students (odd), 37 for training
# minus round(0.14 * 37) = 5 for validation (odd), 32 for training (8 steps of a global batch of 4).
KT_TEST_SIZE, KT_VAL_SIZE, KT_TRAIN_SIZE = 37, 5, 32
KT_DATA = {
    "max_len": 10,
    "shuffle": False,  # windows in file order, so that 2 x batch b sees what 1 x batch 2b sees
    "synthetic_students": 74,
    "synthetic_exercises": 20,
    "synthetic_seq_len": 10,
    "val_fraction": 0.14,
    "seed": 0,
}
KT_MODEL = {"d_model": 16, "num_heads": 2, "num_layers": 1, "max_len": 10, "dropout": 0.0}  # no dropout: no noise


def kt_config(record_dir: Path, batch_size: int, max_epochs: int, test_after_fit: bool = True) -> dict[str, Any]:
    """A ``lit-kt`` config (SAKT :data:`KT_MODEL` on :data:`KT_DATA`) whose processes record to ``record_dir``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": max_epochs,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "run",
            "plugins": [{"class_path": "tests.ddp_helpers.CountingCheckpointIO"}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -1}},
                {"class_path": "tests.ddp_helpers.RecordRun", "init_args": {"out_dir": str(record_dir)}},
            ],
        },
        "model": {
            "class_path": "lit_kt.SAKTModule",
            "init_args": {
                "model": {"class_path": "lit_kt.SAKT", "init_args": KT_MODEL},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            },
        },
        "data": {**KT_DATA, "batch_size": batch_size},
        "test_after_fit": test_after_fit,
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Writes a config (JSON is YAML) and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------- distillation
def write_text_data(folder: Path) -> Path:
    """A BERT tokenizer over :data:`WORDS` in ``folder/tokenizer`` and ``train.tsv``/``dev.tsv`` in ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # transformers 5 takes the vocabulary itself (`vocab_file=` is silently ignored: every word would be [UNK]).
    tokens = vocab.read_text().split()
    BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(folder / "tokenizer")
    g = torch.Generator().manual_seed(0)
    for name, n in (("train.tsv", KD_TRAIN_SIZE), ("dev.tsv", KD_DEV_SIZE)):
        rows = []
        for _ in range(n):
            length = int(torch.randint(2, 7, (1,), generator=g))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)]
            label = int(any(w in words for w in ("good", "great", "fine", "fun")))
            rows.append(f"{' '.join(words)}\t{label}\n")
        (folder / name).write_text("sentence\tlabel\n" + "".join(rows))
    return folder


def tiny_bert(layers: int, width: int, seed: int):
    """A random ``BertForSequenceClassification`` over :data:`WORDS` (2 labels), the same for the same seed."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def kd_parts(data_dir: Path) -> dict[str, Any]:
    """Teacher (seed 0), student (seed 1), distillation config and data module of the distillation test."""
    from lit_kd import DistillationConfig, IntermediateMatch
    from lit_kd.data import TextClassificationDataModule

    config = DistillationConfig(
        temperature=2.0,
        hard_label_weight=1.0,
        intermediate_matches=[IntermediateMatch(layer_t=2, layer_s=1, projection=("linear", 16, 32))],
    )
    return {
        "teacher": tiny_bert(layers=2, width=32, seed=0),
        "student": tiny_bert(layers=1, width=16, seed=1),
        "config": config,
        "data": TextClassificationDataModule(
            str(data_dir), tokenizer=str(data_dir / "tokenizer"), max_length=16, batch_size=2, eval_batch_size=2
        ),
    }


def ddp_trainer(out_dir: Path, max_epochs: int, callbacks: list[Callback] | None = None, **kwargs: Any) -> L.Trainer:
    """A 2-process CPU ``Trainer(strategy="ddp")`` whose :class:`RecordRun` writes to ``out_dir/record``."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[RecordRun(str(out_dir / "record")), *(callbacks or [])],
        **kwargs,
    )


def kd_main(data_dir: Path, out_dir: Path, epochs: int) -> None:
    """Distil on 2 processes with ``Trainer(strategy="ddp")``, then test; :class:`RecordRun` writes the results."""
    from lit_kd import DistillationModule

    L.seed_everything(0)
    parts = kd_parts(data_dir)
    module = DistillationModule(
        parts["teacher"], parts["student"], parts["config"], optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )
    trainer = ddp_trainer(
        out_dir,
        epochs,
        callbacks=[ModelCheckpoint(dirpath=out_dir / "checkpoints")],
        plugins=[CountingCheckpointIO()],
    )
    trainer.fit(module, parts["data"])
    trainer.test(module, parts["data"])


def logits_only_config():
    """The distillation config of the teacher-cache runs: soft and hard labels, no intermediate match."""
    from lit_kd import DistillationConfig

    return DistillationConfig(temperature=2.0, hard_label_weight=1.0)


def build_teacher_cache(data_dir: Path, path: Path) -> None:
    """The teacher's logits over the training split, by sample index (built once, in one process)."""
    from lit_kd.cache import TeacherCache

    parts = kd_parts(data_dir)
    parts["data"].setup("fit")
    TeacherCache.build(parts["teacher"], parts["data"].train_dataloader(), path, progress=False)


def kd_logits_main(data_dir: Path, out_dir: Path, cache: Path | None) -> None:
    """Distil logits only on 2 processes, with the live teacher (``cache=None``) or its cache; records the run."""
    from lit_kd import DistillationModule

    L.seed_everything(0)
    parts = kd_parts(data_dir)
    module = DistillationModule(
        parts["teacher"],
        parts["student"],
        logits_only_config(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        teacher_cache=None if cache is None else str(cache),
    )
    trainer = ddp_trainer(out_dir, 2, enable_checkpointing=False)
    trainer.fit(module, parts["data"])


def dkt_main(out_dir: Path) -> None:
    """Train DKT on 2 processes (``Trainer(strategy="ddp")``) for one epoch; :class:`RecordRun` writes the results."""
    from lit_kt import DKT, DKTModule, KTDataModule

    L.seed_everything(0)
    data = KTDataModule(**KT_DATA, batch_size=4)
    module = DKTModule(DKT(data.num_exercises, hidden_size=16, embedding_dim=16, dropout=0.0))
    trainer = ddp_trainer(out_dir, 1, enable_checkpointing=False)
    trainer.fit(module, data)


def callback_main(out_dir: Path) -> None:
    """A user's own LightningModule (tests/kd_user_project.py) distilled by ``DistillationCallback`` on 2 processes,
    with a named-module match and its projection; records the run, the teacher and the projections."""
    import copy

    from lit_kd import DistillationCallback, DistillationConfig, IntermediateMatch
    from tests.kd_user_project import TEACHER_INPUTS, MyModule, UserData, tiny_teacher, user_adaptor

    L.seed_everything(0)
    match = IntermediateMatch("bert.encoder.layer.1", "encoder", projection=("linear", 8, 16), name="enc")
    teacher = tiny_teacher()
    callback = DistillationCallback(
        teacher,
        DistillationConfig(temperature=2.0, intermediate_matches=[match]),
        student_module="net",
        teacher_inputs=TEACHER_INPUTS,
        student_adaptor=user_adaptor,
    )
    projections0 = copy.deepcopy(callback.distiller.projections.state_dict())
    trainer = ddp_trainer(out_dir, 2, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(MyModule(lr=0.1, momentum=0.9), UserData(n=16))
    extra = {
        "teacher": teacher.state_dict(),
        "projections": callback.distiller.projections.state_dict(),
        "projections0": projections0,
    }
    torch.save(extra, out_dir / f"rank{trainer.global_rank}_distiller.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "jobs",
        nargs="+",
        choices=["kd", "dkt", "kdlive", "kdcache", "kdcallback"],
        help="runs, in order, in the same processes",
    )
    parser.add_argument("--cache", type=Path, help="teacher cache folder (kdcache)")
    parser.add_argument("--out", type=Path, required=True, help="each job writes to OUT/<job>")
    parser.add_argument("--data", type=Path, help="folder made by write_text_data (kd)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (kd)")
    args = parser.parse_args(argv)
    for job in args.jobs:
        if job == "kd":
            kd_main(args.data, args.out / "kd", args.epochs)
        elif job == "kdcallback":
            callback_main(args.out / "kdcallback")
        elif job in ("kdlive", "kdcache"):
            kd_logits_main(args.data, args.out / job, args.cache if job == "kdcache" else None)
        else:
            dkt_main(args.out / "dkt")
    from lit_kt.cli import release_process_group

    release_process_group()


if __name__ == "__main__":
    main()
