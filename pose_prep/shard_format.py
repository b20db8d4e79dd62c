"""The shard format: the contract between `vsam prep-pose` (writer) and the trainer (reader).

A shard collection is a folder holding

* `shard-NNNNNN.h5`: immutable HDF5 files, each written completely under a temporary name, fsynced
  and renamed, so a reader never sees a partial shard;
* `index.sqlite`: the manifest and the only source of truth for which rows are live. A shard row
  is live when an entry of `files` points at it; rows of changed or deleted images are simply no
  longer pointed at. A shard file that the index does not list is an orphan of a crash and is
  deleted by the next writer.

Nothing is pickled: arrays are plain HDF5 datasets and structured metadata is JSON text.

Everything a reader takes from these files is covered by a checksum, so that a damaged byte is
named rather than trained on: each shard dataset (sha256 in the `checksums` attribute), the file
attributes together (`attributes_checksum`) and each row of the index (its `checksum` column).
Readers check what they read (`Shard.read`, `Shard.item`, the index queries below) and raise
ShardFormatError naming the file; `verify_collection` checks everything.

A change of either file's layout bumps SCHEMA_VERSION; readers and writers refuse any other version
with `check_schema`'s message (rebuild with prep-pose into a new folder). Version 2 added the
attribute and index-row checksums.
"""
from __future__ import annotations

import hashlib
import io
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

from . import leases
from .atomic import atomic_path
from .keypoints import NUM_JOINTS

SCHEMA_VERSION = 2
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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


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

    @classmethod
    def parse(cls, text, where: str | Path) -> "Vocabulary":
        """`from_json` for text read from a file: anything but a vocabulary is a ShardFormatError."""
        try:
            vocabulary = cls.from_json(text)
        except (TypeError, ValueError) as error:
            raise ShardFormatError(f"{where}: the label vocabulary does not parse ({_one_line(error)})") from None
        lists = (vocabulary.categories, vocabulary.category_types, vocabulary.attributes, vocabulary.attribute_groups)
        if not all(isinstance(values, list) for values in lists) or \
                not all(isinstance(v, str) for v in vocabulary.categories + vocabulary.attributes
                        + vocabulary.attribute_groups) or \
                not all(isinstance(v, int) for v in vocabulary.category_types):
            raise ShardFormatError(f"{where}: the label vocabulary holds values of the wrong type")
        return vocabulary

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
        payload = np.ascontiguousarray(array)     # hashed through the buffer protocol: no copy
    return hashlib.sha256(payload).hexdigest()


ATTRIBUTES_CHECKSUM = "attributes_checksum"
_INT_ATTRIBUTES = ("schema_version", "n_items")
_TEXT_ATTRIBUTES = ("created", "vocabulary", "heatmap", "detector", "detector_version", "image_encoding", "splits",
                    "checksums")


def _attributes_checksum(attrs: dict) -> str:
    """sha256 of every file attribute but this one, names and types included: a damaged byte in a
    value (vocabulary, heatmap parameters, detector, the dataset checksums...), a name or a type
    changes it."""
    canonical = {name: [type(value).__name__, value.item() if isinstance(value, np.generic) else value]
                 for name, value in attrs.items() if name != ATTRIBUTES_CHECKSUM}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()


def _label_problem(arrays: dict[str, np.ndarray], vocabulary: Vocabulary) -> str | None:
    """The first label value out of the vocabulary's range, as "row R: ..." (None when all fit)."""
    if "category" in arrays:
        category, n = arrays["category"], len(vocabulary.categories)
        bad = np.flatnonzero((category < -1) | (category >= n))
        if len(bad):
            return (f"row {bad[0]}: category {category[bad[0]]} is outside the vocabulary's {n} categories "
                    + (f"(0..{n - 1}, -1 unknown)" if n else "(only -1, unknown)"))
    if "attributes" in arrays:
        attributes = arrays["attributes"]
        bad = np.argwhere((attributes < -1) | (attributes > 1))
        if len(bad):
            row, column = bad[0]
            return f"row {row}: attribute {column} is {attributes[row, column]}, not 1, 0 or -1 (unknown)"
    return None


def write_shard(path: str | Path, items: list[ShardItem], metadata: ShardMetadata) -> None:
    """Write a complete shard atomically: temporary file, fsync, rename, fsync of the folder.

    The HDF5 file is built in memory and written in one go: on a full disk, HDF5 writing to the file
    itself fails while it flushes its metadata (a RuntimeError, then a traceback on stderr for every
    object it frees), where a plain write raises ENOSPC, which atomic_path reports in one line."""
    path = Path(path)
    if not items:
        raise ValueError("a shard holds at least one item")
    for item in items:
        if item.split not in SPLITS:
            raise ValueError(f"{item.path}: split {item.split!r} is not one of {SPLITS}")
        if np.shape(item.keypoints) != (NUM_JOINTS, 3):
            raise ValueError(f"{item.path}: keypoints must be ({NUM_JOINTS}, 3)")
    arrays = _item_arrays(items, len(metadata.vocabulary.attributes))
    problem = _label_problem(arrays, metadata.vocabulary)
    if problem:
        raise ValueError(f"{path}: {problem}")
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        for name in ITEM_DATASETS:
            array = arrays[name]
            if name == "path":
                f.create_dataset(name, data=array, dtype=h5py.string_dtype("utf-8"))
            elif name == "heatmap":
                # Heatmaps are mostly zeros: lzf shrinks them ~5x and decodes fast. Fletcher-32 per chunk,
                # checked before decompression: a damaged LZF stream can decode short and leave the rest of
                # the chunk to whatever the buffer held, which no checksum of the decoded values can pin down.
                f.create_dataset(name, data=array, compression="lzf", fletcher32=True,
                                 chunks=(min(len(items), 64),) + array.shape[1:])
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
        # Of the attributes as they read back (types included), so that a reader computes the same.
        f.attrs[ATTRIBUTES_CHECKSUM] = _attributes_checksum(dict(f.attrs.items()))
    with atomic_path(path, durable=True, single_writer=True) as temporary:
        temporary.write_bytes(image.getbuffer())


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Any error of the HDF5 library reading `what` (damaged bytes give OSError, KeyError, TypeError,
    ValueError, RuntimeError... depending on where they are) as one ShardFormatError naming the file."""
    try:
        yield
    except ShardFormatError:
        raise
    except Exception as error:
        raise ShardFormatError(f"{path}: {what} unreadable ({_one_line(error)})") from None


@dataclass
class _Header:
    """A shard's file attributes, checked (types, checksum) and parsed."""
    attrs: dict
    n_items: int
    vocabulary: Vocabulary
    heatmap: dict
    checksums: dict
    image_bytes: int = 0          # length of the image_bytes dataset


def _read_header(file: h5py.File, path: Path) -> _Header:
    with _reading(path, "file attributes"):
        attrs = {name: file.attrs[name] for name in file.attrs}
    check_schema(attrs.get("schema_version"), path)
    for name in _INT_ATTRIBUTES + _TEXT_ATTRIBUTES + (ATTRIBUTES_CHECKSUM,):
        expected = np.integer if name in _INT_ATTRIBUTES else str
        if not isinstance(attrs.get(name), expected):
            raise ShardFormatError(f"{path}: attribute {name} is missing or not a "
                                   f"{'number' if expected is np.integer else 'text'}")
    if _attributes_checksum(attrs) != attrs[ATTRIBUTES_CHECKSUM]:
        raise ShardFormatError(f"{path}: file attributes do not match their checksum")
    try:
        heatmap, checksums = json.loads(attrs["heatmap"]), json.loads(attrs["checksums"])
        assert isinstance(heatmap, dict) and isinstance(checksums, dict)
    except (ValueError, AssertionError):
        raise ShardFormatError(f"{path}: the heatmap or checksums attribute does not parse") from None
    return _Header({name: _attr(value) for name, value in attrs.items()}, int(attrs["n_items"]),
                   Vocabulary.parse(attrs["vocabulary"], path), heatmap, checksums)


def _expected_layout(header: _Header) -> dict[str, tuple[np.dtype, tuple | None]]:
    """dtype and shape of each dataset (None: checked by `_check_layout` itself)."""
    n, size = header.n_items, header.heatmap.get("size")
    return {
        "image_offsets": (np.dtype("<i8"), (n + 1,)), "image_bytes": (np.dtype("u1"), None),
        "heatmap": (np.dtype("u1"), (n, *size) if isinstance(size, list) and len(size) == 2 else None),
        "keypoints": (np.dtype("<f4"), (n, NUM_JOINTS, 3)), "has_pose": (np.dtype("u1"), (n,)),
        "category": (np.dtype("<i4"), (n,)), "attributes": (np.dtype("i1"), (n, len(header.vocabulary.attributes))),
        "split": (np.dtype("u1"), (n,)), "path": (None, (n,)), "sha256": (np.dtype("S64"), (n,)),
        "width": (np.dtype("<i4"), (n,)), "height": (np.dtype("<i4"), (n,)),
    }


def _check_layout(file: h5py.File, header: _Header, path: Path) -> None:
    """Every dataset there, with the type and shape the attributes imply, before anything is read (a
    damaged type would read different values from intact bytes; a damaged shape, a huge allocation)."""
    for name, (dtype, shape) in _expected_layout(header).items():
        with _reading(path, f"dataset {name}"):
            if name not in file:
                raise ShardFormatError(f"{path}: dataset {name} is missing")
            dataset = file[name]
            actual_dtype, actual_shape = dataset.dtype, dataset.shape
            if name == "image_bytes":
                contiguous = dataset.chunks is None and dataset.compression is None
                storage = dataset.id.get_storage_size()
            elif name == "heatmap" and not (dataset.compression == "lzf" and dataset.fletcher32):
                # lzf without Fletcher-32: written by an early build of version 2 (before heatmap chunks had
                # checksums), which carries the same schema_version; a rerun into the same folder keeps it.
                raise ShardFormatError(f"{path}: dataset heatmap is not stored with lzf and Fletcher-32 "
                                       f"(filters {dataset.compression}, fletcher32={dataset.fletcher32}): written "
                                       "by an early build of schema version 2, or damaged; rebuild the shards with "
                                       "`vsam prep-pose` of this version into a new --out folder")
            elif name == "heatmap" and shape is None:
                shape = (header.n_items, *actual_shape[1:]) if len(actual_shape) == 3 else ("n", "h", "w")
            string = h5py.check_string_dtype(actual_dtype) if dtype is None else None
        if (dtype is None and (string is None or string.encoding != "utf-8" or string.length is not None)) or \
                (dtype is not None and actual_dtype != dtype) or actual_shape != shape and shape is not None:
            raise ShardFormatError(f"{path}: dataset {name} is {actual_dtype} {actual_shape}, expected "
                                   f"{dtype or 'UTF-8 text'} {shape or ''}".rstrip())
        if name == "image_bytes":
            if len(actual_shape) != 1 or not contiguous or storage != actual_shape[0]:
                raise ShardFormatError(f"{path}: dataset image_bytes is {actual_shape}, stored in {storage} bytes")
            header.image_bytes = actual_shape[0]


def _value_problem(name: str, array: np.ndarray, header: _Header) -> str | None:
    """Values a reader could not use though their checksum matches (a foreign or faulty writer)."""
    if name in ("category", "attributes"):
        return _label_problem({name: array}, header.vocabulary)
    if name == "image_offsets":
        if array[0] != 0 or array[-1] != header.image_bytes or np.any(np.diff(array) < 0):
            return f"image_offsets do not cut the {header.image_bytes} image bytes into items"
    limits = {"split": len(SPLITS) - 1, "has_pose": 1}
    if name in limits:
        bad = np.flatnonzero(array > limits[name])
        if len(bad):
            return f"row {bad[0]}: {name} is {array[bad[0]]} (at most {limits[name]})"
    if name in ("width", "height"):
        bad = np.flatnonzero(array <= 0)
        if len(bad):
            return f"row {bad[0]}: {name} is {array[bad[0]]}"
    if name == "sha256":
        digits = array.view(np.uint8).reshape(len(array), -1)
        bad = np.flatnonzero(~np.isin(digits, np.frombuffer(b"0123456789abcdef", np.uint8)).all(axis=1))
        if len(bad):
            return f"row {bad[0]}: sha256 is not 64 hexadecimal digits"
    return None


class Shard:
    """A read-only shard. Opens the HDF5 file on first use, so it can be built in one process and
    used in another (DataLoader workers must each open their own handle).

    Opening checks the file attributes against their checksum and every dataset's type and shape;
    `read` checks each dataset it reads against its checksum and its values (labels within the
    vocabulary, offsets, splits...); `item` checks the whole shard once. Damage is a ShardFormatError
    naming the file (and the row, for a value)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._header: _Header | None = None
        self._data: dict[str, np.ndarray] | None = None   # every dataset, read once and checked (for `item`)

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            with _reading(self.path, "HDF5 file"):
                file = _open_hdf5(self.path)
            try:
                header = _read_header(file, self.path)
                _check_layout(file, header, self.path)
            except BaseException:
                file.close()      # and keep refusing it: only a checked file is kept open
                raise
            self._file, self._header = file, header
        return self._file

    @property
    def header(self) -> _Header:
        self.file
        return self._header

    def close(self) -> None:
        self._data = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.header.n_items

    @property
    def vocabulary(self) -> Vocabulary:
        return self.header.vocabulary

    @property
    def heatmap_params(self) -> dict:
        return self.header.heatmap

    def attrs(self) -> dict:
        return dict(self.header.attrs)

    def read(self, names: tuple[str, ...] = ITEM_DATASETS) -> dict[str, np.ndarray]:
        """Whole datasets into memory (one read per dataset is the fast way through a shard), each
        checked against its checksum and for values a reader could not use."""
        header, data = self.header, {}
        for name in names:
            with _reading(self.path, f"dataset {name}"):
                array = _read_dataset(self.file[name])
            if _checksum(array) != header.checksums.get(name):
                raise ShardFormatError(f"{self.path}: dataset {name} does not match its checksum")
            problem = _value_problem(name, array, header)
            if problem:
                raise ShardFormatError(f"{self.path}: {problem}")
            data[name] = array
        return data

    def image(self, row: int, offsets: np.ndarray | None = None) -> bytes:
        """One item's encoded image. Read alone, its bytes are not checked against the checksum (that
        takes the whole dataset: `read`, `item`, `verify_shard`); a damaged JPEG fails to decode."""
        offsets = self.read(("image_offsets",))["image_offsets"] if offsets is None else offsets
        start, end = int(offsets[row]), int(offsets[row + 1])
        with _reading(self.path, f"image of row {row}"):
            return self.file["image_bytes"][start:end].tobytes()

    def item(self, row: int) -> ShardItem:
        """One row back as a ShardItem (prep-pose copies rows when only labels change, and compaction
        moves them). The first call reads and checks every dataset of the shard, so that a copy never
        carries damage forward under a fresh checksum, and keeps them until `close`: each row is then
        sliced from memory (one HDF5 read per row and dataset cost ~4 ms a row, 80% of a restore)."""
        if not 0 <= row < len(self):
            raise IndexError(f"{self.path}: row {row} is outside 0..{len(self) - 1}")
        if self._data is None:
            self._data = self.read()
        d = self._data
        start, end = int(d["image_offsets"][row]), int(d["image_offsets"][row + 1])
        return ShardItem(
            image=d["image_bytes"][start:end].tobytes(), heatmap=d["heatmap"][row], keypoints=d["keypoints"][row],
            has_pose=bool(d["has_pose"][row]), category=int(d["category"][row]), attributes=d["attributes"][row],
            split=SPLITS[int(d["split"][row])], path=d["path"][row], sha256=d["sha256"][row].decode("ascii"),
            width=int(d["width"][row]), height=int(d["height"][row]))


def _open_hdf5(path: Path) -> h5py.File:
    """The shard file named `path`, where it is now: a file that left the collection after a reader's
    snapshot was taken sits in `retired/` while the reader's lease holds it (pose_prep.leases)."""
    for candidate in (path, leases.retired_path(path)):
        try:
            return h5py.File(candidate, "r")
        except FileNotFoundError:
            continue
        except OSError as error:
            raise ShardFormatError(f"{path}: not a readable HDF5 shard ({_one_line(error)})") from None
    raise ShardFormatError(f"{path}: no such shard file: the collection changed under this reader (a shard it "
                           "started with was deleted, by hand or by a prep-pose that does not keep shards for "
                           "running readers); rerun the command to read the collection as it is now")


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
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise ShardFormatError(f"{where}: schema_version {version!r} is not a number: not a vsam shard") from None
    if number != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{where}: shard schema version {number} is not supported by this vsam "
            f"(it reads version {SCHEMA_VERSION}); rebuild the shards with `vsam prep-pose` of this version "
            "into a new --out folder")


def verify_shard(path: str | Path) -> list[str]:
    """Problems found in one shard file (empty when it is sound): schema, attributes and their
    checksum, every dataset's type, shape, checksum and values. Never raises for a damaged file."""
    with Shard(path) as shard:
        return _shard_problems(shard)[0]


def _shard_problems(shard: Shard) -> tuple[list[str], dict[str, np.ndarray]]:
    """(`verify_shard`'s problems, the datasets that were read and are sound)."""
    problems, data = [], {}
    try:
        shard.file
    except ShardFormatError as error:
        return [str(error)], data
    for name in ITEM_DATASETS:
        try:
            data.update(shard.read((name,)))
        except ShardFormatError as error:
            problems.append(str(error))
    return problems, data


# --- the index -----------------------------------------------------------------------------

# Every row carries `checksum`, of its other values (`_row_checksum`): SQLite's integrity check sees
# damage to its own structures, not a changed value inside a row.
_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,          -- the NNNNNN of shard-NNNNNN.h5
    n_items INTEGER NOT NULL,
    created TEXT NOT NULL,
    checksum TEXT NOT NULL
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
    updated TEXT NOT NULL,
    checksum TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_shard ON files(shard_id, row);
"""
_COLUMNS = {"meta": ("key", "value"), "shards": ("id", "n_items", "created"),
            "files": ("path", "size", "mtime_ns", "sha256", "status", "reason", "shard_id", "row", "split", "labels",
                      "updated")}
# A damaged index raises sqlite3 errors, or UnicodeDecodeError where SQLite's own error message quotes a
# damaged table definition that is no longer UTF-8.
_SQLITE_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)
# SQLite result codes that say something about the machine, not about the file's bytes.
_ENVIRONMENT_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY",
                       "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_INTERRUPT", "SQLITE_NOMEM")


def _row_checksum(table: str, values: tuple) -> str:
    """Of a row's values with their types (repr tells 5 from '5' and None from 'None')."""
    return hashlib.blake2b(repr((table, *values)).encode("utf-8"), digest_size=8).hexdigest()


def _index_file(connection: sqlite3.Connection) -> str:
    return connection.execute("PRAGMA database_list").fetchone()[2]


def _table_rows(connection: sqlite3.Connection, table: str, problems: list[str] | None = None,
                where: str = "") -> Iterator[tuple]:
    """Every row of `table` (`where`: an SQL condition) whose values match their checksum and make
    sense. A row that does not is a ShardFormatError naming the index (or, with `problems`, a line
    added to it, and the row is skipped). The hot path of an unchanged prep-pose run: keep it lean."""
    check = _ROW_CHECKS.get(table)
    query = f"SELECT {', '.join(_COLUMNS[table])}, checksum FROM {table}" + (f" WHERE {where}" if where else "")
    for row in connection.execute(query):
        values = row[:-1]
        problem = "does not match its checksum" if row[-1] != _row_checksum(table, values) else \
            check(values) if check else None
        if problem is None:
            yield values
            continue
        message = f"{_index_file(connection)}: {table} row {values[0]!r} {problem}"
        if problems is None:
            raise ShardFormatError(message)
        problems.append(message)


def _files_row_problem(values: tuple) -> str | None:
    """Values our writers never store (a row with a valid checksum can still come from a faulty writer)."""
    status, shard_id, row, split = values[4], values[6], values[7], values[8]
    if status not in STATUSES:
        return f"has unknown status {status!r}"
    if (status == "rejected") != (shard_id is None):
        return f"has status {status} but shard {shard_id}"
    if shard_id is not None and not (type(shard_id) is int and type(row) is int and row >= 0 and split in SPLITS):
        return f"points at shard {shard_id!r} row {row!r} with split {split!r}"
    return None


def _shards_row_problem(values: tuple) -> str | None:
    return None if type(values[1]) is int and values[1] > 0 else f"says the shard holds {values[1]!r} items"


_ROW_CHECKS = {"files": _files_row_problem, "shards": _shards_row_problem}


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


def existing_index(folder: str | Path) -> Path:
    """`index_path(folder)`, a ShardFormatError when there is no index: `folder` is not a collection."""
    path = index_path(folder)
    if not path.exists():
        raise ShardFormatError(f"{path}: no shard index here (is {folder} a `vsam prep-pose` output folder?)")
    return path


@contextmanager
def open_index(folder: str | Path, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """The collection's index. Writers get one transaction per `with connection:` block.

    A damaged file met inside the block (SQLite: "database disk image is malformed", a text that is
    not UTF-8, a row that does not match its checksum...) is a ShardFormatError naming the index;
    for writers, errors of the machine (disk full, I/O, locked) pass through as they are."""
    path = existing_index(folder) if readonly else index_path(folder)
    if not readonly and not path.exists():
        _create_index(path)
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
                if _schema_version(connection) is None:
                    with connection:
                        set_meta(connection, "schema_version", str(SCHEMA_VERSION))
            version = _schema_version(connection)
        except _SQLITE_ERRORS as error:
            raise ShardFormatError(f"{path}: not a readable shard index ({_one_line(error)})") from None
        check_schema(version, path)
        try:
            yield connection
        except _SQLITE_ERRORS as error:
            if not readonly and (getattr(error, "sqlite_errorname", "") or "").startswith(_ENVIRONMENT_ERRORS):
                raise
            raise ShardFormatError(f"{path}: damaged or unreadable shard index ({_one_line(error)})") from None
    finally:
        connection.close()


def _create_index(path: Path) -> None:
    """A new index with its tables and schema version, made under a temporary name and renamed into
    place: sqlite3.connect creates the file before the schema is committed, and a kill -9 in between
    left an index.sqlite that readers refused ("no such table: meta") until the next prep-pose run."""
    with atomic_path(path, durable=True) as temporary:
        connection = sqlite3.connect(temporary)
        try:
            connection.execute("PRAGMA journal_mode=WAL")    # kept in the file's header
            connection.executescript(_INDEX_SCHEMA)
            with connection:
                set_meta(connection, "schema_version", str(SCHEMA_VERSION))
        finally:
            connection.close()          # the last connection: its -wal and -shm files go with it


def _schema_version(connection: sqlite3.Connection) -> str | None:
    """Read before anything else, without the row checksum: an index of another version may not have one."""
    row = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return row[0] if row else None


def get_meta(connection: sqlite3.Connection, key: str) -> str | None:
    row = connection.execute("SELECT key, value, checksum FROM meta WHERE key=?", (key,)).fetchone()
    if row is None:
        return None
    if row[2] != _row_checksum("meta", row[:2]):
        raise ShardFormatError(f"{_index_file(connection)}: meta row {key!r} does not match its checksum")
    return row[1]


def set_meta(connection: sqlite3.Connection, key: str, value: str) -> None:
    connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?, ?)", (key, value, _row_checksum("meta", (key, value))))


LAST_SHARD = "last_shard"      # meta key: the highest shard number ever committed


def next_shard_number(folder: str | Path, connection: sqlite3.Connection) -> int:
    """One past every number used so far: by the index (now or ever: `LAST_SHARD`), or by any file
    (orphans and retired files included). A number is never used twice, so a reader's snapshot that
    names `shard-000012.h5` can only ever find the file it meant (pose_prep.leases)."""
    in_index = max((shard_id for shard_id, _, _ in _table_rows(connection, "shards")), default=0)
    ever = int(get_meta(connection, LAST_SHARD) or 0)
    folder = Path(folder)
    on_disk = [shard_number(p) or 0 for p in [*folder.glob(SHARD_GLOB), *(folder / leases.RETIRED).glob(SHARD_GLOB)]]
    return max([in_index, ever, *on_disk]) + 1


def commit_shard(connection: sqlite3.Connection, number: int, records: list[FileRecord]) -> None:
    """Register a shard already renamed into place and point its files at it, in one transaction.
    Call only after `write_shard` returned: the index must never list a file that is not complete."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with connection:
        shard = (number, len(records), now)
        connection.execute("INSERT INTO shards VALUES (?, ?, ?, ?)", (*shard, _row_checksum("shards", shard)))
        if number > int(get_meta(connection, LAST_SHARD) or 0):
            set_meta(connection, LAST_SHARD, str(number))
        _insert_files(connection, [(r.path, r.size, r.mtime_ns, r.sha256, r.status, r.reason, number, row, r.split,
                                    r.labels, now) for row, r in enumerate(records)])


def _insert_files(connection: sqlite3.Connection, rows: list[tuple]) -> None:
    connection.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*row, _row_checksum("files", row)) for row in rows])


def record_files(connection: sqlite3.Connection, records: list[FileRecord]) -> None:
    """Insert or update entries that point at no shard (rejected files), in one transaction."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with connection:
        _insert_files(connection, [(r.path, r.size, r.mtime_ns, r.sha256, r.status, r.reason, r.shard_id, r.row,
                                    r.split, r.labels, now) for r in records])


def file_records(connection: sqlite3.Connection) -> dict[str, FileRecord]:
    return {row[0]: FileRecord(*row[:10]) for row in _table_rows(connection, "files")}


def live_rows(folder: str | Path, splits: tuple[str, ...] | None = None) -> dict[Path, np.ndarray]:
    """Shard file → sorted live row numbers, optionally only items of the given splits. Every row of
    the index is checked (filtering in SQL would skip a row whose split or shard was damaged).
    Without a lease: a reader that outlives a prep-pose run takes a `snapshot` instead."""
    with open_index(folder, readonly=True) as connection:
        return _live_rows(connection, Path(folder), splits)


def _live_rows(connection: sqlite3.Connection, folder: Path, splits: tuple[str, ...] | None) -> dict[Path, np.ndarray]:
    by_shard: dict[int, list[int]] = {}
    for record in file_records(connection).values():
        if record.shard_id is not None and (not splits or record.split in splits):
            by_shard.setdefault(record.shard_id, []).append(record.row)
    return {folder / shard_name(n): np.array(sorted(by_shard[n]), np.int64) for n in sorted(by_shard)}


@dataclass
class Snapshot:
    """A collection as it was at one instant, for a reader: the index's meta values and the live rows
    per shard file, read in one transaction, and a lease on each of those files (pose_prep.leases)
    until `close` or the end of the process. Whatever prep-pose does meanwhile (relabel, reprocess,
    retire, compact), these rows stay readable and unchanged."""
    folder: Path
    meta: dict[str, str]
    rows: dict[Path, np.ndarray]
    lease: leases.Lease

    def close(self) -> None:
        self.lease.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SNAPSHOT_ATTEMPTS = 5


def snapshot(folder: str | Path, splits: tuple[str, ...] | None = None) -> Snapshot:
    """The collection now (optionally only items of `splits`), leased: see `Snapshot`. A shard that
    leaves the collection between the index read and its lease makes it read the index again."""
    folder = Path(folder)
    gone_each_time = set()       # (shard files listed, the one gone) of each attempt
    for _ in range(SNAPSHOT_ATTEMPTS):
        with open_index(folder, readonly=True) as connection:
            connection.execute("BEGIN")       # one read transaction: meta and rows of one instant
            meta = dict(_table_rows(connection, "meta"))
            rows = _live_rows(connection, folder, splits)
            connection.rollback()
        try:
            return Snapshot(folder, meta, rows, leases.hold(list(rows)))
        except leases.Gone as gone:
            gone_each_time.add((tuple(rows), str(gone)))
    if len(gone_each_time) == 1:
        # The index listed the same files every time and the same one was missing: no prep-pose retired
        # it meanwhile (that removes it from the index first); it is missing, as `vsam shards verify` says.
        (_, missing), = gone_each_time
        raise ShardFormatError(f"{missing}: listed in the index but missing (vsam shards verify {folder} "
                               "lists every problem of the collection)")
    raise ShardFormatError(f"{folder}: the collection changed under this reader {SNAPSHOT_ATTEMPTS} times while it "
                           "took its snapshot (a prep-pose run retiring shards); try again")


def collection_metadata(folder: str | Path) -> dict:
    """The index's meta table (vocabulary, heatmap parameters, detector) as a dict of strings."""
    with open_index(folder, readonly=True) as connection:
        return dict(_table_rows(connection, "meta"))


def remove_orphans(folder: str | Path, connection: sqlite3.Connection) -> list[Path]:
    """Delete temporary files, and retire shard files the index does not list (left by a crash
    between rename and commit) and shards no live row points at any more: moved into `retired/`,
    deleted there once no reader holds a lease on them (pose_prep.leases). Returns what left the
    folder (under the names it had there)."""
    folder = Path(folder)
    temporaries = [p for p in folder.glob(f".{SHARD_GLOB}*.tmp")]   # .NAME.tmp, or another writer's .NAME.<hex>.tmp
    temporaries += [p for p in folder.glob(f".{INDEX_NAME}.*") if p.name.endswith((".tmp", ".tmp-wal", ".tmp-shm"))]
    known = {shard_id for shard_id, _, _ in _table_rows(connection, "shards")}
    unlisted = [p for p in folder.glob(SHARD_GLOB) if shard_number(p) not in known]
    dead = [n for (n,) in connection.execute(
        "SELECT id FROM shards WHERE id NOT IN (SELECT DISTINCT shard_id FROM files WHERE shard_id IS NOT NULL)")]
    if unlisted or dead:
        # Deleting a shard must rest on what the index positively says: a damaged byte must stop the
        # run, not get a sound shard deleted. Checked only then, so an unchanged run stays quick.
        _check_index(connection)
        used = {record.shard_id for record in file_records(connection).values()}
        dead = sorted(known - used)
    leaving = unlisted
    if dead:
        # Forget first, then retire: a crash in between leaves an unlisted file, retired next time.
        with connection:
            connection.executemany("DELETE FROM shards WHERE id=?", [(n,) for n in dead])
        leaving += [folder / shard_name(n) for n in dead]
    for path in temporaries:
        path.unlink(missing_ok=True)
    for path in leaving:
        if path.exists():
            leases.retire(path)
    leases.purge(folder)
    return temporaries + leaving


# --- collection queries: `vsam shards info | list | verify`, and what prep-pose adds --------
# (Added for prep-pose: `Shard.item` above, `retire_files`, `write_collection_metadata`,
# `collection_vocabulary`, `live_items`, `collection_info`, `verify_collection`.)

def _check_index(connection: sqlite3.Connection) -> None:
    """SQLite's integrity check (a lost row leaves bytes its pages do not account for) as a ShardFormatError."""
    integrity = [line for (line,) in connection.execute("PRAGMA integrity_check(20)")]
    if integrity != ["ok"]:
        raise ShardFormatError(f"{_index_file(connection)}: SQLite integrity check failed ({'; '.join(integrity)})")


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
    return Vocabulary.parse(text, index_path(folder)) if text else Vocabulary()


def live_items(folder: str | Path) -> Iterator[dict]:
    """One dict per live item, in shard order: path, sha256, split, has_pose, shard (file name), row."""
    with open_index(folder, readonly=True) as connection:
        records = sorted((r for r in file_records(connection).values() if r.shard_id is not None),
                         key=lambda r: (r.shard_id, r.row))
    for r in records:
        yield {"path": r.path, "sha256": r.sha256, "split": r.split, "has_pose": r.status == "ok",
               "shard": shard_name(r.shard_id), "row": r.row}


def count_live(connection: sqlite3.Connection) -> int:
    """Items that a shard row holds (ok and no_person)."""
    return connection.execute("SELECT COUNT(*) FROM files WHERE shard_id IS NOT NULL").fetchone()[0]


def rejected_files(connection: sqlite3.Connection) -> list[dict]:
    """[{path, reason}] of the files rejected and not stored, sorted by path."""
    rows = _table_rows(connection, "files", where="status='rejected'")
    return [{"path": row[0], "reason": row[5]} for row in sorted(rows)]


def collection_info(folder: str | Path) -> dict:
    """Totals of a collection from its index: items per split, with and without pose, the
    vocabularies, detector, heatmap and image parameters, and the rejected files with reasons."""
    folder = Path(folder)
    retired = leases.retired_files(folder)     # out of the collection, kept while readers hold them
    with open_index(folder, readonly=True) as connection:
        meta = dict(_table_rows(connection, "meta"))
        records = list(file_records(connection).values())
        shard_ids = sorted(shard_id for shard_id, _, _ in _table_rows(connection, "shards"))
    live = [r for r in records if r.shard_id is not None]
    splits = {s: sum(r.split == s for r in live) for s in SPLITS}
    statuses = {s: sum(r.status == s for r in live) for s in STATUSES}
    rejected = [{"path": r.path, "reason": r.reason} for r in sorted(records, key=lambda r: r.path)
                if r.status == "rejected"]
    vocabulary = Vocabulary.parse(meta["vocabulary"], index_path(folder)) if "vocabulary" in meta else Vocabulary()
    parsed = {}
    for key in ("heatmap", "image_encoding"):
        try:
            parsed[key] = json.loads(meta[key]) if key in meta else None
        except ValueError:
            raise ShardFormatError(f"{index_path(folder)}: meta {key} does not parse") from None
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
        "retired": {"files": len(retired), "bytes": sum(p.stat().st_size for p in retired if p.exists())},
        "detector": meta.get("detector"),
        "detector_version": meta.get("detector_version"),
        "heatmap": parsed["heatmap"],
        "image_encoding": parsed["image_encoding"],
        "labels": meta.get("labels_source"),
        "vocabulary": asdict(vocabulary),
        "rejected": rejected,
    }


def verify_collection(folder: str | Path, check_leftovers: bool = True) -> list[str]:
    """Every problem of a collection, each naming the file, never an exception for a damaged one:

    * the index: SQLite's integrity check, its tables as this version creates them, every row against
      its checksum and for values no writer stores, the meta values parse;
    * every listed shard: schema, attributes and their checksum, every dataset's type, shape,
      checksum and values (`verify_shard`), its vocabulary the collection's;
    * the index against the shards: each live row exists and holds the path, sha256, split and pose
      flag that the index says.

    With `check_leftovers`, temporary and unlisted shard files (left by an interrupted run, removed by
    the next one) are problems too. A shard that fails is reported and the others are still checked."""
    folder = Path(folder)
    index = index_path(folder)
    problems: list[str] = []
    try:
        with open_index(folder, readonly=True) as connection:
            try:
                _check_index(connection)
            except ShardFormatError as error:
                problems.append(str(error))
            problems += _schema_problems(connection, index)
            meta = dict(_table_rows(connection, "meta", problems))
            shards = {shard_id: n_items for shard_id, n_items, _ in _table_rows(connection, "shards", problems)}
            files = list(_table_rows(connection, "files", problems))
    except ShardFormatError as error:     # names the index already
        return problems + [str(error)]
    vocabulary = None
    try:
        vocabulary = Vocabulary.parse(meta["vocabulary"], index) if "vocabulary" in meta else None
        for key in ("heatmap", "image_encoding"):
            if key in meta and not isinstance(json.loads(meta[key]), dict):
                raise ValueError
    except ShardFormatError as error:
        problems.append(str(error))
    except ValueError:
        problems.append(f"{index}: meta {key} does not parse")

    by_shard: dict[int, list[tuple]] = {}
    for path, _, _, sha256, status, _, shard_id, row, split, _, _ in files:
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
        with Shard(path) as shard:
            shard_problems, data = _shard_problems(shard)
            problems += shard_problems or _check_rows(shard, data, shards[shard_id], by_shard.get(shard_id, []),
                                                      vocabulary)

    if check_leftovers:
        problems += [f"{p}: temporary file of an interrupted run (the next prep-pose run removes it)"
                     for p in sorted(folder.glob(f".{SHARD_GLOB}*.tmp"))]
        problems += [f"{p}: shard file not listed in the index (orphan of an interrupted run)"
                     for p in sorted(folder.glob(SHARD_GLOB)) if shard_number(p) not in shards]
    return problems


def _schema_problems(connection: sqlite3.Connection, index: Path) -> list[str]:
    """The tables and indexes must be the ones this version creates (a damaged column name or type
    would read other values, or none)."""
    expected_db = sqlite3.connect(":memory:")
    try:
        expected_db.executescript(_INDEX_SCHEMA)
        query = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        expected = expected_db.execute(query).fetchall()
    finally:
        expected_db.close()
    actual = connection.execute(query).fetchall()
    if actual != expected:
        differing = sorted({row[1] for row in set(actual) ^ set(expected)})
        return [f"{index}: the definition of {', '.join(map(str, differing))} is not this version's"]
    return []


def _check_rows(shard: Shard, data: dict[str, np.ndarray], n_items: int, rows: list[tuple],
                vocabulary: Vocabulary | None) -> list[str]:
    """A sound shard against the index's rows for it (`data`: its datasets, read by `_shard_problems`)."""
    path = shard.path
    if len(shard) != n_items:
        return [f"{path}: holds {len(shard)} items, the index says {n_items}"]
    if vocabulary is not None and shard.vocabulary != vocabulary:
        return [f"{path}: written with another label vocabulary than the collection's "
                "(an interrupted relabelling run? rerun prep-pose)"]
    problems = []
    for item_path, sha256, status, row, split in rows:
        if not 0 <= row < n_items:
            problems.append(f"{path}: index row {row} of {item_path} is outside 0..{n_items - 1}")
            continue
        stored = (data["path"][row], data["sha256"][row].decode("ascii"), SPLITS[data["split"][row]],
                  bool(data["has_pose"][row]))
        if stored != (item_path, sha256, split, status == "ok"):
            problems.append(f"{path}: row {row} holds {stored[:3]} (pose {stored[3]}), the index says "
                            f"{(item_path, sha256, split)} ({status})")
    return problems
