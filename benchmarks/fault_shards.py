"""Fault trials: random single-byte flips in a real shard and in the real index. Does `verify` see each?

A small real collection is built by `vsam prep-pose` (BlazePose, images stored at 128 px) from DeepFashion
photos copied to a temporary folder, with CSV labels (categories, attributes, splits). Then, one at a time, a
byte at a seeded random position of one file is XORed with a random non-zero mask:

* the shard (`shard-000001.h5`): half the flips anywhere in the file, half outside the datasets' stored
  data (superblock, object headers, attributes, heaps, B-trees, free space: where a flip used to crash
  `verify` or slip past it);
* the index (`index.sqlite`): half anywhere, half in page content (not in the unused space of a page or a
  free page, which no reader looks at); the table says where each flip landed (unused space, or the
  table or index owning the page; page 1 also holds the file header).

Each flip is classified:

* caught: `verify_collection` reports a problem naming the damaged file;
* harmless: verify reports nothing and everything a reader can see is identical to the original (every
  dataset's dtype, shape and bytes, every file attribute of every shard, every row of every index table);
* silent change: verify reports nothing but something read back differs;
* crash: verify raised (a traceback), hung or killed its process.

Besides verify, every flip runs the read paths of `vsam prep-pose` and `vsam train` (index meta and rows,
`Shard.read` and `Shard.item` of every row, a `ShardStream` epoch): "readers refused" counts flips where they
stopped with a ShardFormatError naming the file (a caught flip they let through is in bytes they do not
check: an image read alone, an index page's structure), "reader crash" where one raised anything else. Each trial runs in a forked process, so a hard crash of the HDF5
library is counted, not fatal.

    .venv/bin/python benchmarks/fault_shards.py [--flips 400] [--images 24] [--seed 0]

Writes benchmarks/results/fault_shards.json (with --out, elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import signal
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "data" / "deepfashion-attr" / "img"
VSAM = str(Path(sys.executable).with_name("vsam"))
RESULTS = REPO / "benchmarks" / "results" / "fault_shards.json"
CATEGORIES = ("Tee", "Jeans", "Dress")
ATTRIBUTES = ("floral", "striped", "denim", "lace")
OUTCOMES = ("caught", "harmless", "silent change", "crash")
TRIAL_TIMEOUT_S = 60

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from pose_prep.shard_format import (INDEX_NAME, Shard, ShardFormatError, collection_metadata, file_records,  # noqa: E402
                                    live_rows, open_index, verify_collection)
from vsam_train.data import ShardStream, make_loader  # noqa: E402  (imported once, before the trials fork)


# --- the collection ------------------------------------------------------------------------------

def build_collection(root: Path, n_images: int, shard_size: int) -> Path:
    images = root / "img"
    images.mkdir()
    rows = []
    for i, path in enumerate(sorted(PHOTOS.glob("*.jpg"))[2000:2000 + n_images]):
        shutil.copyfile(path, images / path.name)
        attributes = ";".join(a for j, a in enumerate(ATTRIBUTES) if (i >> j) & 1)
        rows.append(f"{path.name},{CATEGORIES[i % 3]},{attributes},{('train', 'val', 'test')[i % 3]}")
    labels = root / "labels.csv"
    labels.write_text("path,category,attributes,split\n" + "\n".join(rows) + "\n")
    out = root / "shards"
    # In a process of its own: the trials fork this one, which must not hold the detector's threads.
    built = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--labels", str(labels), "--out", str(out),
                            "--shard-size", str(shard_size), "--max-side", "128", "--detector", "blazepose",
                            "--no-progress"], capture_output=True, text=True)
    if built.returncode != 0 or verify_collection(out):
        raise SystemExit(f"could not build a sound collection: {built.stdout}{built.stderr[-2000:]}")
    return out


def snapshot(folder: Path) -> dict:
    """Everything a reader can see, as comparable values: each shard's datasets (dtype, shape, bytes)
    and file attributes, and every row of every table of the index (its schema included)."""
    seen = {}
    for path in sorted(folder.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            seen[path.name] = {
                "datasets": {name: _dataset_value(f[name]) for name in sorted(f)},
                "attrs": {key: _attr_value(value) for key, value in sorted(f.attrs.items())}}
    connection = sqlite3.connect((folder / INDEX_NAME).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        schema = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        seen[INDEX_NAME] = {"schema": sorted(map(repr, schema)),
                            **{t: sorted(map(repr, connection.execute(f'SELECT * FROM "{t}"'))) for t in tables}}
    finally:
        connection.close()
    return seen


def _dataset_value(dataset: h5py.Dataset):
    data = dataset.asstr()[...] if h5py.check_string_dtype(dataset.dtype) else dataset[...]
    return (str(dataset.dtype), dataset.shape,
            repr(data.tolist()) if data.dtype == object else data.tobytes())


def _attr_value(value):
    return (type(value).__name__, repr(value.tolist() if isinstance(value, np.ndarray) else value))


def read_paths(folder: Path) -> None:
    """What `vsam prep-pose` and `vsam train` read of an existing collection."""
    collection_metadata(folder)
    with open_index(folder, readonly=True) as connection:
        file_records(connection)
    for path, rows in live_rows(folder).items():
        with Shard(path) as shard:
            shard.read()
            for row in rows:
                shard.item(int(row))
    for _ in make_loader(ShardStream(folder, None, image_size=64, batch_size=4, train=False), num_workers=0):
        pass


# --- one trial (in a forked process) ----------------------------------------------------------------

def trial(folder: str, target: str, position: int, mask: int, original: dict) -> dict:
    folder = Path(folder)
    path = folder / target
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))
    try:
        problems = verify_collection(folder)
    except Exception:
        return {"outcome": "crash", "where": "verify", "detail": traceback.format_exc(limit=-3)}
    if problems:
        result = {"outcome": "caught", "detail": problems[0]}
    else:
        try:
            same = snapshot(folder) == original
        except Exception as error:      # unreadable to the raw readers, yet verify saw nothing
            same, error_text = False, f"{type(error).__name__}: {error}"
        else:
            error_text = ""
        result = {"outcome": "harmless" if same else "silent change", "detail": error_text}
    try:
        read_paths(folder)
        result["readers"] = "ok"
    except ShardFormatError as error:
        result["readers"] = "error"
        result["reader_detail"] = str(error)
    except Exception:
        result["readers"] = "crash"
        result["reader_detail"] = traceback.format_exc(limit=-3)
    return result


def run_trial(folder: Path, target: str, position: int, mask: int, original: dict, pristine: bytes) -> dict:
    """`trial` in a forked process (a crash or hang of the HDF5 library is an outcome, not the end of
    the benchmark); the file is restored afterwards."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: run the trial, send its result back
        os.close(read_end)
        try:
            result = trial(str(folder), target, position, mask, original)
        except BaseException:
            result = {"outcome": "crash", "where": "trial", "detail": traceback.format_exc(limit=-3)}
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + TRIAL_TIMEOUT_S
    with os.fdopen(read_end, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    (folder / target).write_bytes(pristine)
    if status != 0 or not chunks:
        how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status}"
        return {"outcome": "crash", "where": "process", "detail": how, "readers": "crash"}
    return json.loads(b"".join(chunks))


# --- where to flip -------------------------------------------------------------------------------

def dataset_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) byte ranges of every dataset's stored data (contiguous, or each chunk)."""
    ranges = []
    with h5py.File(path, "r") as f:
        for name in f:
            dataset = f[name]
            if dataset.chunks is None:
                offset = dataset.id.get_offset()
                if offset is not None:
                    ranges.append((offset, offset + dataset.id.get_storage_size()))
            else:
                for i in range(dataset.id.get_num_chunks()):
                    chunk = dataset.id.get_chunk_info(i)
                    ranges.append((chunk.byte_offset, chunk.byte_offset + chunk.size))
    return sorted(ranges)


def index_pages(path: Path) -> tuple[int, dict[int, str]]:
    """(page size, page number → what the page holds: a table or index name, or none (a free page))."""
    connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        owners = {page: name for name, page in connection.execute("SELECT name, pageno FROM dbstat")}
    finally:
        connection.close()
    return page_size, owners


def unused_page_bytes(data: bytes, page_size: int, owners: dict[int, str]) -> np.ndarray:
    """True for the bytes of the index that no reader looks at: free pages, the gap between a b-tree
    page's cell pointers and its cells, and the inside of its free blocks (SQLite's file format, 1.6)."""
    unused = np.zeros(len(data), bool)
    u16 = lambda at: int.from_bytes(data[at:at + 2], "big")  # noqa: E731
    trunks, trunk = set(), int.from_bytes(data[32:36], "big")   # the free list's trunk pages hold the list
    while trunk and trunk not in trunks and trunk * page_size <= len(data):
        trunks.add(trunk)
        trunk = int.from_bytes(data[(trunk - 1) * page_size:(trunk - 1) * page_size + 4], "big")
    for page in range(1, len(data) // page_size + 1):
        base = (page - 1) * page_size
        if page not in owners:
            if page not in trunks:                  # a free page: nothing reads it
                unused[base:base + page_size] = True
            continue
        header = base + (100 if page == 1 else 0)
        kind = data[header]
        if kind not in (2, 5, 10, 13):              # an overflow page: all content
            continue
        cells = u16(header + 3)
        content = u16(header + 5) or 65536
        unused[header + (12 if kind in (2, 5) else 8) + 2 * cells:base + content] = True
        block = u16(header + 1)
        while block:
            unused[base + block + 4:base + block + u16(base + block + 2)] = True
            block = u16(base + block)
    return unused


def _page_region(owner: str | None) -> str:
    if owner is None:
        return "free page"
    if owner in ("sqlite_schema", "sqlite_master"):
        return "header + schema"
    if owner.startswith("sqlite_autoindex_"):
        return f"{owner.removeprefix('sqlite_autoindex_').rsplit('_', 1)[0]} key index"
    return owner


def positions(target: str, path: Path, n: int, rng: random.Random) -> list[tuple[int, str]]:
    """(byte position, region) of `n` flips: half anywhere in the file, half where damage is hard to
    see (the shard: outside its datasets' stored data; the index: inside page content, not unused
    space). The region is where the flip landed: for the shard, "dataset data" or "outside data";
    for the index, "unused space" (see `unused_page_bytes`) or the table or index whose page content
    holds the byte (page 1 also holds the file header)."""
    size = path.stat().st_size
    if target == INDEX_NAME:
        page_size, owners = index_pages(path)
        hard = ~unused_page_bytes(path.read_bytes(), page_size, owners)
        name = lambda p: _page_region(owners.get(p // page_size + 1)) if hard[p] else "unused space"  # noqa: E731
    else:
        hard = np.ones(size, bool)
        for start, end in dataset_ranges(path):
            hard[start:end] = False
        name = lambda p: "outside data" if hard[p] else "dataset data"  # noqa: E731
    candidates = np.flatnonzero(hard)
    flips = [rng.randrange(size) for _ in range(n - n // 2)] + \
        [int(candidates[rng.randrange(len(candidates))]) for _ in range(n // 2)]
    return [(p, name(p)) for p in flips]


# --- report --------------------------------------------------------------------------------------

def table(results: dict) -> str:
    """A Markdown table: one row per file and region, then the file's total."""
    columns = ["file", "flips in", "flips", *OUTCOMES, "readers refused", "reader crash"]
    lines = ["| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * (len(columns) - 2)]
    for target, trials in results.items():
        for region in sorted({t["region"] for t in trials}) + ["all"]:
            chosen = [t for t in trials if region in ("all", t["region"])]
            counts = [len(chosen), *(sum(t["outcome"] == o for t in chosen) for o in OUTCOMES),
                      sum(t.get("readers") == "error" for t in chosen), sum(t.get("readers") == "crash" for t in chosen)]
            cells = [target, region, *map(str, counts)]
            if region == "all":
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CODE_UNDER_TEST = ("pose_prep/shard_format.py", "vsam_train/data.py", "benchmarks/fault_shards.py")


def code_state() -> dict:
    git = lambda *args: subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "HEAD"), "code_under_test": CODE_UNDER_TEST,
            "uncommitted_changes": bool(git("status", "--porcelain", "--", *CODE_UNDER_TEST))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flips", type=int, default=400, help="flips per file (shard, index)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    code = code_state()          # now: the trials run the code this process loaded
    with tempfile.TemporaryDirectory() as root:
        folder = build_collection(Path(root), args.images, args.shard_size)
        original = snapshot(folder)
        results, sizes = {}, {}
        for target in ("shard-000001.h5", INDEX_NAME):
            path = folder / target
            pristine = path.read_bytes()
            trials = []
            for position, region in positions(target, path, args.flips, rng):
                mask = rng.randrange(1, 256)
                result = run_trial(folder, target, position, mask, original, pristine)
                trials.append({"position": position, "mask": mask, "region": region, **result})
            results[target] = trials
            sizes[target] = len(pristine)
    printed = table(results)
    print(", ".join(f"{target}: {size} bytes" for target, size in sizes.items()) + "\n")
    print(printed)
    for target, trials in results.items():
        for t in trials:
            if t["outcome"] in ("silent change", "crash") or t.get("readers") == "crash":
                print(f"\n{target} @{t['position']} ^0x{t['mask']:02x} ({t['region']}): {t['outcome']}, "
                      f"readers {t.get('readers')}\n  {t.get('detail', '')}\n  {t.get('reader_detail', '')}")
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **code,
        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.monotonic() - started, 1),
        "machine": platform.platform(), "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version,
        "sqlite": sqlite3.sqlite_version, "flips_per_file": args.flips, "images": args.images,
        "shard_size": args.shard_size, "seed": args.seed, "file_bytes": sizes, "table": printed,
        "counts": {target: {o: sum(t["outcome"] == o for t in trials) for o in OUTCOMES}
                   | {"readers refused": sum(t.get("readers") == "error" for t in trials),
                      "reader crash": sum(t.get("readers") == "crash" for t in trials)}
                   for target, trials in results.items()},
        "trials": {target: [{key: (value[:300] if isinstance(value, str) else value) for key, value in t.items()}
                            for t in trials] for target, trials in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
