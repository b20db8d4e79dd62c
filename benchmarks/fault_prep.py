"""Fault trials: kill -9 a real `vsam prep-pose` process at a random instant, rerun it, check exactly-once.

Each trial starts a real `vsam prep-pose` subprocess (CSV labels, --shard-size 4 so that a run commits
many shards), kills its whole process group with SIGKILL at a uniformly random instant of its working
life (from shortly before it takes the output folder's lock to its end, where it decodes, detects,
writes and commits), then checks

* no readable partial shard: every `shard-*.h5` in the folder passes `verify_shard`;
* after a rerun to completion: every image of the catalog is live exactly once with the sha256 of its
  bytes and nothing else is (`prep.catalog_problems`), each item carries its current labels, and
  `vsam shards verify` exits 0.

Trials rotate through three kinds of interrupted run: a first build into an empty folder, an
incremental run (12 added, 4 changed, 4 deleted), and a relabelling run (the CSV's categories change,
so every row is copied with new labels).

    .venv/bin/python benchmarks/fault_prep.py [--trials 24] [--images 80] [--seed 0]

Columns: the kind of run killed, the kill instant after process start, shard files and live items left
by the kill (before->after for runs on an existing collection), what the rerun then had to do.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "data" / "deepfashion-attr" / "img"
VSAM = str(Path(sys.executable).with_name("vsam"))

from pose_prep.labels import read_labels  # noqa: E402
from pose_prep.lock import is_locked  # noqa: E402
from pose_prep.prep import catalog_problems  # noqa: E402
from pose_prep.shard_format import Shard, live_items, verify_shard  # noqa: E402

CATEGORIES = ("Tee", "Jeans", "Dress")


def write_labels(path: Path, images: Path, shift: int) -> None:
    rows = [f"{p.name},{CATEGORIES[(int(p.stem) + shift) % 3]},floral,{('train', 'val', 'test')[int(p.stem) % 3]}"
            for p in sorted(images.iterdir())]
    # A relabelling run renames the categories, so the vocabulary changes and every row is copied.
    rows = [r.replace(",Tee,", f",Tee{shift},") for r in rows]
    path.write_text("path,category,attributes,split\n" + "\n".join(rows) + "\n")


def prep_command(images: Path, out: Path, labels: Path) -> list[str]:
    return [VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--labels", str(labels),
            "--shard-size", "4", "--no-progress", "--detector", "blazepose"]


def run_to_end(images: Path, out: Path, labels: Path) -> str:
    result = subprocess.run(prep_command(images, out, labels), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"rerun failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout.splitlines()[0]


def prepare(kind: str, images: Path, spare: list[Path], out: Path, labels: Path, rng: random.Random,
            shift: int) -> None:
    """Bring the folder to the state before the interrupted run of this kind."""
    if kind == "first build":
        shutil.rmtree(out, ignore_errors=True)
    elif kind == "incremental":
        present = sorted(images.iterdir())
        for path in rng.sample(present, 4):
            path.unlink()
        for path in rng.sample(sorted(images.iterdir()), 4):
            path.write_bytes(rng.choice(spare).read_bytes())
        for path in rng.sample([p for p in spare if not (images / p.name).exists()], 12):
            shutil.copyfile(path, images / path.name)
    write_labels(labels, images, shift)   # labels follow the file name: an incremental run keeps the shift


def timed_run(images: Path, out: Path, labels: Path) -> tuple[float, float]:
    """Seconds from process start until it holds the lock, and until it ends."""
    started = time.monotonic()
    process = subprocess.Popen(prep_command(images, out, labels), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    locked = None
    while process.poll() is None:
        if locked is None and is_locked(out):
            locked = time.monotonic() - started
        time.sleep(0.01)
    if process.returncode:
        raise SystemExit(f"calibration run failed ({process.returncode})")
    return locked or 0.0, time.monotonic() - started


def labels_match(out: Path, labels: Path) -> bool:
    expected = read_labels(labels)
    for item in live_items(out):
        with Shard(out / item["shard"]) as shard:
            stored = shard.item(item["row"])
        want = expected.for_item(item["path"])
        if (stored.category, stored.split) != (want.category, want.split):
            return False
    return True


def _nonzero(summary: str) -> str:
    """The counts of a prep-pose summary line that are not zero."""
    counts = summary.removeprefix("prep-pose: ").split(" in ")[0].split(", ")
    return ", ".join(c for c in counts if not c.startswith("0 ")) or "nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    photos = sorted(PHOTOS.glob("*.jpg"))
    with tempfile.TemporaryDirectory() as folder:
        images, out, labels = Path(folder) / "img", Path(folder) / "shards", Path(folder) / "labels.csv"
        images.mkdir()
        for path in photos[3000:3000 + args.images]:
            shutil.copyfile(path, images / path.name)
        spare = photos[4000:4000 + 12 * args.trials]

        kinds = ("first build", "incremental", "relabelling")
        window = {}
        for shift, kind in enumerate(kinds):     # when an uninterrupted run of each kind locks and ends
            prepare(kind, images, spare, out, labels, rng, shift if kind == "relabelling" else 0)
            window[kind] = timed_run(images, out, labels)
        print("calibration, uninterrupted runs (lock taken .. process end): "
              + ", ".join(f"{k} {a:.1f}..{b:.1f} s" for k, (a, b) in window.items())
              + "; each kill falls uniformly in [0.8 x lock, 1.05 x end] s after the process starts,\n"
              "the stretch where the run decodes, detects, writes and commits\n")
        print(f"{'trial':>5}  {'interrupted run':<16}{'kill at':>8}  {'shards':>6}  {'live':>9}  "
              f"{'the rerun did':<58}  result")

        failures, shift = 0, 0
        for trial in range(args.trials):
            kind = kinds[trial % 3]
            shift = shift if kind == "incremental" else trial
            prepare(kind, images, spare, out, labels, rng, shift)
            before = sum(1 for _ in live_items(out)) if (out / "index.sqlite").exists() else 0
            instant = rng.uniform(0.8 * window[kind][0], 1.05 * window[kind][1])
            process = subprocess.Popen(prep_command(images, out, labels), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(instant)
            finished_first = process.poll() is not None
            try:
                os.killpg(process.pid, signal.SIGKILL)   # the run and its workers, as a crash would
            except ProcessLookupError:
                pass                                      # it had finished and nothing of its group is left
            process.wait()
            readable = list(out.glob("shard-*.h5"))
            partial = [p.name for p in readable if verify_shard(p)]
            live = sum(1 for _ in live_items(out)) if (out / "index.sqlite").exists() else 0
            rerun = run_to_end(images, out, labels)
            problems = catalog_problems(out, images)
            verify = subprocess.run([VSAM, "shards", "verify", str(out)], capture_output=True, text=True)
            ok = not partial and not problems and verify.returncode == 0 and labels_match(out, labels)
            failures += not ok
            note = " (had finished)" if finished_first else ""
            live = f"{before}->{live}" if kind != "first build" else str(live)
            print(f"{trial:>5}  {kind:<16}{instant:>7.2f}s  {len(readable):>6}  {live:>9}  "
                  f"{_nonzero(rerun):<58}  {'ok' if ok else 'FAILED'}{note}")
            broken = verify.stdout.splitlines() if verify.returncode else []
            for problem in partial + problems + broken:
                print(f"       {problem}")
        print(f"\n{args.trials - failures}/{args.trials} trials: every image live exactly once with its current "
              f"labels, no readable partial shard, `vsam shards verify` ok")
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
