"""Replacing a file atomically: a reader, or a crash at any instant, sees the old file or the complete
new one, never half of one. The new content is written to a temporary file in the same folder and
renamed over NAME.

Each writer gets its own temporary file, `.NAME.<random>.tmp`, so two processes writing the same
target at once (two `vsam predict --out preds.jsonl`) never write into one file: the last rename
wins, and what it publishes is one writer's complete output. A writer that is the only one by
construction (the shard writer holds the folder's lock) may ask for the fixed name `.NAME.tmp`,
which `shard_format.remove_orphans` finds after a kill.

A full disk (ENOSPC, or EDQUOT: a quota) during any of this is raised as `DiskFull`, whose str() is
one line naming the target, `no space left on device: PATH`: the temporary file is gone, the target
is as it was, and the commands print that line and exit 1. `reporting_disk_full` does the same for
writes that do not replace a file (appending to a log, a database commit).
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMPORARY_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SQLITE_SHM_GROWTH = 32 * 1024    # bytes a WAL index's -shm file grows by


class DiskFull(OSError):
    """A write that failed for want of space; str(): 'no space left on device: PATH'."""

    def __str__(self) -> str:
        return f"{(self.strerror or 'no space left on device').lower()}: {self.filename}"


def disk_full(path: str | Path, code: int = errno.ENOSPC) -> DiskFull:
    return DiskFull(code, os.strerror(code), str(path))


def no_space_cause(error: BaseException | None, where: str | Path | None = None) -> int | None:
    """ENOSPC or EDQUOT when `error`, or an exception it was raised from or while handling, is a write
    that found the disk full (h5py and the OS raise OSError; SQLite says SQLITE_FULL); else None.
    SQLite reports a WAL shared-memory file it could not enlarge as SQLITE_IOERR_SHMSIZE, which its
    documentation says "may indicate" a full volume: taken as one when the filesystem of `where`
    has less room left than that file grows by."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error.errno
        if isinstance(error, sqlite3.Error):
            name = getattr(error, "sqlite_errorname", "")
            if name == "SQLITE_FULL" or (name == "SQLITE_IOERR_SHMSIZE" and where is not None
                                         and _free_bytes(where) < SQLITE_SHM_GROWTH):
                return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(path: str | Path) -> int:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


@contextmanager
def reporting_disk_full(path: str | Path) -> Iterator[None]:
    """Re-raise a full disk inside the block as DiskFull naming `path`; anything else as it is."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        code = no_space_cause(error, path)
        if code is None:
            raise
        raise disk_full(path, code) from error


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, single_writer: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write (any writer: open(), h5py, torch.save, onnx); when the block
    completes, rename it over `path`. If the block raises, the temporary file is removed and `path`
    is left as it was. `durable`: fsync the file before the rename and the folder after it, so that
    the new file also survives a power cut. `single_writer`: the caller guarantees that no other
    process writes `path` (it holds a lock); the temporary file is then `.NAME.tmp`."""
    path = Path(path)
    with reporting_disk_full(path):
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
