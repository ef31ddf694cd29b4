"""Time per training step of on-policy batches (the student generates) beside off-policy ones (the data's).

    python scripts/bench_kd_onpolicy.py --json out/kd_onpolicy.json
    python scripts/bench_kd_onpolicy.py --data-dir ../shared/data/nlp/sst2 --json out/kd_onpolicy_sst2.json
    python scripts/bench_kd_onpolicy.py --device cuda --steps 60 --json out/kd_onpolicy_cuda.json

A tiny GPT-2 teacher (2 layers, width 64) is distilled into a 1-layer student of width 64 (byte-level vocabulary of
257: bytes and an end-of-sequence token, no tokenizer needed) with ``DistillationModule(task_type="causal_lm",
on_policy_fraction=--fraction)`` for ``--steps`` training steps of ``--batch-size`` left-padded prompts of up to
``--prompt-len`` tokens: random tokens, or the first bytes of SST-2 sentences from ``--data-dir`` (``train.tsv``).
An off-policy batch trains on the prompt followed by a reference completion of ``--max-new-tokens`` tokens (random,
or the sentence's next bytes), so both kinds of batch have the same length at most; an on-policy batch replaces it by
the student's sampled continuation (``generate``, up to ``--max-new-tokens`` tokens; the untrained student rarely
samples the end of sequence, so about that many).

Time: a whole training step, from Lightning's ``on_train_batch_start`` to ``on_train_batch_end`` (generation, both
forwards, backward, optimizer step; CUDA synchronised), by kind; the JSON gives the median and mean of each kind after
the first ``--warmup`` steps of that kind, their ratio, and the running means the module itself logs
(``train/step_s_on_policy``, ``train/step_s_off_policy``, ``DistillationModule.step_seconds``; these include the
warm-up steps). On a shared CPU the times are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import emit, machine  # noqa: E402

from lit_kd import DistillationConfig, DistillationModule  # noqa: E402
from lit_kd.generation import batch_source  # noqa: E402

V, EOS = 257, 256  # bytes, and the end of sequence


def tiny_gpt2(n_layer: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=64, n_head=2, vocab_size=V, n_positions=256, bos_token_id=EOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config)


def sequences(args: argparse.Namespace, n: int) -> list[list[int]]:
    """``n`` token sequences of ``prompt_len + max_new_tokens`` tokens at most: SST-2 sentences' bytes or random."""
    total = args.prompt_len + args.max_new_tokens
    if args.data_dir is None:
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (n,), generator=g)
        return [torch.randint(0, EOS, (int(k) + args.max_new_tokens,), generator=g).tolist() for k in lengths]
    lines = (Path(args.data_dir) / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]  # header: sentence, label
    texts = [line.split("\t")[0] for line in lines if len(line.split("\t")[0].encode()) >= 8]
    if not texts:
        raise SystemExit(f"Expected SST-2 sentences in {args.data_dir}/train.tsv but found none.")
    return [list(texts[i % len(texts)].encode()[:total]) for i in range(n)]


def make_batch(rows: list[list[int]], prompt_len: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (the first ``min(prompt_len, len - 1)`` tokens), and prompt + reference for off-policy."""
    cut = [min(prompt_len, max(1, len(r) // 2)) for r in rows]
    width = max(len(r) for r in rows)
    B = len(rows)
    prompt = torch.zeros(B, prompt_len, dtype=torch.long)
    prompt_mask = torch.zeros(B, prompt_len, dtype=torch.long)
    ids = torch.zeros(B, prompt_len + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (row, k) in enumerate(zip(rows, cut, strict=True)):
        prompt[b, prompt_len - k :] = torch.tensor(row[:k])
        prompt_mask[b, prompt_len - k :] = 1
        rest = row[k:]
        ids[b, :prompt_len], mask[b, :prompt_len] = prompt[b], prompt_mask[b]
        ids[b, prompt_len : prompt_len + len(rest)] = torch.tensor(rest, dtype=torch.long)
        mask[b, prompt_len : prompt_len + len(rest)] = 1
        labels[b, prompt_len : prompt_len + len(rest)] = torch.tensor(rest, dtype=torch.long)
    return {
        "input_ids": ids,  # (B, P + R): the prompt, then the reference completion (right-padded)
        "attention_mask": mask,
        "labels": labels,  # -100 on the prompt and the padding
        "prompt_input_ids": prompt,  # (B, P), left-padded
        "prompt_attention_mask": prompt_mask,
    }


class StepTimer(L.Callback):
    """The duration of every training step and whether it was on-policy (the module's draw for that batch)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        kind = "on_policy" if pl_module._batch_source == "student" else "off_policy"
        self.times.append((kind, time.perf_counter() - self.start))


def summary(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] or times
    return {
        "steps": len(times),
        "timed_steps": len(kept),
        "median_s": statistics.median(kept) if kept else None,
        "mean_s": statistics.fmean(kept) if kept else None,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps in all")
    p.add_argument("--fraction", type=float, default=0.5, help="on_policy_fraction (TRL's lmbda)")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each kind left out of the medians")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="generation_temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data-dir", default=None, help="SST-2 folder (train.tsv) for the prompts; random tokens without")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(args.seed, verbose=False)
    rows = sequences(args, args.steps * args.batch_size)
    batches = [
        make_batch(rows[i * args.batch_size : (i + 1) * args.batch_size], args.prompt_len) for i in range(args.steps)
    ]
    module = DistillationModule(
        tiny_gpt2(2, 0),
        tiny_gpt2(1, 1),
        DistillationConfig(temperature=1.0),
        task_type="causal_lm",
        on_policy_fraction=args.fraction,
        max_new_tokens=args.max_new_tokens,
        generation_temperature=args.temperature,
        on_policy_seed=args.seed,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        default_root_dir=tempfile.mkdtemp(prefix="bench_kd_onpolicy_"), num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    by_kind = {kind: [s for k, s in timer.times if k == kind] for kind in ("on_policy", "off_policy")}
    result = {
        "benchmark": "kd_onpolicy",
        "machine": machine(args.device),
        "data": "sst2 bytes" if args.data_dir else "random tokens",
        "teacher": "GPT-2 2x64",
        "student": "GPT-2 1x64",
        "vocab": V,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "on_policy_fraction": args.fraction,
        "on_policy_draws": sum(
            batch_source(args.seed, i, args.fraction, False) == "student" for i in range(args.steps)
        ),
        **{kind: summary(times, args.warmup) for kind, times in by_kind.items()},
        "module_step_seconds": module.step_seconds,
    }
    on, off = result["on_policy"]["median_s"], result["off_policy"]["median_s"]
    result["on_vs_off_policy_median"] = on / off if on and off else None
    print(
        f"on-policy  step: median {on if on is None else f'{on * 1e3:.1f} ms'} ({result['on_policy']['steps']} steps)\n"
        f"off-policy step: median {off if off is None else f'{off * 1e3:.1f} ms'} ({result['off_policy']['steps']} "
        "steps)",
        file=sys.stderr,
    )
    return emit(result, args.json)


if __name__ == "__main__":
    main()
