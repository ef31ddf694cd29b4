"""Shared fixtures: the real data sets under ../shared/data (skipped with a reason when absent), and two session
guards: Hypothesis keeps its files in a temporary folder, and the run fails when the tests changed the working tree
(tests write only under ``tmp_path``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIT_KDKT_SHARED_DATA", REPO.parent / "shared" / "data"))
# Written by the test tools themselves, not by tests: left out of the working-tree check.
_TOOL_OUTPUT = ("__pycache__", ".pytest_cache", ".egg-info")
# Ignored by git (so `git status` shows at most the folder): their files are compared one by one.
_OUTPUT_DIRS = ("runs", "lightning_logs")


def _worktree_state() -> tuple[set[str], dict[str, int]] | None:
    """``git status --porcelain --ignored`` lines and ``{file: mtime_ns}`` under runs/ and lightning_logs/.

    Returns ``None`` when git is missing or the repository is not a git checkout (e.g. an unpacked sdist).
    """
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        return None
    try:
        result = subprocess.run(
            [git, "--no-optional-locks", "status", "--porcelain", "--ignored"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    lines = {line for line in result.stdout.splitlines() if not any(part in line for part in _TOOL_OUTPUT)}
    files = {}
    for name in _OUTPUT_DIRS:
        for path in (REPO / name).rglob("*"):
            if path.is_file():
                files[path.relative_to(REPO).as_posix()] = path.stat().st_mtime_ns
    return lines, files


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps its caches (``.hypothesis/``, written from collection on) in a temporary folder, not the cwd."""
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        return
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # hypothesis absent (the `test` extra not installed) or moved the function
        return
    home = tempfile.mkdtemp(prefix="lit-kdkt-hypothesis-")
    set_hypothesis_home_dir(home)
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_the_worktree_unchanged() -> Iterator[None]:
    """Fails the run when tests change ``git status`` of the repository or write under runs/ or lightning_logs/.

    Skipped without git. Set ``LIT_KDKT_NO_WORKTREE_CHECK=1`` when files are edited by hand during a run.
    """
    if os.environ.get("LIT_KDKT_NO_WORKTREE_CHECK"):
        yield
        return
    before = _worktree_state()
    yield
    after = _worktree_state() if before is not None else None
    if before is None or after is None:
        return
    new_status = sorted(after[0] - before[0])
    new_files = sorted(path for path, mtime in after[1].items() if before[1].get(path) != mtime)
    if new_status or new_files:
        pytest.fail(
            "Tests changed the working tree; they must write only under tmp_path (set LIT_KDKT_NO_WORKTREE_CHECK=1 "
            "if these are your own edits during the run):\n"
            + "\n".join([*new_status, *(f"written: {path}" for path in new_files)]),
            pytrace=False,
        )


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
