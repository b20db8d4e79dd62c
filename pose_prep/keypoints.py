"""The one keypoint format inside vsam: OpenPose COCO-18, an (18, 3) float32 array of x, y, score.

x and y are pixels of the original (EXIF-corrected) image; score is in [0, 1] and 0 marks a missing
joint (whose x and y are then 0, as OpenPose writes them). Every detector converts to this format
and everything downstream (heatmaps, shards, pose-eval) reads only this format.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_JOINTS = 18
JOINT_NAMES = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
JOINT_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}

# OpenPose's COCO limb pairs, in OpenPose's order.
LIMBS = (
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 2), (2, 3), (3, 4), (2, 16),
    (1, 5), (5, 6), (6, 7), (5, 17), (1, 0), (0, 14), (0, 15), (14, 16), (15, 17),
)

# The 12 body joints that pose-eval scores (shoulders, elbows, wrists, hips, knees, ankles).
BODY12 = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)

# Source index per COCO-18 joint; None marks the neck, which these formats lack and which is the
# mid-point of the two shoulders (given as a pair).
_FROM_COCO17 = (0, (5, 6), 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_FROM_BLAZEPOSE33 = (0, (11, 12), 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
_FROM_BODY25 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def empty() -> np.ndarray:
    """A person with no joints."""
    return np.zeros((NUM_JOINTS, 3), np.float32)


def _convert(points: np.ndarray, source_of: tuple, expected: int, name: str) -> np.ndarray:
    points = np.asarray(points, np.float32)
    if points.shape != (expected, 3):
        raise ValueError(f"{name} keypoints must have shape ({expected}, 3), got {points.shape}")
    out = empty()
    for i, src in enumerate(source_of):
        if isinstance(src, tuple):
            a, b = points[src[0]], points[src[1]]
            if a[2] > 0 and b[2] > 0:
                out[i] = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, min(a[2], b[2]))
        else:
            out[i] = points[src]
    return clean(out)


def from_coco17(points: np.ndarray) -> np.ndarray:
    """COCO-17 (x, y, score) → COCO-18; the neck is the mid-point of the shoulders."""
    return _convert(points, _FROM_COCO17, 17, "COCO-17")


def from_blazepose33(points: np.ndarray) -> np.ndarray:
    """BlazePose-33 (x, y, score in pixels) → COCO-18."""
    return _convert(points, _FROM_BLAZEPOSE33, 33, "BlazePose-33")


def from_body25(points: np.ndarray) -> np.ndarray:
    """OpenPose BODY_25 → COCO-18 (drops mid-hip and the feet)."""
    return _convert(points, _FROM_BODY25, 25, "BODY_25")


def clean(keypoints: np.ndarray) -> np.ndarray:
    """Zero x and y of missing joints and clip scores into [0, 1], as OpenPose writes them."""
    keypoints = np.array(keypoints, np.float32, copy=True)
    keypoints[:, 2] = np.clip(np.nan_to_num(keypoints[:, 2]), 0.0, 1.0)
    keypoints[keypoints[:, 2] <= 0] = 0.0
    return keypoints


def drop_outside(keypoints: np.ndarray, width: int, height: int, min_score: float = 0.0) -> np.ndarray:
    """Mark as missing the joints outside the image or scored at or below `min_score`."""
    keypoints = clean(keypoints)
    x, y, s = keypoints.T
    outside = (x < 0) | (y < 0) | (x > width - 1) | (y > height - 1) | (s <= min_score)
    keypoints[outside] = 0.0
    return keypoints


def visible(keypoints: np.ndarray) -> np.ndarray:
    """Boolean mask of the joints that are present."""
    return np.asarray(keypoints)[:, 2] > 0


def bounding_box(keypoints: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) around the present joints, or None when there are none."""
    present = np.asarray(keypoints)[visible(keypoints)]
    if len(present) == 0:
        return None
    return (float(present[:, 0].min()), float(present[:, 1].min()),
            float(present[:, 0].max()), float(present[:, 1].max()))


def select_main_person(persons: list[np.ndarray], width: int, height: int) -> int | None:
    """Index of the main person: the largest keypoint box, discounted by its distance from the
    image centre. Ties go to the lower index, so the choice is deterministic."""
    best, best_score = None, -1.0
    diagonal = float(np.hypot(width, height)) or 1.0
    for i, person in enumerate(persons):
        box = bounding_box(person)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        area = max(x2 - x1, 1.0) * max(y2 - y1, 1.0)
        off_centre = np.hypot((x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2) / diagonal
        score = area * (1.0 - off_centre)
        if score > best_score:
            best, best_score = i, score
    return best


# --- OpenPose JSON (what `openpose --write_json` writes) -------------------------------------

def to_openpose_dict(persons: list[np.ndarray]) -> dict:
    return {
        "version": 1.3,
        "people": [{"pose_keypoints_2d": [round(float(v), 3) for v in clean(p).reshape(-1)]}
                   for p in persons],
    }


def write_openpose_json(path: str | Path, persons: list[np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_openpose_dict(persons)))


def from_openpose_flat(values: list[float]) -> np.ndarray:
    """One `pose_keypoints_2d` list (COCO-18: 54 values, BODY_25: 75) → COCO-18."""
    points = np.asarray(values, np.float32)
    if points.size == NUM_JOINTS * 3:
        return clean(points.reshape(NUM_JOINTS, 3))
    if points.size == 25 * 3:
        return from_body25(points.reshape(25, 3))
    raise ValueError(f"pose_keypoints_2d has {points.size} values: expected 54 (COCO-18) or 75 (BODY_25)")


def read_openpose_json(path: str | Path) -> list[np.ndarray]:
    """All people of an OpenPose JSON file, each as COCO-18."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return [from_openpose_flat(person["pose_keypoints_2d"]) for person in data["people"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not an OpenPose keypoints file ({error})") from error
