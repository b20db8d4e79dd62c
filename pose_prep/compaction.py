"""Compaction: a shard whose live share falls to a threshold is rewritten, so that shards shrink.

Rows of deleted, changed or relabelled images stay in their shard file (shards are immutable); only the
index stops pointing at them. A shard in which at most `threshold` of the rows are live (default
`DEFAULT_THRESHOLD`, 50%) is a *candidate*: its live rows, read and checked whole (`Shard.item`), are
written unchanged (the same bytes, labels, keypoints and heatmap, under the metadata the source shard
was written with) into new shards of `shard_size` rows, each written atomically and committed in one
index transaction that registers it and points its rows at it (`shard_format.commit_shard`). The
sources are then dead and leave through `remove_orphans`: into `retired/`, deleted once no reader
holds them (pose_prep.leases). A kill at any instant leaves every row live exactly once: in its old
shard until the transaction that moves it commits, in the new one after.

Why 50%: a row is moved only out of a shard that has lost more rows than it keeps, so compaction
writes fewer rows than the runs before it retired (at most one row copied per row retired), and no
shard in the collection holds more dead bytes than live ones.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from .shard_format import (FileRecord, Shard, ShardFormatError, ShardMetadata, _check_index, _table_rows, commit_shard,
                           file_records, next_shard_number, remove_orphans, shard_name, write_shard)

DEFAULT_THRESHOLD = 0.5


@dataclass
class Compaction:
    """What one compaction did."""
    shards: list[str] = field(default_factory=list)       # rewritten (now dead) shards
    rows: int = 0                                         # live rows moved
    new_shards: list[str] = field(default_factory=list)
    bytes_before: int = 0                                 # of the rewritten shards
    bytes_after: int = 0                                  # of the new ones


def candidates(connection: sqlite3.Connection, threshold: float) -> dict[int, int]:
    """Shard id → live rows, of the shards whose live share is at most `threshold` (and above 0: a shard
    without live rows is dead, for `remove_orphans`). One grouped query: quick on an unchanged run."""
    if threshold <= 0:
        return {}
    live = dict(connection.execute(
        "SELECT shard_id, COUNT(*) FROM files WHERE shard_id IS NOT NULL GROUP BY shard_id").fetchall())
    sizes = dict(connection.execute("SELECT id, n_items FROM shards").fetchall())
    return {shard_id: count for shard_id, count in live.items()
            if shard_id in sizes and count <= threshold * sizes[shard_id]}


def compact(folder: str | Path, connection: sqlite3.Connection, shard_size: int | None = None,
            threshold: float = DEFAULT_THRESHOLD) -> Compaction:
    """Rewrite the candidate shards of the collection in `folder` (the caller holds its prep lock) into
    shards of `shard_size` rows (None: as many as the largest shard holds)."""
    folder, done = Path(folder), Compaction()
    if not candidates(connection, threshold):
        return done
    # Moving rows must rest on what the index positively says (as deleting a shard does): checked rows only.
    _check_index(connection)
    sizes = {shard_id: n_items for shard_id, n_items, _ in _table_rows(connection, "shards")}
    shard_size = shard_size or max(sizes.values())
    rows: dict[int, list[FileRecord]] = {}
    for record in file_records(connection).values():
        if record.shard_id is not None:
            rows.setdefault(record.shard_id, []).append(record)
    chosen = sorted(n for n, records in rows.items() if n in sizes and len(records) <= threshold * sizes[n])
    writer = _Writer(folder, connection, shard_size, done)
    for shard_id in chosen:
        path = folder / shard_name(shard_id)
        done.shards.append(path.name)
        done.bytes_before += path.stat().st_size
        with Shard(path) as shard:
            metadata = _metadata(shard)
            for record in sorted(rows[shard_id], key=lambda r: r.row):
                item = shard.item(record.row)
                if (item.path, item.sha256) != (record.path, record.sha256):
                    raise ShardFormatError(f"{path}: row {record.row} holds {item.path}, the index says {record.path} "
                                           "(vsam shards verify names every such row): nothing was moved from it")
                writer.add(metadata, item, record)
    writer.flush()
    remove_orphans(folder, connection)
    return done


def _metadata(shard: Shard) -> ShardMetadata:
    """The metadata the shard was written with: its rows keep exactly what they were written under."""
    attrs = shard.attrs()
    return ShardMetadata(vocabulary=shard.vocabulary, heatmap=shard.heatmap_params,
                         detector=attrs["detector"], detector_version=attrs["detector_version"],
                         image_encoding=json.loads(attrs["image_encoding"]))


class _Writer:
    """Rows into new shards of `shard_size`; a new shard starts when the metadata changes."""

    def __init__(self, folder: Path, connection: sqlite3.Connection, shard_size: int, done: Compaction):
        self.folder, self.connection, self.shard_size, self.done = folder, connection, shard_size, done
        self.metadata: ShardMetadata | None = None
        self.items, self.records = [], []

    def add(self, metadata: ShardMetadata, item, record: FileRecord) -> None:
        if self.metadata is not None and metadata != self.metadata:
            self.flush()
        self.metadata = metadata
        self.items.append(item)
        self.records.append(record)
        if len(self.items) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        number = next_shard_number(self.folder, self.connection)
        path = self.folder / shard_name(number)
        write_shard(path, self.items, self.metadata)
        commit_shard(self.connection, number, self.records)    # registers it and moves the rows, at once
        self.done.rows += len(self.items)
        self.done.new_shards.append(path.name)
        self.done.bytes_after += path.stat().st_size
        self.items, self.records = [], []
