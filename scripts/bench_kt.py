"""Train a knowledge-tracing model on DIR/train.csv, pick the epoch on a validation split, test on DIR/test.csv.

    python scripts/bench_kt.py --data-dir ../shared/data/kt/assist2009 --model sakt --json out/sakt_assist2009.json

Model selection never looks at the test set: a fraction of the training *students* (``--val-fraction``) is held
out, the checkpoint with the best validation AUC is kept (early stopping after ``--patience`` epochs without
improvement), and only that checkpoint is evaluated on ``test.csv``. The defaults are the settings that made the
table in docs/benchmarks.md; they were chosen on validation AUC, never on test AUC.

Prints and writes (``--json``) ``{"model", "dataset", "auc", "acc", "epochs", "train_interactions_per_s",
"seconds"}`` plus the settings and the best validation AUC. ``epochs`` is the number of epochs trained and
``best_epoch`` the one tested; ``train_interactions_per_s`` counts scored (non-padded) interactions per second of
training steps (validation excluded); ``seconds`` is the whole run's wall time. ``--max-minutes`` (AKT's default:
25) bounds the training time on any data set: Lightning's ``max_time`` stops the fit and the best epoch so far is
tested (``stopped_by_time`` in the output); on ASSIST2009 it does not bind. Calibration on the test split
(lit_kt.calibration): ``ece_uncalibrated`` (15 equal-width bins, L1), then ``ece`` and ``brier`` after calibration:
the ``logit_shift`` fitted on the training split (in eval mode; ``--no-shift-on-train``: none) and the
``temperature`` fitted on the validation split, probabilities ``sigmoid((z + logit_shift) / temperature)``;
``ece_temperature_only`` with the temperature alone (``temperature_only``, fitted without a shift).
``brier_uncalibrated`` is before calibration; ``auc``, ``acc`` and ``test_rmse`` are those of the uncalibrated
model (calibration changes no ranking, hence not the AUC).

Loop efficiency: ``model_step_interactions_per_s`` is the throughput of the model step alone (forward, masked BCE,
backward, optimizer step; no Lightning, no data loading, batches already on the device) on ``--step-batches``
training batches after ``--step-warmup`` untimed ones, measured after the fit on a fresh copy of the fitted model
with a fresh optimizer (so the tested checkpoint is unaffected), under the Trainer's own autocast context
(``--precision``; ``16-mixed`` without its gradient scaler); ``loop_efficiency`` = ``train_interactions_per_s`` /
``model_step_interactions_per_s``, the share of the model's own speed that ``Trainer.fit`` keeps (1 = no loop
overhead). On CUDA both are timed with ``torch.cuda.synchronize()`` at the start and end of every step (the fit's
steps too, through the meter), so that each counts the kernels' time, not the time to queue them. The figure the
GPU issue asks for is the one with ``--accelerator gpu``; on CPU (what CI runs) the loop's overhead hides behind
slower steps. ``device`` is the GPU's name (``torch.cuda.get_device_name()``) or the ``machine`` line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit, machine
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lit_kt import AKT, DKT, SAKT, KTDataModule, KTModule, masked_bce_with_logits
from lit_kt.calibration import calibrate, collect_logits

DEFAULTS = {
    # SAKT: at most 100 epochs (early stopping ends it): a cap of 40 ended every ASSIST2009 seed with validation AUC
    # still rising (best epoch 39-40); with 100 the runs stop at 60-77 (docs/benchmarks.md, issue 16 section).
    "sakt": dict(epochs=100, max_len=100, batch_size=64, d_model=128, num_heads=8, num_layers=1, dropout=0.2, lr=1e-3),
    "dkt": dict(epochs=40, max_len=200, batch_size=64, d_model=200, num_heads=0, num_layers=1, dropout=0.3, lr=1e-3),
    # num_layers: knowledge-retriever blocks (each encoder has 1, as in the paper); d_ff is 2 * d_model.
    # AKT: windows of 400, the square-root distance and a cosine learning-rate decay, each chosen on validation AUC
    # (docs/benchmarks.md, issue 14).
    "akt": dict(
        epochs=30,
        max_len=400,
        batch_size=64,
        d_model=64,
        num_heads=4,
        num_layers=2,
        dropout=0.1,
        lr=1e-3,
        sqrt_distance=True,
        cosine=True,
        max_minutes=25.0,
    ),
}


class ThroughputMeter(L.Callback):
    """Counts scored interactions and the wall time of training batches only.

    On CUDA it synchronises before a batch's clock starts and before it stops (the kernels' time, as the model-step
    measurement counts it); the count of interactions is read after the clock stops.
    """

    def __init__(self) -> None:
        self.interactions = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self._start
        self.interactions += int(batch["mask"].sum())


def synchronize(device: torch.device) -> None:
    """Waits for the queued kernels on CUDA; on CPU every op has finished when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_step_throughput(
    module: KTModule, trainer: L.Trainer, data: KTDataModule, batches: int = 30, warmup: int = 5
) -> float:
    """Scored interactions per second of the model step alone, outside Lightning (see the docstring).

    Args:
        module: The fitted module; its model is copied, so it and its checkpoint are unaffected.
        trainer: The trainer that fitted it: its device and its autocast context (``--precision``).
        data: The set-up data module; its training loader gives the batches (cycled if there are too few).
        batches: Timed steps.
        warmup: Untimed steps before them.

    Returns:
        Scored interactions of the timed batches over their summed step time.
    """
    device = trainer.strategy.root_device
    model = copy.deepcopy(module.model).to(device).train()
    optimizer = module.optimizer(model.parameters())
    loader = itertools.cycle(data.train_dataloader())
    # On the device before any timed step: the step time excludes loading and copying, which the loop pays.
    steps = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(warmup + batches)]
    flush = device.type == "cpu" and module.hparams.flush_denormal  # as KTModule does while fitting on CPU
    torch.set_flush_denormal(flush)
    interactions, seconds = 0, 0.0
    for i, b in enumerate(steps):
        synchronize(device)
        start = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            loss = masked_bce_with_logits(model(b["exercises"], b["responses"]), b["responses"], b["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)
        if i >= warmup:
            seconds += time.perf_counter() - start
            interactions += int(b["mask"].sum())
    torch.set_flush_denormal(False)
    return interactions / max(seconds, 1e-9)


class EpochPrinter(L.Callback):
    """One line per epoch (the progress bar is off so that logs stay readable)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        print(
            f"epoch {trainer.current_epoch + 1}: val/auc {m.get('val/auc', float('nan')):.4f}"
            f" val/loss {m.get('val/loss', float('nan')):.4f}",
            flush=True,
        )


def build_model(name: str, num_exercises: int, a: argparse.Namespace) -> torch.nn.Module:
    if name == "sakt":
        return SAKT(num_exercises, a.d_model, a.num_heads, a.num_layers, a.max_len, a.dropout, a.attention_dropout)
    if name == "akt":  # concept ids only: the three-line files have no question ids, so no Rasch difficulties
        return AKT(
            num_exercises,
            d_model=a.d_model,
            num_heads=a.num_heads,
            d_ff=2 * a.d_model,
            num_retriever_layers=a.num_layers,
            dropout=a.dropout,
            sqrt_distance=a.sqrt_distance,
        )
    return DKT(
        num_exercises, hidden_size=a.d_model, num_layers=a.num_layers, embedding_dim=a.d_model, dropout=a.dropout
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with train.csv and test.csv (three-line format)")
    p.add_argument("--model", choices=sorted(DEFAULTS), default="sakt")
    p.add_argument("--epochs", type=int, help="most epochs to train (early stopping may end sooner)")
    p.add_argument("--max-len", type=int, help="window length")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--d-model", type=int, help="SAKT width / DKT hidden and embedding width")
    p.add_argument("--num-heads", type=int, help="SAKT heads")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--attention-dropout", type=float, default=None, help="SAKT attention dropout (default: --dropout)")
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--sqrt-distance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="AKT: decay with the square root of the distance (the authors' code) instead of the distance",
    )
    p.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cosine learning-rate decay to 0 over --epochs (AKT's default; not SAKT's or DKT's)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="training time budget: stop within this many minutes and test the best epoch so far "
        "(AKT default 25; none for SAKT and DKT)",
    )
    p.add_argument(
        "--shift-on-train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibration: fit the logit shift on the training split before the temperature (lit_kt.calibration)",
    )
    p.add_argument("--patience", type=int, default=5, help="epochs without validation improvement before stopping")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training students held out for model selection")
    p.add_argument("--eval-stride", type=int, default=None, help="stride of test windows (default: no overlap)")
    p.add_argument("--group-by-length", action="store_true", help="batch training windows of similar lengths")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument(
        "--step-batches", type=int, default=30, help="timed batches of the model-step measurement (loop_efficiency)"
    )
    p.add_argument("--step-warmup", type=int, default=5, help="untimed batches before them")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument(
        "--save-logits",
        type=Path,
        default=None,
        help="also write the tested checkpoint's raw validation and test logits and responses (scored positions) to "
        "this .pt file (keys val_logits, val_labels, test_logits, test_labels, train_logits and train_labels in eval "
        "mode, temperature, logit_shift), for calibration studies",
    )
    a = p.parse_args(argv)
    for key, value in DEFAULTS[a.model].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.cosine = bool(a.cosine)  # SAKT and DKT: no schedule unless asked
    if a.max_minutes is not None and not a.max_minutes > 0:
        p.error(f"Expected `--max-minutes` to be a positive number of minutes but got {a.max_minutes}.")
    if a.step_batches < 1 or a.step_warmup < 0:
        p.error(
            f"Expected `--step-batches` >= 1 and `--step-warmup` >= 0 but got {a.step_batches} and {a.step_warmup}."
        )
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    L.seed_everything(a.seed, verbose=False)
    data = KTDataModule(
        data_dir=a.data_dir,
        max_len=a.max_len,
        eval_stride=a.eval_stride,
        batch_size=a.batch_size,
        val_fraction=a.val_fraction,
        seed=a.seed,
        group_by_length=a.group_by_length,
    )
    # --cosine: the learning rate follows a half cosine from --lr to 0 over --epochs (stepped once per epoch).
    schedule = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=a.epochs) if a.cosine else None
    module = KTModule(
        build_model(a.model, data.num_exercises, a),
        optimizer=partial(torch.optim.Adam, lr=a.lr),
        lr_scheduler=schedule,
    )
    meter = ThroughputMeter()
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=tmp, monitor="val/auc", mode="max")
        trainer = L.Trainer(
            accelerator=a.accelerator,
            devices=1,
            precision=a.precision,
            max_epochs=a.epochs,
            max_time=timedelta(minutes=a.max_minutes) if a.max_minutes else None,
            logger=False,
            default_root_dir=tmp,
            callbacks=[best, EarlyStopping(monitor="val/auc", mode="max", patience=a.patience), meter, EpochPrinter()],
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        fit_start = time.perf_counter()
        trainer.fit(module, data)
        fit_seconds = time.perf_counter() - fit_start
        step_throughput = model_step_throughput(module, trainer, data, a.step_batches, a.step_warmup)
        device = trainer.strategy.root_device
        val_auc = float(best.best_model_score)
        best_epoch = int(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["epoch"])
        test = trainer.test(module, data, ckpt_path=best.best_model_path, verbose=False, weights_only=True)[0]
        # The module now holds the tested weights: fit T on the validation split, then test again with it; then
        # the shift on the training split and T on the shifted validation logits (--shift-on-train), tested again.
        temperature_only = calibrate(module, data.val_dataloader())
        calibrated = only = trainer.test(module, data, verbose=False)[0]
        temperature = temperature_only
        if a.shift_on_train:
            temperature = calibrate(module, data.val_dataloader(), data.train_dataloader())
            calibrated = trainer.test(module, data, verbose=False)[0]
        shift = float(module.logit_shift)
        if a.save_logits is not None:
            val_z, val_y = collect_logits(module, data.val_dataloader())
            test_z, test_y = collect_logits(module, data.test_dataloader())
            train_z, train_y = collect_logits(module, data.train_dataloader())  # eval mode: no dropout
            a.save_logits.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                dict(
                    val_logits=val_z,
                    val_labels=val_y,
                    test_logits=test_z,
                    test_labels=test_y,
                    train_logits=train_z,
                    train_labels=train_y,
                    temperature=temperature,
                    logit_shift=shift,
                ),
                a.save_logits,
            )
    train_throughput = meter.interactions / max(meter.seconds, 1e-9)
    result = {
        "model": a.model,
        "dataset": Path(a.data_dir).resolve().name,
        "auc": round(test["test/auc"], 4),
        "acc": round(test["test/acc"], 4),
        "epochs": trainer.current_epoch,
        # The budget ended the fit (rather than max epochs or early stopping): the best epoch so far was tested.
        "stopped_by_time": bool(a.max_minutes) and fit_seconds >= 60 * a.max_minutes,
        "train_interactions_per_s": round(train_throughput),
        "model_step_interactions_per_s": round(step_throughput),
        "loop_efficiency": round(train_throughput / step_throughput, 3),
        "seconds": round(time.perf_counter() - start, 1),
        "best_epoch": best_epoch + 1,
        "val_auc": round(val_auc, 4),
        "test_rmse": round(test["test/rmse"], 4),
        "ece": round(calibrated["test/ece"], 4),
        "ece_temperature_only": round(only["test/ece"], 4),
        "ece_uncalibrated": round(test["test/ece"], 4),
        "brier": round(calibrated["test/brier"], 4),
        "brier_uncalibrated": round(test["test/brier"], 4),
        "temperature": round(temperature, 4),
        "logit_shift": round(shift, 4),
        "temperature_only": round(temperature_only, 4),
        "settings": {
            k: getattr(a, k)
            for k in (
                *DEFAULTS[a.model],
                "max_minutes",
                "cosine",
                "patience",
                "val_fraction",
                "shift_on_train",
                "eval_stride",
                "group_by_length",
                "seed",
                "precision",
                "step_batches",
                "step_warmup",
            )
        },
        "machine": machine(a.accelerator),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(a.accelerator),
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
