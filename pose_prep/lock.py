"""One run at a time per folder: `vsam prep-pose` per output folder (`<out>/.prep.lock`), `vsam train`
per run folder (`<out>/.train.lock`, taken by rank 0 alone under torchrun).

An exclusive `fcntl.flock` on the lock file, taken without waiting. The kernel drops the lock
when the holder's file descriptor closes, which also happens when the process is killed (kill -9,
OOM, reboot), so a crashed run can never leave a lock that blocks the next one. The file itself is
never deleted (deleting a lock file races with a run that is opening it); it only names the holder.
A process the holder forks (a DataLoader worker) closes its copy of the lock's descriptor at once,
so the lock never outlives the holder (a flock belongs to the open file, which a fork shares);
processes started with exec never inherit it (Python's descriptors are close-on-exec).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".prep.lock"
TRAIN_LOCK_NAME = ".train.lock"
_held: set[int] = set()      # descriptors of the locks this process holds


def _close_in_forked_child() -> None:
    """Closing a copy does not unlock (the holder's descriptor still refers to the open file)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


class Busy(Exception):
    """Another run holds the lock; str() names the folder and, when known, the holder."""


def _holder(path: Path, command: str) -> str:
    """`COMMAND run is active (pid … on … since …)` from the lock file; the command is the holder's own
    (prep-pose and `shards compact` share a folder's lock), else the one asking."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return f"{command} run is active (another process)"
    return (f"{info.get('command', command)} run is active "
            f"(pid {info.get('pid')} on {info.get('host')} since {info.get('since')})")


@contextmanager
def exclusive(folder: str | os.PathLike, name: str = LOCK_NAME, command: str = "vsam prep-pose") -> Iterator[Path]:
    """Hold the folder's lock `name` for the duration of the block, or raise Busy at once (naming
    `command`, the kind of run that holds it)."""
    path = Path(folder) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{folder}: another {_holder(path, command)}; "
                       "this run does nothing (exit code 75: try again later)") from None
        _held.add(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError:
            pass   # a full disk: the holder's name is a courtesy; the run itself says what went wrong
        yield path
    finally:
        _held.discard(fd)
        os.close(fd)  # closing releases the flock


def is_locked(folder: str | os.PathLike, name: str = LOCK_NAME) -> bool:
    """Whether a run holds the folder's lock `name` right now (without taking it for long)."""
    path = Path(folder) / name
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
