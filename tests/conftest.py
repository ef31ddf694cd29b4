"""Shared fixtures: the real data sets under ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIT_KDKT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (override with ``$LIT_KDKT_SHARED_DATA``)."""
    if not (SHARED_DATA / "kt").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md); set LIT_KDKT_SHARED_DATA")
    return SHARED_DATA
