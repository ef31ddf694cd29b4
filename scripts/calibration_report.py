"""Compare post-hoc calibrations of a knowledge-tracing model from the logits that ``bench_kt.py --save-logits`` wrote.

    python scripts/bench_kt.py --data-dir ../shared/data/kt/assist2009 --model sakt --save-logits out/sakt.pt
    python scripts/calibration_report.py out/sakt.pt [more.pt ...] [--json out/calibration.json]

For each file, the expected calibration error on the test split (15 equal-width bins, L1; lit_kt.calibration) of:

- ``uncalibrated``: ``sigmoid(z)``;
- ``temperature``: ``sigmoid(z / T)``, ``T`` fitted on the validation split (NLL);
- ``shift_temperature``: ``sigmoid((z + b) / T)``, ``b`` fitted on the training split in eval mode so that the mean
  probability equals its rate of correct answers (:func:`lit_kt.calibration.fit_logit_shift`), then ``T`` on the
  validation split's ``z + b`` (what ``TemperatureScaling`` and ``bench_kt.py`` do by default);
- ``platt_val``: ``sigmoid(a * z + c)``, ``a`` and ``c`` fitted together on the validation split (NLL);
- ``oracle_temperature``: the lowest test ECE any temperature reaches (a grid of ``T`` in [0.5, 2], chosen *on the
  test split*: a bound for temperature scaling, not a method);

and the mean probability minus the rate of correct answers (``bias``) on each split at ``T = 1``. Files from runs
without training logits (older ``--save-logits``) get no ``shift_temperature``. All but ``oracle_temperature`` fit
nothing on the test split, and each is an increasing map of ``z``: the AUC is the same for all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_kt.calibration import (
    calibrated_probabilities,
    expected_calibration_error,
    fit_logit_shift,
    fit_temperature,
)


def platt(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(a, c)`` minimising the NLL of ``sigmoid(a * z + c)`` (L-BFGS from ``(1, 0)``; the NLL is convex)."""
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, c], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")
    z, y = logits.double(), labels.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a * z + c, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach()), float(c.detach())


def report(path: Path) -> dict:
    d = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("val_logits", "val_labels", "test_logits", "test_labels"):
        if key not in d:
            raise SystemExit(f"{path}: expected a file of `bench_kt.py --save-logits` (with {key!r}) but it has none.")
    vz, vy, tz, ty = d["val_logits"], d["val_labels"], d["test_logits"], d["test_labels"]

    def ece(p: torch.Tensor) -> float:
        return round(expected_calibration_error(p, ty), 4)

    t = fit_temperature(vz, vy)
    a, c = platt(vz, vy)
    grid = [0.5 + 0.01 * i for i in range(151)]
    oracle_ece, oracle_t = min((expected_calibration_error(torch.sigmoid(tz / g), ty), g) for g in grid)
    out = {
        "file": str(path),
        "val_positions": vz.numel(),
        "test_positions": tz.numel(),
        "ece": {
            "uncalibrated": ece(torch.sigmoid(tz)),
            "temperature": ece(calibrated_probabilities(tz, t)),
            "platt_val": ece(torch.sigmoid(a * tz.double() + c)),
            "oracle_temperature": round(oracle_ece, 4),
        },
        "temperature": round(t, 4),
        "platt_val": [round(a, 4), round(c, 4)],
        "oracle_temperature": round(oracle_t, 2),
        "bias": {},
    }
    splits = ("train", "val", "test") if "train_logits" in d else ("val", "test")
    for split in splits:
        z, y = d[f"{split}_logits"], d[f"{split}_labels"]
        out["bias"][split] = round(float(torch.sigmoid(z).mean() - y.mean()), 4)
    if "train_logits" in d:
        b = fit_logit_shift(d["train_logits"], d["train_labels"])
        tb = fit_temperature(vz + b, vy)
        out["ece"]["shift_temperature"] = ece(calibrated_probabilities(tz, tb, b))
        out["logit_shift"], out["temperature_after_shift"] = round(b, 4), round(tb, 4)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="files written by bench_kt.py --save-logits")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    results = []
    for path in a.files:
        r = report(path)
        results.append(r)
        e = r["ece"]
        print(
            f"{path}: test ECE uncalibrated {e['uncalibrated']:.4f}, temperature {e['temperature']:.4f}"
            f" (T {r['temperature']:.3f}), shift + temperature {e.get('shift_temperature', float('nan')):.4f}"
            f" (b {r.get('logit_shift', float('nan')):+.3f}), Platt on val {e['platt_val']:.4f},"
            f" best temperature on test {e['oracle_temperature']:.4f} (T {r['oracle_temperature']:.2f});"
            f" bias at T = 1: {', '.join(f'{k} {v:+.4f}' for k, v in r['bias'].items())}",
            flush=True,
        )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
