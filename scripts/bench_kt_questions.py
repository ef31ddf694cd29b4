"""AKT with Rasch embeddings against its oracle on question-level simulated students.

    python scripts/bench_kt_questions.py --threads 1 --json out/kt_questions.json

Simulated students with a question level (:func:`lit_kt.generate_students` with ``num_questions``: every question
has a Rasch difficulty around its exercise's) are split in half: the first half is the test set, the rest the
training students, of which ``--val-fraction`` is held out for validation. Two AKTs of the same size are trained
with :class:`~lit_kt.AKTModule` and Lightning, the best epoch kept on validation AUC (early stopping after
``--patience`` epochs without improvement): one with Rasch embeddings (``num_questions`` from the data module) and
one on the concepts (exercise ids) only. Each is tested once, with its best checkpoint.

Prints and writes (``--json``) ``{"oracle_auc", "question_blind_oracle_auc", "true_probability_auc",
"akt_rasch_auc", "akt_concept_auc", "gap_to_oracle", ...}``: ``oracle_auc`` is the Bayes-optimal ceiling (the
simulator with the questions' difficulties known, the abilities inferred from the history), ``gap_to_oracle`` is
``oracle_auc - akt_rasch_auc`` (the issue's target: below 0.01), and ``question_blind_oracle_auc`` the same oracle
given only the exercises' difficulties, a reference for the concept-only model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from _bench import emit, machine
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lit_kt import AKT, AKTModule, KTDataModule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=4000, help="Simulated students in all (half for test).")
    parser.add_argument("--exercises", type=int, default=10, help="Exercises (the concept ids the models see).")
    parser.add_argument("--concepts", type=int, default=10, help="Latent concepts of the simulator.")
    parser.add_argument("--questions", type=int, default=200, help="Questions inside the exercises.")
    parser.add_argument("--seq-len", type=int, default=50, help="Interactions per student.")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Training students held out for validation.")
    parser.add_argument("--epochs", type=int, default=30, help="Most epochs per model.")
    parser.add_argument("--patience", type=int, default=4, help="Epochs without a better validation AUC to stop.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--l2", type=float, default=1e-5, help="AKTModule's L2 weight on the Rasch difficulties.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    return parser.parse_args(argv)


def train_and_test(dm: KTDataModule, args: argparse.Namespace, rasch: bool, root: Path) -> dict:
    """Fits one AKT (with or without Rasch embeddings), keeps the best validation epoch, tests it."""
    L.seed_everything(args.seed, verbose=False)
    model = AKT(
        num_exercises=dm.num_exercises,
        num_questions=dm.num_questions if rasch else 0,
        d_model=args.d_model,
        num_heads=args.num_heads,
        d_ff=2 * args.d_model,
        dropout=args.dropout,
    )
    module = AKTModule(model, optimizer=partial(torch.optim.Adam, lr=args.lr), l2=args.l2)
    checkpoint = ModelCheckpoint(dirpath=root / ("rasch" if rasch else "concept"), monitor="val/auc", mode="max")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, EarlyStopping(monitor="val/auc", mode="max", patience=args.patience)],
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    test = trainer.test(module, datamodule=dm, ckpt_path="best", weights_only=True, verbose=False)[0]
    return {
        "auc": test["test/auc"],
        "best_val_auc": float(checkpoint.best_model_score),
        "epochs": trainer.current_epoch,
        "fit_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dm = KTDataModule(
        synthetic_students=args.students,
        synthetic_exercises=args.exercises,
        synthetic_concepts=args.concepts,
        synthetic_questions=args.questions,
        synthetic_seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        max_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    oracle, blind_auc = dm.oracle_auc(), dm.oracle_auc(use_questions=False)
    with tempfile.TemporaryDirectory() as tmp:
        rasch = train_and_test(dm, args, rasch=True, root=Path(tmp))
        concept = train_and_test(dm, args, rasch=False, root=Path(tmp))
    result = {
        "oracle_auc": round(oracle, 4),
        "question_blind_oracle_auc": round(blind_auc, 4),
        "true_probability_auc": round(dm.true_probability_auc(), 4),
        "akt_rasch_auc": round(rasch["auc"], 4),
        "akt_concept_auc": round(concept["auc"], 4),
        "gap_to_oracle": round(oracle - rasch["auc"], 4),
        "target_met": oracle - rasch["auc"] < 0.01,
        "akt_rasch": rasch,
        "akt_concept": concept,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_questions": dm.num_questions,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
