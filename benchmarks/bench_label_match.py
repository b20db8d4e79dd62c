"""What the one-to-one label matching of prep-pose (`Labels.match`, issue 10.2) costs a run:

1. the real DeepFashion attribute-challenge labels on its 7000 photos, with `--images` at img/ and at the
   dataset root: counts, and milliseconds for `match`;
2. the scan + classify of an unchanged rerun of those 7000 photos (an index that holds every file as it is):
   the CPU work such a rerun does besides process start and opening the index;
3. benchmark-shaped synthetic paths (5000 item folders × 58 photos = 290,000 rows, as the DeepFashion
   Category and Attribute Prediction Benchmark): every image at its row's path, and a drop of 1000 images
   under paths without the leading img/.

    .venv/bin/python benchmarks/bench_label_match.py [--rounds 5] \
        [--json benchmarks/results/bench_label_match-cpu-DATE.json]

Best of --rounds (the machine is shared and noisy); prints a table, writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LABELS = REPO.parent / "shared" / "data" / "deepfashion-attr"

from pose_prep import prep  # noqa: E402
from pose_prep.images import find_images  # noqa: E402
from pose_prep.labels import ItemLabels, Labels, read_labels  # noqa: E402
from pose_prep.prep_worker import Settings  # noqa: E402
from pose_prep.shard_format import FileRecord  # noqa: E402


def best_seconds(work, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def real_matching(rounds: int) -> list[dict]:
    rows = []
    for images in (LABELS / "img", LABELS):
        relative = [p.relative_to(images).as_posix() for p in find_images(images)]
        labels = read_labels(LABELS)
        summary = labels.match(relative).summary(0)
        # a fresh Labels each round (nothing cached), as in a run; reading the files is not timed
        fresh = [read_labels(LABELS) for _ in range(rounds)]
        seconds = best_seconds(lambda: fresh.pop().match(relative), rounds)
        rows.append({"case": f"deepfashion-attr, --images {images.relative_to(LABELS.parent)}",
                     "images": len(relative), "rows": len(labels.items), "match_ms": round(seconds * 1000, 1),
                     **{k: summary[k] for k in ("matched", "unlabelled", "unmatched_rows", "ambiguous", "case_only")}})
    return rows


def unchanged_scan(rounds: int) -> dict:
    images = LABELS / "img"
    settings = Settings(detector="blazepose", max_side=256, jpeg_quality=90)
    labels = read_labels(LABELS)
    report = prep.Report(images=str(images), out="-", labels=None, detector=settings.detector)
    fingerprint = prep.Fingerprints(labels, settings, False)
    records = {e.relative: FileRecord(e.relative, e.size, e.mtime_ns, "0" * 64, "ok", shard_id=1, row=0,
                                      labels=fingerprint(e.labels))
               for e in prep.scan(images, labels, None, report)}

    def work():
        fresh = read_labels(LABELS)
        run_report = prep.Report(images=str(images), out="-", labels=None, detector=settings.detector)
        entries = prep.scan(images, fresh, None, run_report)
        todo = prep.classify(entries, records, prep.Fingerprints(fresh, settings, False))
        gone = prep._seen_gone(records, entries, run_report)
        assert not todo and not gone and len(entries) == len(records)
    return {"case": "scan + classify of an unchanged rerun (labels read included)", "images": len(records),
            "ms": round(best_seconds(work, rounds) * 1000, 1)}


def synthetic(rounds: int) -> list[dict]:
    keys = [f"img/Item_{folder:04d}/img_{n:08d}.jpg" for folder in range(5000) for n in range(58)]
    item = ItemLabels()
    rows = []
    for case, images in (("290,000 images at their rows' paths", keys),
                         ("a drop of 1000 images, paths without img/", [k[4:] for k in keys[::290]])):
        seconds = best_seconds(lambda: Labels(items=dict.fromkeys(keys, item)).match(images), max(1, rounds // 2))
        rows.append({"case": f"synthetic benchmark shape: {case}", "images": len(images), "rows": len(keys),
                     "match_ms": round(seconds * 1000, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), shared, noisy",
               "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
               "matching": real_matching(args.rounds), "unchanged_scan": unchanged_scan(args.rounds),
               "synthetic": synthetic(args.rounds)}
    print(f"{'case':<72} {'images':>8} {'rows':>8} {'ms':>9}")
    for row in results["matching"] + [results["unchanged_scan"]] + results["synthetic"]:
        print(f"{row['case']:<72} {row['images']:>8} {row.get('rows', ''):>8} {row.get('match_ms', row.get('ms')):>9}")
    for row in results["matching"]:
        print(f"  {row['case']}: {row['matched']} matched, {row['unlabelled']} unlabelled, "
              f"{row['unmatched_rows']} rows unmatched, {row['ambiguous']} ambiguous, {row['case_only']} case only")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
