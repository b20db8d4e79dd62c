"""Reader leases: a shard file that a running reader may still read is never deleted under it.

A reader (`vsam train`, `vsam eval`, anything built on `shard_format.snapshot`) takes a snapshot of the
collection when it starts: the live rows from the index, read in one transaction, and a *lease* on
every shard file they are in: a shared `fcntl.flock` on the file, held for as long as the reader runs
(the kernel drops it when the process ends, kill -9 included, so a dead reader never pins anything).
Shards are immutable, so the snapshot's rows stay what they were whatever prep-pose does next.

A writer never unlinks a shard file that leaves the collection (dead after a relabel, a reprocess, a
deletion or a compaction, or an orphan of a crash): it moves it into `retired/` beside the shards
(a rename: the same file, the same inode, leases included) and deletes a retired file only when it
can take an exclusive flock on it without waiting, that is when no reader holds a lease on it. Files
that some reader still holds stay in `retired/` until a later run of the writer finds them free.
A reader looks for a shard of its snapshot where it was, then in `retired/` (`shard_format._open_hdf5`).

Why a lock on the shard file itself, not a lease file per reader: nothing to clean up after a crash,
it works where the reader may not write (a read-only copy of the collection), it pins exactly the
files of the reader's snapshot, and HDF5 (which takes a shared flock on the files it opens) agrees
with it. Keep the collection on a local filesystem: flock over NFS is not reliable.

Only the holder of the folder's prep lock moves or deletes shard files, so the files of `retired/` have
one writer. Shard numbers are never reused (`shard_format.next_shard_number`), so a path names one
file for the collection's whole life: a reader that finds `shard-000012.h5` finds the file its
snapshot meant.
"""
from __future__ import annotations

import fcntl
import os
import resource
from pathlib import Path

RETIRED = "retired"


class Gone(Exception):
    """A file of the snapshot left the collection before the lease was taken: take the snapshot again."""


def retired_path(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / RETIRED / path.name


class Lease:
    """Shared flocks on a set of shard files, held until `close` or the end of the process.

    A forked child (a DataLoader worker) shares them (its copies keep the locks until it ends as
    well); a pickled copy (a spawned worker) holds none: the original keeps the lease."""

    def __init__(self, descriptors: list[int] | None = None):
        self._descriptors = descriptors or []

    def __len__(self) -> int:
        return len(self._descriptors)

    def close(self) -> None:
        # os.close, never LOCK_UN: a forked child closing its copies must not unlock the parent's.
        for fd in self._descriptors:
            try:
                os.close(fd)
            except Exception:  # noqa: BLE001 - already closed, or `os` gone at interpreter exit (from __del__)
                pass
        self._descriptors = []

    def __getstate__(self) -> dict:
        return {"_descriptors": []}

    def __del__(self) -> None:
        self.close()


def hold(paths: list[Path]) -> Lease:
    """A lease on each file (found where it was, else in `retired/`: a file only ever moves from the
    first to the second, so trying them in this order misses nothing). Raises Gone when one of them is no longer
    in the folder nor in `retired/` (or was being deleted): the caller's snapshot is stale."""
    _allow_descriptors(len(paths))
    lease = Lease()
    try:
        for path in paths:
            lease._descriptors.append(_lock_shared(Path(path)))
    except BaseException:
        lease.close()
        raise
    return lease


def _lock_shared(path: Path) -> int:
    for candidate in (path, retired_path(path)):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            # Blocking: a writer holds its exclusive lock only for the instant of an unlink.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _reachable(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)      # deleted between our open and our lock
        break
    raise Gone(str(path))


def _reachable(fd: int, path: Path) -> bool:
    """Whether the locked file is still the one at `path` or in `retired/` (not unlinked)."""
    held = os.fstat(fd)
    for candidate in (path, retired_path(path)):
        try:
            found = os.stat(candidate)
        except FileNotFoundError:
            continue
        if (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
            return True
    return False


def _allow_descriptors(count: int) -> None:
    """Raise the soft limit on open files when a lease needs more than it leaves (a collection of
    thousands of shards), within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


# --- the writer's side (holds the folder's prep lock) -------------------------------------------

def retire(path: Path) -> Path:
    """Move a shard file out of the collection into `retired/` (nothing happens to a reader that
    holds it or has it open). Returns its new path."""
    target = retired_path(path)
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    return target


def retired_files(folder: str | Path) -> list[Path]:
    """The files of `folder/retired/`: shards out of the collection that some reader still held."""
    retired = Path(folder) / RETIRED
    return sorted(p for p in retired.iterdir() if p.is_file()) if retired.is_dir() else []


def purge(folder: Path) -> tuple[list[Path], list[Path]]:
    """Delete each file of `folder/retired/` that no reader holds; returns (deleted, kept)."""
    deleted, kept = [], []
    for path in retired_files(folder):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                kept.append(path)
                continue
            # Unlinked while we hold the exclusive lock: a reader that opened it meanwhile and then
            # gets its shared lock finds it unreachable (`_reachable`) and takes a new snapshot.
            path.unlink()
            deleted.append(path)
        finally:
            os.close(fd)
    return deleted, kept
