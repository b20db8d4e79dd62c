"""Pose detection throughput, the old path beside the new one, and heatmap rendering.

    .venv/bin/python benchmarks/bench_pose.py [--images 120] [--rounds 1] [--jobs-table] [--json PATH]

1. `vsam prep-pose` end to end (read, hash, decode, detect, heatmap, JPEG re-encode, shards and index
   written), one job, each configuration in a fresh process, after a warm-up run: `auto` and `yolo`
   with YOLO through ultralytics' torch path (VSAM_YOLO_RUNTIME=torch, the old path) and through
   onnxruntime (the default since issue 16). Per configuration: photos/s of wall time; CPU ms per photo
   (every thread of the process: mediapipe's and onnxruntime's included); photos per CPU-second, that
   is per core, the figure that stays put while other jobs share the machine; seconds to build the
   detector; peak RSS; for auto, the share of photos YOLO ran on. Then new/old ratios.
2. `--jobs-table`: `vsam pose` per detector with 1 and 2 worker processes (wall photos/s), as before.
3. Heatmap renders/s.

Images: the first N DeepFashion training photos (../shared/data, real catalog shots, 300 px high),
linked into a temporary folder. With --rounds R the configurations run R times in alternating order
and each keeps its best round. The figures and the load average go to --json (default
benchmarks/results/bench_pose-cpu-DATE.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
CONFIGURATIONS = (("auto", "torch"), ("auto", "onnx"), ("yolo", "torch"), ("yolo", "onnx"))
WARM_UP = 8


def _catalog(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for name in names:
        os.symlink(DATA / "deepfashion-attr" / name, folder / Path(name).name)
    return folder


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """VmHWM: unlike ru_maxrss, not carried over exec from the process that started this one."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024


def prep_child(spec: dict) -> dict:
    """One configuration, in this (fresh) process: build, warm up, time a prep-pose run."""
    os.environ["VSAM_YOLO_RUNTIME"] = spec["runtime"]
    from pose_prep.prep import PrepOptions, run
    from pose_prep.prep_worker import detector_for

    started = time.perf_counter()
    detector = detector_for(spec["detector"])          # the instance prep's in-process job uses
    build_seconds = time.perf_counter() - started
    out = Path(spec["out"])
    run(PrepOptions(images=Path(spec["warm_up"]), out=out / "warm", detector=spec["detector"], progress=False))
    fallbacks = getattr(detector, "fallback_calls", None)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    report = run(PrepOptions(images=Path(spec["images"]), out=out / "timed", detector=spec["detector"],
                             progress=False))
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    assert report.exit_code == 0 and report.stored == spec["count"], report
    return {"detector": spec["detector"], "yolo_runtime": spec["runtime"], "detector_version": detector.version,
            "photos": report.stored, "photos_per_s": report.stored / wall, "cpu_ms_per_photo": 1000 * cpu / report.stored,
            "photos_per_cpu_s": report.stored / cpu, "build_s": build_seconds,
            "peak_rss_mb": _peak_rss_mb(),
            "yolo_share": (detector.fallback_calls - fallbacks) / report.stored if fallbacks is not None else None}


def prep_row(detector: str, runtime: str, images: Path, warm_up: Path, out: Path, count: int) -> dict:
    spec = {"detector": detector, "runtime": runtime, "images": str(images), "warm_up": str(warm_up),
            "out": str(out / f"{detector}-{runtime}-{time.monotonic_ns()}"), "count": count}
    completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True, check=False)
    if completed.returncode:
        raise SystemExit(f"{detector} ({runtime}) failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def prep_table(images: Path, warm_up: Path, out: Path, count: int, rounds: int) -> list[dict]:
    best: dict[tuple, dict] = {}
    for round_ in range(rounds):
        order = CONFIGURATIONS if round_ % 2 == 0 else CONFIGURATIONS[::-1]
        for detector, runtime in order:
            row = prep_row(detector, runtime, images, warm_up, out, count)
            row["load_average"] = os.getloadavg()[0]
            key = (detector, runtime)
            if key not in best or row["photos_per_cpu_s"] > best[key]["photos_per_cpu_s"]:
                best[key] = row
    return [best[key] for key in CONFIGURATIONS]


def ratios(rows: list[dict]) -> dict:
    """new (onnx) / old (torch) per detector: >1 is better for every figure but RSS and build time."""
    by = {(r["detector"], r["yolo_runtime"]): r for r in rows}
    figures = ("photos_per_s", "photos_per_cpu_s", "build_s", "peak_rss_mb")
    return {detector: {f: by[(detector, "onnx")][f] / by[(detector, "torch")][f] for f in figures}
            for detector in ("auto", "yolo")}


def print_prep_table(rows: list[dict], ratio: dict) -> None:
    print(f"{'prep-pose, 1 job':<22} {'photos/s':>9} {'CPU ms/photo':>13} {'photos/CPU-s':>13} {'build s':>8} "
          f"{'peak RSS MB':>12} {'YOLO ran on':>12} {'load':>5}")
    for r in rows:
        share = f"{100 * r['yolo_share']:.0f} %" if r["yolo_share"] is not None else "all"
        name = f"{r['detector']} ({'old: torch' if r['yolo_runtime'] == 'torch' else 'new: onnx'})"
        print(f"{name:<22} {r['photos_per_s']:>9.1f} {r['cpu_ms_per_photo']:>13.1f} {r['photos_per_cpu_s']:>13.1f} "
              f"{r['build_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {share:>12} {r['load_average']:>5.1f}")
    for detector, figures in ratio.items():
        print(f"{detector + ' new/old':<22} {figures['photos_per_s']:>9.2f} {'':>13} {figures['photos_per_cpu_s']:>13.2f} "
              f"{figures['build_s']:>8.2f} {figures['peak_rss_mb']:>12.2f}")


def images_per_second(images: Path, out: Path, detector: str, jobs: int) -> float:
    from pose_prep.pose import BATCH, run

    # Enough batches that every worker process gets one and builds its detector before the clock runs.
    warm_up = images.parent / f"warm-{detector}-{jobs}"
    warm_up.mkdir()
    for path in sorted(images.iterdir())[: 2 * jobs * BATCH]:
        os.symlink(path.resolve(), warm_up / path.name)
    run(warm_up, out / "warm", detector, jobs=jobs, progress=False)
    start = time.perf_counter()
    summary = run(images, out / f"{detector}-{jobs}", detector, jobs=jobs, progress=False)
    seconds = time.perf_counter() - start
    assert summary.failed == 0, summary.failures
    return summary.images / seconds


def heatmap_renders_per_second(seconds: float = 2.0) -> dict[str, float]:
    from pose_prep import heatmaps, keypoints
    from pose_prep.pose_eval import annotated_person

    coco = json.loads((DATA / "keypoints/fashion-models/val.json").read_text())
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    people = [(annotated_person(a).keypoints, sizes[a["image_id"]]) for a in coco["annotations"]]
    assert all(keypoints.visible(p).sum() > 10 for p, _ in people)
    rates = {}
    for group in ("full", "upper", "lower"):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            person, size = people[count % len(people)]
            heatmaps.render(person, size, joints=group)
            count += 1
        rates[group] = count / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jobs-table", action="store_true", help="also vsam pose with 1 and 2 worker processes")
    parser.add_argument("--detectors", default="blazepose,yolo,auto", help="for --jobs-table")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"bench_pose-cpu-{time.strftime('%Y-%m-%d')}.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prep_child(json.loads(args.child))))
        return
    names = (DATA / "deepfashion-attr/split/train.txt").read_text().split()
    load_before = os.getloadavg()
    print(f"CPU cores: {os.cpu_count()}; load average {load_before[0]:.1f}; photos: the first {args.images} "
          f"DeepFashion training photos (warm-up: the next {WARM_UP})")
    results = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                          "shared with other jobs", "date": time.strftime("%Y-%m-%d %H:%M"), "photos": args.images,
               "load_average_before": load_before}
    with tempfile.TemporaryDirectory() as tmp:
        images = _catalog(Path(tmp) / "images", names[: args.images])
        warm_up = _catalog(Path(tmp) / "warm-up", names[args.images: args.images + WARM_UP])
        results["prep_pose"] = prep_table(images, warm_up, Path(tmp) / "out", args.images, args.rounds)
        results["prep_pose_new_over_old"] = ratios(results["prep_pose"])
        print_prep_table(results["prep_pose"], results["prep_pose_new_over_old"])
        if args.jobs_table:
            print(f"\n{'vsam pose':<10} {'1 job img/s':>12} {'2 jobs img/s':>13} {'2/1':>6}")
            results["pose_jobs"] = []
            for detector in args.detectors.split(","):
                one = images_per_second(images, Path(tmp) / "out", detector, 1)
                two = images_per_second(images, Path(tmp) / "out", detector, 2)
                results["pose_jobs"].append({"detector": detector, "one_job": one, "two_jobs": two})
                print(f"{detector:<10} {one:>12.1f} {two:>13.1f} {two / one:>6.2f}")
    results["heatmap_renders_per_s"] = heatmap_renders_per_second()
    for group, rate in results["heatmap_renders_per_s"].items():
        print(f"heatmap 56x56 ({group:<5}) {rate:>8.0f} renders/s  {1000 / rate:.3f} ms each")
    results["load_average_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
