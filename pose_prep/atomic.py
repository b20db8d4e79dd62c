"""Replacing a file atomically: a reader, or a crash at any instant, sees the old file or the complete
new one, never half of one. The new content is written to `.NAME.tmp` in the same folder and renamed
over NAME (`shard_format.remove_orphans` finds a killed shard writer's leftovers by that name).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write (any writer: open(), h5py, torch.save, onnx); when the block
    completes, rename it over `path`. If the block raises, the temporary file is removed and `path`
    is left as it was. `durable`: fsync the file before the rename and the folder after it, so that
    the new file also survives a power cut."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
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


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
