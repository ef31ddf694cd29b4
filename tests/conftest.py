"""Shared fixtures: the real data sets under ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIT_KDKT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (override with ``$LIT_KDKT_SHARED_DATA``)."""
    if not (SHARED_DATA / "kt").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md); set LIT_KDKT_SHARED_DATA")
    return SHARED_DATA


def cpu_trainer(root: Path | None = None, **kwargs) -> L.Trainer:
    """The quiet CPU ``Trainer`` of the tests: no logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    return L.Trainer(**options)
