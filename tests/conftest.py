"""Shared fixtures. Real data lives beside the repository in ../shared/data (read-only, never copied)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data: DeepFashion images, keypoint sets (see ../shared/README.md)."""
    assert SHARED_DATA.is_dir(), f"real test data missing: {SHARED_DATA} (see ../shared/README.md)"
    return SHARED_DATA
