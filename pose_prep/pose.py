"""`vsam pose`: keypoints for every image under a folder, one OpenPose JSON file per image.

`<out>/<relative path without extension>_keypoints.json` holds `{"version": 1.3, "people": [...]}`
exactly as `openpose --write_json` writes it, the main person first (an empty list when there is
nobody). A bad file gets one record (file and reason) in `<out>/pose_failures.jsonl` and on stderr,
and the run goes on; so does a file whose name is not valid UTF-8, named as images.catalog_images
names it. With `jobs > 1` images are spread over joblib worker processes, each building
its detector once.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from . import images
from .atomic import atomic_write_text, reporting_disk_full
from .detectors import check_detector
from .detectors.openpose_json import keypoints_file_name
from .keypoints import select_main_person, to_openpose_dict
from .prep_worker import detector_for

FAILURES_FILE = "pose_failures.jsonl"
OVERLAY_SUFFIX = "_overlay.png"
BATCH = 4  # images per worker task: frequent progress updates, little scheduling overhead


@dataclass
class ImageResult:
    relative_path: str
    people: int = 0
    reason: str | None = None     # set when the image failed

    @property
    def failed(self) -> bool:
        return self.reason is not None


@dataclass
class Summary:
    images: int = 0
    with_person: int = 0
    without_person: int = 0
    failed: int = 0
    failures: list[ImageResult] = field(default_factory=list)

    def add(self, result: ImageResult) -> None:
        self.images += 1
        if result.failed:
            self.failed += 1
            self.failures.append(result)
        elif result.people:
            self.with_person += 1
        else:
            self.without_person += 1

    @property
    def nothing_processed(self) -> bool:
        return self.images == self.failed

    def line(self) -> str:
        return (f"{self.images} images: {self.with_person} with a person, {self.without_person} without, "
                f"{self.failed} failed")


def overlay_file_name(relative_path: str) -> str:
    path = PurePosixPath(relative_path)
    return str(path.with_name(path.stem + OVERLAY_SUFFIX))


def main_person_first(persons: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    main = select_main_person(persons, width, height)
    if main is None:
        return []
    return [persons[main]] + [p for i, p in enumerate(persons) if i != main]


def process_image(detector, images_dir: Path, relative_path: str, out: Path, overlays: bool) -> ImageResult:
    """Detect, then write the JSON file (and overlay). A bad image or a detector that cannot
    handle this one image gives a failed result and leaves no output of an earlier run behind."""
    json_path = out / keypoints_file_name(relative_path)
    overlay_path = out / overlay_file_name(relative_path)
    try:
        _, decoded = images.load(images_dir / relative_path)
        persons = detector.detect(decoded.rgb, relative_path)
    except images.BadImage as error:
        return _failed(relative_path, error.reason, json_path, overlay_path)
    except (OSError, ValueError, RuntimeError) as error:
        return _failed(relative_path, f"detector {detector.name} failed: {error}", json_path, overlay_path)
    persons = main_person_first(persons, decoded.width, decoded.height)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(to_openpose_dict(persons)))
    if overlays:
        from .overlays import draw, write_png
        with reporting_disk_full(overlay_path):
            write_png(overlay_path, draw(decoded.rgb, persons))
    return ImageResult(relative_path, people=len(persons))


def _failed(relative_path: str, reason: str, *stale: Path) -> ImageResult:
    for path in stale:
        path.unlink(missing_ok=True)
    return ImageResult(relative_path, reason=reason)


def _process_batch(detector_name: str, images_dir: Path, relative_paths: list[str], out: Path,
                   overlays: bool) -> list[ImageResult]:
    detector = detector_for(detector_name)   # built on a worker's first task, reused for the following ones
    return [process_image(detector, images_dir, path, out, overlays) for path in relative_paths]


def _name_collisions(relative_paths: list[str]) -> dict[str, str]:
    """`a.jpg` and `a.png` both map to `a_keypoints.json`: the later one (in sorted order) fails
    rather than overwrite the other's keypoints."""
    first_owner, collisions = {}, {}
    for path in relative_paths:
        target = keypoints_file_name(path)
        if target in first_owner:
            collisions[path] = (f"its output {target} is already written for {first_owner[target]}: "
                                "rename one of the two")
        else:
            first_owner[target] = path
    return collisions


def run(images_dir: str | Path, out: str | Path, detector_name: str = "auto", jobs: int = 1,
        overlays: bool = False, progress: bool = True) -> Summary:
    """Process every image under `images_dir`; return the counts. Raises before any work when the
    folder or the detector is unusable."""
    images_dir, out = Path(images_dir), Path(out)
    check_detector(detector_name)
    found = [image for image in images.catalog_images(images_dir, on_error=images.warn_unreadable())
             if not _inside(image.path, out)]   # an output folder inside --images: not its own input
    bad_names = {image.name: image.reason for image in found if image.reason}
    relative_paths = [image.name for image in found if not image.reason]
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    collisions = _name_collisions(relative_paths)
    todo = [p for p in relative_paths if p not in collisions]

    from tqdm import tqdm

    with tqdm(total=len(found), unit="img", desc="pose", disable=not progress,
              file=sys.stderr) as bar, open(out / FAILURES_FILE, "w", encoding="utf-8") as failures:
        def record(result: ImageResult) -> None:
            summary.add(result)
            bar.update(1)
            if result.failed:
                with reporting_disk_full(out / FAILURES_FILE):
                    failures.write(json.dumps({"file": result.relative_path, "reason": result.reason},
                                              ensure_ascii=False) + "\n")
                    failures.flush()
                tqdm.write(f"failed: {images_dir / images.printable_name(result.relative_path)}: {result.reason}",
                           file=sys.stderr)

        for path, reason in [*bad_names.items(), *collisions.items()]:
            record(ImageResult(path, reason=reason))
        for results in _batches(detector_name, images_dir, todo, out, overlays, jobs):
            for result in results:
                record(result)
    return summary


def _inside(path: Path, folder: Path) -> bool:
    return path.parent.resolve().is_relative_to(folder.resolve())   # the file itself may be a broken link


def _batches(detector_name, images_dir, relative_paths, out, overlays, jobs):
    batches = [relative_paths[i:i + BATCH] for i in range(0, len(relative_paths), BATCH)]
    if jobs <= 1 or len(batches) <= 1:
        for batch in batches:
            yield _process_batch(detector_name, images_dir, batch, out, overlays)
        return
    from joblib import delayed

    from .workers import loky_parallel

    parallel = loky_parallel(jobs, return_as="generator_unordered")   # workers end with this process
    yield from parallel(delayed(_process_batch)(detector_name, images_dir, batch, out, overlays)
                        for batch in batches)
