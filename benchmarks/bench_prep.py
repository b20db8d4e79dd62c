"""prep-pose figures on real DeepFashion photos (../shared/data/deepfashion-attr):

1. image storage: original bytes vs re-encoded JPEG at a bounded size (bytes per image, decode ms);
2. prep images/s beside detector-alone images/s on the same images, one process (goal ≥ 0.9);
3. "adding 20 images processes exactly those 20";
4. the unchanged rerun of the full 7000-image catalog (`vsam prep-pose` wall time, process start included).

    .venv/bin/python benchmarks/bench_prep.py [--images 200] [--full-out /tmp/vsam/df-shards]

The machine is shared and noisy: throughput is measured in alternating rounds, by wall clock and by the
process's CPU time (which other processes on the machine disturb less); the median ratio is what matters.
The full-catalog rerun builds the collection first when --full-out holds none (minutes).
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
PHOTOS = DATA / "deepfashion-attr" / "img"
LABELS = DATA / "deepfashion-attr"

from pose_prep.images import decode  # noqa: E402
from pose_prep.prep import PrepOptions, catalog_problems, run  # noqa: E402
from pose_prep.prep_worker import detector_for, encode_jpeg  # noqa: E402


def decode_ms(blobs: list[bytes]) -> float:
    started = time.perf_counter()
    for blob in blobs:
        np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return (time.perf_counter() - started) / len(blobs) * 1e3


def storage(paths: list[Path], title: str) -> None:
    originals = [p.read_bytes() for p in paths]
    rgbs = [decode(b).rgb for b in originals]
    sizes = [f"{r.shape[1]}x{r.shape[0]}" for r in rgbs[:3]]
    print(f"\n## image storage: {title} ({len(paths)} images, e.g. {', '.join(sizes)})")
    print(f"{'stored as':<28}{'bytes/image':>12}{'decode ms':>11}")
    print(f"{'original bytes':<28}{np.mean([len(b) for b in originals]):>12.0f}{decode_ms(originals):>11.2f}")
    for side, quality in ((256, 90), (224, 85), (160, 85)):
        blobs = [encode_jpeg(rgb, side, quality) for rgb in rgbs]
        print(f"{f'JPEG max side {side}, q{quality}':<28}{np.mean([len(b) for b in blobs]):>12.0f}"
              f"{decode_ms(blobs):>11.2f}")


def throughput(paths: list[Path], work: Path, rounds: int = 5) -> None:
    print(f"\n## throughput, one process, BlazePose, {len(paths)} images ({rounds} alternating rounds)")
    images = work / "tp"
    images.mkdir()
    for path in paths:
        shutil.copyfile(path, images / path.name)
    detector = detector_for("blazepose")            # built once, as each prep worker does
    rgbs = [decode(p.read_bytes()).rgb for p in paths]
    detector.detect(rgbs[0])                          # warm up
    figures = {"alone": ([], []), "prep": ([], [])}   # (wall images/s, CPU images/s) per round
    for round_ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for rgb in rgbs:
            detector.detect(rgb)
        _record(figures["alone"], len(rgbs), wall, cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        report = run(PrepOptions(images=images, out=work / f"tp-out-{round_}", jobs=1, detector="blazepose",
                                 progress=False))
        _record(figures["prep"], report.processed, wall, cpu)
    for name, label in (("alone", "detector alone (decoded images in memory)"),
                        ("prep", "prep-pose --jobs 1 (read, hash, decode, detect, heatmap, JPEG, HDF5, index)")):
        wall, cpu = figures[name]
        print(f"{label}: median {np.median(wall):5.1f} images/s wall, {np.median(cpu):5.1f} images/CPU-s"
              f"  (wall rounds {np.round(wall, 1)})")
    for i, kind in enumerate(("wall clock", "CPU time of the process")):
        ratios = np.array(figures["prep"][i]) / np.array(figures["alone"][i])
        print(f"ratio prep / detector alone, {kind}: median {np.median(ratios):.2f} "
              f"(rounds {np.round(ratios, 2)}; goal >= 0.9)")


def _record(into: tuple[list, list], count: int, wall: float, cpu: float) -> None:
    into[0].append(count / (time.perf_counter() - wall))
    into[1].append(count / (time.process_time() - cpu))


def adding_twenty(paths: list[Path], work: Path) -> None:
    print("\n## adding 20 images to a catalog and rerunning")
    images, out = work / "add", work / "add-out"
    images.mkdir()
    for path in paths[:-20]:
        shutil.copyfile(path, images / path.name)
    first = run(PrepOptions(images=images, out=out, labels=LABELS, detector="blazepose", progress=False))
    for path in paths[-20:]:
        shutil.copyfile(path, images / path.name)
    second = run(PrepOptions(images=images, out=out, labels=LABELS, progress=False))  # keeps blazepose
    problems = catalog_problems(out, images)
    print(f"first run: {first.counts['new']} new; after adding 20: {second.counts['new']} new, "
          f"{second.counts['unchanged']} unchanged, {second.processed} decoded+detected, "
          f"{second.items_total} live; exactly-once audit: {'ok' if not problems else problems}")
    print("RESULT:", "exactly those 20" if second.processed == 20 and second.counts["new"] == 20 and not problems
          else "FAILED")


def unchanged_rerun(full_out: Path) -> None:
    print(f"\n## unchanged rerun of the full catalog ({PHOTOS}) into {full_out}")
    command = [str(Path(sys.executable).with_name("vsam")), "prep-pose", "--images", str(PHOTOS), "--labels",
               str(LABELS), "--out", str(full_out), "--jobs", "2", "--no-progress", "--detector", "blazepose"]
    if not (full_out / "index.sqlite").exists():
        print("building it first (7000 images; minutes) ...")
        subprocess.run(command, check=True, capture_output=True)
    for _ in range(2):
        started = time.perf_counter()
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        print(f"{time.perf_counter() - started:.2f} s wall, process start included: {result.stdout.splitlines()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images for the throughput comparison")
    parser.add_argument("--full-out", type=Path, default=Path("/tmp/vsam/df-shards"))
    parser.add_argument("--skip-full", action="store_true", help="leave out the 7000-image rerun")
    args = parser.parse_args()
    photos = sorted(PHOTOS.glob("*.jpg"))
    storage(photos[::10], "DeepFashion catalog photos")
    storage(sorted((DATA / "keypoints" / "fashion-models").rglob("*.png"))[:30], "fashion-model photos (PNG)")
    with tempfile.TemporaryDirectory() as folder:
        throughput(photos[1000:1000 + args.images], Path(folder))
        adding_twenty(photos[2000:2060], Path(folder))
    if not args.skip_full:
        unchanged_rerun(args.full_out)


if __name__ == "__main__":
    main()
