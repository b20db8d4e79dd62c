"""Label readers: the three formats `vsam prep-pose --labels` accepts, one `Labels` out.

* `deepfashion-attr`: the DeepFashion attribute-challenge folder (`split/list_attr_cloth.txt`,
  `{train,val,test}.txt`, `{train,val}_attr.txt`, `*_bbox.txt`): 26 attributes in 6 mutually
  exclusive groups, one index per group and image; no category. Test images have no labels.
* `deepfashion`: the DeepFashion Category and Attribute Prediction Benchmark (`Anno/list_category_cloth.txt`,
  `list_category_img.txt`, `list_attr_cloth.txt`, `list_attr_img.txt` with 1 / -1 / 0, `list_bbox.txt`,
  `Eval/list_eval_partition.txt`). Every file starts with a count line and a column-name line.
* `csv`: `path,category,attributes,split` with attributes separated by `;` (optional column
  `category_type`: 1 upper, 2 lower, 3 full body, as DeepFashion numbers them).

Label files name images by paths relative to their dataset root (`img/00000.jpg`) while prep-pose
knows paths relative to `--images`. `Labels.match` pairs a label row with an image only when one path
is a whole-component suffix of the other (`img/00000.jpg` and `00000.jpg` or `drop/img/00000.jpg`, not
`ximg/00000.jpg`) and the pairing is one to one: a row that several images could take, or an image
that several rows could name, stays unmatched, and so does a pair whose paths differ only in letter
case (reported as such, never guessed). So `--images data/img` and `--images data` both find their
labels, and an unlisted `tops/001.jpg` never borrows the labels of `dresses/001.jpg`.
Attribute values: 1 true, 0 false, -1 unknown. An image the labels do not mention is unlabelled:
category -1, every attribute -1, split "none".
"""
from __future__ import annotations

import csv
import io
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable

import numpy as np

from .heatmaps import DEFAULT_GROUP, group_for_category_type
from .shard_format import SPLITS, Vocabulary

FORMATS = ("deepfashion-attr", "deepfashion", "csv")
# list_attr_cloth.txt of the attribute challenge numbers its six groups 1..6.
ATTR_CHALLENGE_GROUPS = ("texture", "sleeve", "length", "neckline", "fabric", "fit")
# list_attr_cloth.txt of the full benchmark numbers its five attribute types 1..5.
BENCHMARK_ATTRIBUTE_TYPES = ("texture", "fabric", "shape", "part", "style")


class LabelError(Exception):
    """A label file that cannot be read; str() names the file (and line) and the reason."""


@dataclass
class ItemLabels:
    category: int = -1
    attributes: np.ndarray | None = None       # (A,) int8; None = all unknown
    split: str = "none"
    bbox: tuple[int, int, int, int] | None = None   # x1, y1, x2, y2 in pixels of the image


@dataclass
class Labels:
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    items: dict[str, ItemLabels] = field(default_factory=dict)   # key: path as the label files write it
    format: str = "none"
    source: str = ""
    _index: _TailIndex | None = field(default=None, repr=False)

    def match(self, images: Iterable[str]) -> Matching:
        """Pair label rows with images (paths relative to --images): see the module docstring."""
        images = list(images)
        if self._index is None:
            self._index = _TailIndex(self.items)
        candidates = {image: self._index.candidates(image) for image in images}
        claims = Counter(chain.from_iterable(candidates.values()))
        matched = {image: keys[0] for image, keys in candidates.items() if len(keys) == 1 and claims[keys[0]] == 1}
        ambiguous = [f"image {image} matches {len(keys)} label rows ({_first(keys)})"
                     for image, keys in candidates.items() if len(keys) > 1]
        shared = {key: [] for key, count in claims.items() if count > 1}
        for image, keys in candidates.items() if shared else ():
            for key in keys:
                if key in shared:
                    shared[key].append(image)
        ambiguous += [f"label row {key} matches {len(found)} images ({_first(found)})" for key, found in shared.items()]
        unlabelled = sorted(image for image in images if image not in matched)
        unmatched_rows = sorted(set(self.items) - set(matched.values()))
        case_only = _case_only([image for image in unlabelled if not candidates[image]],
                               [key for key in unmatched_rows if key not in claims])
        return Matching({image: self.items[key] for image, key in matched.items()}, unlabelled, unmatched_rows,
                        ambiguous, case_only)

    def lookup(self, relative_path: str) -> ItemLabels | None:
        """The labels of one image given by its path relative to --images (the rule of `match`), or None."""
        return self.match([relative_path]).items.get(relative_path)

    def for_item(self, relative_path: str) -> ItemLabels:
        found = self.lookup(relative_path)
        return found if found is not None else ItemLabels()

    def attributes(self, item: ItemLabels) -> np.ndarray:
        if item.attributes is None:
            return np.full(len(self.vocabulary.attributes), -1, np.int8)
        return item.attributes

    def joint_group(self, item: ItemLabels) -> str:
        """Heatmap joint subset of an item: by its category type; the full body without one."""
        return category_joint_group(self.vocabulary, item.category)


def category_joint_group(vocabulary: Vocabulary, category: int) -> str:
    """Heatmap joint subset of an item of `category` (-1: unknown) under `vocabulary`: by the category's
    type; the full body without one."""
    types = vocabulary.category_types
    return group_for_category_type(types[category]) if 0 <= category < len(types) else DEFAULT_GROUP


@dataclass
class Matching:
    """Which label row each image got (`Labels.match`)."""
    items: dict[str, ItemLabels]           # image → its labels, for the matched images only
    unlabelled: list[str]                  # images no label row pairs with (sorted)
    unmatched_rows: list[str]              # label rows (as the label files write them) no image pairs with
    ambiguous: list[str]                   # one line per image or row that could pair several ways
    case_only: list[tuple[str, str]]       # (label row, image) whose paths differ only in letter case

    def for_item(self, relative_path: str) -> ItemLabels:
        return self.items.get(relative_path) or ItemLabels()

    def summary(self, limit: int) -> dict:
        """Counts, and the first `limit` of each list (for a report)."""
        lists = {"unlabelled": self.unlabelled, "unmatched_rows": self.unmatched_rows, "ambiguous": self.ambiguous,
                 "case_only": [list(pair) for pair in self.case_only]}
        return {"matched": len(self.items), **{name: len(values) for name, values in lists.items()},
                "first": {name: values[:limit] for name, values in lists.items()}}


class _TailIndex:
    """The keys a path pairs with: the keys that are a whole-component suffix of it (its shorter tails,
    looked up), and the keys it is a whole-component suffix of (found by bisecting the sorted reversed
    keys, so no index of every tail of every key: a small drop against a 289,222-row benchmark file
    costs a sort, not a million strings)."""

    def __init__(self, keys: Collection[str]):
        self.keys = keys
        self.reversed = sorted(key[::-1] for key in keys)

    def candidates(self, path: str) -> list[str]:
        found = []
        slash = path.find("/")
        while slash != -1:
            if path[slash + 1:] in self.keys:
                found.append(path[slash + 1:])
            slash = path.find("/", slash + 1)
        backwards, size = path[::-1], len(path)
        at = bisect_left(self.reversed, backwards)
        while at < len(self.reversed) and self.reversed[at].startswith(backwards):
            key = self.reversed[at]
            if len(key) == size or key[size] == "/":     # the whole path, or a whole-component tail
                found.append(key[::-1])
            at += 1
        return found


def _case_only(images: list[str], rows: list[str]) -> list[tuple[str, str]]:
    """(row, image) pairs among images and rows that pair with nothing, equal but for letter case."""
    if not images or not rows:
        return []
    folded = {row.casefold(): row for row in rows}
    index = _TailIndex(folded)
    return sorted((folded[key], image) for image in images for key in index.candidates(image.casefold()))


def _first(values: list[str], shown: int = 3) -> str:
    return ", ".join(sorted(values)[:shown]) + (", ..." if len(values) > shown else "")


def unlabelled() -> Labels:
    return Labels()


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if path.is_dir():
        if (path / "split" / "list_attr_cloth.txt").is_file() or \
                ((path / "list_attr_cloth.txt").is_file() and (path / "train_attr.txt").is_file()):
            return "deepfashion-attr"
        if (path / "Anno" / "list_category_img.txt").is_file() or (path / "list_category_img.txt").is_file():
            return "deepfashion"
    if not path.exists():
        raise LabelError(f"{path}: no such file or folder")
    raise LabelError(f"{path}: not a known labels format (a .csv file, a DeepFashion attribute-challenge folder "
                     f"with split/list_attr_cloth.txt, or a DeepFashion benchmark folder with Anno/); "
                     f"force one with --labels-format {{{','.join(FORMATS)}}}")


def read_labels(path: str | Path, format: str | None = None) -> Labels:
    format = format or detect_format(path)
    readers = {"deepfashion-attr": read_attribute_challenge, "deepfashion": read_benchmark, "csv": read_csv}
    if format not in readers:
        raise LabelError(f"unknown labels format {format!r}; known: {', '.join(FORMATS)}")
    labels = readers[format](Path(path))
    labels.format, labels.source = format, str(Path(path).resolve())
    return labels


# --- shared parsing ---------------------------------------------------------------------------

def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LabelError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LabelError(f"{path}: cannot read ({error})") from None


def _counted_table(path: Path) -> list[tuple[int, str]]:
    """Rows of a DeepFashion list file (count line, column-name line, rows) with their line numbers."""
    lines = _lines(path)
    if len(lines) < 2:
        raise LabelError(f"{path}: expected a count line and a column-name line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise LabelError(f"{path}:1: expected the number of rows, got {lines[0]!r}") from None
    rows = [(number, line) for number, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(rows) != count:
        raise LabelError(f"{path}: the first line says {count} rows, the file has {len(rows)}")
    return rows


def _name_and_type(path: Path, rows: list[tuple[int, str]]) -> tuple[list[str], list[int]]:
    names, types = [], []
    for number, line in rows:
        parts = line.rsplit(None, 1)  # names may contain spaces ("abstract chevron  1")
        try:
            names.append(parts[0].strip())
            types.append(int(parts[1]))
        except (IndexError, ValueError):
            raise LabelError(f"{path}:{number}: expected 'name type', got {line!r}") from None
    return names, types


def _ints(path: Path, number: int, text: str, count: int) -> list[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise LabelError(f"{path}:{number}: expected {count} integers, got {text!r}")
    return values


def _bbox(path: Path, number: int, text: str) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = _ints(path, number, text, 4)
    if x2 <= x1 or y2 <= y1:
        raise LabelError(f"{path}:{number}: empty box {text!r} (x1 y1 x2 y2)")
    return x1, y1, x2, y2


# --- DeepFashion attribute challenge ----------------------------------------------------------

def read_attribute_challenge(folder: Path) -> Labels:
    split_folder = folder / "split" if (folder / "split").is_dir() else folder
    names, types = _name_and_type(split_folder / "list_attr_cloth.txt",
                                  _counted_table(split_folder / "list_attr_cloth.txt"))
    if any(not 1 <= t <= len(ATTR_CHALLENGE_GROUPS) for t in types):
        raise LabelError(f"{split_folder / 'list_attr_cloth.txt'}: attribute types must lie in 1..6")
    vocabulary = Vocabulary(attributes=names, attribute_groups=[ATTR_CHALLENGE_GROUPS[t - 1] for t in types],
                            exclusive_groups=True)
    members = [[i for i, t in enumerate(types) if t == g] for g in range(1, len(ATTR_CHALLENGE_GROUPS) + 1)]
    items: dict[str, ItemLabels] = {}
    for split in ("train", "val", "test"):
        list_path = split_folder / f"{split}.txt"
        if not list_path.exists():
            continue
        paths = [line.strip() for line in _lines(list_path) if line.strip()]
        attributes = _aligned(split_folder / f"{split}_attr.txt", len(paths), required=split != "test")
        boxes = _aligned(split_folder / f"{split}_bbox.txt", len(paths), required=False)
        for row, image in enumerate(paths):
            item = ItemLabels(split=split)
            if attributes is not None:
                number, text = attributes[row]
                item.attributes = _multi_hot(split_folder / f"{split}_attr.txt", number, text, members, len(names))
            if boxes is not None:
                item.bbox = _bbox(split_folder / f"{split}_bbox.txt", *boxes[row])
            if image in items:
                raise LabelError(f"{list_path}: {image} is listed twice")
            items[image] = item
    if not items:
        raise LabelError(f"{split_folder}: none of train.txt, val.txt, test.txt is there")
    return Labels(vocabulary=vocabulary, items=items)


def _aligned(path: Path, count: int, required: bool) -> list[tuple[int, str]] | None:
    """Rows of a file that is row-aligned with an image list (None when optional and absent)."""
    if not path.exists():
        if required:
            raise LabelError(f"{path}: missing")
        return None
    rows = [(number, line) for number, line in enumerate(_lines(path), start=1) if line.strip()]
    if len(rows) != count:
        raise LabelError(f"{path}: {len(rows)} rows, but its image list has {count}")
    return rows


def _multi_hot(path: Path, number: int, text: str, members: list[list[int]], size: int) -> np.ndarray:
    picks = _ints(path, number, text, len(members))
    attributes = np.zeros(size, np.int8)
    for group, (pick, indices) in enumerate(zip(picks, members)):
        if not 0 <= pick < len(indices):
            raise LabelError(f"{path}:{number}: group {group + 1} ({ATTR_CHALLENGE_GROUPS[group]}) has "
                             f"{len(indices)} attributes, got index {pick}")
        attributes[indices[pick]] = 1
    return attributes


# --- DeepFashion Category and Attribute Prediction Benchmark --------------------------------

def read_benchmark(folder: Path) -> Labels:
    anno = folder / "Anno" if (folder / "Anno").is_dir() else folder
    evaluation = folder / "Eval" if (folder / "Eval").is_dir() else anno
    categories, category_types = _name_and_type(anno / "list_category_cloth.txt",
                                                _counted_table(anno / "list_category_cloth.txt"))
    attributes, attribute_types = _name_and_type(anno / "list_attr_cloth.txt",
                                                 _counted_table(anno / "list_attr_cloth.txt"))
    if any(not 1 <= t <= len(BENCHMARK_ATTRIBUTE_TYPES) for t in attribute_types):
        raise LabelError(f"{anno / 'list_attr_cloth.txt'}: attribute types must lie in 1..5")
    vocabulary = Vocabulary(categories=categories, category_types=category_types, attributes=attributes,
                            attribute_groups=[BENCHMARK_ATTRIBUTE_TYPES[t - 1] for t in attribute_types])
    items: dict[str, ItemLabels] = {}

    def item(name: str) -> ItemLabels:
        return items.setdefault(name, ItemLabels())

    path = anno / "list_category_img.txt"
    for number, line in _counted_table(path):
        name, value = _split_name(path, number, line)
        label = _ints(path, number, value, 1)[0]
        if not 1 <= label <= len(categories):
            raise LabelError(f"{path}:{number}: category {label} is outside 1..{len(categories)}")
        item(name).category = label - 1
    path = anno / "list_attr_img.txt"
    if path.exists():
        for number, line in _counted_table(path):
            name, values = _split_name(path, number, line)
            item(name).attributes = _benchmark_attributes(path, number, values, len(attributes))
    path = anno / "list_bbox.txt"
    if path.exists():
        for number, line in _counted_table(path):
            name, values = _split_name(path, number, line)
            item(name).bbox = _bbox(path, number, values)
    path = evaluation / "list_eval_partition.txt"
    if path.exists():
        for number, line in _counted_table(path):
            name, value = _split_name(path, number, line)
            split = value.strip()
            if split not in SPLITS:
                raise LabelError(f"{path}:{number}: evaluation status {split!r} is not one of {SPLITS}")
            item(name).split = split
    return Labels(vocabulary=vocabulary, items=items)


def _split_name(path: Path, number: int, line: str) -> tuple[str, str]:
    parts = line.split(None, 1)
    if len(parts) != 2:
        raise LabelError(f"{path}:{number}: expected 'image_name values', got {line!r}")
    return parts[0], parts[1]


_BENCHMARK_VALUE = {1: 1, -1: 0, 0: -1}   # file: 1 positive, -1 negative, 0 unknown


def _benchmark_attributes(path: Path, number: int, text: str, size: int) -> np.ndarray:
    values = _ints(path, number, text, size)
    try:
        return np.array([_BENCHMARK_VALUE[v] for v in values], np.int8)
    except KeyError as error:
        raise LabelError(f"{path}:{number}: attribute values must be 1, -1 or 0, got {error.args[0]}") from None


# --- CSV ------------------------------------------------------------------------------------

CSV_COLUMNS = ("path", "category", "attributes", "split", "category_type")


def read_csv(path: Path) -> Labels:
    """`path,category,attributes,split[,category_type]`, as spreadsheets write it: a UTF-8 byte-order
    mark (Excel's "CSV UTF-8") and CRLF are fine, blank and all-empty rows (`,,,`) are skipped, a quoted
    cell may span lines. Any other malformed row stops the read with file:line (the physical line where
    its record starts) and the reason."""
    header, rows = _csv_records(path)
    columns = set(header)

    def cell(row: dict, name: str) -> str:
        return (row.get(name) or "").strip()

    categories = sorted({cell(r, "category") for _, r in rows} - {""})
    attribute_names = sorted({a.strip() for _, r in rows for a in cell(r, "attributes").split(";")} - {""})
    category_types = _csv_category_types(path, rows, categories) if "category_type" in columns else []
    vocabulary = Vocabulary(categories=categories, category_types=category_types, attributes=attribute_names,
                            attribute_groups=[""] * len(attribute_names))
    position = {name: i for i, name in enumerate(attribute_names)}
    items: dict[str, ItemLabels] = {}
    for number, row in rows:
        if not cell(row, "path"):
            raise LabelError(f"{path}:{number}: empty path")
        image = PurePosixPath(cell(row, "path").replace("\\", "/")).as_posix()
        if image in items:
            raise LabelError(f"{path}:{number}: {image} is listed twice")
        split = cell(row, "split") or "none"
        if split not in SPLITS:
            raise LabelError(f"{path}:{number}: split {split!r} is not one of {', '.join(SPLITS)}")
        attributes = np.zeros(len(attribute_names), np.int8)
        for name in cell(row, "attributes").split(";"):
            if name.strip():
                attributes[position[name.strip()]] = 1
        category = cell(row, "category")
        items[image] = ItemLabels(category=categories.index(category) if category else -1,
                                  attributes=attributes, split=split)
    return Labels(vocabulary=vocabulary, items=items)


def _csv_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and each record as (its first physical line, {column: cell})."""
    reader = csv.reader(io.StringIO(_csv_text(path), newline=""))
    header, rows, read = None, [], 0      # read: physical lines consumed before this record
    try:
        for cells in reader:
            first, last, read = read + 1, reader.line_num, reader.line_num
            if not any(c.strip() for c in cells):
                continue                  # a blank line, or an empty row of commas
            if header is None:
                header = _csv_header(path, first, [c.strip() for c in cells])
                continue
            if len(cells) != len(header):
                runs = f" (the record runs to line {last}: a quote not closed?)" if last > first else ""
                raise LabelError(f"{path}:{first}: expected {len(header)} fields ({','.join(header)}), "
                                 f"got {len(cells)}{runs}")
            rows.append((first, dict(zip(header, cells))))
    except csv.Error as error:            # a NUL byte, a field beyond csv's size limit
        raise LabelError(f"{path}:{reader.line_num}: cannot read ({error})") from None
    if header is None:
        raise LabelError(f"{path}: empty; needs a header with a 'path' column (path,category,attributes,split)")
    return header, rows


def _csv_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelError(f"{path}: missing") from None
    except OSError as error:
        raise LabelError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")   # -sig: without the byte-order mark Excel writes first
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LabelError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); save it as UTF-8 "
                         "(Excel: CSV UTF-8)") from None


def _csv_header(path: Path, number: int, header: list[str]) -> list[str]:
    if "path" not in header:
        raise LabelError(f"{path}: needs a header with a 'path' column (path,category,attributes,split)")
    unknown = set(header) - set(CSV_COLUMNS)
    if unknown:
        raise LabelError(f"{path}:{number}: unknown columns {sorted(unknown)}; expected path,category,attributes,split")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise LabelError(f"{path}:{number}: column {twice[0]!r} appears twice")
    return header


def _csv_category_types(path: Path, rows: list[tuple[int, dict]], categories: list[str]) -> list[int]:
    types: dict[str, int] = {}
    for number, row in rows:
        category, text = (row.get("category") or "").strip(), (row.get("category_type") or "").strip()
        if not category or not text:
            continue
        if text not in ("1", "2", "3") or types.setdefault(category, int(text)) != int(text):
            raise LabelError(f"{path}:{number}: category_type of {category!r} must be one value of 1, 2, 3")
    return [types.get(c, 0) for c in categories]
