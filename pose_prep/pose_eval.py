"""`vsam pose-eval`: how well a detector finds the 12 body joints, against COCO keypoint annotations.

PCK: a detected joint is correct when it lies within `threshold` × the longer side of the person's
box from the annotated one. The box is the annotation's, unless it is missing or its longer side is
shorter than that of the box around the annotated keypoints; then the keypoint box.

Which detected person is scored against which annotated one (images with several people): only
annotated people with at least MIN_BODY_JOINTS labelled body joints are scored (tiny background
people with two labelled joints say nothing about a catalog). Detections and annotated people are
then paired greedily, best pair first: most correct joints, ties to the smaller mean distance; a
pair needs at least one correct joint, and each detection serves one person. An annotated person
left without a detection counts every labelled joint as missed.

- detection_rate: scored people that got a detection.
- pck / pck_per_joint: correct joints / labelled joints of all scored people (missed people included).
- pck_detected: the same over the people that got a detection (how good the joints are, when found).
- ms_per_image: mean wall time of the detector's `detect` (decoding and a first warm-up call excluded).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import images
from .detectors import make_detector
from .keypoints import BODY12, JOINT_NAMES, drop_outside, from_coco17

MIN_BODY_JOINTS = 6


class EvalError(Exception):
    """The annotations cannot be evaluated (no usable person, images missing, ...)."""


@dataclass
class AnnotatedPerson:
    keypoints: np.ndarray      # (18, 3) COCO-18; score 1 for labelled joints (COCO v > 0), else 0
    size: float                # longer side of the person's box, in pixels


@dataclass
class AnnotatedImage:
    path: Path
    width: int
    height: int
    persons: list[AnnotatedPerson]


def person_size(coco17: np.ndarray, bbox: list[float] | None) -> float:
    """Longer side of the annotation's box, or of the keypoint box when that is longer or the
    annotation has no box."""
    labelled = coco17[coco17[:, 2] > 0]
    keypoint_side = float(np.ptp(labelled[:, :2], axis=0).max()) if len(labelled) else 0.0
    box_side = float(max(bbox[2], bbox[3])) if bbox and len(bbox) == 4 else 0.0
    return max(box_side, keypoint_side)


def annotated_person(annotation: dict, width: int | None = None, height: int | None = None) -> AnnotatedPerson | None:
    """The person of one COCO annotation, or None when it is not scored (crowd, too few joints).
    Joints annotated outside the image (width × height) are not scored: no detector here can
    place a joint outside the frame."""
    if annotation.get("iscrowd") or "keypoints" not in annotation:
        return None
    coco17 = np.asarray(annotation["keypoints"], np.float32).reshape(17, 3)
    coco17[:, 2] = coco17[:, 2] > 0
    keypoints = from_coco17(coco17)
    if width and height:
        keypoints = drop_outside(keypoints, width, height)
    if int(keypoints[list(BODY12), 2].sum()) < MIN_BODY_JOINTS:
        return None
    size = person_size(coco17, annotation.get("bbox"))
    return AnnotatedPerson(keypoints, size) if size > 0 else None


def load_annotations(images_dir: str | Path, annotation_files) -> tuple[list[AnnotatedImage], int]:
    """Images with at least one scored person, and the number of annotated people left out."""
    by_name = _index_by_name(Path(images_dir))
    annotated, left_out = [], 0
    for annotation_file in annotation_files:
        try:
            images_of_file, left_out_of_file = _read_annotation_file(annotation_file, Path(images_dir), by_name)
        except (OSError, ValueError, KeyError, TypeError) as error:
            # A malformed entry (a missing key, a keypoint list of the wrong length) names the file too.
            raise EvalError(f"{annotation_file}: not a COCO keypoints file ({error!r})") from None
        annotated += images_of_file
        left_out += left_out_of_file
    return annotated, left_out


def _read_annotation_file(annotation_file, images_dir: Path,
                          by_name: dict[str, list[Path]]) -> tuple[list[AnnotatedImage], int]:
    coco = json.loads(Path(annotation_file).read_text())
    entries = {entry["id"]: entry for entry in coco["images"]}
    persons_of: dict[int, list[AnnotatedPerson]] = {}
    left_out = 0
    for annotation in coco["annotations"]:
        entry = entries.get(annotation.get("image_id"), {})
        person = annotated_person(annotation, entry.get("width"), entry.get("height"))
        if person is None:
            left_out += 1
        else:
            persons_of.setdefault(annotation["image_id"], []).append(person)
    annotated = []
    for image_id, persons in sorted(persons_of.items()):
        entry = entries.get(image_id)
        if entry is None:
            raise EvalError(f"{annotation_file}: annotation for image id {image_id}, which it does not list")
        path = _find(by_name, images_dir, entry["file_name"])
        annotated.append(AnnotatedImage(path, int(entry["width"]), int(entry["height"]), persons))
    return annotated, left_out


def _index_by_name(images_dir: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in images.find_images(images_dir):
        index.setdefault(path.name, []).append(path)
    return index


def _find(by_name: dict[str, list[Path]], images_dir: Path, file_name: str) -> Path:
    direct = images_dir / file_name
    if direct.is_file():
        return direct
    found = by_name.get(Path(file_name).name, [])
    if len(found) != 1:
        problem = "not found" if not found else f"ambiguous ({len(found)} files of that name)"
        raise EvalError(f"{file_name}: {problem} under {images_dir}")
    return found[0]


def correct_joints(detected: np.ndarray, person: AnnotatedPerson, threshold: float) -> tuple[np.ndarray, float]:
    """Per body joint (BODY12 order) whether `detected` has it within threshold × size, and the
    mean distance over the joints both have (inf when none)."""
    joints = list(BODY12)
    both = (detected[joints, 2] > 0) & (person.keypoints[joints, 2] > 0)
    distance = np.linalg.norm(detected[joints, :2] - person.keypoints[joints, :2], axis=1)
    correct = both & (distance <= threshold * person.size)
    return correct, float(distance[both].mean()) if both.any() else float("inf")


def match(detections: list[np.ndarray], persons: list[AnnotatedPerson], threshold: float) -> dict[int, np.ndarray]:
    """{annotated person index: its correct-joint mask} for the people that got a detection."""
    candidates = []
    for p, person in enumerate(persons):
        for d, detected in enumerate(detections):
            correct, distance = correct_joints(detected, person, threshold)
            if correct.any():
                candidates.append((-int(correct.sum()), distance, p, d, correct))
    matched, used = {}, set()
    for _, _, p, d, correct in sorted(candidates, key=lambda c: c[:4]):
        if p not in matched and d not in used:
            matched[p] = correct
            used.add(d)
    return matched


def evaluate(images_dir: str | Path, annotation_files, detector, threshold: float = 0.1) -> dict:
    """The scores as one JSON-ready dict. `detector`: a --detector name, or a built detector."""
    images_dir = Path(images_dir)
    annotated, left_out = load_annotations(images_dir, annotation_files)
    if not annotated:
        raise EvalError(f"no person with {MIN_BODY_JOINTS}+ labelled body joints in {list(annotation_files)}")
    detector = make_detector(detector) if isinstance(detector, str) else detector
    labelled = np.zeros(len(BODY12))
    correct_all = np.zeros(len(BODY12))
    labelled_found = np.zeros(len(BODY12))
    correct_found = np.zeros(len(BODY12))
    people = found = 0
    seconds = []
    _warm_up(detector, annotated[0], images_dir)
    for image in annotated:
        decoded = _load(image)
        if (decoded.width, decoded.height) != (image.width, image.height):
            raise EvalError(f"{image.path}: {decoded.width}x{decoded.height} pixels, annotated as "
                            f"{image.width}x{image.height}")
        start = time.perf_counter()
        detections = _detect(detector, image, images_dir, decoded.rgb)
        seconds.append(time.perf_counter() - start)
        matched = match(detections, image.persons, threshold)
        for p, person in enumerate(image.persons):
            has = person.keypoints[list(BODY12), 2] > 0
            labelled += has
            people += 1
            if p in matched:
                found += 1
                correct_all += matched[p]
                correct_found += matched[p]
                labelled_found += has
    return {
        "detector": detector.name,
        "detector_version": detector.version,
        "annotations": [str(f) for f in annotation_files],
        "images": len(annotated),
        "persons": people,
        "persons_left_out": left_out,
        "threshold": threshold,
        "detection_rate": _ratio(found, people),
        "pck": _ratio(correct_all.sum(), labelled.sum()),
        "pck_detected": _ratio(correct_found.sum(), labelled_found.sum()),
        "pck_per_joint": {JOINT_NAMES[j]: _ratio(c, n) for j, c, n in zip(BODY12, correct_all, labelled)},
        "ms_per_image": round(1000 * float(np.mean(seconds)), 1),
    }


def _warm_up(detector, image: AnnotatedImage, images_dir: Path) -> None:
    """One untimed call: the first inference of a model includes its one-off set-up."""
    _detect(detector, image, images_dir, _load(image).rgb)


def _load(image: AnnotatedImage) -> images.DecodedImage:
    try:
        return images.load(image.path)[1]
    except images.BadImage as error:
        raise EvalError(str(error)) from None


def _detect(detector, image: AnnotatedImage, images_dir: Path, rgb: np.ndarray) -> list[np.ndarray]:
    try:
        return detector.detect(rgb, image.path.relative_to(images_dir).as_posix())
    except (OSError, ValueError, RuntimeError) as error:
        raise EvalError(f"{image.path}: detector {detector.name} failed: {error}") from error


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(float(numerator) / float(denominator), 4) if denominator else None
