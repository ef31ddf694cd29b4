"""Pretrain a small GPT-2 teacher on the sentences of a folder in the SST-2 layout, then train a smaller GPT-2 student
with and without distillation for the same steps on the same batches; compare their perplexities on ``dev.tsv``.

    python scripts/bench_kd_lm.py --data-dir ../shared/data/nlp/sst2 --json out/bench_kd_lm_sst2.json

Steps:

1. Teacher: a fresh GPT-2 (``--teacher-layers`` x ``--teacher-width``, :func:`lit_kd.lm_factories.gpt2_lm` over
   all-MiniLM-L6-v2's vocabulary) trained with :class:`lit_kd.CausalLMModule` for ``--teacher-steps`` steps, saved
   as ``teacher.ckpt`` (a Lightning-style checkpoint: :func:`lit_kd.lm_factories.gpt2_from_checkpoint` loads it) in
   ``runs/bench_kd_lm/teacher-<fingerprint>``, the fingerprint a SHA-256 of the training sentences it read and of
   every setting that shapes it. A teacher saved there is reused (``teacher_reused`` in the output);
   ``--retrain-teacher`` trains it again.
2. Student: a fresh, smaller GPT-2 (``--student-layers`` x ``--student-width``), trained twice from the same weights
   for ``--steps`` optimizer steps on the same batches (a seeded sampler; checked by a hash of the sample indices,
   ``same_batches``): without distillation (``CausalLMModule``, next-token cross-entropy) and with it
   (``DistillationModule(task_type="causal_lm")``: ``--kd-weight`` times ``--kd-loss`` at ``--temperature`` plus
   ``--hard-label-weight`` times the next-token cross-entropy).
3. Every model is evaluated once, at the end: perplexity (``CausalLMModule``'s ``val/ppl``: exp of the mean
   next-token cross-entropy over every real token) on ``dev.tsv``, or with ``--carve-dev N`` on the last N rows of
   ``train.tsv``, held out from every training run.

Batches group sentences of similar lengths (:class:`lit_kd.lm_data.LengthGroupedBatchSampler`): SST-2's training
phrases average 13 tokens, and with random batches most of each step would be padding through a 30522-word softmax.

Steps 2-3 run once per student seed (``--seeds``, default 3: ``--seed`` .. ``--seed + N - 1``; the teacher is
trained once, with ``--seed``). Prints and writes (``--json``): ``teacher_ppl``, ``student_ppl_no_kd``,
``student_ppl_kd`` (means over the seeds), ``kd_ppl_reduction`` (the mean of ``1 - kd / no_kd`` over the seeds), the
per-seed lists ``student_ppl_no_kd_seeds``, ``student_ppl_kd_seeds``, ``kd_ppl_reduction_seeds``, the reduction's
standard deviation and standard error (``kd_ppl_reduction_std``, ``kd_ppl_reduction_se``), ``steps``,
``kd_step_s`` and ``student_step_s`` (mean seconds per training step, the first ``--timing-warmup`` left out),
``seconds`` (the whole run) and the settings. ``--threads`` defaults to 1 (see
``scripts/bench_kd.py``: on a small shared CPU one thread is much faster than two).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit, machine
from torch import nn
from torch.utils.data import DataLoader

from lit_kd import CausalLMModule, DistillationConfig, DistillationModule
from lit_kd.config import KDLossType
from lit_kd.lm_data import LanguageModelingDataModule, LengthGroupedBatchSampler, collate_lm
from lit_kd.lm_factories import gpt2_from_checkpoint, gpt2_lm

TEACHER_META = "bench_kd_lm_teacher.json"  # written last: a folder without it holds no complete teacher
TEACHER_CKPT = "teacher.ckpt"
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "kl", "ce")
TEACHER_KEYS = (
    "tokenizer", "max_length", "batch_size", "teacher_layers", "teacher_width", "teacher_heads", "teacher_steps",
    "teacher_lr", "teacher_dropout", "warmup_fraction", "seed", "group_pool",
)  # fmt: skip


class StepTimer(L.Callback):
    """Wall time of training steps only, skipping the first ``warmup``; a hash of the sample indices seen."""

    def __init__(self, name: str, warmup: int = 3, log_every: int = 50) -> None:
        self.name, self.warmup, self.log_every = name, warmup, log_every
        self.times: list[float] = []
        self.indices = hashlib.sha1()
        self._start = 0.0
        self._losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.indices.update(batch["index"].cpu().numpy().tobytes())
        self._losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step % self.log_every == 0 or step == trainer.max_steps:
            loss = sum(self._losses) / len(self._losses)
            print(f"[{self.name}] step {step}/{trainer.max_steps} loss {loss:.4f} ({self.mean:.3f} s/step)", flush=True)
            self._losses.clear()

    @property
    def mean(self) -> float:
        timed = self.times[self.warmup :] or self.times
        return sum(timed) / max(len(timed), 1)


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))


def optimizer_and_schedule(lr: float, steps: int, warmup_fraction: float) -> tuple[partial, partial]:
    schedule = partial(warmup_linear, warmup=max(1, round(warmup_fraction * steps)), total=steps)
    return (
        partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
    )


def train_loader(data: LanguageModelingDataModule, a: argparse.Namespace, seed: int) -> DataLoader:
    """Training batches of similar-length sentences in an order fixed by ``seed`` alone."""
    dataset = data.dataset("train")
    sampler = LengthGroupedBatchSampler(
        [len(ids) for ids in dataset.input_ids], a.batch_size, a.group_pool, torch.Generator().manual_seed(seed)
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate_lm, pad_token_id=data.pad_token_id))


def fit(name: str, module: L.LightningModule, data: LanguageModelingDataModule, steps: int, a, seed: int) -> StepTimer:
    timer = StepTimer(name, a.timing_warmup, a.log_every)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    L.seed_everything(seed, verbose=False)
    trainer.fit(module, train_loader(data, a, seed))
    return timer


def dev_ppl(model: nn.Module, data: LanguageModelingDataModule) -> float:
    """Perplexity of ``model`` (put in eval mode) on the validation split."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(CausalLMModule(model.eval()), data.val_dataloader(), verbose=False)[0]
    return float(metrics["val/ppl"])


def fingerprint(data: LanguageModelingDataModule, a: argparse.Namespace) -> str:
    """SHA-256 of the training sentences the teacher reads and of the settings that shape it."""
    digest = hashlib.sha256()
    for text in data.texts("train"):
        digest.update(text.encode() + b"\n")
    digest.update(json.dumps({k: getattr(a, k) for k in TEACHER_KEYS}, sort_keys=True).encode())
    return digest.hexdigest()


def get_teacher(a: argparse.Namespace, data: LanguageModelingDataModule) -> tuple[nn.Module, dict]:
    """The teacher saved in ``--teacher-ckpt-dir``, or a fresh one trained and saved there."""
    folder = Path(a.teacher_ckpt_dir)
    if (folder / TEACHER_META).is_file() and not a.retrain_teacher:
        meta = json.loads((folder / TEACHER_META).read_text())
        if meta.get("data_fingerprint") != a.fingerprint:
            raise ValueError(
                f"Expected {folder} to hold a teacher trained on the training sentences of {a.data_dir} with these "
                f"settings (fingerprint {a.fingerprint[:12]}) but it holds one of fingerprint "
                f"{str(meta.get('data_fingerprint'))[:12]}; pass another `--teacher-ckpt-dir` or `--retrain-teacher`."
            )
        print(f"[teacher] reusing {folder} ({meta['teacher_steps']} steps)", flush=True)
        return gpt2_from_checkpoint(str(folder / TEACHER_CKPT)), {**meta, "teacher_reused": True}
    start = time.perf_counter()
    L.seed_everything(a.seed, verbose=False)
    teacher = gpt2_lm(
        tokenizer=a.tokenizer,
        n_layer=a.teacher_layers,
        n_embd=a.teacher_width,
        n_head=a.teacher_heads,
        n_positions=a.max_length,
        dropout=a.teacher_dropout,
    )
    optimizer, schedule = optimizer_and_schedule(a.teacher_lr, a.teacher_steps, a.warmup_fraction)
    module = CausalLMModule(teacher, optimizer=optimizer, lr_scheduler=schedule)
    timer = fit("teacher", module, data, a.teacher_steps, a, a.seed)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint: dict = {"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)  # the model's config, so that gpt2_from_checkpoint rebuilds it
    torch.save(checkpoint, folder / TEACHER_CKPT)
    meta = {
        **{k: getattr(a, k) for k in TEACHER_KEYS},
        "data_fingerprint": a.fingerprint,
        "teacher_step_s": round(timer.mean, 4),
        "teacher_train_seconds": round(time.perf_counter() - start, 1),
    }
    (folder / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return teacher.eval(), {**meta, "teacher_reused": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with train.tsv and dev.tsv (SST-2 layout)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--carve-dev", type=int, default=0, help="evaluate on the last N rows of train.tsv (held out)")
    p.add_argument("--tokenizer", default="all-MiniLM-L6-v2", help="tokenizer name or local path")
    p.add_argument("--max-length", type=int, default=32, help="longest tokenised sentence (special tokens included)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--group-pool", type=int, default=50, help="batches per length-sorted pool")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--teacher-dropout", type=float, default=0.0)
    p.add_argument("--teacher-ckpt-dir", default=None, help="default runs/bench_kd_lm/teacher-<fingerprint>")
    p.add_argument("--retrain-teacher", action="store_true", help="train the teacher again even if one is saved")
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of each student run")
    p.add_argument("--lr", type=float, default=1e-3, help="student learning rate")
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warm-up, then linear decay to 0.1x")
    p.add_argument("--kd-loss", choices=KD_LOSSES, default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--hard-label-weight", type=float, default=0.5)
    p.add_argument("--log-every", type=int, default=20, help="print the training loss every N steps")
    p.add_argument("--timing-warmup", type=int, default=3, help="steps left out of the step timings")
    p.add_argument("--seed", type=int, default=42, help="the teacher's seed and the first student seed")
    p.add_argument(
        "--seeds", type=int, default=3, help="student seeds --seed .. --seed + N - 1 (the teacher is trained once)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 for torch's choice")
    a = p.parse_args(argv)
    for name in (
        "max_length",
        "batch_size",
        "eval_batch_size",
        "group_pool",
        "teacher_steps",
        "steps",
        "log_every",
        "seeds",
    ):
        if getattr(a, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 1 but got {getattr(a, name)}.")
    for name in ("carve_dev", "timing_warmup", "threads"):
        if getattr(a, name) < 0:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 0 but got {getattr(a, name)}.")
    if a.kd_loss not in KDLossType.__args__:
        p.error(f"Expected `--kd-loss` to be one of {KDLossType.__args__} (this lit_kd) but got {a.kd_loss!r}.")
    return a


def student_init(a: argparse.Namespace, seed: int) -> nn.Module:
    """The student's fresh weights for one seed (``seed + 1``, as the batches: the teacher used ``--seed``)."""
    L.seed_everything(seed + 1, verbose=False)
    return gpt2_lm(
        tokenizer=a.tokenizer,
        n_layer=a.student_layers,
        n_embd=a.student_width,
        n_head=a.student_heads,
        n_positions=a.max_length,
        dropout=0.0,
    )


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    data = LanguageModelingDataModule(
        a.data_dir,
        tokenizer=a.tokenizer,
        max_length=a.max_length,
        batch_size=a.batch_size,
        eval_batch_size=a.eval_batch_size,
        train_limit=a.train_limit,
        carve_dev=a.carve_dev,
    )
    a.fingerprint = fingerprint(data, a)
    if a.teacher_ckpt_dir is None:
        a.teacher_ckpt_dir = f"runs/bench_kd_lm/teacher-{a.fingerprint[:12]}"
    teacher, meta = get_teacher(a, data)
    teacher_ppl = dev_ppl(teacher, data)
    print(f"[teacher] dev ppl {teacher_ppl:.2f}", flush=True)

    ppl = {"no_kd": [], "kd": []}
    timers = {"no_kd": [], "kd": []}
    same_batches = True
    for seed in range(a.seed, a.seed + a.seeds):
        init = student_init(a, seed)
        indices = None
        for name in ("no_kd", "kd"):
            student = copy.deepcopy(init)  # both runs of a seed start from the same weights
            optimizer, schedule = optimizer_and_schedule(a.lr, a.steps, a.warmup_fraction)
            if name == "kd":
                config = DistillationConfig(
                    kd_loss_type=a.kd_loss,
                    temperature=a.temperature,
                    kd_loss_weight=a.kd_weight,
                    hard_label_weight=a.hard_label_weight,
                )
                module = DistillationModule(
                    teacher, student, config, optimizer=optimizer, lr_scheduler=schedule, task_type="causal_lm"
                )
            else:
                module = CausalLMModule(student, optimizer=optimizer, lr_scheduler=schedule)
            timer = fit(f"student {name} seed {seed}", module, data, a.steps, a, seed + 1)
            timers[name].append(timer.mean)
            digest = timer.indices.hexdigest()
            same_batches &= indices is None or digest == indices
            indices = digest
            ppl[name].append(dev_ppl(student, data))
            print(f"[student {name} seed {seed}] dev ppl {ppl[name][-1]:.2f}", flush=True)

    reductions = [1 - kd / no_kd for kd, no_kd in zip(ppl["kd"], ppl["no_kd"])]
    result = {
        "teacher_ppl": round(teacher_ppl, 3),
        "student_ppl_no_kd": round(statistics.fmean(ppl["no_kd"]), 3),
        "student_ppl_kd": round(statistics.fmean(ppl["kd"]), 3),
        "kd_ppl_reduction": round(statistics.fmean(reductions), 4),
        "student_ppl_no_kd_seeds": [round(x, 3) for x in ppl["no_kd"]],
        "student_ppl_kd_seeds": [round(x, 3) for x in ppl["kd"]],
        "kd_ppl_reduction_seeds": [round(x, 4) for x in reductions],
        "kd_ppl_reduction_std": round(statistics.stdev(reductions), 4) if len(reductions) > 1 else None,
        "kd_ppl_reduction_se": round(statistics.stdev(reductions) / len(reductions) ** 0.5, 4)
        if len(reductions) > 1
        else None,
        "seeds": list(range(a.seed, a.seed + a.seeds)),
        "steps": a.steps,
        "teacher_steps": a.teacher_steps,
        "kd_step_s": round(statistics.fmean(timers["kd"]), 4),
        "student_step_s": round(statistics.fmean(timers["no_kd"]), 4),
        "same_batches": same_batches,
        "teacher_reused": meta["teacher_reused"],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "dataset": Path(a.data_dir).resolve().name
        + (f" (last {a.carve_dev} train rows as dev)" if a.carve_dev else ""),
        "train_sentences": len(data.dataset("train")),
        "dev_sentences": len(data.dataset("val")),
        "dev_tokens_scored": sum(len(ids) - 1 for ids in data.dataset("val").input_ids),
        "settings": {
            **{k: v for k, v in vars(a).items() if k not in ("json", "data_dir", "fingerprint")},
            "teacher_step_s": meta["teacher_step_s"],
            "teacher_train_seconds": meta["teacher_train_seconds"],
            "threads": torch.get_num_threads(),
        },
        "machine": machine(),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return emit(result, a.json)


if __name__ == "__main__":
    main()
