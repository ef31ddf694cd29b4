"""Latency of streaming SAKT inference: append one interaction and predict the next exercise.

    python scripts/bench_streaming.py --json out/streaming.json

Builds a SAKT model (untrained weights: latency does not depend on their values), fills a student's history to
``--history`` interactions, then times ``SAKTStream.step(exercise, response, [candidate])`` (one new interaction +
one prediction over the full window) and, for comparison, a full forward over the same window
(:func:`lit_kt.predict_next`). Prints and writes median and 90th-percentile milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _bench import emit, machine

from lit_kt import SAKT, predict_next
from lit_kt.streaming import SAKTStream


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history", type=int, default=200, help="interactions in the window")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--num-exercises", type=int, default=110)
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits one-request latency)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = SAKT(a.num_exercises, a.d_model, a.num_heads, a.num_layers, max_len=a.history + 1).eval()
    rng = np.random.default_rng(0)
    ex = rng.integers(1, a.num_exercises + 1, a.history + a.repeats + 100).tolist()
    resp = rng.integers(0, 2, len(ex)).tolist()
    stream = SAKTStream(model, ex[: a.history], resp[: a.history])
    position = iter(range(a.history, len(ex)))

    def stream_step():
        t = next(position)
        stream.step(ex[t], resp[t], ex[t + 1])

    timed(stream_step, 50)  # warm-up
    stream_ms = timed(stream_step, a.repeats)
    full_ms = timed(lambda: predict_next(model, ex[: a.history], resp[: a.history], ex[a.history]), 200)
    result = {
        "history": a.history,
        "d_model": a.d_model,
        "num_heads": a.num_heads,
        "num_layers": a.num_layers,
        "stream_step_median_ms": round(statistics.median(stream_ms), 4),
        "stream_step_p90_ms": round(float(np.percentile(stream_ms, 90)), 4),
        "full_forward_median_ms": round(statistics.median(full_ms), 4),
        "threads": a.threads,
        "machine": machine(),
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
