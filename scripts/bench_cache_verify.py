"""What verifying a teacher cache costs when it is opened: ``TeacherCache(path)`` with and without ``verify``.

    python scripts/bench_cache_verify.py --size-gb 1.0 --json out/cache_verify.json

Builds a cache of about ``--size-gb`` GB with :meth:`~lit_kd.cache.TeacherCache.build` in a temporary folder
(under ``--dir``): the "teacher" is an embedding and a linear layer to ``--classes`` logits (its values do not
matter, only the size of ``logits.npy``). Then times opening it:

- ``verify=True`` (default): ``meta.json``, every ``.npy`` header and size, and the SHA-256 of every file;
- ``verify=False``: ``meta.json``, the headers and sizes only.

Each is timed first "cold" (the files' pages are dropped from the page cache beforehand with
``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fsync``, so the first open reads from the disk, as after a reboot
or on another node; where the kernel ignores the advice the figure is warm, ``cold_evicted`` says whether it was
asked) and then ``--repeats`` times more with the pages cached (warm: a second run, or the other DDP processes of
the same node). Prints and writes (``--json``) seconds and GB/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import emit, machine
from torch import nn

from lit_kd.cache import TeacherCache


class _LinearTeacher(nn.Module):
    """(B, L) token ids -> (B, C) logits: mean embedding, then a linear layer."""

    def __init__(self, vocab: int = 100, width: int = 16, classes: int = 32000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(input_ids).mean(dim=1))  # (B, C)


def _batches(num_samples: int, batch_size: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, num_samples, batch_size):
        index = torch.arange(start, min(start + batch_size, num_samples))
        ids = torch.randint(2, vocab, (len(index), length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": index})
    return out


def _evict(folder: Path) -> bool:
    """Ask the kernel to drop the folder's files from the page cache; whether it could be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _open_seconds(path: Path, verify: bool) -> float:
    start = time.perf_counter()
    TeacherCache(path, verify=verify)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="size of logits.npy in GB (1e9 bytes)")
    p.add_argument("--classes", type=int, default=32000, help="logits per sample (a vocabulary-sized output)")
    p.add_argument("--repeats", type=int, default=3, help="warm opens after the first, cold one")
    p.add_argument("--dir", type=Path, default=None, help="where to put the temporary cache (default: the system's)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    num_samples = max(1, round(a.size_gb * 1e9 / (4 * a.classes)))
    torch.manual_seed(0)
    teacher = _LinearTeacher(classes=a.classes)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "cache"
        start = time.perf_counter()
        TeacherCache.build(teacher, _batches(num_samples, 256, 16, 100), path, progress=False)
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.iterdir())
        result: dict = {
            "machine": machine(),
            "size_bytes": size,
            "num_samples": num_samples,
            "classes": a.classes,
            "build_s": round(build_s, 3),
        }
        for verify in (True, False):
            key = "verify" if verify else "no_verify"
            result["cold_evicted"] = _evict(path)
            first = _open_seconds(path, verify)
            repeated = [_open_seconds(path, verify) for _ in range(a.repeats)]
            result[f"{key}_first_s"] = round(first, 4)
            result[f"{key}_repeat_s"] = [round(s, 4) for s in repeated]
            if verify:
                result["verify_first_gb_per_s"] = round(size / first / 1e9, 3)
                result["verify_repeat_gb_per_s"] = round(size / statistics.median(repeated) / 1e9, 3)
    return emit(result, a.json)


if __name__ == "__main__":
    main()
