"""Replacing a file atomically: a reader, or a crash at any instant, sees the old file or the complete
new one, never half of one. The new content is written to a temporary file in the same folder and
renamed over NAME.

Each writer gets its own temporary file, `.NAME.<random>.tmp`, so two processes writing the same
target at once (two `vsam predict --out preds.jsonl`) never write into one file: the last rename
wins, and what it publishes is one writer's complete output. A writer that is the only one by
construction (the shard writer holds the folder's lock) may ask for the fixed name `.NAME.tmp`,
which `shard_format.remove_orphans` finds after a kill.
"""
from __future__ import annotations

import glob
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMPORARY_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, single_writer: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write (any writer: open(), h5py, torch.save, onnx); when the block
    completes, rename it over `path`. If the block raises, the temporary file is removed and `path`
    is left as it was. `durable`: fsync the file before the rename and the folder after it, so that
    the new file also survives a power cut. `single_writer`: the caller guarantees that no other
    process writes `path` (it holds a lock); the temporary file is then `.NAME.tmp`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{TEMPORARY_SUFFIX}") if single_writer else _unique_temporary(path)
    try:
        yield temporary
        if durable:
            _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_text(text, encoding="utf-8")


def temporary_files(path: str | Path) -> list[Path]:
    """The temporary files of writers of `path` (`.NAME.<random>.tmp`) that are still there: a killed
    writer's. Only the holder of a lock that excludes every other writer may delete them."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"))


def _unique_temporary(path: Path) -> Path:
    """Create (O_EXCL) and return a temporary file no other writer has. Not tempfile.mkstemp: it
    creates the file with mode 0600, which the rename would give the published file; here the
    process's umask applies, as it does to a file opened for writing."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
