"""Draw a KT model's reliability diagram on the test split, before and after temperature scaling, as a PNG.

    python scripts/plot_reliability.py --ckpt runs/sakt_synthetic/checkpoints/best.ckpt --out reliability.png
    python scripts/plot_reliability.py --ckpt best.ckpt --data-dir ../shared/data/kt/assist2009 --max-len 100

The students come from ``DIR/train.csv`` and ``DIR/test.csv`` (``--data-dir``) or, by default, from the built-in
simulated students. The calibration is fitted again (the checkpoint's own is ignored): the logit shift on the
training split (``--no-shift-on-train``: none) and the temperature on the validation split (``--val-fraction`` of the
training students), as in ``lit_kt.calibration``; both curves are drawn on the test split, with their expected
calibration errors (15 equal-width bins by default) in the title.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lit_kt import KTDataModule, KTModule
from lit_kt.calibration import calibrated_probabilities, collect_logits, fit_logit_shift, fit_temperature
from lit_kt.plotting import reliability_diagram


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a KTModule checkpoint")
    p.add_argument("--data-dir", default=None, help="folder with train.csv and test.csv; default: simulated students")
    p.add_argument("--max-len", type=int, default=None, help="window length (default: the model's max_len, or 200)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training students held out to fit T on")
    p.add_argument(
        "--shift-on-train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the logit shift on the training split before the temperature",
    )
    p.add_argument("--n-bins", type=int, default=15, help="equal-width probability bins")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("reliability.png"))
    a = p.parse_args(argv)
    module = KTModule.load_from_checkpoint(a.ckpt, map_location="cpu", weights_only=True)
    max_len = a.max_len or getattr(module.model, "max_len", None) or 200
    data = KTDataModule(data_dir=a.data_dir, max_len=max_len, batch_size=a.batch_size, val_fraction=a.val_fraction)
    if data.num_exercises > module.model.num_exercises:
        n = module.model.num_exercises
        p.error(f"the data holds exercise ids up to {data.num_exercises} but the model embeds 1..{n}")
    data.setup("test")
    val_logits, val_labels = collect_logits(module, data.val_dataloader())
    if not val_logits.numel():
        p.error("the validation split is empty: raise --val-fraction")
    shift = fit_logit_shift(*collect_logits(module, data.train_dataloader())) if a.shift_on_train else 0.0
    temperature = fit_temperature(val_logits + shift, val_labels)
    logits, labels = collect_logits(module, data.test_dataloader())
    fig = reliability_diagram(
        torch.sigmoid(logits), labels, a.n_bins, calibrated_probs=calibrated_probabilities(logits, temperature, shift)
    )
    fig.axes[0].set_title(f"{fig.axes[0].get_title()} (T = {temperature:.3f}, shift {shift:+.3f})", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out} (T = {temperature:.4f}, logit shift {shift:+.4f})")
    return a.out


if __name__ == "__main__":
    main()
