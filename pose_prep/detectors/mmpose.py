"""An adapter around MMPose's `MMPoseInferencer` (the `mmpose` extra; COCO-17 models).

mmcv has no wheel for this Python and the inferencer downloads its checkpoints on first use, so
only `persons_from_mmpose` (the mapping of its predictions to COCO-18) is tested here; the
inferencer call itself is not (docs/pose.md, "Detectors").
"""
from __future__ import annotations

import numpy as np

from ..keypoints import drop_outside, from_coco17

MIN_JOINT_SCORE = 0.3   # MMPose's own visualiser threshold


def persons_from_mmpose(instances: list[dict], width: int, height: int,
                        min_joint_score: float = MIN_JOINT_SCORE) -> list[np.ndarray]:
    """One image's `result["predictions"][0]` (a list of instances with `keypoints` (17, 2) and
    `keypoint_scores` (17,)) → COCO-18 persons."""
    persons = []
    for instance in instances:
        xy = np.asarray(instance["keypoints"], np.float32).reshape(-1, 2)
        scores = np.asarray(instance["keypoint_scores"], np.float32).reshape(-1, 1)
        if len(xy) != 17 or len(scores) != 17:
            raise ValueError(f"expected a COCO-17 model's 17 keypoints, got {len(xy)}")
        person = drop_outside(from_coco17(np.hstack([xy, scores])), width, height, min_score=min_joint_score)
        if person[:, 2].any():
            persons.append(person)
    return persons


class MMPose:
    name = "mmpose"

    def __init__(self, model: str = "human", device: str = "cpu"):
        from . import DetectorUnavailable

        try:
            import mmpose
            from mmpose.apis import MMPoseInferencer
        except ImportError as error:   # mmpose present but mmcv (or another of its needs) missing
            raise DetectorUnavailable(f"detector 'mmpose' cannot be imported: {error}") from error

        self._inferencer = MMPoseInferencer(model, device=device)
        self.version = f"mmpose-{mmpose.__version__}-{model}"

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        # MMPose takes arrays in OpenCV's BGR order.
        result = next(self._inferencer(np.ascontiguousarray(rgb[:, :, ::-1]), return_vis=False))
        return persons_from_mmpose(result["predictions"][0], rgb.shape[1], rgb.shape[0])
