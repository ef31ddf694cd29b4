"""Draw one student's predicted mastery of each concept over time as a heatmap PNG.

    python scripts/plot_mastery.py --ckpt runs/sakt_synthetic/checkpoints/best.ckpt --out mastery.png
    python scripts/plot_mastery.py --ckpt best.ckpt --data-dir ../shared/data/kt/assist2009 --student 3 --top 10

The student comes from ``DIR/test.csv`` (``--data-dir``) or, by default, from the built-in simulated students; the
plot shows the first ``--length`` interactions. Cell (concept, t) is the probability of answering the concept
correctly given interactions 0..t (:func:`lit_kt.mastery`, at the checkpoint's temperature); the concept practised at
each step is marked (white circle: correct, black cross: wrong). The rows are ``--concepts`` or, by default, the
``--top`` most practised concepts in the shown history.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from lit_kt import KTDataModule, KTModule, mastery
from lit_kt.plotting import mastery_heatmap


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a KTModule checkpoint")
    p.add_argument("--data-dir", default=None, help="folder with test.csv; default: simulated students")
    p.add_argument("--student", type=int, default=0, help="index of the student in the test split")
    p.add_argument("--length", type=int, default=50, help="interactions to show")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--concepts", default=None, help="comma-separated concept ids, e.g. 1,2,3")
    which.add_argument("--top", type=int, default=15, help="show the N most practised concepts (default 15)")
    p.add_argument("--out", type=Path, default=Path("mastery.png"))
    a = p.parse_args(argv)
    if a.length < 1:
        p.error(f"--length must be at least 1, got {a.length}")
    if a.top < 1:
        p.error(f"--top must be at least 1, got {a.top}")
    module = KTModule.load_from_checkpoint(a.ckpt, map_location="cpu", weights_only=True)
    test = KTDataModule(data_dir=a.data_dir).sequences("test")
    if not 0 <= a.student < len(test):
        p.error(f"--student must be between 0 and {len(test) - 1} (students in the test split), got {a.student}")
    seq = test[a.student]
    n = min(a.length, len(seq))
    exercises, responses = seq.exercises[:n].tolist(), seq.responses[:n].tolist()
    if a.concepts is not None:
        try:
            concepts = [int(c) for c in a.concepts.split(",") if c.strip()]
        except ValueError:
            p.error(f"--concepts must be comma-separated integer ids, got {a.concepts!r}")
    else:
        top = Counter(exercises).most_common(a.top)  # ties: first practised first
        concepts = sorted(c for c, _ in top)
    try:
        probs = mastery(module, exercises, responses, concepts)  # (n, C)
    except ValueError as err:
        p.error(str(err))
    fig = mastery_heatmap(probs, exercises, responses, concepts)
    ax = fig.axes[0]
    ax.set_title(f"{ax.get_title()}\nstudent {a.student}, {type(module.model).__name__}", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main()
