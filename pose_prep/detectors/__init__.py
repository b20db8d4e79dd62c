"""Pose detectors behind one small interface: an RGB image in, persons out as COCO-18 arrays.

`make_detector(name)` builds one from its command-line name. Heavy imports (mediapipe, ultralytics,
mmpose) happen inside each detector's constructor, never at import time of this package.
"""
from __future__ import annotations

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


def make_detector(name: str) -> Detector:
    if name == "blazepose":
        from .blazepose import BlazePose
        return BlazePose()
    raise ValueError(f"unknown detector {name!r}")
