"""Shards that shrink, and paths that come back (issue 17.7): prep-pose on a catalog of many paths.

The catalog: `--paths` paths (default 20,000) in folders of 500, each a hard link to one of the fixture set's
51 real photos (tests/data/photos), so the detector runs once per distinct photo and the figures are those of
the job around it: hashing, copying rows, writing and committing shards. Steps, each one `prep-pose` run
(in this process, BlazePose, `--shard-size 1000`):

1. first build;
2. delete every other path (`--max-retire 100%`): every shard is left half live; with compaction
   (this vsam) the run rewrites them;
3. restore the deleted paths (the same bytes as live rows: copied, not detected);
4. an unchanged rerun, twice in this process, then as `vsam prep-pose` (process start included).

Printed: seconds per step, shard files and bytes after each, the restore / first-build ratio. `--code DIR`
runs another checkout's pose_prep (e.g. `git archive <commit> pose_prep | tar -x -C /tmp/old`) for a
before/after comparison with the same script; `--json FILE` appends the figures to a JSON list.

    .venv/bin/python benchmarks/bench_compaction.py [--paths 20000] [--code DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "tests" / "data" / "photos").glob("*.jpg"))


def make_catalog(images: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        folder = images / f"{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        os.link(PHOTOS[i % len(PHOTOS)], path)
        paths.append(path)
    return paths


def shards(out: Path) -> tuple[int, int]:
    files = list(out.glob("shard-*.h5"))
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=20000)
    parser.add_argument("--code", type=Path, default=REPO, help="folder holding the pose_prep package to measure")
    parser.add_argument("--json", type=Path, help="append the figures to this JSON list")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code))
    from pose_prep.prep import PrepOptions, catalog_problems, run

    compaction = "compact_below" in PrepOptions.__dataclass_fields__
    figures: dict = {"code": str(args.code), "paths": args.paths, "distinct_photos": len(PHOTOS),
                     "compaction": compaction, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                     "load_average_at_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}

    with tempfile.TemporaryDirectory() as folder:
        images, out = Path(folder) / "img", Path(folder) / "shards"
        paths = make_catalog(images, args.paths)

        def step(name: str, **options) -> None:
            started = time.perf_counter()
            report = run(PrepOptions(images=images, out=out, detector="blazepose", progress=False, **options))
            seconds = time.perf_counter() - started
            files, size = shards(out)
            figures[name] = {"seconds": round(seconds, 2), "shards": files, "bytes": size,
                             "live": report.items_total, "counts": {k: v for k, v in report.counts.items() if v},
                             "detected": report.processed}
            print(f"{name:<12} {seconds:7.2f} s   {files:3d} shards {size / 1e6:8.1f} MB   {report.items_total} live, "
                  f"{report.processed} detected, {figures[name]['counts']}")

        step("first_build")
        for path in paths[::2]:
            path.unlink()
        step("delete_half", max_retire="100%")
        for i, path in enumerate(paths):
            if i % 2 == 0:
                os.link(PHOTOS[i % len(PHOTOS)], path)
        step("restore")
        step("unchanged")
        step("unchanged_again")      # the first one after many commits also reads back a long SQLite WAL
        if args.code.resolve() == REPO:      # the command line is this checkout's
            command = [str(Path(sys.executable).with_name("vsam")), "prep-pose", "--images", str(images), "--out",
                       str(out), "--no-progress", "--detector", "blazepose"]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            figures["unchanged_cli_seconds"] = round(time.perf_counter() - started, 2)
        problems = catalog_problems(out, images)
        figures["exactly_once_audit"] = "ok" if not problems else problems[:5]

    ratio = figures["restore"]["seconds"] / figures["first_build"]["seconds"]
    figures["restore_over_first_build"] = round(ratio, 2)
    shrink = figures["delete_half"]["bytes"] / figures["first_build"]["bytes"]
    figures["bytes_after_delete_over_first_build"] = round(shrink, 2)
    cli = figures.get("unchanged_cli_seconds")
    print(f"restore / first build: {ratio:.2f}; bytes after deleting half / first build: {shrink:.2f}; unchanged "
          f"rerun as vsam prep-pose: {f'{cli:.2f} s wall' if cli else 'not measured'}; exactly-once audit: "
          f"{figures['exactly_once_audit']}")
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(previous + [figures], indent=1) + "\n")


if __name__ == "__main__":
    main()
