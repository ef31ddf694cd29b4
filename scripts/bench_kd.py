"""Distil a fine-tuned teacher into a small student on a sentence-classification task; compare with no distillation,
over several seeds.

    python scripts/bench_kd.py --data-dir ../shared/data/nlp/sst2 --student 2layer --json out/sst2_2layer.json

The default setting is the one distillation is for: a small labelled budget and more text than labels. Only the
first ``--train-limit`` rows of ``train.tsv`` (default 2000) carry labels, for the teacher and for both students; the
rest of the file, its labels dropped, is unlabelled in-domain text that only the distilled student reads, labelled
by the teacher (``--transfer-unused-train``, on by default; ``--train-limit 0`` labels every row, as in the full-data
comparison of ``docs/benchmarks.md``). Batches group sentences of similar lengths (``--group-by-length``, less
padding; the same batches for both students).

Steps:

1. Teacher: ``--teacher`` (default all-MiniLM-L6-v2, :func:`~lit_kd.students.minilm_path`) with a fresh
   classification head, fine-tuned with :class:`~lit_kd.finetune.ClassifierModule` for ``--teacher-steps`` steps and
   saved (``save_pretrained`` + tokenizer) in ``--teacher-ckpt-dir``. A teacher saved there is reused only when it
   was fine-tuned by this script from the same ``--teacher``, with the same labels and on the same training data (a
   SHA-256 fingerprint of the training rows it read); otherwise the run stops and says so (``--retrain-teacher``
   fine-tunes it again in place). ``teacher_reused`` in the output.
2. For each of ``--seeds`` seeds (``--seed``, ``--seed`` + 1, ...), the student is built (``2layer``: teacher blocks
   ``--student-layers``, default ``0,5``, with embeddings, pooler and head copied; ``small``: 4 blocks 256 wide, fresh,
   embeddings projected from the teacher's (:func:`~lit_kd.students.project_embeddings`); ``bigru``: a BiGRU whose
   embeddings start as the teacher's word embeddings) and trained twice for ``--steps`` optimizer steps from the same
   initialisation on the same labelled batches (a seeded sampler; checked by a hash of the labelled sample indices):
   without distillation (cross-entropy on the labels, ``ClassifierModule``) and with it (``DistillationModule``: soft
   cross-entropy at ``--temperature`` scaled by ``T**2``, plus ``--hard-label-weight`` (0 for the BERT students, 1
   for ``bigru``) times the label cross-entropy, plus for the BERT students ``--hidden-weight`` times the MSE between
   the student's last hidden state and the teacher's, with a linear projection for ``small``). With a transfer set
   (the unused training rows, see above; ``--transfer-augment K``: K noisy copies of every labelled sentence;
   ``--transfer-file F``: unlabelled sentences) each KD batch also carries ``--transfer-per-sample`` (3 for
   ``2layer``, 1 otherwise) unlabelled rows per labelled row, read by the KD term only, from a stream that uses every
   transfer row once before any twice; the student alone never sees them. Both runs take the same number of
   optimizer steps on the same labelled rows.
   With ``--teacher-cache`` (the 2-layer student's default) the teacher runs once, before the seeds, over every
   labelled and transfer row (``TextClassificationDataModule.cache_dataloader``), and the distilled runs read its
   logits and the matched hidden states from that :class:`~lit_kd.cache.TeacherCache` (kept in
   ``--teacher-ckpt-dir``, keyed by the rows' token ids and the layers, reused by later runs) instead of running it
   at every step; ``--fused-optimizer`` (also the 2-layer default) gives the students torch's fused AdamW. Both
   change the figures only by rounding (tested: the same KD losses as the live teacher) and halve the 2-layer run.
3. Every model is evaluated once, at the end, on ``dev.tsv`` (or, with ``--carve-dev N``, on the last N rows of
   ``train.tsv``, held out from every training run: a second split for checking settings chosen on SST-2).

Prints and writes (``--json``): ``teacher_acc``; ``student_acc_no_kd`` and ``student_acc_kd`` (means over seeds),
``student_acc_no_kd_seeds``/``student_acc_kd_seeds`` (per seed) and their standard deviations; ``kd_gain`` (mean of
KD - no KD) and ``kd_gain_se`` (its standard error, from the per-seed paired differences); ``retention`` (KD student
/ teacher); step times (``*_step_s``: mean seconds per training step, the first ``--timing-warmup`` left out) and
``seconds`` (the whole run, teacher fine-tuning and cache building included); ``settings.kd.teacher_cache``: the
cache's ``path``, ``rows``, ``bytes``, whether it was ``reused`` and the ``seconds`` it took (``null`` without one).

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
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit, machine
from torch import nn
from torch.utils.data import DataLoader

from lit_kd import DistillationConfig, DistillationModule, IntermediateMatch
from lit_kd.cache import TeacherCache
from lit_kd.data import TextClassificationDataModule, TrainingRowsDataset, collate_text
from lit_kd.finetune import ClassifierModule
from lit_kd.students import BiGRUClassifier, build_bert_student, load_teacher, minilm_path

TEACHER_META = "bench_kd_teacher.json"  # written last: a folder without it holds no complete teacher
# Per-student defaults of the options left unset (None) on the command line. Evidence (docs/benchmarks.md, issue 11):
# - hard_label_weight: the BERT students distil slightly better from the teacher alone (no label term), over seeds
#   42-44 against weight 1: 2-layer +0.38 +- 0.19 points on SST-2 dev and +0.17 +- 0.16 on the carved split; small
#   +0.46 +- 0.17 and +0.40 +- 0.25. The BiGRU was worse without it on SST-2 dev (-0.38): it keeps 1.
# - transfer_per_sample: three unlabelled rows per labelled one in each KD batch: the 2-layer student +0.69 +- 0.17
#   points on SST-2 dev and +0.33 +- 0.09 on the carved split over seeds 42-44 against one (every seed better), at
#   twice the KD step's cost; the default run stays within 45 minutes. The other students: not measured, keep 1.
STUDENT_DEFAULTS = {
    "2layer": {
        "lr": 1e-4,
        "hard_label_weight": 0.0,
        "transfer_per_sample": 3,
        "fused_optimizer": True,
        "teacher_cache": True,
    },
    "small": {
        "lr": 5e-4,
        "hard_label_weight": 0.0,
        "transfer_per_sample": 1,
        "fused_optimizer": False,
        "teacher_cache": False,
    },
    "bigru": {
        "lr": 2e-3,
        "hard_label_weight": 1.0,
        "transfer_per_sample": 1,
        "fused_optimizer": False,
        "teacher_cache": False,
    },
}
TWO_LAYERS = (0, 5)  # the teacher blocks the 2-layer student starts from
SMALL = {"layers": [0, 2, 3, 5], "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4}


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
        labelled = batch["labels"] >= 0  # transfer-set rows (label -100) are not part of the labelled batches
        self.indices.update(batch["index"][labelled].cpu().numpy().tobytes())

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


class KeepTrainingRandomness(L.Callback):
    """Validation during training (``--eval-every``) leaves the training run's random numbers as they were.

    Starting the validation loader's iterator draws a seed from torch's global generator, so without this a run with
    a dev-accuracy curve would drop out different units afterwards than the same run without one: the curve would
    change what it only observes.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = torch.random.get_rng_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and hasattr(self, "_state"):
            torch.random.set_rng_state(self._state)


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def optimizer_and_schedule(
    lr: float, steps: int, warmup_fraction: float, fused: bool = False
) -> tuple[partial, partial]:
    """AdamW (``fused``: torch's single-kernel implementation, the same update up to rounding) and the schedule."""
    schedule = partial(warmup_linear, warmup=max(1, round(warmup_fraction * steps)), total=steps)
    return (
        partial(torch.optim.AdamW, lr=lr, weight_decay=0.01, **({"fused": True} if fused else {})),
        partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
    )


def train_loader(data: TextClassificationDataModule, seed: int, batch_size: int, transfer: bool) -> DataLoader:
    """Training batches in an order fixed by ``seed`` alone, whatever else draws random numbers; with ``transfer``
    each labelled sample brings its transfer rows (the labelled batches are the same either way)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        data.train_dataset() if transfer else data.dataset("train"),
        batch_size=batch_size,
        sampler=data.train_sampler(generator, transfer=transfer),
        collate_fn=partial(collate_text, pad_token_id=data.load_tokenizer().pad_token_id),
    )


def fit(
    name: str, module: L.LightningModule, data: TextClassificationDataModule, steps: int, a, seed: int, transfer=False
) -> StepTimer:
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
        callbacks=[timer, Printer(name, a.log_every, timer), KeepTrainingRandomness()],
    )
    L.seed_everything(seed, verbose=False)
    loader = train_loader(data, seed, a.batch_size, transfer)
    trainer.fit(module, loader, data.val_dataloader() if validate else None)
    return timer


def dev_accuracy(model: nn.Module, data: TextClassificationDataModule, num_labels: int) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(ClassifierModule(model, num_labels), data.val_dataloader(), verbose=False)[0]
    return float(metrics["val/acc"])


def teacher_is_saved(folder: Path) -> bool:
    return (folder / TEACHER_META).is_file() and (folder / "config.json").is_file()


def data_fingerprint(data: TextClassificationDataModule) -> str:
    """SHA-256 of the training rows the teacher reads (texts and labels, after ``--train-limit``)."""
    texts, labels = data._read("train")
    limit = data.hparams.train_limit
    digest = hashlib.sha256()
    for text, label in zip(texts[:limit], labels[:limit]):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def get_teacher(a: argparse.Namespace, data: TextClassificationDataModule) -> tuple[nn.Module, dict]:
    """Load the fine-tuned teacher from ``--teacher-ckpt-dir``, or fine-tune ``--teacher`` and save it there.

    Raises:
        ValueError: If the saved teacher was fine-tuned from another model, for other labels or on other data (and
            ``--retrain-teacher`` is not given).
    """
    folder, num_labels = Path(a.teacher_ckpt_dir), data.num_labels
    fingerprint = data_fingerprint(data)
    if teacher_is_saved(folder) and not a.retrain_teacher:
        meta = json.loads((folder / TEACHER_META).read_text())
        saved = (meta["teacher"], meta["num_labels"], meta.get("data_fingerprint"))
        if saved != (a.teacher, num_labels, fingerprint):
            raise ValueError(
                f"Expected {folder} to hold {a.teacher!r} fine-tuned for {num_labels} labels on the training data of"
                f" {a.data_dir} (fingerprint {fingerprint[:12]}) but it holds {meta['teacher']!r} for"
                f" {meta['num_labels']} labels on data {str(meta.get('data_fingerprint'))[:12]}; pass another"
                " `--teacher-ckpt-dir` or `--retrain-teacher`."
            )
        print(f"[teacher] reusing {folder} ({meta['teacher_steps']} fine-tuning steps)", flush=True)
        return load_teacher(str(folder), num_labels).eval(), {**meta, "teacher_reused": True}

    start = time.perf_counter()
    L.seed_everything(a.seed, verbose=False)  # the fresh classification head
    # from_pretrained returns eval mode and Lightning keeps modules' modes: switch dropout on for fine-tuning.
    teacher = load_teacher(a.teacher, num_labels).train()
    optimizer, schedule = optimizer_and_schedule(a.teacher_lr, a.teacher_steps, a.warmup_fraction)
    module = ClassifierModule(teacher, num_labels, optimizer=optimizer, lr_scheduler=schedule)
    timer = fit("teacher", module, data, a.teacher_steps, a, a.seed)
    folder.mkdir(parents=True, exist_ok=True)
    module.export_model(folder)
    data.load_tokenizer().save_pretrained(folder)
    meta = {
        "teacher": a.teacher,
        "num_labels": num_labels,
        "data_fingerprint": fingerprint,
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


def rows_fingerprint(rows: TrainingRowsDataset) -> str:
    """SHA-256 of the teacher's token ids of every training row (labelled and transfer), in index order."""
    digest = hashlib.sha256()
    for i in range(len(rows)):
        digest.update(torch.tensor(rows[i]["encoding"]["input_ids"], dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def get_teacher_cache(
    a: argparse.Namespace, data: TextClassificationDataModule, teacher: nn.Module, hidden_layers: list[int]
) -> tuple[Path, dict]:
    """The teacher's logits (and ``hidden_layers``) for every row the KD batches can carry, built once and kept in
    ``--teacher-ckpt-dir`` under a name keyed by those rows' token ids and the layers; a folder built from other
    teacher weights is refused when it is opened (:class:`~lit_kd.cache.TeacherCache`)."""
    start = time.perf_counter()
    rows = TrainingRowsDataset(data.train_dataset())
    key = hashlib.sha256(f"{rows_fingerprint(rows)} {hidden_layers}".encode()).hexdigest()[:12]
    path = Path(a.teacher_ckpt_dir) / f"cache-{key}"
    reused = (path / "meta.json").is_file()
    if not reused:
        print(f"[teacher cache] running the teacher over {len(rows)} rows into {path}", flush=True)
        TeacherCache.build(
            teacher, data.cache_dataloader(a.eval_batch_size), path, hidden_layers=hidden_layers, progress=False
        )
    seconds = round(time.perf_counter() - start, 1)
    print(f"[teacher cache] {'reusing' if reused else 'built'} {path} ({len(rows)} rows, {seconds} s)", flush=True)
    size = sum(f.stat().st_size for f in path.iterdir())
    return path, {"path": str(path), "rows": len(rows), "reused": reused, "seconds": seconds, "bytes": size}


def build_student(
    kind: str,
    teacher: nn.Module,
    vocab_size: int,
    pad_token_id: int,
    num_labels: int,
    layers: tuple[int, int] = TWO_LAYERS,
) -> nn.Module:
    if kind == "2layer":
        return build_bert_student(teacher, layers=list(layers)).train()
    if kind == "small":
        return build_bert_student(teacher, **SMALL).train()
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


def kd_config(a: argparse.Namespace, teacher: nn.Module) -> DistillationConfig:
    matches = []
    if a.student in ("2layer", "small") and a.hidden_weight > 0:
        # The students' hidden states against the teacher's (2layer: both 384 wide; small: 256 -> 384, one linear
        # projection per match): the last only, or (--hidden-layers uniform, TinyBERT's mapping) student layer m
        # against teacher layer m * N // M for m = 0 (the embeddings) .. M.
        depth = 2 if a.student == "2layer" else len(SMALL["layers"])
        width_t = teacher.config.hidden_size
        layers_t = teacher.config.num_hidden_layers
        projection = None if a.student == "2layer" else ("linear", SMALL["hidden_size"], width_t)
        pairs = (
            [(depth, layers_t)] if a.hidden_layers == "last" else [(m, m * layers_t // depth) for m in range(depth + 1)]
        )
        for layer_s, layer_t in pairs:
            matches.append(
                IntermediateMatch(
                    layer_t=layer_t,
                    layer_s=layer_s,
                    loss="hidden_mse",
                    weight=a.hidden_weight,
                    projection=projection,
                    weight_scheduler="first_stage" if a.staged else "constant",
                )
            )
    if a.student == "2layer" and a.attention_weight > 0:
        # The student's last attention maps against the teacher's (both 12 heads).
        matches.append(
            IntermediateMatch(
                layer_t=teacher.config.num_hidden_layers - 1,
                layer_s=1,
                feature="attention",
                loss="attention_mse",
                weight=a.attention_weight,
                weight_scheduler="first_stage" if a.staged else "constant",
            )
        )
    # Staged (TinyBERT's two stages): the matches alone until `--staged`, then the predictions (soft and hard).
    second = "second_stage" if a.staged else "constant"
    return DistillationConfig(
        temperature=a.temperature,
        kd_loss_type=a.kd_loss,
        kd_loss_weight=a.kd_weight,
        kd_loss_weight_scheduler=second,
        hard_label_weight=a.hard_label_weight,
        hard_label_weight_scheduler=second,
        scale_by_temperature_squared=True,
        intermediate_matches=matches,
        stage_boundary=a.staged or 0.5,
    )


def _two_layers(text: str) -> tuple[int, int]:
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        layers = ()
    if len(layers) != 2 or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected two teacher block indices such as 0,5, got {text!r}")
    return layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with train.tsv and dev.tsv (SST-2 layout)")
    p.add_argument("--teacher", default=None, help="local folder of the teacher (default: all-MiniLM-L6-v2)")
    p.add_argument("--student", choices=("2layer", "small", "bigru"), required=True)
    p.add_argument(
        "--student-layers",
        type=_two_layers,
        default=TWO_LAYERS,
        help="the two teacher blocks the 2layer student starts from, e.g. 0,1 (default 0,5)",
    )
    p.add_argument("--seeds", type=int, default=3, help="student seeds (--seed, --seed + 1, ...); both runs per seed")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each student run")
    p.add_argument("--teacher-steps", type=int, default=400, help="fine-tuning steps of the teacher")
    p.add_argument("--teacher-ckpt-dir", default=None, help="where the fine-tuned teacher lives (default: per data)")
    p.add_argument("--retrain-teacher", action="store_true", help="fine-tune the teacher again even if one is saved")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="longest tokenised sentence")
    p.add_argument(
        "--lr", type=float, default=None, help="student learning rate (default 1e-4 2layer, 5e-4 small, 2e-3 bigru)"
    )
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument(
        "--student-dropout",
        type=float,
        default=None,
        help="set every dropout probability of the student (both runs) to this; default: as built (BERT: 0.1)",
    )
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="keep the student's word-embedding table fixed in both runs (BERT students: the copied or projected "
        "table; BiGRU: the teacher's); the optimizer skips it",
    )
    p.add_argument(
        "--fused-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the students' AdamW as torch's fused kernel (same update up to rounding, faster) instead of the"
        " multi-tensor one; default on for 2layer, off"
        " for small and bigru (whose figures were measured without it). The teacher's fine-tuning never uses it",
    )
    p.add_argument(
        "--teacher-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the teacher once over every labelled and transfer row and distil from its stored logits and"
        " hidden states (lit_kd.cache.TeacherCache, kept beside the teacher and reused by every seed and later run"
        " on the same data) instead of running it at every step; default on for 2layer, off for small and bigru",
    )
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up, then linear decay to 0")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--hard-label-weight",
        type=float,
        default=None,
        help="weight of the label cross-entropy in the distilled run (default 0 for 2layer and small, 1 for bigru)",
    )
    p.add_argument("--hidden-weight", type=float, default=1.0, help="last-hidden-state MSE weight (BERT students)")
    p.add_argument(
        "--hidden-layers",
        choices=("last", "uniform"),
        default="last",
        help="hidden states matched: the last, or every student layer m (embeddings included) against teacher layer "
        "m * N // M (TinyBERT's uniform mapping), each at --hidden-weight",
    )
    p.add_argument(
        "--attention-weight", type=float, default=0.0, help="last-attention-map MSE weight (2layer student only)"
    )
    p.add_argument(
        "--kd-loss",
        choices=("ce", "kl", "mse"),
        default="ce",
        help="logits loss of the KD term: soft cross-entropy, KL divergence (both at --temperature) or MSE on logits",
    )
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the soft cross-entropy (KD) term")
    p.add_argument(
        "--staged",
        type=float,
        default=0.0,
        help="staged distillation: matches only until this fraction of the steps, then soft + hard labels (0: off)",
    )
    p.add_argument("--transfer-augment", type=int, default=0, help="noisy copies of each training sentence, KD only")
    p.add_argument(
        "--transfer-file", default=None, help="unlabelled sentences for the KD term (one per line, or a TSV)"
    )
    p.add_argument(
        "--transfer-unused-train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the training rows beyond --train-limit, labels dropped, join the transfer set (KD term only; off when"
        " there are none)",
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batches of similar-length sentences (less padding; the same batches with and without KD)",
    )
    p.add_argument(
        "--transfer-per-sample",
        type=int,
        default=None,
        help="transfer rows per labelled row in a KD batch (default 3 for 2layer, 1 for small and bigru)",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=2000,
        help="labelled budget: only the first N rows of train.tsv carry labels, for the teacher and both students"
        " (0: every row)",
    )
    p.add_argument("--carve-dev", type=int, default=0, help="evaluate on the last N rows of train.tsv (held out)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=0, help="also print dev accuracy every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    p.add_argument("--timing-warmup", type=int, default=3, help="steps left out of the step timings")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 for torch's choice (see the docstring)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    if a.train_limit < 0:
        p.error(f"Expected `--train-limit` to be >= 0 but got {a.train_limit}.")
    a.train_limit = a.train_limit or None
    a.transfer_unused_train = a.transfer_unused_train and a.train_limit is not None
    if not 0 <= a.staged < 1:
        p.error(f"Expected --staged to be in [0, 1) but got {a.staged}")
    if a.student_dropout is not None and not 0 <= a.student_dropout < 1:
        p.error(f"Expected `--student-dropout` to be in [0, 1) but got {a.student_dropout}.")
    a.teacher = a.teacher or minilm_path()
    if a.teacher_cache is None and a.attention_weight > 0:
        a.teacher_cache = False  # the cache holds no attention maps: the teacher runs live
    for key, value in STUDENT_DEFAULTS[a.student].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    for name in ("steps", "teacher_steps", "batch_size", "max_length", "log_every", "seeds", "transfer_per_sample"):
        if getattr(a, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 1 but got {getattr(a, name)}.")
    if a.teacher_cache and a.attention_weight > 0:
        p.error("`--teacher-cache` holds no attention maps: pass `--no-teacher-cache` with `--attention-weight`.")
    for name in ("transfer_augment", "carve_dev"):
        if getattr(a, name) < 0:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 0 but got {getattr(a, name)}.")
    return a


def carve(data_dir: str, n: int, into: Path) -> str:
    """A folder whose ``dev.tsv`` is the last ``n`` data rows of ``data_dir/train.tsv`` and ``train.tsv`` the rest."""
    lines = (Path(data_dir) / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    if not 0 < n < len(rows):
        raise ValueError(f"Expected `--carve-dev` to be in [1, {len(rows) - 1}] but got {n}.")
    into.mkdir(parents=True, exist_ok=True)
    (into / "train.tsv").write_text(header + "".join(rows[:-n]), encoding="utf-8")
    (into / "dev.tsv").write_text(header + "".join(rows[-n:]), encoding="utf-8")
    return str(into)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-Trainer banners: one line per event
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = carve(a.data_dir, a.carve_dev, Path(tmp) / "carved") if a.carve_dev else a.data_dir
        options = dict(
            tokenizer=a.teacher,  # fine-tuning keeps the vocabulary: teacher and students read these ids
            max_length=a.max_length,
            batch_size=a.batch_size,
            eval_batch_size=a.eval_batch_size,
            train_limit=a.train_limit,
            transfer_file=a.transfer_file,
            transfer_augment=a.transfer_augment,
            group_by_length=a.group_by_length,
            transfer_per_sample=a.transfer_per_sample,
            transfer_seed=a.seed,
        )
        data = TextClassificationDataModule(data_dir, transfer_unused_train=a.transfer_unused_train, **options)
        a.train_rows = len(data._read("train")[0])
        if a.transfer_unused_train and a.train_rows <= a.train_limit:
            print(
                f"[data] train.tsv has {a.train_rows} rows, none beyond --train-limit {a.train_limit}: every row is"
                " labelled and there is no unlabelled transfer text",
                flush=True,
            )
            a.transfer_unused_train = False
            data = TextClassificationDataModule(data_dir, **options)
        if a.teacher_ckpt_dir is None:
            a.teacher_ckpt_dir = f"runs/bench_kd/teacher-{data_fingerprint(data)[:12]}"
        result = run(a, data)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return emit(result, a.json)


def run(a: argparse.Namespace, data: TextClassificationDataModule) -> dict:
    num_labels = data.num_labels
    transfer = data.has_transfer_set
    teacher, teacher_meta = get_teacher(a, data)
    teacher_acc = dev_accuracy(teacher, data, num_labels)
    print(f"[teacher] dev acc {teacher_acc:.4f}", flush=True)

    cache_path, cache_meta = None, None
    if a.teacher_cache:
        layers = sorted({m.layer_t for m in kd_config(a, teacher).intermediate_matches})
        cache_path, cache_meta = get_teacher_cache(a, data, teacher, layers)

    seeds = [a.seed + i for i in range(a.seeds)]
    accs: dict[str, list[float]] = {"no_kd": [], "kd": []}
    timers: dict[str, list[StepTimer]] = {"no_kd": [], "kd": []}
    same_batches = True
    for seed in seeds:
        L.seed_everything(seed, verbose=False)  # fresh weights of the student (BiGRU, small BERT's blocks)
        init = build_student(
            a.student, teacher, data.vocab_size, data.pad_token_id, num_labels, layers=a.student_layers
        )
        if a.student_dropout is not None:  # every dropout of the student, in both runs
            for m in init.modules():
                if isinstance(m, nn.Dropout):
                    m.p = a.student_dropout
        if a.freeze_embeddings:  # both modules hand the optimizer only the parameters that require grad
            init.get_input_embeddings().requires_grad_(False)
        for name in ("no_kd", "kd"):
            student = copy.deepcopy(init)  # both runs start from the same weights
            optimizer, schedule = optimizer_and_schedule(a.lr, a.steps, a.warmup_fraction, a.fused_optimizer)
            if name == "kd":
                module = DistillationModule(
                    teacher,
                    student,
                    kd_config(a, teacher),
                    optimizer=optimizer,
                    lr_scheduler=schedule,
                    num_labels=num_labels,
                    teacher_cache=None if cache_path is None else str(cache_path),
                )
            else:
                module = ClassifierModule(student, num_labels, optimizer=optimizer, lr_scheduler=schedule)
            timer = fit(f"seed {seed} student {name}", module, data, a.steps, a, seed, transfer and name == "kd")
            acc = dev_accuracy(student, data, num_labels)
            print(f"[seed {seed} student {name}] dev acc {acc:.4f}", flush=True)
            accs[name].append(acc)
            timers[name].append(timer)
        same_batches &= timers["no_kd"][-1].indices.hexdigest() == timers["kd"][-1].indices.hexdigest()

    (plain, plain_std), (kd, kd_std) = mean_std(accs["no_kd"]), mean_std(accs["kd"])
    gains = [k - p for k, p in zip(accs["kd"], accs["no_kd"])]
    gain, gain_std = mean_std(gains)
    step_s = {name: statistics.fmean(t.mean for t in timers[name]) for name in timers}
    return {
        "teacher_acc": round(teacher_acc, 4),
        "student_acc_no_kd": round(plain, 4),
        "student_acc_kd": round(kd, 4),
        "student_acc_no_kd_seeds": [round(x, 4) for x in accs["no_kd"]],
        "student_acc_kd_seeds": [round(x, 4) for x in accs["kd"]],
        "student_acc_no_kd_std": round(plain_std, 4),
        "student_acc_kd_std": round(kd_std, 4),
        "kd_gain": round(gain, 4),
        "kd_gain_se": round(gain_std / len(gains) ** 0.5, 4),
        "retention": round(kd / teacher_acc, 4),
        "retention_no_kd": round(plain / teacher_acc, 4),
        "seeds": seeds,
        "steps": a.steps,
        "kd_step_s": round(step_s["kd"], 4),
        "student_step_s": round(step_s["no_kd"], 4),
        "teacher_steps": teacher_meta["teacher_steps"],
        "teacher_reused": teacher_meta["teacher_reused"],
        "student": a.student,
        "student_params": sum(p.numel() for p in init.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "dataset": Path(a.data_dir).resolve().name
        + (f" (last {a.carve_dev} train rows as dev)" if a.carve_dev else ""),
        "dev_size": len(data.dataset("val")),
        "labelled_rows": len(data.dataset("train")),
        "train_rows": a.train_rows,
        "same_batches": same_batches,
        "settings": {
            "teacher": a.teacher,
            "teacher_ckpt_dir": a.teacher_ckpt_dir,
            "data_fingerprint": teacher_meta.get("data_fingerprint"),
            "teacher_lr": teacher_meta["teacher_lr"],
            "teacher_step_s": teacher_meta["teacher_step_s"],
            "teacher_finetune_seconds": teacher_meta["teacher_finetune_seconds"],
            "kd": {
                "kd_loss_type": a.kd_loss,
                "temperature": a.temperature,
                "scale_by_temperature_squared": True,
                "hard_label_weight": a.hard_label_weight,
                "hidden_weight": a.hidden_weight if a.student != "bigru" else None,
                "hidden_layers": a.hidden_layers if a.student != "bigru" else None,
                "attention_weight": a.attention_weight if a.student == "2layer" else None,
                "student_layers": list(a.student_layers) if a.student == "2layer" else None,
                "student_dropout": a.student_dropout,
                "freeze_embeddings": a.freeze_embeddings,
                "kd_weight": a.kd_weight,
                "staged": a.staged or None,
                "transfer_augment": a.transfer_augment,
                "transfer_file": a.transfer_file,
                "transfer_unused_train": a.transfer_unused_train,
                "transfer_per_sample": a.transfer_per_sample if transfer else None,
                "transfer_rows": len(data.transfer_dataset()) if transfer else 0,
                "teacher_cache": cache_meta,
            },
            "fused_optimizer": a.fused_optimizer,
            **{
                k: getattr(a, k)
                for k in (
                    "lr",
                    "batch_size",
                    "max_length",
                    "group_by_length",
                    "warmup_fraction",
                    "train_limit",
                    "carve_dev",
                    "seed",
                )  # fmt: skip
            },
            "threads": torch.get_num_threads(),
        },
        "machine": machine(),
    }


if __name__ == "__main__":
    main()
