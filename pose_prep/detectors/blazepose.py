"""BlazePose through mediapipe's legacy `solutions.pose` (one person per image).

Only `model_complexity=1` works offline: its weights ship inside the mediapipe wheel, while 0 and 2
are downloaded on first use.
"""
from __future__ import annotations

import numpy as np

from ..keypoints import drop_outside, from_blazepose33
from ..native_logs import quiet_native_logs

# BlazePose guesses joints it cannot see (unseen ankles land far outside the image) and reports a
# low visibility for them: such joints are dropped.
MIN_VISIBILITY = 0.5


class BlazePose:
    name = "blazepose"

    def __init__(self, min_visibility: float = MIN_VISIBILITY, min_detection_confidence: float = 0.5):
        import mediapipe as mp

        self.version = f"mediapipe-{mp.__version__}-pose-complexity1"
        self.min_visibility = min_visibility
        # TensorFlow Lite and absl write their lines to fd 2 from the graph's threads while it starts,
        # after Pose() has returned: one image through it waits for the start (see native_logs).
        with quiet_native_logs():
            self._pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1,
                                                min_detection_confidence=min_detection_confidence)
            self._pose.process(np.zeros((64, 64, 3), np.uint8))

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        with quiet_native_logs():
            result = self._pose.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None:
            return []
        height, width = rgb.shape[:2]
        points = np.array([(p.x * width, p.y * height, p.visibility) for p in result.pose_landmarks.landmark],
                          np.float32)
        person = drop_outside(from_blazepose33(points), width, height, min_score=self.min_visibility)
        return [person] if person[:, 2].any() else []

    def close(self) -> None:
        with quiet_native_logs():
            self._pose.close()
