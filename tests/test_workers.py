"""Worker processes never outlive their parent: a real `kill -9` of the parent alone (what the OOM
killer does) of `vsam prep-pose --jobs 2`, `vsam pose --jobs 2` and `vsam train --workers 2`, and
every process it had started is gone within seconds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import fixture_set

BIN = Path(sys.executable).parent
VSAM = str(BIN / "vsam")
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
GONE_WITHIN = 10.0   # seconds; the watchdog polls every 0.5 s, the rest is a busy 2-core machine


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 of the fixture photos: work for 2 workers for longer than it takes to kill their parent."""
    names = sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:40]
    return fixture_set.copy_photos(tmp_path_factory.mktemp("workers") / "img", names)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _workers(parent: psutil.Process) -> int:
    """Live children of `parent` other than helpers such as loky's resource tracker. A child can end
    (and be a zombie until reaped) between listing and reading its command line: it is not a worker."""
    count = 0
    for child in parent.children():
        try:
            count += "resource_tracker" not in " ".join(child.cmdline())
        except psutil.NoSuchProcess:   # ZombieProcess included
            pass
    return count


def kill_parent_alone(command: list[str], workers: int, cwd: Path,
                      settle: float = 1.0) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Start `command`, wait until it has `workers` worker processes (besides helpers such as loky's
    resource tracker) and `settle` seconds more for them to take work, kill -9 the parent only, and
    return (its descendants, those still alive GONE_WITHIN seconds later)."""
    stderr = cwd / "stderr.txt"
    with open(stderr, "wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=sink,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        parent = psutil.Process(process.pid)
        deadline = time.monotonic() + 120
        while _workers(parent) < workers:
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.02)
        time.sleep(settle)
        descendants = parent.children(recursive=True)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + GONE_WITHIN
        while _alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        return descendants, _alive(descendants)
    finally:
        try:   # whatever the outcome, leave no process behind
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _described(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid}: {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return described


def test_prep_workers_and_loky_helpers_end_when_the_parent_is_killed(photos, tmp_path):
    command = [VSAM, "prep-pose", "--images", str(photos), "--out", str(tmp_path / "shards"), "--jobs", "2",
               "--detector", "blazepose", "--shard-size", "4", "--no-progress"]
    descendants, alive = kill_parent_alone(command, 2, tmp_path)
    assert len(descendants) >= 2
    assert alive == [], _described(alive)


def test_pose_workers_end_when_the_parent_is_killed(photos, tmp_path):
    command = [VSAM, "pose", "--images", str(photos), "--out", str(tmp_path / "keypoints"), "--jobs", "2",
               "--detector", "blazepose", "--no-progress"]
    descendants, alive = kill_parent_alone(command, 2, tmp_path)
    assert len(descendants) >= 2
    assert alive == [], _described(alive)


def test_training_loader_workers_end_when_the_trainer_is_killed(df_shards, tmp_path):
    command = [VSAM, "train", "--shards", str(df_shards), "--out", str(tmp_path / "run"), "--config", str(TINY),
               "--device", "cpu", "--workers", "2", "--epochs", "50", "--batch-size", "2"]
    descendants, alive = kill_parent_alone(command, 2, tmp_path, settle=0.0)   # forked afresh each epoch
    assert len(descendants) >= 2
    assert alive == [], _described(alive)
