"""Damage done to real shard and index files by the tests that check `verify` (and every reader) names it."""
from __future__ import annotations

import json
from pathlib import Path

import h5py

from pose_prep import shard_format


def flip_byte(path: Path, dataset: str, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of `dataset`'s stored data (contiguous datasets only), `offset` bytes in."""
    with h5py.File(path) as f:
        position = f[dataset].id.get_offset() + offset
    flip_at(path, position, mask)


def flip_at(path: Path, position: int, mask: int = 0xFF) -> None:
    """XOR the byte at `position` of the file with `mask`, in place."""
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def flip_text(path: Path, text: str, at: int = 0, mask: int = 0x01, occurrence: int = 0) -> None:
    """XOR byte `at` of the `occurrence`-th copy of `text` (UTF-8) in the file's bytes: a value as
    HDF5 or SQLite stores it (attribute strings, index rows), wherever that is in the file."""
    data = path.read_bytes()
    needle, start = text.encode("utf-8"), -1
    for _ in range(occurrence + 1):
        start = data.index(needle, start + 1)
    flip_at(path, start + at, mask)


def object_header(path: Path, dataset: str) -> range:
    """Byte positions of `dataset`'s object header: its datatype, shape, layout and filter messages."""
    with h5py.File(path) as f:
        info = h5py.h5o.get_info(f[dataset].id)
    return range(info.addr, info.addr + info.hdr.space.total)


def rewrite_value(path: Path, dataset: str, row: int, value) -> None:
    """Store `value` at `row` of `dataset` and recompute the checksums, as a faulty writer would: a
    shard whose checksums all match but whose values a reader cannot use."""
    with h5py.File(path, "r+") as f:
        f[dataset][row] = value
        checksums = json.loads(f.attrs["checksums"])
        checksums[dataset] = shard_format._checksum(f[dataset][...])
        f.attrs["checksums"] = json.dumps(checksums, sort_keys=True)
        f.attrs[shard_format.ATTRIBUTES_CHECKSUM] = shard_format._attributes_checksum(dict(f.attrs.items()))
