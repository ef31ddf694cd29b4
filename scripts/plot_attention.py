"""Draw a SAKT model's attention over one student's history as a heatmap PNG.

    python scripts/plot_attention.py --ckpt runs/sakt_synthetic/checkpoints/*.ckpt --out attention.png
    python scripts/plot_attention.py --ckpt best.ckpt --data-dir ../shared/data/kt/assist2009 --student 3 --length 40

The student comes from ``DIR/test.csv`` (``--data-dir``) or, by default, from the built-in simulated students;
the plot shows the first ``--length`` interactions (at most the model's ``max_len``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_kt import SAKT, KTDataModule, KTModule
from lit_kt.plotting import plot_attention


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a KTModule checkpoint of a SAKT model")
    p.add_argument("--data-dir", default=None, help="folder with test.csv; default: simulated students")
    p.add_argument("--student", type=int, default=0, help="index of the student in the test split")
    p.add_argument("--length", type=int, default=30, help="interactions to show")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, default=None, help="one head (default: mean over heads)")
    p.add_argument("--out", type=Path, default=Path("attention.png"))
    a = p.parse_args(argv)
    model = KTModule.load_from_checkpoint(a.ckpt, map_location="cpu", weights_only=True).model
    if not isinstance(model, SAKT):
        p.error(f"--ckpt holds a {type(model).__name__} model; attention plots need SAKT")
    test = KTDataModule(data_dir=a.data_dir).sequences("test")
    if not 0 <= a.student < len(test):
        p.error(f"--student must be between 0 and {len(test) - 1} (students in the test split), got {a.student}")
    seq = test[a.student]
    n = min(a.length, len(seq), model.max_len)
    out = plot_attention(model, seq.exercises[:n].tolist(), seq.responses[:n].tolist(), a.out, a.layer, a.head)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
