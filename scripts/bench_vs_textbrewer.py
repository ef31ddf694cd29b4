"""Distillation step time of ``lit_kd.DistillationModule`` against TextBrewer's ``GeneralDistiller``, in one process.

    python scripts/bench_vs_textbrewer.py --json /tmp/peers/textbrewer.json

Needs ``pip install --no-deps textbrewer`` plus ``pip install tensorboardX`` (TextBrewer imports a
``SummaryWriter`` from tensorboardX, or else from ``torch.utils.tensorboard``, which needs the much larger
``tensorboard``); without ``--no-deps`` pip also pulls ``tensorboard``.

Setting, identical for both libraries: teacher all-MiniLM-L6-v2 with a classification head
(:func:`~lit_kd.students.load_teacher`, ``num_labels=2``; its head is freshly initialised, which does not change
the cost), student a 2-layer copy of it (:func:`~lit_kd.students.build_bert_student` with teacher blocks ``[0, 5]``,
width 384), both with eager attention (attention maps are needed). Loss: soft cross-entropy on the logits at
temperature ``--temperature`` (not scaled by ``T**2``, TextBrewer's definition), plus hidden-state MSE between
teacher hidden state 6 and student hidden state 2, plus attention MSE between teacher attention 5 and student
attention 1 (all weights 1, no hard-label term). Batches: ``--batch-size`` SST-2 sentences from
``--data-dir/train.tsv`` (shuffled with ``--seed``) tokenised with the MiniLM tokenizer and padded to
``--max-length``. Optimizer: ``AdamW(lr=--lr)`` for every trained student; no gradient clipping on either side.

Timed in one process, one step of each in turn on the same batch (so that load from other jobs hits all alike),
the first ``--warmup`` rounds left out:

* ``ours_live``: ``DistillationModule.training_step(batch, i)``, ``loss.backward()``, ``AdamW.step()`` (stepped
  by hand, without a Trainer: ``self.log`` returns at once, so Lightning's logging cost is not included);
* ``textbrewer_live``: ``GeneralDistiller.train_on_batch`` + ``write_loss`` + ``backward`` + ``step`` +
  ``zero_grad``, i.e. the body of its ``train_with_num_steps`` loop (models called with ``output_hidden_states``
  and ``output_attentions``);
* ``student_step``: the plain student (eager attention), forward with labels (cross-entropy), backward, AdamW step;
* ``teacher_forward``: the teacher (eager attention), forward under ``torch.no_grad``;
* ``ours_cached``: ``DistillationModule(teacher_cache=...)`` reading the teacher's logits from a
  :class:`~lit_kd.cache.TeacherCache` built beforehand for these batches. This cache holds logits only (attention
  maps cannot be cached), so this is KD on the logits *without* the intermediate matches: compare it with the plain
  student step, not with the live runs. Its student uses SDPA attention (no attention maps are needed) and is
  compared with ``student_step_sdpa``, the plain student with SDPA; ``teacher_forward_sdpa`` is timed too, for
  reference.

Prints and writes (``--json``) mean and median seconds per step of each, and the ratios (means):
``live_vs_textbrewer`` = ours_live / textbrewer_live; ``live_vs_floor`` = ours_live / (teacher_forward +
student_step); ``cached_vs_student`` = ours_cached / student_step_sdpa; ``cached_vs_textbrewer`` = ours_cached /
textbrewer_live (different work: logits only vs logits + matches + live teacher). ``loss_check`` holds both
libraries' total loss on the first batch with the student in eval mode (the same definition, so they should agree).

Options: ``--teacher-dtype bfloat16`` runs our live module with ``teacher_dtype="bfloat16"`` (its teacher in
bfloat16, outputs cast back to float32 for the losses; fast on CPUs with AVX512-BF16 or AMX); TextBrewer, the floor
and the cached run keep the float32 teacher. ``--fused-adamw`` gives every optimizer (ours, TextBrewer's, the plain
students') ``fused=True``; the 2-layer student's AdamW step updates the whole 30522 x 384 word-embedding table.

Device and precision (every run alike): ``--device cuda`` moves the models, projections and every batch (before the
timed rounds) to the GPU (TextBrewer's ``TrainingConfig(device=...)`` too) and synchronises
(``torch.cuda.synchronize()``) before each timed step starts and after it ends, so that a step's time is the time its
kernels take, not the time it takes to queue them; ``--device cuda`` without a GPU is an error naming the argument.
``--precision bf16`` runs each step's forward and loss under ``torch.autocast(device, dtype=torch.bfloat16)``
(parameters and optimizer states stay float32; ``--teacher-dtype`` is separate). The JSON records ``device``
(``torch.cuda.get_device_name()`` on CUDA, else the ``machine`` line), ``device_type`` and ``precision``.

``--threads`` defaults to 1: see ``scripts/bench_kd.py`` (on a small CPU shared with other jobs, extra intra-op
threads mostly measure the contention).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _bench import autocast, device_name, dist_version, emit, machine, resolve_device, synchronizer
from transformers import AutoTokenizer

from lit_kd import DistillationConfig, DistillationModule, IntermediateMatch
from lit_kd.cache import TeacherCache
from lit_kd.data import read_labelled_text
from lit_kd.students import build_bert_student, load_teacher, minilm_path

INSTALL_HINT = "pip install --no-deps textbrewer && pip install tensorboardX"
ARGS_T = {"output_hidden_states": True, "output_attentions": True}  # what TextBrewer passes to both models


# The shared data sets beside the repository (../shared/data), wherever it is checked out.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def import_textbrewer():
    """TextBrewer's package, or a clear message saying what to install."""
    try:
        import textbrewer
    except ImportError as err:
        raise SystemExit(f"Could not import TextBrewer ({err}). Install it with: {INSTALL_HINT}") from err
    return textbrewer


def make_batches(a: argparse.Namespace, tokenizer) -> list[dict[str, torch.Tensor]]:
    """``--warmup + --steps`` batches of shuffled SST-2 training sentences, padded to ``--max-length``."""
    texts, labels = read_labelled_text(Path(a.data_dir) / "train.tsv")
    rows = np.random.default_rng(a.seed).permutation(len(texts))[: (a.warmup + a.steps) * a.batch_size]
    enc = tokenizer(
        [texts[i] for i in rows], padding="max_length", truncation=True, max_length=a.max_length, return_tensors="pt"
    )
    batches = []
    for start in range(0, len(rows), a.batch_size):
        part = slice(start, start + a.batch_size)
        batch = {key: value[part] for key, value in enc.items()}
        batch["labels"] = torch.tensor([labels[i] for i in rows[part]], dtype=torch.long)
        batch["index"] = torch.arange(start, start + len(batch["labels"]))  # key of the teacher cache
        batches.append(batch)
    return batches


def our_config(a: argparse.Namespace, matches: bool) -> DistillationConfig:
    return DistillationConfig(
        temperature=a.temperature,
        kd_loss_type="ce",
        hard_label_weight=0.0,
        scale_by_temperature_squared=False,
        intermediate_matches=[
            IntermediateMatch(layer_t=6, layer_s=2, feature="hidden", loss="hidden_mse", weight=1.0),
            IntermediateMatch(layer_t=5, layer_s=1, feature="attention", loss="attention_mse", weight=1.0),
        ]
        if matches
        else [],
    )


def textbrewer_distiller(textbrewer, a: argparse.Namespace, teacher, student, output_dir: str):
    def adaptor(batch, outputs):
        return {
            "logits": outputs.logits,
            "hidden": outputs.hidden_states,
            "attention": outputs.attentions,
            "inputs_mask": batch["attention_mask"],
        }

    train_config = textbrewer.TrainingConfig(device=a.device, output_dir=output_dir, log_dir=None)
    distill_config = textbrewer.DistillationConfig(
        temperature=a.temperature,
        kd_loss_type="ce",
        kd_loss_weight=1.0,
        hard_label_weight=0.0,
        intermediate_matches=[
            {"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1.0},
            {"layer_T": 5, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1.0},
        ],
    )
    return textbrewer.GeneralDistiller(train_config, distill_config, teacher, student, adaptor, adaptor)


def with_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    return model


def alternate(
    steps: dict[str, Callable[[int], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Round ``i`` runs every step function on batch ``i`` in turn; seconds of the rounds after ``warmup``.

    ``sync`` runs before each step starts and after it ends (``torch.cuda.synchronize`` on a GPU, whose ops return
    before they have run), so that one step's queued kernels are not counted in the next one's time.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step(i)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def bench(a: argparse.Namespace, batches: list[dict], tmp: str) -> dict:
    textbrewer = import_textbrewer()
    torch.manual_seed(a.seed)  # the classification head
    teacher = load_teacher(a.teacher, num_labels=2, attn_implementation="eager").eval().to(a.device)
    init = build_bert_student(teacher, [0, 5]).train().to(a.device)
    teacher_sdpa = with_sdpa(teacher)
    optimizer = partial(torch.optim.AdamW, lr=a.lr, fused=a.fused_adamw or None)
    inputs = [{k: v for k, v in b.items() if k != "index"} for b in batches]  # what TextBrewer passes to the models
    features = [{k: v for k, v in b.items() if k not in ("index", "labels")} for b in inputs]

    ours = DistillationModule(
        copy.deepcopy(teacher) if a.teacher_dtype != "float32" else teacher,  # the module casts its teacher in place
        copy.deepcopy(init),
        our_config(a, matches=True),
        optimizer=optimizer,
        teacher_dtype=a.teacher_dtype,
    )
    ours.to(a.device)  # its projections (none here) and anything else it built
    ours_opt = ours.configure_optimizers()
    TeacherCache.build(teacher_sdpa, batches, Path(tmp) / "cache", progress=False)
    cached = DistillationModule(
        teacher,
        with_sdpa(init),
        our_config(a, matches=False),
        optimizer=optimizer,
        teacher_cache=str(Path(tmp) / "cache"),
    )
    cached.to(a.device)
    cached_opt = cached.configure_optimizers()
    tb_student = copy.deepcopy(init)
    distiller = textbrewer_distiller(textbrewer, a, teacher, tb_student, str(Path(tmp) / "textbrewer"))
    tb_opt = optimizer(tb_student.parameters())
    plain, plain_sdpa = copy.deepcopy(init), with_sdpa(init)
    plain_opt, plain_sdpa_opt = optimizer(plain.parameters()), optimizer(plain_sdpa.parameters())

    ours.student.eval(), tb_student.eval()
    with torch.no_grad():
        loss_check = {
            "ours": round(float(ours.training_step(batches[0], 0)), 6),
            "textbrewer": round(float(distiller.train_on_batch(inputs[0], ARGS_T)[0]), 6),
        }
    ours.train(), cached.train(), tb_student.train(), plain.train(), plain_sdpa.train()

    def module_step(module, opt, i: int) -> None:
        with autocast(a.device, a.precision):
            loss = module.training_step(batches[i], i)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def textbrewer_step(i: int) -> None:
        with autocast(a.device, a.precision):
            total_loss, losses = distiller.train_on_batch(inputs[i], ARGS_T)
        distiller.write_loss(total_loss, i, losses)
        total_loss.backward()
        tb_opt.step()
        tb_opt.zero_grad()

    def student_step(model, opt, i: int) -> None:
        with autocast(a.device, a.precision):
            loss = model(**inputs[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def teacher_forward(model, i: int) -> None:
        with torch.no_grad(), autocast(a.device, a.precision):
            model(**features[i])

    steps = {
        "ours_live": partial(module_step, ours, ours_opt),
        "textbrewer_live": textbrewer_step,
        "student_step": partial(student_step, plain, plain_opt),
        "teacher_forward": partial(teacher_forward, teacher),
        "ours_cached": partial(module_step, cached, cached_opt),
        "student_step_sdpa": partial(student_step, plain_sdpa, plain_sdpa_opt),
        "teacher_forward_sdpa": partial(teacher_forward, teacher_sdpa),
    }
    times = alternate(steps, a.steps, a.warmup, synchronizer(a.device))
    return {"times": times, "loss_check": loss_check}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(SHARED_DATA / "nlp/sst2"), help="folder with train.tsv (SST-2 layout)")
    p.add_argument("--teacher", default=None, help="local folder of the teacher (default: all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="every batch is padded to this length")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--teacher-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="our live module's teacher_dtype (TextBrewer has no such option; the floor keeps a float32 teacher)",
    )
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for every optimizer, both sides")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each kind per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every run goes (see the docstring)")
    p.add_argument(
        "--precision",
        choices=("32", "bf16"),
        default="32",
        help="32: float32; bf16: torch.autocast to bfloat16 around every step's forward and loss",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 for torch's choice (see the docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    a.teacher = a.teacher or minilm_path()
    for name in ("batch_size", "max_length", "steps"):
        if getattr(a, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 1 but got {getattr(a, name)}.")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import_textbrewer()  # fail early, with the install command
    a.device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    # DistillationModule.training_step logs through self.log, which warns (and returns) without a Trainer.
    warnings.filterwarnings("ignore", message=".*self.log.*")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.teacher, trust_remote_code=False)
    # On the device before any timed step: the steps time the models, not the copies.
    batches = [{k: v.to(a.device) for k, v in b.items()} for b in make_batches(a, tokenizer)]
    with tempfile.TemporaryDirectory() as tmp:
        out = bench(a, batches, tmp)
    mean = {name: statistics.fmean(t) for name, t in out["times"].items()}
    result = {
        "live_vs_textbrewer": round(mean["ours_live"] / mean["textbrewer_live"], 3),
        "live_vs_floor": round(mean["ours_live"] / (mean["teacher_forward"] + mean["student_step"]), 3),
        "cached_vs_student": round(mean["ours_cached"] / mean["student_step_sdpa"], 3),
        "cached_vs_textbrewer": round(mean["ours_cached"] / mean["textbrewer_live"], 3),
        "live_vs_floor_sdpa": round(mean["ours_live"] / (mean["teacher_forward_sdpa"] + mean["student_step_sdpa"]), 3),
        "s_per_step": {name: round(value, 5) for name, value in mean.items()},
        "s_per_step_median": {name: round(statistics.median(t), 5) for name, t in out["times"].items()},
        "loss_check": out["loss_check"],
        "settings": {
            **{k: getattr(a, k) for k in ("batch_size", "max_length", "temperature", "lr", "steps", "warmup", "seed")},
            "teacher": a.teacher,
            "student_layers": [0, 5],
            "matches": ["hidden 6->2 hidden_mse", "attention 5->1 attention_mse"],
            "threads": torch.get_num_threads(),
            "ours_teacher_dtype": a.teacher_dtype,
            "fused_adamw": a.fused_adamw,
        },
        "textbrewer_version": dist_version("textbrewer"),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(a.device.type),
        "device": device_name(a.device),
        "device_type": a.device.type,
        "precision": a.precision,
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
