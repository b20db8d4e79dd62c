"""`auto`: BlazePose first; YOLO only when BlazePose finds nobody, and then only people YOLO shows
with both lower legs.

BlazePose finds people through their face, so what it misses in a catalog is mostly headless crops:
trousers, skirts and shorts worn by a model cut at the waist. YOLO finds those, but it also draws a
torso-shaped skeleton on flat-lay and ghost-mannequin tops (shoulders at the seams, hips at the hem).
The rule keeps a YOLO person only when its box is confident and both knees and both ankles are
present. Measured on 900 DeepFashion images labelled by hand (benchmarks/person_labels.csv,
benchmarks/cascade_rates.py): docs/pose.md, "The fallback rule of `auto`, and its person/garment rates"
and "The default detector: `auto`".
"""
from __future__ import annotations

import numpy as np

from ..keypoints import JOINT_INDEX

MIN_FALLBACK_BOX_SCORE = 0.5
LOWER_LEGS = tuple(JOINT_INDEX[name] for name in ("right_knee", "right_ankle", "left_knee", "left_ankle"))


def looks_like_person(keypoints: np.ndarray, box_score: float) -> bool:
    """Whether a YOLO person (joints below YOLO's score threshold already dropped) is kept."""
    return box_score >= MIN_FALLBACK_BOX_SCORE and bool((keypoints[list(LOWER_LEGS), 2] > 0).all())


class Auto:
    name = "auto"

    def __init__(self):
        from . import DetectorUnavailable, _require
        from .blazepose import BlazePose

        _require("blazepose")
        self.blazepose = BlazePose()
        try:
            _require("yolo")
        except DetectorUnavailable:
            self.yolo = None       # without the AGPL extra, auto is BlazePose alone
        else:
            from .yolo import Yolo
            self.yolo = Yolo()
        fallback = f"+{self.yolo.version}" if self.yolo else "+no-fallback"
        self.version = f"auto:{self.blazepose.version}{fallback}"
        self.fallback_calls = 0     # photos YOLO ran on (benchmarks/bench_pose.py reports the share)

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        persons = self.blazepose.detect(rgb, relative_path)
        if persons or self.yolo is None:
            return persons
        self.fallback_calls += 1
        return [person for person, box_score in self.yolo.detect_scored(rgb)
                if looks_like_person(person, box_score)]

    def close(self) -> None:
        self.blazepose.close()
