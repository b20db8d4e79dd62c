"""`vsam prep-pose`: catalog images (and labels) → HDF5 shards, incremental and crash-safe.

One run, holding the output folder's lock (`lock.py`):

1. remove what an interrupted run left (temporary and unlisted shard files, shards no row uses);
2. scan `--images`; compare each file with the index by size and mtime first, by sha256 of its bytes
   only when those differ; classify it new, changed, unchanged, relabelled or reprocessed, and the
   index entries whose file is gone as deleted (retired in one transaction). Gone means positively
   seen gone: absent from a folder listing that succeeded. An item under a folder that cannot be
   listed, or whose file cannot be stat'ed, is kept as it is (counted `unreadable`). A run that finds
   no image at all, or that would retire more live items than `--max-retire` allows, stops here and
   changes nothing (status `refused`, exit 1): an unmounted share must not wipe the collection;
3. decode + detect + render + re-encode in workers (joblib's loky processes, or a Dask cluster: `cluster.py`);
4. the parent alone writes shards: every `shard_size` items it writes one shard atomically and
   commits it to the index in one transaction (`shard_format.write_shard` then `commit_shard`).

A kill at any instant therefore loses at most the items of the shard being written, and the next run
redoes exactly those: no image is lost, none is live twice, no partial shard is ever readable.

Each index entry carries a fingerprint `P:R` (in the `labels` column): P of what the stored pixels and
keypoints depend on (detector, image encoding, crop box), R of what the rest of the item depends on
(vocabulary, category, attributes, split, heatmap parameters and joint subset). An unchanged file whose
R changed (new labels) is *relabelled*: its row is copied from the old shard with the new labels and a
re-rendered heatmap, without decoding or detecting again. One whose P changed (another detector, image
size, or box) is *reprocessed*. Two paths with the same content are two items (each keeps its own
labels); the detector runs once for the content.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from . import heatmaps, leases, lock
from .cluster import DEFAULT_WORKER_WAIT, ClusterError, map_on_cluster
from .compaction import DEFAULT_THRESHOLD, compact
from .atomic import DiskFull, atomic_write_text, reporting_disk_full
from .images import CatalogImage, catalog_images, printable_name
from .labels import ItemLabels, Labels, category_joint_group, read_labels, unlabelled
from .prep_worker import Processed, Settings, Task, process, render_heatmap
from .shard_format import (FileRecord, Shard, ShardItem, ShardMetadata, commit_shard, count_live, file_records,
                           get_meta, index_path, next_shard_number, open_index, record_files, rejected_files, remove_orphans,
                           retire_files, shard_name, write_collection_metadata, write_shard)

# Exit codes (the same values as cli.py's, which imports this module only inside its command).
EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_SHARD_SIZE = 1000
# A nightly drop retires a few discontinued items; retiring more than a tenth of the collection in one
# run is far more often a half-copied drop or a wrong --images than a real clear-out.
DEFAULT_MAX_RETIRE = "10%"
REPORT_LIST_LIMIT = 100               # paths a report lists per kind of label mismatch (the counts are exact)
REPORTS = "reports"


class PrepError(Exception):
    """A run that cannot start (bad options for this output folder); str() says why."""


class DetectorChoiceError(PrepError):
    """The detector asked for (or the one the collection was built with) is unknown, or its extra is not
    installed: a usage error, exit 2, as for `vsam pose`."""


@dataclass(frozen=True)
class RetireLimit:
    """`--max-retire`: how many live items one run may retire, as a share of the live items before
    the run (`10%`: more than 10% is refused) or as a count (`500`). `100%` allows anything, also a
    run that finds no image at all."""
    amount: float
    share: bool

    @classmethod
    def parse(cls, text: str) -> "RetireLimit":
        match = re.fullmatch(r"(\d+(?:\.\d+)?)%|(\d+)", str(text).strip())
        if not match or (match[1] is not None and float(match[1]) > 100):
            raise ValueError(f"{text!r}: expected a share of the live items like 10% or a count like 500 "
                             "(100% allows any)")
        return cls(float(match[1]), True) if match[1] is not None else cls(int(match[2]), False)

    def allows(self, retire: int, live: int) -> bool:
        return retire * 100 <= self.amount * live if self.share else retire <= self.amount

    @property
    def everything(self) -> bool:
        return self.share and self.amount >= 100

    def __str__(self) -> str:
        return f"{self.amount:g}%" if self.share else str(int(self.amount))


@dataclass
class PrepOptions:
    images: Path
    out: Path = Path("shards")
    labels: Path | None = None
    labels_format: str | None = None
    detector: str | None = None              # None: the collection's detector, else pose_prep.detectors.DEFAULT
    jobs: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    strict: bool = False
    crop_bbox: bool = False
    max_side: int = 256
    jpeg_quality: int = 90
    splits: tuple[str, ...] | None = None    # keep only images of these splits
    progress: bool | None = None             # None: a bar when stderr is a terminal
    max_retire: str = DEFAULT_MAX_RETIRE     # RetireLimit text: 10% or 500
    worker_wait: float = DEFAULT_WORKER_WAIT  # dask: seconds without any worker before the run stops
    compact_below: float = DEFAULT_THRESHOLD  # rewrite shards with a smaller live share at the end (0: never)

    def settings(self) -> Settings:
        return Settings(detector=self.detector or _default_detector(Path(self.out)), max_side=self.max_side,
                        jpeg_quality=self.jpeg_quality)


COUNTS = ("new", "changed", "deleted", "unchanged", "relabelled", "reprocessed", "no_person", "rejected",
          "excluded", "unreadable")


@dataclass
class Report:
    """What one run did; written as JSON into `<out>/reports/` and summarised on stdout."""
    images: str
    out: str
    labels: str | None
    detector: str
    start: str = ""
    end: str | None = None
    status: str = "running"           # running | completed | failed | refused (a stale "running": killed)
    seconds: float = 0.0
    processed: int = 0                # images decoded and run through the detector
    images_per_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    rejected: list[dict] = field(default_factory=list)   # this run's: {path, reason}
    rejected_total: int = 0           # rejected files in the index after the run
    items_total: int = 0              # live items after the run
    removed_leftovers: list[str] = field(default_factory=list)
    retired_kept: list[str] = field(default_factory=list)   # shard files out of the collection that readers hold
    compaction: dict = field(default_factory=dict)   # compaction.Compaction: shards rewritten, rows moved, bytes
    found: int = 0                    # image files found under --images (after --splits)
    stored: int = 0                   # items this run committed into shards (also when it failed later)
    unreadable: list[dict] = field(default_factory=list)  # {path, reason}: folders and files not seen
    would_retire: int = 0             # live items this run found gone (retired unless refused)
    labels_match: dict = field(default_factory=dict)   # with --labels: labels.Matching.summary
    max_retire: str = DEFAULT_MAX_RETIRE
    path: str = ""                    # of this report
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    exit_code: int | None = None
    error: str | None = None

    def summary(self) -> str:
        c = self.counts
        text = (f"prep-pose: {c['new']} new, {c['changed']} changed, {c['deleted']} deleted, "
                f"{c['unchanged']} unchanged, {c['relabelled']} relabelled, {c['reprocessed']} reprocessed, "
                f"{c['no_person']} no person, {c['rejected']} rejected in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s); {self.items_total} items live")
        text += f", {c['unreadable']} kept unreadable" if c["unreadable"] else ""
        text += f", {c['excluded']} outside --splits" if c["excluded"] else ""
        if self.compaction.get("shards"):
            text += (f", {len(self.compaction['shards'])} shard(s) compacted into "
                     f"{len(self.compaction['new_shards'])}")
        text += f", {len(self.retired_kept)} retired shard(s) kept for running readers" if self.retired_kept else ""
        match = self.labels_match
        return text + (f"; labels: {match['matched']} images matched, {match['unlabelled']} unlabelled, "
                       f"{match['unmatched_rows']} label rows match no image" if match else "")


# --- planning ---------------------------------------------------------------------------------

@dataclass
class Entry:
    """One scanned file and what this run does with it."""
    relative: str
    path: Path
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    labels: ItemLabels = field(default_factory=ItemLabels)
    fingerprint: str = ""
    kind: str = "new"                 # new | changed | unchanged | relabelled | reprocessed | unreadable
    reason: str | None = None         # rejected before any worker saw it
    copy_from: FileRecord | None = None   # stored row to copy instead of detecting again


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Fingerprints:
    def __init__(self, labels: Labels, settings: Settings, crop_bbox: bool):
        self.labels, self.settings, self.crop_bbox = labels, settings, crop_bbox
        self._vocabulary = _digest(labels.vocabulary.to_json())

    def __call__(self, item: ItemLabels) -> str:
        s = self.settings
        pixels = _digest([s.detector, s.max_side, s.jpeg_quality, s.max_pixels,
                          list(item.bbox) if self.crop_bbox and item.bbox else None])
        rest = _digest([self._vocabulary, item.category, self.labels.attributes(item).tolist(), item.split,
                        s.heatmap_size, s.heatmap_sigma, self.labels.joint_group(item)])
        return f"{pixels}:{rest}"


def _pixels_part(fingerprint: str | None) -> str | None:
    return fingerprint.split(":")[0] if fingerprint else None


def scan(images: Path, labels: Labels, splits: tuple[str, ...] | None, report: Report) -> list[Entry]:
    """The image files under `images` as entries (those outside --splits counted, not returned); the
    subfolders that could not be listed go into report.unreadable as `{path: "folder/", reason}`."""
    entries, named = [], []
    for image in _list_catalog(images, report):
        if image.reason:              # a name that is not valid UTF-8, written as images.catalog_images does
            entries.append(Entry(image.name, image.path, reason=image.reason))
        else:
            named.append((image.name, image.path))
    matching = labels.match(relative for relative, _ in named)
    if labels.source:
        report.labels_match = matching.summary(REPORT_LIST_LIMIT)
    for relative, path in named:
        item = matching.for_item(relative)
        if splits and item.split not in splits:
            report.counts["excluded"] += 1
            continue
        entry = Entry(relative, path, labels=item)
        try:
            stat = path.stat()
            entry.size, entry.mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError as error:
            entry.reason = f"cannot read ({error.strerror or error})"
        entries.append(entry)
    return entries


def _list_catalog(images: Path, report: Report) -> list[CatalogImage]:
    errors: list[OSError] = []
    try:
        found = catalog_images(images, on_error=errors.append)
    except FileNotFoundError:
        raise PrepError(f"{images}: no such folder (an unmounted share?): nothing was changed") from None
    for error in errors:
        reason = f"cannot list ({error.strerror or error})"
        if Path(error.filename) == images:
            raise PrepError(f"{images}: {reason}: nothing was changed") from None
        folder = Path(error.filename).relative_to(images).as_posix()
        report.unreadable.append({"path": printable_name(folder) + "/", "reason": reason})
    return found


def classify(entries: list[Entry], records: dict[str, FileRecord], fingerprint: Fingerprints) -> list[Entry]:
    """Decide per entry what to do; returns the entries that need work (everything not unchanged)."""
    stored_by_content: dict[tuple[str, str], FileRecord] = {}
    for record in records.values():
        if record.status != "rejected" and record.sha256:
            stored_by_content.setdefault((record.sha256, _pixels_part(record.labels)), record)
    todo = []
    for entry in entries:
        record = records.get(entry.relative)
        entry.fingerprint = fingerprint(entry.labels)
        if entry.reason is not None:     # cannot even be stat'ed (a dangling link, a bad name)
            if record is not None and record.shard_id is not None:
                entry.kind = "unreadable"    # not seen, so not known to be bad: the stored item stays
            elif record is not None and (record.status, record.reason) == ("rejected", entry.reason):
                entry.kind = "unchanged"     # still rejected for the same reason: recorded already
            else:
                entry.kind = "changed" if record else "new"
                todo.append(entry)
            continue
        same_stat = record is not None and (record.size, record.mtime_ns) == (entry.size, entry.mtime_ns)
        if same_stat:
            entry.sha256 = record.sha256
        else:
            try:
                entry.sha256 = hashlib.sha256(entry.path.read_bytes()).hexdigest()
            except OSError:
                entry.sha256 = None   # the worker reads it again and records why it cannot
        if record is not None and record.sha256 == entry.sha256 and (same_stat or record.status != "rejected"):
            if record.status == "rejected" or record.labels == entry.fingerprint:
                entry.kind = "unchanged"
                if not same_stat:     # touched, same bytes: remember the new size and mtime
                    entry.copy_from = record
                    todo.append(entry)
                continue
            entry.kind = "relabelled" if _pixels_part(record.labels) == _pixels_part(entry.fingerprint) \
                else "reprocessed"
        else:
            entry.kind = "changed" if record is not None else "new"
        if entry.sha256 is not None:
            entry.copy_from = stored_by_content.get((entry.sha256, _pixels_part(entry.fingerprint)))
        todo.append(entry)
    return todo


# --- writing ----------------------------------------------------------------------------------

class ShardWriter:
    """Collects items; every `shard_size` of them becomes one shard, written then committed."""

    def __init__(self, folder: Path, connection, metadata: ShardMetadata, shard_size: int, report: Report):
        self.folder, self.connection, self.metadata, self.shard_size = folder, connection, metadata, shard_size
        self.report = report
        self.items: list[ShardItem] = []
        self.records: list[FileRecord] = []
        self.rejected: list[FileRecord] = []

    def add(self, item: ShardItem, record: FileRecord) -> None:
        self.items.append(item)
        self.records.append(record)
        if len(self.items) >= self.shard_size:
            self.flush()

    def reject(self, record: FileRecord) -> None:
        self.rejected.append(record)

    def flush(self) -> None:
        if self.items:
            number = next_shard_number(self.folder, self.connection)
            write_shard(self.folder / shard_name(number), self.items, self.metadata)
            commit_shard(self.connection, number, self.records)
            self.report.stored += len(self.records)
            self.items, self.records = [], []
        if self.rejected:
            record_files(self.connection, self.rejected)
            self.rejected = []


def _item_and_record(entry: Entry, result: Processed, labels: Labels,
                     settings: Settings) -> tuple[ShardItem, FileRecord]:
    joint_group = labels.joint_group(entry.labels)
    heatmap = result.heatmap
    if heatmap is None or joint_group != result.joint_group:
        heatmap = render_heatmap(result.keypoints, result.width, result.height, joint_group, settings)
    has_pose = bool(heatmap.any())
    item = ShardItem(image=result.image, heatmap=heatmap, keypoints=result.keypoints, has_pose=has_pose,
                     category=entry.labels.category, attributes=labels.attributes(entry.labels),
                     split=entry.labels.split, path=entry.relative, sha256=result.sha256,
                     width=result.width, height=result.height)
    record = FileRecord(entry.relative, entry.size, entry.mtime_ns, result.sha256,
                        "ok" if has_pose else "no_person", split=entry.labels.split, labels=entry.fingerprint)
    return item, record


# --- running ------------------------------------------------------------------------------

def run(options: PrepOptions) -> Report:
    """One complete prep-pose run. Raises lock.Busy at once when another run holds the folder, and
    LabelError or PrepError before touching anything when the labels or options are unusable (a Dask
    scheduler that cannot be reached: PrepError when detection starts, what is committed stays)."""
    _check_backend(options)
    _retire_limit(options.max_retire)
    if options.detector:            # a named one before --out is created; the collection's own under its lock
        _check_detector(options.detector)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    with lock.exclusive(out):
        settings = options.settings()
        if not options.detector:    # the collection's own (a named one was checked above)
            _check_detector(settings.detector)
        labels = read_labels(options.labels, options.labels_format) if options.labels else unlabelled()
        report = Report(images=str(options.images), out=str(out), detector=settings.detector,
                        labels=labels.source or None, start=_now())
        report.path = str(out / REPORTS / f"prep-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json")
        started = time.monotonic()
        try:
            with reporting_disk_full(index_path(out)):    # SQLite's SQLITE_FULL; shards and reports name themselves
                _run_locked(options, settings, out, labels, report)
        except BaseException as error:
            report.status, report.error = "failed", f"{type(error).__name__}: {error}"
            _collection_totals(report, out)
            try:
                _finish(report, started, EXIT_FAILED)
            except DiskFull:
                pass    # no room for the report either: the error itself goes to stderr
            raise
        if report.status != "refused":
            report.error = failure(report, options.strict)
        _finish(report, started, EXIT_FAILED if report.error else EXIT_OK)
        return report


def _collection_totals(report: Report, out: Path) -> None:
    """items_total and rejected_total of a failed run: what the index holds now (best effort: the index
    itself may be what failed)."""
    try:
        with open_index(out, readonly=True) as connection:
            _totals(report, connection)
    except Exception:  # noqa: BLE001 - the report says what is known; the run's own error is raised
        pass


def _totals(report: Report, connection) -> None:
    """The report's items_total and rejected_total: live and rejected files in the index now."""
    report.items_total = count_live(connection)
    report.rejected_total = len(rejected_files(connection))


def _finish(report: Report, started: float, code: int) -> None:
    report.seconds = round(time.monotonic() - started, 3)
    report.images_per_s = round(report.processed / report.seconds, 2) if report.seconds else 0.0
    report.end, report.exit_code = _now(), code
    if report.status == "running":
        report.status = "completed"
    write_report(Path(report.path), report)


def _run_locked(options: PrepOptions, settings: Settings, out: Path, labels: Labels, report: Report) -> None:
    with open_index(out) as connection:
        _check_labels_continuity(connection, labels, out)
        write_report(Path(report.path), report)
        records = file_records(connection)
        images = Path(options.images)
        entries = scan(images, labels, options.splits, report)
        report.found = len(entries)
        todo = classify(entries, records, Fingerprints(labels, settings, options.crop_bbox))
        deleted = _seen_gone(records, entries, report)
        report.error = _retire_refusal(images, _retire_limit(options.max_retire), records, deleted,
                                       scanned=len(entries) + report.counts["excluded"], report=report)
        if report.error:                  # before any change: no leftover removed, nothing retired or written
            report.status = "refused"
            _totals(report, connection)
            return
        report.removed_leftovers = [p.name for p in remove_orphans(out, connection)]
        retire_files(connection, deleted)
        report.counts["deleted"] = len(deleted)
        report.counts["unchanged"] = sum(e.kind == "unchanged" for e in entries)

        metadata = ShardMetadata(
            vocabulary=labels.vocabulary, heatmap=heatmap_parameters(settings), detector=settings.detector,
            detector_version=_known_detector_version(connection, settings.detector),
            image_encoding={"format": "jpeg", "max_side": settings.max_side, "quality": settings.jpeg_quality,
                            "color": "RGB", "exif_applied": True, "cropped_to_bbox": options.crop_bbox})
        extra = {"labels_source": labels.source, "labels_format": labels.format}
        write_collection_metadata(connection, metadata, extra)
        writer = ShardWriter(out, connection, metadata, options.shard_size, report)
        _apply(todo, labels, settings, options, writer, report, out)
        writer.flush()
        write_collection_metadata(connection, metadata, extra)   # the detector version is known now
        report.compaction = asdict(compact(out, connection, options.shard_size, options.compact_below))
        remove_orphans(out, connection)
        report.retired_kept = [p.name for p in leases.retired_files(out)]
        _totals(report, connection)


def _seen_gone(records: dict[str, FileRecord], entries: list[Entry], report: Report) -> list[str]:
    """Index entries whose file this run positively saw gone: absent from a folder listing that
    succeeded. Those under a folder that could not be listed, and files that could not be stat'ed,
    are kept; the live ones among them are counted `unreadable` and named in report.unreadable."""
    seen = {e.relative for e in entries}
    hidden = tuple(folder["path"] for folder in report.unreadable)
    unseen = [path for path in records if path not in seen]
    kept_live = [path for path in unseen if path.startswith(hidden) and records[path].shard_id is not None] \
        if hidden else []
    not_statted = [e for e in entries if e.kind == "unreadable"]
    report.unreadable += [{"path": e.relative, "reason": e.reason} for e in not_statted]
    report.counts["unreadable"] = len(kept_live) + len(not_statted)
    return sorted(path for path in unseen if not (hidden and path.startswith(hidden)))


def _retire_refusal(images: Path, limit: RetireLimit, records: dict[str, FileRecord], gone: list[str],
                    scanned: int, report: Report) -> str | None:
    """Why this run must change nothing (None: it may go on). `scanned`: image files found, --splits or not."""
    live = sum(record.shard_id is not None for record in records.values())
    retire = sum(records[path].shard_id is not None for path in gone)
    report.would_retire, report.max_retire = retire, str(limit)
    if retire and scanned == 0 and not limit.everything:
        return (f"refused: no image found under {images} while the collection holds {live} live items "
                "(an unmounted share, or a drop not yet copied?): nothing was changed; if the catalog is really "
                "empty, rerun with --max-retire 100%")
    if retire and not limit.allows(retire, live):
        over = f"{100 * retire / live:.3g}% > --max-retire {limit}" if limit.share else \
            f"{retire} > --max-retire {limit}"
        return (f"refused: this run would retire {retire} of {live} live items ({over}): nothing was changed; "
                f"check that --images {images} is the whole catalog; if those images are really gone, rerun with "
                f"--max-retire {retire} (or 100%)")
    return None


def _default_detector(out: Path) -> str:
    """Without --detector: the detector the collection was built with (so a new package default never
    silently reprocesses a whole catalog on the next cron run), else the package default."""
    from .detectors import DEFAULT

    if index_path(out).exists():
        with open_index(out, readonly=True) as connection:
            return get_meta(connection, "detector") or DEFAULT
    return DEFAULT


def _check_detector(name: str) -> None:
    """An unknown detector or a missing extra stops the run before any worker starts."""
    from .detectors import DetectorUnavailable, check_detector

    try:
        check_detector(name)
    except (ValueError, OSError, DetectorUnavailable) as error:
        raise DetectorChoiceError(str(error)) from None


def _check_backend(options: PrepOptions) -> None:
    if options.backend not in ("loky", "dask"):
        raise PrepError(f"unknown backend {options.backend!r} (loky or dask)")
    if options.backend == "dask" and not options.scheduler:
        raise PrepError("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")


def _retire_limit(text: str) -> RetireLimit:
    try:
        return RetireLimit.parse(text)
    except ValueError as error:
        raise PrepError(f"--max-retire {error}") from None


def _check_labels_continuity(connection, labels: Labels, out: Path) -> None:
    source = get_meta(connection, "labels_source")
    if source and not labels.source:
        raise PrepError(f"{out} was built with the labels of {source}: pass --labels again (a run without "
                        "labels would strip every item of its labels), or write to another --out")


def _known_detector_version(connection, detector: str) -> str:
    return (get_meta(connection, "detector_version") or "") if get_meta(connection, "detector") == detector else ""


def heatmap_parameters(settings: Settings) -> dict:
    return {"size": [settings.heatmap_size, settings.heatmap_size], "sigma": settings.heatmap_sigma,
            "limbs": True, "dtype": "uint8", "scale": 255,
            "joint_groups": {name: list(joints) for name, joints in heatmaps.JOINT_GROUPS.items()},
            "category_type_group": {str(k): v for k, v in heatmaps.CATEGORY_TYPE_GROUP.items()},
            "default_group": heatmaps.DEFAULT_GROUP}


def _apply(todo: list[Entry], labels: Labels, settings: Settings, options: PrepOptions, writer: ShardWriter,
           report: Report, out: Path) -> None:
    copies = [e for e in todo if e.reason is None and e.copy_from is not None]
    rejected_now = [e for e in todo if e.reason is not None]
    detect = [e for e in todo if e.reason is None and e.copy_from is None]
    for entry in rejected_now:
        _reject(entry, entry.reason, writer, report)
    _copy_rows(copies, labels, settings, writer, report, out)

    # One detection per distinct content (and box, when cropping); every path of it becomes an item.
    groups: dict[tuple, list[Entry]] = {}
    for entry in detect:
        box = entry.labels.bbox if options.crop_bbox else None
        key = (entry.sha256, box) if entry.sha256 else (entry.relative,)
        groups.setdefault(key, []).append(entry)
    tasks = [Task(str(g[0].path), g[0].relative, bbox=g[0].labels.bbox if options.crop_bbox else None,
                  joint_group=labels.joint_group(g[0].labels)) for g in groups.values()]
    by_first = {g[0].relative: g for g in groups.values()}
    try:
        _store_results(_progress(_map(tasks, settings, options), len(tasks), options.progress), by_first, labels,
                       settings, writer, report)
    except ClusterError as error:
        writer.flush()    # what arrived before the cluster failed is complete: committed, not done again
        raise PrepError(f"{error}: stopped; {report.stored} items of this run are committed and the next run "
                        "does only the rest") from None


def _store_results(results: Iterable[Processed], by_first: dict[str, list[Entry]], labels: Labels,
                   settings: Settings, writer: ShardWriter, report: Report) -> None:
    for result in results:
        group = by_first[result.relative]
        report.processed += 1
        if result.rejected:
            for entry in group:
                _reject(entry, result.reason, writer, report, result.sha256)
            continue
        if result.detector_version and not writer.metadata.detector_version:
            writer.metadata.detector_version = result.detector_version
        for entry in group:
            item, record = _item_and_record(entry, result, labels, settings)
            _count(entry, record, report)
            writer.add(item, record)


def _reject(entry: Entry, reason: str, writer: ShardWriter, report: Report, sha256: str | None = None) -> None:
    writer.reject(FileRecord(entry.relative, entry.size, entry.mtime_ns, sha256 or entry.sha256, "rejected",
                             reason=reason, split=entry.labels.split, labels=entry.fingerprint))
    report.counts["rejected"] += 1
    report.rejected.append({"path": entry.relative, "reason": reason})


def _count(entry: Entry, record: FileRecord, report: Report) -> None:
    report.counts[entry.kind] += 1
    if record.status == "no_person":
        report.counts["no_person"] += 1


def _copy_rows(entries: list[Entry], labels: Labels, settings: Settings, writer: ShardWriter, report: Report,
               out: Path) -> None:
    """Items whose pixels and keypoints are already stored: touched files keep their row (only the
    index learns the new size and mtime); the others are copied with new labels (and a heatmap
    rendered again only when it would differ). One source shard at a time, read once."""
    touched, by_shard = [], {}
    for entry in entries:
        source = entry.copy_from
        if entry.kind == "unchanged":
            touched.append(FileRecord(entry.relative, entry.size, entry.mtime_ns, source.sha256, source.status,
                                      source.reason, source.shard_id, source.row, source.split, source.labels))
        else:
            by_shard.setdefault(source.shard_id, []).append(entry)
    heatmap = json.loads(json.dumps(heatmap_parameters(settings)))    # as a shard's attribute reads back
    for shard_id, copies in sorted(by_shard.items()):
        with Shard(out / shard_name(shard_id)) as shard:
            same_heatmaps = shard.heatmap_params == heatmap
            for entry in copies:
                stored = shard.item(entry.copy_from.row)
                # The stored heatmap is the one _item_and_record would render when the parameters and
                # the joint subset (from the category type) are the same: keep it.
                group = category_joint_group(shard.vocabulary, stored.category)
                result = Processed(entry.relative, sha256=stored.sha256, image=stored.image,
                                   keypoints=stored.keypoints, width=stored.width, height=stored.height,
                                   heatmap=stored.heatmap if same_heatmaps else None,
                                   joint_group=group if same_heatmaps else None)
                item, record = _item_and_record(entry, result, labels, settings)
                _count(entry, record, report)
                writer.add(item, record)
    if touched:
        record_files(writer.connection, touched)


def _map(tasks: list[Task], settings: Settings, options: PrepOptions) -> Iterator[Processed]:
    """Results in completion order. One local job runs in this process (no pool to start)."""
    if not tasks:
        return
    if options.backend == "dask":
        yield from map_on_cluster(tasks, settings, options.scheduler, options.jobs, options.worker_wait)
    elif options.jobs == 1:
        yield from (process(task, settings) for task in tasks)
    else:
        from joblib import delayed

        from .workers import loky_parallel

        parallel = loky_parallel(options.jobs, return_as="generator_unordered", batch_size=4,
                                 pre_dispatch="8*n_jobs")   # workers end with this process, even on kill -9
        yield from parallel(delayed(process)(task, settings) for task in tasks)


def _progress(results: Iterable[Processed], total: int, enabled: bool | None) -> Iterable[Processed]:
    from tqdm import tqdm

    return tqdm(results, total=total, unit="img", desc="prep-pose", disable=None if enabled is None else not enabled)


# --- reports ----------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_report(path: Path, report: Report) -> None:
    """Atomically (temporary file, rename), so a reader never sees half a report; also as latest.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: v for k, v in asdict(report).items()}, indent=1, ensure_ascii=False)
    for target in (path, path.parent / "latest.json"):
        atomic_write_text(target, text)


def failure(report: Report, strict: bool) -> str | None:
    """Why a completed run exits 1 (None: exit 0, also when some files were rejected or unreadable):
    with --strict while the catalog holds a rejected file (from this run or an earlier one), this run
    could not read a folder or file, or with --labels an image is unlabelled or a label row matches no
    image; when no image was found and nothing was retired either; or when
    this run had files to process and could store none of them."""
    if strict and (report.counts["rejected"] or report.rejected_total):
        return f"failed: --strict and {report.rejected_total} file(s) are rejected (vsam shards info lists them)"
    if strict and report.unreadable:
        return f"failed: --strict and {len(report.unreadable)} folder(s) or file(s) could not be read"
    match = report.labels_match
    if strict and match and (match["unlabelled"] or match["unmatched_rows"]):
        return (f"failed: --strict and the labels do not pair one to one with the images: {match['unlabelled']} "
                f"image(s) unlabelled, {match['unmatched_rows']} label row(s) match no image")
    if report.found == 0 and report.counts["excluded"] == 0 and report.counts["deleted"] == 0:
        return f"failed: no image found under {report.images}"
    if report.counts["rejected"] and report.stored == 0:
        return "failed: nothing could be processed"
    return None


def catalog_problems(out: str | os.PathLike, images: str | os.PathLike, splits: tuple[str, ...] | None = None,
                     labels: Labels | None = None) -> list[str]:
    """Exactly-once audit of a finished collection against its catalog: every readable image under
    `images` is live exactly once with the sha256 of its current bytes, nothing else is live, and
    `shard_format.verify_collection` finds nothing. Returns the problems (empty when sound)."""
    from .shard_format import live_items, verify_collection

    problems = verify_collection(out)
    live: dict[str, list[dict]] = {}
    for item in live_items(out):
        live.setdefault(item["path"], []).append(item)
    with open_index(out, readonly=True) as connection:
        rejected = {record["path"] for record in rejected_files(connection)}
    images = Path(images)
    found = catalog_images(images)
    matching = labels.match(i.name for i in found if not i.reason) if labels is not None else None
    for image in found:
        relative = image.name     # a name that is not valid UTF-8: rejected under its escaped name
        if splits and matching is not None and not image.reason and matching.for_item(relative).split not in splits:
            continue
        try:
            sha256 = hashlib.sha256(image.path.read_bytes()).hexdigest()
        except OSError:
            sha256 = None
        copies = live.pop(relative, [])
        if len(copies) > 1:
            problems.append(f"{relative}: live {len(copies)} times ({[(c['shard'], c['row']) for c in copies]})")
        elif not copies and relative not in rejected:
            problems.append(f"{relative}: neither live nor rejected in {index_path(out)}")
        elif copies and copies[0]["sha256"] != sha256:
            problems.append(f"{relative}: live with sha256 {copies[0]['sha256'][:12]}…, the file has {str(sha256)[:12]}…")
    problems += [f"{path}: live but not in the catalog" for path in sorted(live)]
    return problems
