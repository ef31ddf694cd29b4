"""Float32 linear-layer throughput on CPU: PyTorch's ``F.linear`` (MKL) against :func:`lit_kt.models.linear.fast_linear`
(oneDNN), forward, input gradient and weight gradient, at SAKT's position-wise shapes.

    python scripts/bench_kt_linear.py --threads 1 --json out/kt_linear.json

Each product is timed on its own (``--repeats`` calls after ``--warmup``, best of ``--rounds`` means), both sides
on the same tensors, alternating; GFLOP/s counts ``2 N K M`` per product. The largest difference between the two
sides' results, relative to the largest value, is printed too (float32 rounding, about 1e-6).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import emit, machine

from lit_kt.models import linear as linear_module


def timed(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def products(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> dict[str, tuple]:
    """Per product: (PyTorch's call, oneDNN's call)."""
    mm = linear_module._mm
    return {
        "forward": (lambda: F.linear(x, weight), lambda: mm(x, weight)),
        "grad_input": (lambda: grad @ weight, lambda: mm(grad, weight.t())),
        "grad_weight": (lambda: grad.t() @ x, lambda: linear_module._grad_weight(grad, x)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4400, help="N: rows (SAKT: real positions of a batch of 64 windows)")
    p.add_argument("--shapes", default="256x256,256x512", help="comma-separated KxM (in x out) features")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not linear_module._AVAILABLE:
        raise SystemExit("This PyTorch has no oneDNN linear op (torch.ops.mkldnn._linear_pointwise): nothing to time.")
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    results = {}
    for shape in a.shapes.split(","):
        K, M = (int(v) for v in shape.split("x"))
        x = torch.randn(a.rows, K, generator=g)
        weight = torch.randn(M, K, generator=g)
        grad = torch.randn(a.rows, M, generator=g)
        flops = 2 * a.rows * K * M
        for name, (ref, ours) in products(x, weight, grad).items():
            times = {"torch": [], "onednn": []}
            for _ in range(a.rounds):
                times["torch"].append(timed(ref, a.repeats, a.warmup))
                times["onednn"].append(timed(ours, a.repeats, a.warmup))
            expected, got = ref(), ours()
            error = float((got - expected).abs().max() / expected.abs().max())
            best = {side: min(t) for side, t in times.items()}
            row = {
                "torch_gflops": round(flops / best["torch"] / 1e9, 1),
                "onednn_gflops": round(flops / best["onednn"] / 1e9, 1),
                "speedup": round(best["torch"] / best["onednn"], 2),
                "torch_ms_mean": round(statistics.fmean(times["torch"]) * 1e3, 3),
                "onednn_ms_mean": round(statistics.fmean(times["onednn"]) * 1e3, 3),
                "max_rel_difference": float(f"{error:.2e}"),
            }
            key = f"{a.rows}x{K}->{M}/{name}"
            results[key] = row
            print(
                f"{key}: torch {row['torch_gflops']} GFLOP/s, oneDNN {row['onednn_gflops']} GFLOP/s "
                f"(x{row['speedup']}), max rel. difference {row['max_rel_difference']:.1e}"
            )
    return emit({"products": results, "threads": a.threads, "machine": machine()}, a.json)


if __name__ == "__main__":
    main()
