"""Helpers shared by the benchmark scripts: the machine line, the JSON output, package versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def machine(accelerator: str = "cpu") -> str:
    """E.g. ``"x86_64 2 cores, torch 2.13.0+cpu, cpu"``."""
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {accelerator}"


def emit(result: dict, path: Path | None) -> dict:
    """Print ``result`` as JSON and, with ``path``, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return result


def dist_version(name: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def resolve_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device``; a clear error when CUDA is asked for but missing."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "Expected `--device cuda` to find a CUDA GPU but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); use `--device cpu`."
        )
    return torch.device(name)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA); a no-op on CPU, where every op has finished when it returns."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 for ``--precision bf16``; nothing for ``32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the ``machine`` line (CPU, cores, torch version)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine(device.type)
