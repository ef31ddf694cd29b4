"""Peak memory and time of a token-level LM distillation loss and its backward: TRL's against lit_kd's three paths.

    python scripts/bench_kd_lm_loss.py --L 128 --json out/kd_lm_loss_L128.json
    python scripts/bench_kd_lm_loss.py --json out/kd_lm_loss.json                  # B 8, L 1024, V 32000
    python scripts/bench_kd_lm_loss.py --device cuda --json out/kd_lm_loss_cuda.json

The generalised JSD (``--beta``, ``--temperature``) over ``N = B * L`` tokens, a vocabulary of ``V`` and a student
hidden width ``D``, float32, the last ``--pad`` fraction of each sequence masked (``labels == -100``). Variants:

* ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss(logits_s, logits_t, labels, beta, temperature)`` (skipped when
  TRL cannot be imported).
* ``unchunked``: :func:`lit_kd.losses.generalized_jsd` without ``chunk_size``.
* ``chunked``: the same with ``chunk_size=--chunk-size`` tokens.
* ``fused``: :func:`lit_kd.fused.fused_linear_divergence` from the student's hidden states (N, D) and LM-head weight
  (V, D), the teacher as logits: the student's (N, V) logits never exist.

All four see the same numbers: the student's logits of the first three are ``hidden @ weight.T``, computed once while
the inputs are made. Each variant must give the same loss (to ``--rtol``, 1e-5) and the same gradient with respect to
the student's hidden states (``grad_logits @ weight`` for the logits variants), checked after the measurement.

How memory is measured (what "peak" means here): each variant runs in a fresh Python process, which allocates its
inputs (the teacher's (N, V) logits; the student's (N, V) logits, or its hidden states and weight for ``fused``),
then runs the loss and ``backward()`` ``--repeats`` times. The figure is the peak *above the memory held once the
inputs exist*: on CUDA, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
``memory_allocated()`` at that point (tensor memory only, not the caching allocator's reserve); on CPU, the peak
resident set size of the process: Linux's ``VmHWM`` reset to the current RSS by writing 5 to
``/proc/self/clear_refs`` once the inputs are made, minus the RSS at that point (whole-process memory, so it counts
the allocator's overheads too; large tensors are ``mmap``-ed by glibc and given back when freed, so the RSS follows the
live tensors). Where ``clear_refs`` cannot be written, ``getrusage(RUSAGE_SELF).ru_maxrss`` minus its value once the
inputs exist is used instead (then the inputs' own making counts into the baseline's high-water mark, which can hide
up to that much of a variant's peak; the JSON says which method was used). The peak includes the gradient each
variant must produce (the (N, V) gradient of the student's logits for the logits variants, (N, D) and (V, D) for
``fused``), which the rest of a training step consumes.

Time: the fastest of ``--repeats`` runs of loss + backward (``perf_counter``; CUDA synchronised). On a shared CPU the
times are noisy. Targets from issue 13: chunked peak <= 25% of TRL's, chunked time <= 1.2x TRL's, fused peak <= 10%
of TRL's; the JSON records each as met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

VARIANTS = ("trl", "unchunked", "chunked", "fused")
TARGETS = {"chunked_peak_vs_trl": 0.25, "chunked_time_vs_trl": 1.2, "fused_peak_vs_trl": 0.10}
MiB = 2**20


# ------------------------------------------------------------------------------------------------- memory probes
def _rss_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuPeak:
    """The process's peak RSS above its RSS at ``start()`` (see the module docstring for the two methods)."""

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs=5, minus VmRSS"
            self.base = _rss_kib("VmRSS")
        except OSError:
            self.method = "ru_maxrss minus ru_maxrss once the inputs exist"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.base_rss = _rss_kib("VmRSS")

    def peak_bytes(self) -> int:
        if self.method.startswith("VmHWM"):
            return (_rss_kib("VmHWM") - self.base) * 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * 1024


class CudaPeak:
    """Tensor memory allocated above what was allocated at ``start()``."""

    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated"

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        self.base_rss = None

    def peak_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


# --------------------------------------------------------------------------------------------------------- worker
def trl_loss_fn():
    """TRL's ``generalized_jsd_loss``, or ``None`` when TRL (or what its GKD module imports) is missing."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.gkd import GKDTrainer  # TRL >= 0.2x
        except ImportError:
            try:
                from trl import GKDTrainer
            except ImportError:
                return None
    return GKDTrainer.generalized_jsd_loss


def make_inputs(a: argparse.Namespace, device: torch.device, fused: bool) -> dict:
    """The variant's inputs, made without temporaries larger than themselves (so the baseline holds just them)."""
    g = torch.Generator(device=device).manual_seed(0)
    n = a.B * a.L
    hidden = torch.randn(n, a.D, generator=g, device=device)  # (N, D)
    weight = torch.randn(a.V, a.D, generator=g, device=device).mul_(a.logit_scale / a.D**0.5)  # (V, D)
    logits_t = torch.randn(a.B, a.L, a.V, generator=g, device=device).mul_(a.logit_scale)  # (B, L, V)
    mask = torch.ones(a.B, a.L, dtype=torch.bool, device=device)
    mask[:, a.L - int(a.L * a.pad) :] = False  # (B, L): right padding
    inputs = {"logits_t": logits_t, "mask": mask, "weight": weight}
    if fused:
        inputs["hidden"] = hidden.requires_grad_()
    else:
        with torch.no_grad():
            inputs["logits_s"] = (hidden @ weight.T).reshape(a.B, a.L, a.V).requires_grad_()  # (B, L, V)
        inputs["hidden"] = hidden  # only for the hidden-state gradient check afterwards
    return inputs


def run_variant(a: argparse.Namespace) -> dict:
    """Run one variant in this process and return its figures (the worker side of ``--worker``)."""
    device = torch.device(a.device)
    variant = a.worker
    if variant == "trl":
        trl_fn = trl_loss_fn()
        if trl_fn is None:
            return {"variant": variant, "skipped": "TRL's GKDTrainer could not be imported (pip install trl)"}
    from lit_kd.fused import fused_linear_divergence
    from lit_kd.losses import generalized_jsd

    x = make_inputs(a, device, fused=variant == "fused")
    if variant == "trl":
        labels = torch.where(x["mask"], 0, -100)  # TRL masks labels == -100; the label values are not read

        def step() -> torch.Tensor:
            return trl_fn(x["logits_s"], x["logits_t"], labels, beta=a.beta, temperature=a.temperature)
    elif variant in ("unchunked", "chunked"):
        chunk = a.chunk_size if variant == "chunked" else None

        def step() -> torch.Tensor:
            return generalized_jsd(x["logits_s"], x["logits_t"], x["mask"], a.beta, a.temperature, chunk)
    else:

        def step() -> torch.Tensor:
            return fused_linear_divergence(
                x["hidden"],
                x["weight"],
                x["logits_t"].reshape(-1, a.V),
                mask=x["mask"].reshape(-1),
                beta=a.beta,
                temperature=a.temperature,
                chunk_size=a.chunk_size,
            )

    leaf = x["hidden"] if variant == "fused" else x["logits_s"]
    probe = CudaPeak() if device.type == "cuda" else CpuPeak()
    probe.start()
    times, value = [], None
    for _ in range(a.repeats):
        leaf.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = float(loss)
        del loss
    peak = probe.peak_bytes()
    # After the measurement: the gradient with respect to the hidden states, comparable across variants.
    with torch.no_grad():
        grad_hidden = leaf.grad if variant == "fused" else leaf.grad.reshape(-1, a.V) @ x["weight"]  # (N, D)
    return {
        "variant": variant,
        "loss": value,
        "grad_hidden_norm": float(grad_hidden.double().norm()),
        "grad_hidden_sum": float(grad_hidden.double().sum()),
        "peak_mib": peak / MiB,
        "inputs_mib": None if probe.base_rss is None else probe.base_rss / 1024,
        "time_s": min(times),
        "times_s": times,
        "memory_method": probe.method,
    }


# ---------------------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--B", type=int, default=8, help="batch size")
    p.add_argument("--L", type=int, default=1024, help="sequence length")
    p.add_argument("--V", type=int, default=32000, help="vocabulary size")
    p.add_argument("--D", type=int, default=256, help="student hidden width (fused variant)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk (chunked and fused)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--pad", type=float, default=0.1, help="fraction of each sequence masked out (right padding)")
    p.add_argument("--logit-scale", type=float, default=3.0, help="standard deviation of the logits")
    p.add_argument("--repeats", type=int, default=2, help="runs of loss + backward per variant (time: the fastest)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--rtol", type=float, default=1e-5, help="allowed relative difference of the losses")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(run_variant(a)))
        return {}

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import dist_version, emit, machine

    forwarded = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    if "--json" in forwarded:
        i = forwarded.index("--json")
        del forwarded[i : i + 2]
    results = {}
    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[variant] = {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
            print(f"{variant}: failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}", file=sys.stderr)
            continue
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        if "skipped" in r:
            print(f"{variant:>10}: skipped ({r['skipped']})")
        else:
            print(
                f"{variant:>10}: loss {r['loss']:.7f}  peak {r['peak_mib']:9.1f} MiB  time {r['time_s']:7.3f} s  "
                f"|grad_h| {r['grad_hidden_norm']:.6g}"
            )

    ran = {k: r for k, r in results.items() if "loss" in r}
    ref = ran.get("trl") or ran.get("unchunked") or next(iter(ran.values()), None)
    checks: dict[str, object] = {}
    if ref is not None:
        for k, r in ran.items():
            checks[f"{k}_loss_matches"] = abs(r["loss"] - ref["loss"]) <= a.rtol * abs(ref["loss"]) + 1e-7
            checks[f"{k}_grad_matches"] = abs(r["grad_hidden_norm"] - ref["grad_hidden_norm"]) <= 1e-4 * abs(
                ref["grad_hidden_norm"]
            )
    ratios: dict[str, float] = {}
    trl = ran.get("trl")
    if trl is not None:
        for k, r in ran.items():
            if k != "trl":
                ratios[f"{k}_peak_vs_trl"] = r["peak_mib"] / trl["peak_mib"]
                ratios[f"{k}_time_vs_trl"] = r["time_s"] / trl["time_s"]
        for name, bound in TARGETS.items():
            if name in ratios:
                checks[f"target_{name}<={bound}"] = ratios[name] <= bound
        for k, v in ratios.items():
            print(f"{k:>24}: {v:.3f}")
    result = {
        "benchmark": "kd_lm_loss",
        "machine": machine(a.device),
        "trl": dist_version("trl"),
        "settings": {
            k: getattr(a, k)
            for k in ("device", "B", "L", "V", "D", "chunk_size", "beta", "temperature", "pad", "repeats", "threads")
        },
        "results": results,
        "ratios": ratios,
        "checks": checks,
    }
    for k, v in checks.items():
        print(f"{k:>36}: {'ok' if v else 'NO'}")
    return emit(result, a.json) if a.json else result


if __name__ == "__main__":
    main()
