"""Shared pytest setup: CPU-only, few threads, repository root on sys.path."""

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# HRM_RAW_DATA points elsewhere, e.g. from a git worktree whose parent folder has no shared/
SHARED_RAW_DATA = Path(os.environ.get("HRM_RAW_DATA", REPO.parent / "shared" / "data" / "raw-data"))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    """The real ARC puzzles shipped beside the project; tests that need them skip when absent."""
    if not SHARED_RAW_DATA.is_dir():
        pytest.skip(f"raw ARC data not found at {SHARED_RAW_DATA}")
    return SHARED_RAW_DATA
