"""Helpers shared by the benchmark scripts: the machine line, the JSON output, package versions."""

from __future__ import annotations

import json
import os
import platform
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
