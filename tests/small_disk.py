"""A real, small filesystem for disk-full tests: a tmpfs of a few megabytes mounted on a folder.

Mounting needs root (CI runs the suite as root on a fresh machine, where it works). Where mount is
not permitted the tests that need it FAIL with the reason, unless VSAM_TESTS_WITHOUT_MOUNT=1 is set,
which skips them knowingly (a skip that names itself in the summary). Not an equivalent: a file size
limit (RLIMIT_FSIZE) gives EFBIG and SIGXFSZ, not ENOSPC; a loop-mounted image needs root as well.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def mounted(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (mount's syntax: 1600k, 2m) for the block; unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    result = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
    if result.returncode != 0:
        reason = f"cannot mount a {size} tmpfs on {folder} ({result.stderr.strip() or result.returncode})"
        if os.environ.get("VSAM_TESTS_WITHOUT_MOUNT") == "1":
            pytest.skip(f"disk-full test skipped by VSAM_TESTS_WITHOUT_MOUNT=1: {reason}")
        pytest.fail(f"{reason}: disk-full tests need root to mount a small tmpfs (CI runs as root); "
                    "set VSAM_TESTS_WITHOUT_MOUNT=1 to skip them knowingly", pytrace=False)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def grow(folder: Path, size: str) -> None:
    """Give the mounted tmpfs more room (the files on it stay): the disk was freed."""
    result = _mount("-o", f"remount,size={size}", str(folder))
    assert result.returncode == 0, result.stderr


def fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on the disk of `folder`; deleting it frees the disk."""
    stat = os.statvfs(folder)
    ballast = folder / "ballast"
    ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast
