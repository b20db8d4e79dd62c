"""The shard format: the contract between `vsam prep-pose` (writer) and the trainer (reader).

A shard collection is a folder holding

* `shard-NNNNNN.h5`: immutable HDF5 files, each written completely under a temporary name, fsynced
  and renamed, so a reader never sees a partial shard;
* `index.sqlite`: the manifest and the only source of truth for which rows are live. A shard row
  is live when an entry of `files` points at it; rows of changed or deleted images are simply no
  longer pointed at. A shard file that the index does not list is an orphan of a crash and is
  deleted by the next writer.

Nothing is pickled: arrays are plain HDF5 datasets and structured metadata is JSON text.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .atomic import atomic_path
from .keypoints import NUM_JOINTS

SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite"
SHARD_GLOB = "shard-*.h5"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.h5$")
SPLITS = ("train", "val", "test", "none")   # "none": no split given (a drop to predict on)
STATUSES = ("ok", "no_person", "rejected")  # ok and no_person are stored in a shard

# Per-item datasets, in the order they are written and checksummed.
ITEM_DATASETS = ("image_offsets", "image_bytes", "heatmap", "keypoints", "has_pose", "category",
                 "attributes", "split", "path", "sha256", "width", "height")


class ShardFormatError(Exception):
    """A shard or index that this version cannot read, or that is damaged; names the file."""


@dataclass
class Vocabulary:
    """Label names. Attributes may belong to named groups; `exclusive` groups hold exactly one
    true attribute per item (DeepFashion attribute subset), so they also get top-1 metrics."""
    categories: list[str] = field(default_factory=list)
    category_types: list[int] = field(default_factory=list)   # DeepFashion: 1 upper, 2 lower, 3 full
    attributes: list[str] = field(default_factory=list)
    attribute_groups: list[str] = field(default_factory=list)  # group name per attribute ("" = none)
    exclusive_groups: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls(**json.loads(text))

    @property
    def group_names(self) -> list[str]:
        """Groups in order of first appearance."""
        return list(dict.fromkeys(g for g in self.attribute_groups if g))

    def group_indices(self) -> dict[str, list[int]]:
        return {g: [i for i, a in enumerate(self.attribute_groups) if a == g] for g in self.group_names}


@dataclass
class ShardItem:
    image: bytes                  # encoded image (JPEG unless the collection says otherwise)
    heatmap: np.ndarray           # (H, W) uint8, 255 = 1.0
    keypoints: np.ndarray         # (18, 3) float32, pixels of the original image
    has_pose: bool
    category: int                 # index into Vocabulary.categories, -1 unknown
    attributes: np.ndarray        # (A,) int8: 1 true, 0 false, -1 unknown
    split: str                    # one of SPLITS
    path: str                     # relative to --images, POSIX separators
    sha256: str                   # of the source file's bytes
    width: int                    # of the original (EXIF-corrected) image
    height: int


@dataclass
class ShardMetadata:
    """File attributes shared by every shard of a collection (plus per-file ones added on write)."""
    vocabulary: Vocabulary
    heatmap: dict                 # {"size": [H, W], "sigma": s, "joint_groups": {...}, "limbs": true}
    detector: str
    detector_version: str
    image_encoding: dict          # {"format": "jpeg", "max_side": 256, "quality": 90}


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.h5"


def shard_number(path: str | Path) -> int | None:
    match = _SHARD_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


# --- HDF5 shards ---------------------------------------------------------------------------

def _item_arrays(items: list[ShardItem], n_attributes: int) -> dict[str, np.ndarray]:
    sizes = np.array([len(item.image) for item in items], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    attributes = np.stack([np.asarray(i.attributes, np.int8) for i in items]) if n_attributes \
        else np.zeros((len(items), 0), np.int8)
    return {
        "image_offsets": offsets,
        "image_bytes": np.frombuffer(b"".join(item.image for item in items), np.uint8),
        "heatmap": np.stack([np.asarray(item.heatmap, np.uint8) for item in items]),
        "keypoints": np.stack([np.asarray(item.keypoints, np.float32) for item in items]),
        "has_pose": np.array([item.has_pose for item in items], np.uint8),
        "category": np.array([item.category for item in items], np.int32),
        "attributes": attributes,
        "split": np.array([SPLITS.index(item.split) for item in items], np.uint8),
        "path": np.array([item.path for item in items], dtype=object),
        "sha256": np.array([item.sha256 for item in items], dtype="S64"),
        "width": np.array([item.width for item in items], np.int32),
        "height": np.array([item.height for item in items], np.int32),
    }


def _checksum(array: np.ndarray) -> str:
    if array.dtype == object:
        payload = "\0".join(array.tolist()).encode("utf-8")
    else:
        payload = np.ascontiguousarray(array).tobytes()
    return hashlib.sha256(payload).hexdigest()


def write_shard(path: str | Path, items: list[ShardItem], metadata: ShardMetadata) -> None:
    """Write a complete shard atomically: temporary file, fsync, rename, fsync of the folder. The
    temporary file is `.shard-NNNNNN.h5.tmp` (the writer holds the folder's lock), the name
    `remove_orphans` removes after a kill."""
    path = Path(path)
    if not items:
        raise ValueError("a shard holds at least one item")
    for item in items:
        if item.split not in SPLITS:
            raise ValueError(f"{item.path}: split {item.split!r} is not one of {SPLITS}")
        if np.shape(item.keypoints) != (NUM_JOINTS, 3):
            raise ValueError(f"{item.path}: keypoints must be ({NUM_JOINTS}, 3)")
    arrays = _item_arrays(items, len(metadata.vocabulary.attributes))
    with atomic_path(path, durable=True, single_writer=True) as temporary, h5py.File(temporary, "w") as f:
        for name in ITEM_DATASETS:
            array = arrays[name]
            if name == "path":
                f.create_dataset(name, data=array, dtype=h5py.string_dtype("utf-8"))
            elif name == "heatmap":
                # Heatmaps are mostly zeros: lzf shrinks them ~5x and decodes fast.
                f.create_dataset(name, data=array, compression="lzf", chunks=(min(len(items), 64),) + array.shape[1:])
            else:
                f.create_dataset(name, data=array)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["n_items"] = len(items)
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["vocabulary"] = metadata.vocabulary.to_json()
        f.attrs["heatmap"] = json.dumps(metadata.heatmap, sort_keys=True)
        f.attrs["detector"] = metadata.detector
        f.attrs["detector_version"] = metadata.detector_version
        f.attrs["image_encoding"] = json.dumps(metadata.image_encoding, sort_keys=True)
        f.attrs["splits"] = json.dumps(SPLITS)
        f.attrs["checksums"] = json.dumps({name: _checksum(arrays[name]) for name in ITEM_DATASETS}, sort_keys=True)


class Shard:
    """A read-only shard. Opens the HDF5 file on first use, so it can be built in one process and
    used in another (DataLoader workers must each open their own handle)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: h5py.File | None = None

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            try:
                file = h5py.File(self.path, "r")
            except OSError as error:
                raise ShardFormatError(f"{self.path}: not a readable HDF5 shard ({error})") from None
            try:
                check_schema(file.attrs.get("schema_version"), self.path)
            except ShardFormatError:
                file.close()      # and keep refusing it: only a checked file is kept open
                raise
            self._file = file
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.file.attrs["n_items"])

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_json(self.file.attrs["vocabulary"])

    @property
    def heatmap_params(self) -> dict:
        return json.loads(self.file.attrs["heatmap"])

    def attrs(self) -> dict:
        return {key: _attr(value) for key, value in self.file.attrs.items()}

    def read(self, names: tuple[str, ...] = ITEM_DATASETS) -> dict[str, np.ndarray]:
        """Whole datasets into memory: one read per dataset is the fast way through a shard."""
        return {name: _read_dataset(self.file[name]) for name in names}

    def image(self, row: int, offsets: np.ndarray | None = None) -> bytes:
        offsets = self.file["image_offsets"] if offsets is None else offsets
        start, end = int(offsets[row]), int(offsets[row + 1])
        return self.file["image_bytes"][start:end].tobytes()

    def item(self, row: int) -> ShardItem:
        """One row back as a ShardItem (prep-pose copies rows when only labels change)."""
        f = self.file
        if not 0 <= row < len(self):
            raise IndexError(f"{self.path}: row {row} is outside 0..{len(self) - 1}")
        return ShardItem(
            image=self.image(row), heatmap=f["heatmap"][row], keypoints=f["keypoints"][row],
            has_pose=bool(f["has_pose"][row]), category=int(f["category"][row]),
            attributes=f["attributes"][row], split=SPLITS[int(f["split"][row])],
            path=f["path"].asstr()[row],
            sha256=f["sha256"][row].decode("ascii"), width=int(f["width"][row]), height=int(f["height"][row]))


def _read_dataset(dataset: h5py.Dataset) -> np.ndarray:
    """A whole dataset; variable-length strings (the paths) as an object array of str."""
    return dataset.asstr()[...] if dataset.dtype.kind == "O" else dataset[...]


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_schema(version, where: str | Path) -> None:
    if version is None:
        raise ShardFormatError(f"{where}: no schema_version attribute: not a vsam shard")
    if int(version) != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{where}: shard schema version {int(version)} is not supported by this vsam "
            f"(it reads version {SCHEMA_VERSION}); rebuild the shards with `vsam prep-pose` of this version")


def verify_shard(path: str | Path) -> list[str]:
    """Problems found in one shard file (empty when it is sound): schema, datasets, checksums."""
    problems = []
    try:
        with h5py.File(path, "r") as f:
            try:
                check_schema(f.attrs.get("schema_version"), path)
            except ShardFormatError as error:
                return [str(error)]
            expected = json.loads(_attr(f.attrs["checksums"]))
            for name in ITEM_DATASETS:
                if name not in f:
                    problems.append(f"{path}: dataset {name} is missing")
                    continue
                if _checksum(_read_dataset(f[name])) != expected.get(name):
                    problems.append(f"{path}: dataset {name} does not match its checksum")
    except (OSError, KeyError, ValueError) as error:
        problems.append(f"{path}: unreadable ({error})")
    return problems


# --- the index -----------------------------------------------------------------------------

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,          -- the NNNNNN of shard-NNNNNN.h5
    n_items INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,           -- relative to --images, POSIX separators
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    status TEXT NOT NULL,            -- ok | no_person | rejected
    reason TEXT,                     -- why it was rejected
    shard_id INTEGER REFERENCES shards(id),
    row INTEGER,
    split TEXT,
    labels TEXT,                     -- fingerprint of the labels it was written with
    updated TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_shard ON files(shard_id, row);
"""


@dataclass
class FileRecord:
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str
    reason: str | None = None
    shard_id: int | None = None
    row: int | None = None
    split: str | None = None
    labels: str | None = None


def index_path(folder: str | Path) -> Path:
    return Path(folder) / INDEX_NAME


@contextmanager
def open_index(folder: str | Path, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """The collection's index. Writers get one transaction per `with connection:` block."""
    path = index_path(folder)
    if readonly and not path.exists():
        raise ShardFormatError(f"{path}: no shard index here (is {folder} a `vsam prep-pose` output folder?)")
    try:
        # A URI, so that "?mode=ro" applies; as_uri() escapes '#', '?' and '%' in folder names.
        connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True) if readonly \
            else sqlite3.connect(path)
    except sqlite3.Error as error:
        raise ShardFormatError(f"{path}: cannot open the shard index ({error})") from None
    try:
        try:
            if not readonly:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.executescript(_INDEX_SCHEMA)
                if get_meta(connection, "schema_version") is None:
                    with connection:
                        set_meta(connection, "schema_version", str(SCHEMA_VERSION))
            version = get_meta(connection, "schema_version")
        except sqlite3.DatabaseError as error:
            raise ShardFormatError(f"{path}: not a readable shard index ({error})") from None
        check_schema(version, path)
        yield connection
    finally:
        connection.close()


def get_meta(connection: sqlite3.Connection, key: str) -> str | None:
    row = connection.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(connection: sqlite3.Connection, key: str, value: str) -> None:
    connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def next_shard_number(folder: str | Path, connection: sqlite3.Connection) -> int:
    """One past every number used so far, by the index or by any file (orphans included)."""
    in_index = connection.execute("SELECT COALESCE(MAX(id), 0) FROM shards").fetchone()[0]
    on_disk = [shard_number(p) or 0 for p in Path(folder).glob(SHARD_GLOB)]
    return max([in_index, *on_disk]) + 1


def commit_shard(connection: sqlite3.Connection, number: int, records: list[FileRecord]) -> None:
    """Register a shard already renamed into place and point its files at it, in one transaction.
    Call only after `write_shard` returned: the index must never list a file that is not complete."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with connection:
        connection.execute("INSERT INTO shards VALUES (?, ?, ?)", (number, len(records), now))
        connection.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.path, r.size, r.mtime_ns, r.sha256, r.status, r.reason, number, row, r.split, r.labels, now)
             for row, r in enumerate(records)])


def record_files(connection: sqlite3.Connection, records: list[FileRecord]) -> None:
    """Insert or update entries that point at no shard (rejected files), in one transaction."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with connection:
        connection.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.path, r.size, r.mtime_ns, r.sha256, r.status, r.reason, r.shard_id, r.row, r.split, r.labels, now)
             for r in records])


def file_records(connection: sqlite3.Connection) -> dict[str, FileRecord]:
    rows = connection.execute(
        "SELECT path, size, mtime_ns, sha256, status, reason, shard_id, row, split, labels FROM files")
    return {r[0]: FileRecord(*r) for r in rows}


def live_rows(folder: str | Path, splits: tuple[str, ...] | None = None) -> dict[Path, np.ndarray]:
    """Shard file → sorted live row numbers, optionally only items of the given splits."""
    query = "SELECT shard_id, row FROM files WHERE shard_id IS NOT NULL"
    args: tuple = ()
    if splits:
        query += f" AND split IN ({','.join('?' * len(splits))})"
        args = tuple(splits)
    by_shard: dict[int, list[int]] = {}
    with open_index(folder, readonly=True) as connection:
        for shard_id, row in connection.execute(query + " ORDER BY shard_id, row", args):
            by_shard.setdefault(shard_id, []).append(row)
    return {Path(folder) / shard_name(n): np.array(rows, np.int64) for n, rows in by_shard.items()}


def collection_metadata(folder: str | Path) -> dict:
    """The index's meta table (vocabulary, heatmap parameters, detector) as a dict of strings."""
    with open_index(folder, readonly=True) as connection:
        return dict(connection.execute("SELECT key, value FROM meta"))


def remove_orphans(folder: str | Path, connection: sqlite3.Connection) -> list[Path]:
    """Delete temporary files and shard files the index does not list (left by a crash between
    rename and commit), and shards no live row points at any more. Returns what was removed."""
    folder = Path(folder)
    removed = [p for p in folder.glob(f".{SHARD_GLOB}.tmp")]
    known = {n for (n,) in connection.execute("SELECT id FROM shards")}
    removed += [p for p in folder.glob(SHARD_GLOB) if shard_number(p) not in known]
    dead = [n for (n,) in connection.execute(
        "SELECT id FROM shards WHERE id NOT IN (SELECT DISTINCT shard_id FROM files WHERE shard_id IS NOT NULL)")]
    if dead:
        # Forget first, then delete: a crash in between leaves an orphan file, removed next time.
        with connection:
            connection.executemany("DELETE FROM shards WHERE id=?", [(n,) for n in dead])
        removed += [folder / shard_name(n) for n in dead]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# --- collection queries: `vsam shards info | list | verify`, and what prep-pose adds --------
# (Added for prep-pose: `Shard.item` above, `retire_files`, `write_collection_metadata`,
# `collection_vocabulary`, `live_items`, `collection_info`, `verify_collection`.)

def retire_files(connection: sqlite3.Connection, paths: list[str]) -> None:
    """Forget files (deleted from the catalog), in one transaction; their rows stop being live."""
    with connection:
        connection.executemany("DELETE FROM files WHERE path=?", [(p,) for p in paths])


def write_collection_metadata(connection: sqlite3.Connection, metadata: ShardMetadata,
                              extra: dict[str, str] | None = None) -> None:
    """Record the collection's vocabulary, heatmap parameters, detector and image encoding in the
    index meta table (the same JSON text as the shards' file attributes), in one transaction."""
    values = {"vocabulary": metadata.vocabulary.to_json(),
              "heatmap": json.dumps(metadata.heatmap, sort_keys=True),
              "detector": metadata.detector, "detector_version": metadata.detector_version,
              "image_encoding": json.dumps(metadata.image_encoding, sort_keys=True), **(extra or {})}
    with connection:
        for key, value in values.items():
            set_meta(connection, key, value)


def collection_vocabulary(folder: str | Path) -> Vocabulary:
    """The label vocabulary of a collection (empty when it was built without labels)."""
    text = collection_metadata(folder).get("vocabulary")
    return Vocabulary.from_json(text) if text else Vocabulary()


_LIVE_QUERY = ("SELECT path, sha256, split, status, shard_id, row FROM files "
               "WHERE shard_id IS NOT NULL ORDER BY shard_id, row")


def live_items(folder: str | Path) -> Iterator[dict]:
    """One dict per live item, in shard order: path, sha256, split, has_pose, shard (file name), row."""
    with open_index(folder, readonly=True) as connection:
        for path, sha256, split, status, shard_id, row in connection.execute(_LIVE_QUERY):
            yield {"path": path, "sha256": sha256, "split": split, "has_pose": status == "ok",
                   "shard": shard_name(shard_id), "row": row}


def count_live(connection: sqlite3.Connection) -> int:
    """Items that a shard row holds (ok and no_person)."""
    return connection.execute("SELECT COUNT(*) FROM files WHERE shard_id IS NOT NULL").fetchone()[0]


def rejected_files(connection: sqlite3.Connection) -> list[dict]:
    """[{path, reason}] of the files rejected and not stored, sorted by path."""
    return [{"path": p, "reason": r} for p, r in connection.execute(
        "SELECT path, reason FROM files WHERE status='rejected' ORDER BY path")]


def collection_info(folder: str | Path) -> dict:
    """Totals of a collection from its index: items per split, with and without pose, the
    vocabularies, detector, heatmap and image parameters, and the rejected files with reasons."""
    folder = Path(folder)
    with open_index(folder, readonly=True) as connection:
        meta = dict(connection.execute("SELECT key, value FROM meta"))
        splits = dict(connection.execute(
            "SELECT split, COUNT(*) FROM files WHERE shard_id IS NOT NULL GROUP BY split"))
        statuses = dict(connection.execute(
            "SELECT status, COUNT(*) FROM files WHERE shard_id IS NOT NULL GROUP BY status"))
        rejected = rejected_files(connection)
        shard_ids = [n for (n,) in connection.execute("SELECT id FROM shards ORDER BY id")]
    vocabulary = Vocabulary.from_json(meta["vocabulary"]) if "vocabulary" in meta else Vocabulary()
    return {
        "folder": str(folder),
        "schema_version": int(meta["schema_version"]),
        "items": sum(splits.values()),
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "with_pose": statuses.get("ok", 0),
        "without_pose": statuses.get("no_person", 0),
        "shards": len(shard_ids),
        "bytes": sum((folder / shard_name(n)).stat().st_size for n in shard_ids
                     if (folder / shard_name(n)).exists()),
        "detector": meta.get("detector"),
        "detector_version": meta.get("detector_version"),
        "heatmap": json.loads(meta["heatmap"]) if "heatmap" in meta else None,
        "image_encoding": json.loads(meta["image_encoding"]) if "image_encoding" in meta else None,
        "labels": meta.get("labels_source"),
        "vocabulary": asdict(vocabulary),
        "rejected": rejected,
    }


def verify_collection(folder: str | Path, check_leftovers: bool = True) -> list[str]:
    """Every problem of a collection, each naming the file: the index's own integrity, every shard's
    schema and dataset checksums, and the index against the shards (each live row exists and holds the
    path, sha256 and split that the index says). With `check_leftovers`, temporary and unlisted
    shard files (left by an interrupted run, removed by the next one) are problems too."""
    folder = Path(folder)
    problems: list[str] = []
    try:
        with open_index(folder, readonly=True) as connection:
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                problems.append(f"{index_path(folder)}: SQLite integrity check failed ({integrity})")
            meta = dict(connection.execute("SELECT key, value FROM meta"))
            shards = dict(connection.execute("SELECT id, n_items FROM shards"))
            files = connection.execute(
                "SELECT path, sha256, status, shard_id, row, split FROM files").fetchall()
    except ShardFormatError as error:     # names the index already
        return [str(error)]
    except sqlite3.DatabaseError as error:
        return [f"{index_path(folder)}: {error}"]

    by_shard: dict[int, list[tuple]] = {}
    for path, sha256, status, shard_id, row, split in files:
        if status not in STATUSES:
            problems.append(f"{index_path(folder)}: {path}: unknown status {status!r}")
        elif (status == "rejected") != (shard_id is None):
            problems.append(f"{index_path(folder)}: {path}: status {status} but shard {shard_id}")
        if shard_id is not None:
            by_shard.setdefault(shard_id, []).append((path, sha256, status, row, split))

    for shard_id in sorted(set(shards) | set(by_shard)):
        path = folder / shard_name(shard_id)
        if shard_id not in shards:
            problems.append(f"{path}: live rows point at shard {shard_id}, which the index does not list")
            continue
        if not path.exists():
            problems.append(f"{path}: listed in the index but missing")
            continue
        shard_problems = verify_shard(path)
        problems += shard_problems
        if not shard_problems:
            problems += _check_rows(path, shards[shard_id], by_shard.get(shard_id, []), meta.get("vocabulary"))

    if check_leftovers:
        problems += [f"{p}: temporary file of an interrupted run (the next prep-pose run removes it)"
                     for p in sorted(folder.glob(f".{SHARD_GLOB}.tmp"))]
        problems += [f"{p}: shard file not listed in the index (orphan of an interrupted run)"
                     for p in sorted(folder.glob(SHARD_GLOB)) if shard_number(p) not in shards]
    return problems


def _check_rows(path: Path, n_items: int, rows: list[tuple], vocabulary: str | None) -> list[str]:
    with Shard(path) as shard:
        if len(shard) != n_items:
            return [f"{path}: holds {len(shard)} items, the index says {n_items}"]
        if vocabulary is not None and \
                Vocabulary.from_json(shard.file.attrs["vocabulary"]) != Vocabulary.from_json(vocabulary):
            return [f"{path}: written with another label vocabulary than the collection's "
                    "(an interrupted relabelling run? rerun prep-pose)"]
        data = shard.read(("path", "sha256", "split", "has_pose"))
    problems = []
    for item_path, sha256, status, row, split in rows:
        if row is None or not 0 <= row < n_items:
            problems.append(f"{path}: index row {row} of {item_path} is outside 0..{n_items - 1}")
            continue
        stored = (data["path"][row], data["sha256"][row].decode("ascii"), SPLITS[data["split"][row]],
                  bool(data["has_pose"][row]))
        if stored != (item_path, sha256, split, status == "ok"):
            problems.append(f"{path}: row {row} holds {stored[:3]} (pose {stored[3]}), the index says "
                            f"{(item_path, sha256, split)} ({status})")
    return problems
