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

What NAME already is decides how it is written, as it would for any Unix tool writing a file:

* a regular file, or nothing: replaced (created) atomically, as above;
* a symbolic link: followed; the file it leads to is replaced, in that file's folder, and the link stays;
* a stream (a character device such as /dev/null, a FIFO, or a process's open file reached through
  /proc/PID/fd, as /dev/stdout is): written in place, never renamed over (atomicity means nothing
  there, and a rename would put a regular file where the device or FIFO was);
* a folder, a block device or a socket, or a path under something that is not a folder: refused
  with `UnusableOutput`, one line `REASON: PATH` ("not a folder: /tmp/afile"), before anything is written.
"""
from __future__ import annotations

import errno
import glob
import os
import re
import secrets
import sqlite3
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMPORARY_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SQLITE_SHM_GROWTH = 32 * 1024    # bytes a WAL index's -shm file grows by
PROCESS_FD_FOLDER = re.compile(r"/proc/[^/]+/fd")    # /dev/stdout and /dev/fd/N lead through it
MAX_LINKS = 40                   # as the kernel's ELOOP limit


class DiskFull(OSError):
    """A write that failed for want of space; str(): 'no space left on device: PATH'."""

    def __str__(self) -> str:
        return f"{(self.strerror or 'no space left on device').lower()}: {self.filename}"


class UnusableOutput(OSError):
    """An output path that cannot be written as a file or a stream; str(): 'REASON: PATH'."""

    def __str__(self) -> str:
        return f"{self.strerror}: {self.filename}"


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


def is_stream(path: str | Path) -> bool:
    """Whether `path` is written in place rather than replaced (see the module): a character device,
    a FIFO, or a process's open file. Raises UnusableOutput for what can be neither."""
    check_parent_is_folder(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False                  # a new file (or a dangling link: created where it points)
    if stat.S_ISDIR(mode):
        raise UnusableOutput(errno.EISDIR, "a folder, not a file", str(path))
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return True
    if stat.S_ISREG(mode):
        # /dev/stdout redirected to a file: the shell goes on writing to the file it opened, and would
        # write into a deleted one after a rename.
        return _through_process_fd(path)
    raise UnusableOutput(errno.EINVAL, "not a file, a character device or a FIFO", str(path))


def check_output(path: str | Path) -> None:
    """UnusableOutput when `path` can be written neither as a file nor as a stream: for a command to
    say before its work what it would otherwise find when it writes."""
    is_stream(path)


def check_parent_is_folder(path: str | Path) -> None:
    """UnusableOutput naming the nearest existing ancestor of `path` when that is not a folder (the
    OS would say "File exists" or "Not a directory" about a file further down)."""
    check_folder_can_be_made(Path(path).parent)


def check_folder_can_be_made(path: str | Path) -> None:
    """UnusableOutput naming `path`, or the nearest ancestor of it that exists, when that is not a folder."""
    existing = nearest_existing(path)
    if existing.exists() and not existing.is_dir():
        raise UnusableOutput(errno.ENOTDIR, "not a folder", str(existing))


def nearest_existing(path: str | Path) -> Path:
    """`path` if it exists, else the nearest folder above it that does (the root, or "." for a
    relative path, at worst)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_parent_folder(path: str | Path) -> None:
    """Create the folders `path` is in; UnusableOutput when one of them is a file."""
    check_parent_is_folder(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def _through_process_fd(path: str | Path) -> bool:
    """Whether following the links of `path` passes through /proc/PID/fd (/dev/stdout, /dev/fd/1)."""
    hop = os.path.abspath(path)
    for _ in range(MAX_LINKS):
        if PROCESS_FD_FOLDER.fullmatch(os.path.realpath(os.path.dirname(hop))):
            return True
        if not os.path.islink(hop):
            return False
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return False


def replaced_file(path: str | Path) -> Path:
    """The file a rename must replace to write `path`: itself, or where its symbolic links lead."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, single_writer: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write (any writer: open(), h5py, torch.save, onnx); when the block
    completes, rename it over `path` (over the file a symbolic link leads to). If the block raises,
    the temporary file is removed and `path` is left as it was. `durable`: fsync the file before the
    rename and the folder after it, so that the new file also survives a power cut. `single_writer`:
    the caller guarantees that no other process writes `path` (it holds a lock); the temporary file
    is then `.NAME.tmp`. A stream (`is_stream`) is yielded itself, to be written in place."""
    if is_stream(path):
        with reporting_disk_full(path):
            yield Path(path)
        return
    path = replaced_file(path)
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
