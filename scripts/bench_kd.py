"""Distil a fine-tuned teacher into a small student on a sentence-classification task; compare with no distillation.

    python scripts/bench_kd.py --data-dir ../shared/data/nlp/sst2 --student 2layer --json /tmp/kd/bench_2layer.json

Steps:

1. Teacher: ``--teacher`` (default all-MiniLM-L6-v2, :func:`~lit_kd.students.minilm_path`) with a fresh
   classification head, fine-tuned with :class:`~lit_kd.finetune.ClassifierModule` for ``--teacher-steps`` steps and
   saved (``save_pretrained`` + tokenizer) in ``--teacher-ckpt-dir``. When that folder already holds a teacher
   fine-tuned by this script from the same ``--teacher``, it is loaded instead (``teacher_reused`` in the output;
   ``teacher_steps`` is then the number it was trained for).
2. Student, built from the fine-tuned teacher so that both student runs start from the same weights:
   ``2layer``: :func:`~lit_kd.students.build_bert_student` with teacher blocks ``[0, 5]`` (embeddings, pooler and
   head copied too); ``bigru``: :class:`~lit_kd.students.BiGRUClassifier` reading the teacher's token ids, with
   ``embedding_dim`` equal to the teacher's width so that its embedding table starts as a copy of the teacher's word
   embeddings (``init_embeddings_from``): a few hundred steps cannot learn 30k word vectors from scratch.
3. The student trains ``--steps`` steps twice from that initialisation, with the same seed and the same batches (a
   seeded sampler): without distillation (cross-entropy on the labels, ``ClassifierModule``) and with it
   (``DistillationModule``: soft cross-entropy at ``--temperature`` scaled by ``T**2``, plus ``--hard-label-weight``
   times the label cross-entropy, plus for ``2layer`` ``--hidden-weight`` times the MSE between the student's last
   hidden state and the teacher's, ``layer_s=2``/``layer_t=6``, same width so no projection).
4. Teacher and both students are evaluated once, at the end, on ``dev.tsv`` accuracy. Nothing is selected on the
   dev set: the distillation settings below were fixed before any dev result was seen (see docs in the code).

Prints and writes (``--json``) ``{"teacher_acc", "student_acc_no_kd", "student_acc_kd", "steps", "kd_step_s",
"student_step_s", ...}``: ``*_step_s`` are mean seconds per training step (forward, backward and optimizer step,
the first ``--timing-warmup`` steps left out; data loading and evaluation excluded); ``seconds`` is the whole
run's wall time, teacher fine-tuning included.

``--threads`` defaults to 1: on a small CPU shared with other jobs, two intra-op threads competing with another
process's threads for two cores made training steps 5-10 times slower than one thread did (measured on the 2-core
development machine: a 2-layer student step took 2.0 s with 2 threads and 0.3 s with 1).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit, machine
from torch import nn
from torch.utils.data import DataLoader

from lit_kd import DistillationConfig, DistillationModule, IntermediateMatch
from lit_kd.data import TextClassificationDataModule, collate_text
from lit_kd.finetune import ClassifierModule
from lit_kd.students import BiGRUClassifier, build_bert_student, load_teacher, minilm_path

TEACHER_META = "bench_kd_teacher.json"  # written last: a folder without it holds no complete teacher
STUDENT_LR = {"2layer": 1e-4, "bigru": 2e-3}


class StepTimer(L.Callback):
    """Wall time of training steps only (forward, backward, optimizer step), skipping the first ``warmup`` steps."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.indices = hashlib.sha1()  # which samples were seen, in which order
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.indices.update(batch["index"].numpy().tobytes())

    @property
    def mean(self) -> float:
        timed = self.times[self.warmup :] or self.times
        return sum(timed) / max(len(timed), 1)


class Printer(L.Callback):
    """One line every ``every`` steps and one per validation (the progress bar is off so that logs stay readable)."""

    def __init__(self, name: str, every: int, timer: StepTimer) -> None:
        self.name, self.every, self.timer = name, every, timer
        self._losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            print(
                f"[{self.name}] step {step}/{trainer.max_steps} loss {sum(self._losses) / len(self._losses):.4f}"
                f" ({self.timer.mean:.3f} s/step)",
                flush=True,
            )
            self._losses.clear()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
            print(f"[{self.name}] step {trainer.global_step}: dev acc {acc:.4f} (curve only, not used)", flush=True)


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def optimizer_and_schedule(lr: float, steps: int, warmup_fraction: float) -> tuple[partial, partial]:
    schedule = partial(warmup_linear, warmup=max(1, round(warmup_fraction * steps)), total=steps)
    return (
        partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
    )


def train_loader(data: TextClassificationDataModule, a: argparse.Namespace) -> DataLoader:
    """Training batches in an order fixed by ``--seed`` alone, whatever else draws random numbers."""
    return DataLoader(
        data.dataset("train"),
        batch_size=a.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(a.seed),
        collate_fn=partial(collate_text, pad_token_id=data.load_tokenizer().pad_token_id),
    )


def fit(name: str, module: L.LightningModule, data: TextClassificationDataModule, steps: int, a) -> StepTimer:
    timer = StepTimer(a.timing_warmup)
    validate = a.eval_every > 0
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        val_check_interval=a.eval_every if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        callbacks=[timer, Printer(name, a.log_every, timer)],
    )
    L.seed_everything(a.seed, verbose=False)
    trainer.fit(module, train_loader(data, a), data.val_dataloader() if validate else None)
    return timer


def dev_accuracy(model: nn.Module, data: TextClassificationDataModule, num_labels: int) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(ClassifierModule(model, num_labels), data.val_dataloader(), verbose=False)[0]
    return float(metrics["val/acc"])


def teacher_is_saved(folder: Path) -> bool:
    return (folder / TEACHER_META).is_file() and (folder / "config.json").is_file()


def get_teacher(a: argparse.Namespace, data: TextClassificationDataModule) -> tuple[nn.Module, dict]:
    """Load the fine-tuned teacher from ``--teacher-ckpt-dir``, or fine-tune ``--teacher`` and save it there."""
    folder, num_labels = Path(a.teacher_ckpt_dir), data.num_labels
    if teacher_is_saved(folder):
        meta = json.loads((folder / TEACHER_META).read_text())
        if meta["teacher"] != a.teacher or meta["num_labels"] != num_labels:
            raise ValueError(
                f"Expected {folder} to hold a fine-tuned {a.teacher!r} with {num_labels} labels but it holds"
                f" {meta['teacher']!r} with {meta['num_labels']}; pass another `--teacher-ckpt-dir`."
            )
        print(f"[teacher] reusing {folder} ({meta['teacher_steps']} fine-tuning steps)", flush=True)
        return load_teacher(str(folder), num_labels).eval(), {**meta, "teacher_reused": True}

    start = time.perf_counter()
    L.seed_everything(a.seed, verbose=False)  # the fresh classification head
    # from_pretrained returns eval mode and Lightning keeps modules' modes: switch dropout on for fine-tuning.
    teacher = load_teacher(a.teacher, num_labels).train()
    optimizer, schedule = optimizer_and_schedule(a.teacher_lr, a.teacher_steps, a.warmup_fraction)
    module = ClassifierModule(teacher, num_labels, optimizer=optimizer, lr_scheduler=schedule)
    timer = fit("teacher", module, data, a.teacher_steps, a)
    folder.mkdir(parents=True, exist_ok=True)
    module.export_model(folder)
    data.load_tokenizer().save_pretrained(folder)
    meta = {
        "teacher": a.teacher,
        "num_labels": num_labels,
        "teacher_steps": a.teacher_steps,
        "teacher_lr": a.teacher_lr,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "seed": a.seed,
        "teacher_step_s": round(timer.mean, 4),
        "teacher_finetune_seconds": round(time.perf_counter() - start, 1),
    }
    (folder / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return teacher.eval(), {**meta, "teacher_reused": False}


def build_student(kind: str, teacher: nn.Module, vocab_size: int, pad_token_id: int, num_labels: int) -> nn.Module:
    if kind == "2layer":
        return build_bert_student(teacher, layers=[0, 5]).train()
    embeddings = teacher.get_input_embeddings()
    student = BiGRUClassifier(
        vocab_size,
        num_labels,
        embedding_dim=embeddings.embedding_dim,
        hidden_size=256,
        pad_token_id=pad_token_id,
    )
    student.init_embeddings_from(embeddings)
    return student


def kd_config(a: argparse.Namespace) -> DistillationConfig:
    matches = []
    if a.student == "2layer" and a.hidden_weight > 0:
        # hidden_states[2] is the student's last block, hidden_states[6] the teacher's; both 384 wide.
        matches.append(IntermediateMatch(layer_t=6, layer_s=2, loss="hidden_mse", weight=a.hidden_weight))
    return DistillationConfig(
        temperature=a.temperature,
        kd_loss_type="ce",
        hard_label_weight=a.hard_label_weight,
        scale_by_temperature_squared=True,
        intermediate_matches=matches,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with train.tsv and dev.tsv (SST-2 layout)")
    p.add_argument("--teacher", default=None, help="local folder of the teacher (default: all-MiniLM-L6-v2)")
    p.add_argument("--student", choices=("2layer", "bigru"), required=True)
    p.add_argument("--steps", type=int, default=300, help="training steps of each student run")
    p.add_argument("--teacher-steps", type=int, default=400, help="fine-tuning steps of the teacher")
    p.add_argument("--teacher-ckpt-dir", default="runs/bench_kd/teacher", help="where the fine-tuned teacher lives")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="longest tokenised sentence")
    p.add_argument("--lr", type=float, default=None, help="student learning rate (default 1e-4 2layer, 2e-3 bigru)")
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up, then linear decay to 0")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hard-label-weight", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=1.0, help="last-hidden-state MSE weight (2layer only)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N rows of train.tsv")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=0, help="also print dev accuracy every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    p.add_argument("--timing-warmup", type=int, default=3, help="steps left out of the step timings")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 for torch's choice (see the docstring)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    a.teacher = a.teacher or minilm_path()
    a.lr = a.lr if a.lr is not None else STUDENT_LR[a.student]
    for name in ("steps", "teacher_steps", "batch_size", "max_length", "log_every"):
        if getattr(a, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 1 but got {getattr(a, name)}.")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-Trainer banners: one line per event
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    data = TextClassificationDataModule(
        a.data_dir,
        tokenizer=a.teacher,  # fine-tuning keeps the vocabulary: teacher and students read these ids
        max_length=a.max_length,
        batch_size=a.batch_size,
        eval_batch_size=a.eval_batch_size,
        train_limit=a.train_limit,
    )
    num_labels = data.num_labels
    teacher, teacher_meta = get_teacher(a, data)
    teacher_acc = dev_accuracy(teacher, data, num_labels)
    print(f"[teacher] dev acc {teacher_acc:.4f}", flush=True)

    L.seed_everything(a.seed, verbose=False)  # the BiGRU's fresh weights
    init = build_student(a.student, teacher, data.vocab_size, data.pad_token_id, num_labels)
    results = {}
    for kd in (False, True):
        name = "kd" if kd else "no_kd"
        student = copy.deepcopy(init)  # both runs start from the same weights
        optimizer, schedule = optimizer_and_schedule(a.lr, a.steps, a.warmup_fraction)
        if kd:
            module = DistillationModule(
                teacher, student, kd_config(a), optimizer=optimizer, lr_scheduler=schedule, num_labels=num_labels
            )
        else:
            module = ClassifierModule(student, num_labels, optimizer=optimizer, lr_scheduler=schedule)
        timer = fit(f"student {name}", module, data, a.steps, a)
        acc = dev_accuracy(student, data, num_labels)
        print(f"[student {name}] dev acc {acc:.4f}", flush=True)
        results[name] = (acc, timer)
    (acc_plain, timer_plain), (acc_kd, timer_kd) = results["no_kd"], results["kd"]

    result = {
        "teacher_acc": round(teacher_acc, 4),
        "student_acc_no_kd": round(acc_plain, 4),
        "student_acc_kd": round(acc_kd, 4),
        "steps": a.steps,
        "kd_step_s": round(timer_kd.mean, 4),
        "student_step_s": round(timer_plain.mean, 4),
        "teacher_steps": teacher_meta["teacher_steps"],
        "teacher_reused": teacher_meta["teacher_reused"],
        "student": a.student,
        "student_params": sum(p.numel() for p in init.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "dataset": Path(a.data_dir).resolve().name,
        "dev_size": len(data.dataset("val")),
        "same_batches": timer_plain.indices.hexdigest() == timer_kd.indices.hexdigest(),
        "seconds": round(time.perf_counter() - start, 1),
        "settings": {
            "teacher": a.teacher,
            "teacher_ckpt_dir": a.teacher_ckpt_dir,
            "teacher_lr": teacher_meta["teacher_lr"],
            "teacher_step_s": teacher_meta["teacher_step_s"],
            "teacher_finetune_seconds": teacher_meta["teacher_finetune_seconds"],
            "kd": {
                "kd_loss_type": "ce",
                "temperature": a.temperature,
                "scale_by_temperature_squared": True,
                "hard_label_weight": a.hard_label_weight,
                "hidden_mse_6_2_weight": a.hidden_weight if a.student == "2layer" else None,
            },
            **{k: getattr(a, k) for k in ("lr", "batch_size", "max_length", "warmup_fraction", "train_limit", "seed")},
            "threads": torch.get_num_threads(),
        },
        "machine": machine(),
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
