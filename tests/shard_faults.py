"""Damage done to real shard files by the tests that check `verify` catches it."""
from __future__ import annotations

from pathlib import Path

import h5py


def flip_byte(path: Path, dataset: str, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of `dataset`'s stored data (contiguous datasets only), `offset` bytes in."""
    with h5py.File(path) as f:
        position = f[dataset].id.get_offset() + offset
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))
