"""Throughput of `vsam pose` per detector (1 and 2 worker processes) and of heatmap rendering.

    .venv/bin/python benchmarks/bench_pose.py [--images N] [--detectors blazepose,yolo,auto]

Images: the first N DeepFashion training photos (../shared/data, real catalog shots, 300 px high),
linked into a temporary folder. Each configuration is warmed up first (model loads, worker start)
and then timed over all N images, JSON writing included. On a shared machine absolute figures
move; the 2-job / 1-job ratio is the steadier number.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _catalog(folder: Path, count: int) -> Path:
    names = (DATA / "deepfashion-attr/split/train.txt").read_text().split()[:count]
    folder.mkdir()
    for name in names:
        os.symlink(DATA / "deepfashion-attr" / name, folder / Path(name).name)
    return folder


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
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--detectors", default="blazepose,yolo,auto")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}; images: first {args.images} DeepFashion training photos")
    with tempfile.TemporaryDirectory() as tmp:
        images = _catalog(Path(tmp) / "images", args.images)
        print(f"{'detector':<10} {'1 job img/s':>12} {'2 jobs img/s':>13} {'2/1':>6}")
        for detector in args.detectors.split(","):
            one = images_per_second(images, Path(tmp) / "out", detector, 1)
            two = images_per_second(images, Path(tmp) / "out", detector, 2)
            print(f"{detector:<10} {one:>12.1f} {two:>13.1f} {two / one:>6.2f}")
    for group, rate in heatmap_renders_per_second().items():
        print(f"heatmap 56x56 ({group:<5}) {rate:>8.0f} renders/s  {1000 / rate:.3f} ms each")


if __name__ == "__main__":
    main()
