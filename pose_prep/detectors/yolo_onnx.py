"""YOLO11n-pose's ONNX export run with onnxruntime, with ultralytics' own pre- and post-processing
re-done in numpy and OpenCV, so that neither torch nor ultralytics is imported to detect.

What it reproduces (ultralytics 8.4, `YOLO.predict` on one image, `rect=True` as predict sets it):

* letterbox: the longer side scaled to 640 (`cv2.resize`, bilinear; scaling up too), the shorter
  one padded with grey 114 to the next multiple of the stride 32 ("minimum rectangle"), the padding
  split between both sides as ultralytics rounds it; RGB, /255, float32 NCHW.
* the network: ultralytics' own ONNX exporter (`YOLO.export(format="onnx", dynamic=True)`), whose
  output (1, 56, N) holds per anchor the box (centre x, y, width, height), the person score and 17
  keypoints (x, y, sigmoid score) in letterboxed pixels, exactly what the torch model returns.
* post-processing: anchors scoring > conf, boxes to corners, non-maximum suppression at IoU 0.7
  (OpenCV's `NMSBoxes`: greedy, best score first, as torchvision's `nms`), at most 300 people; boxes
  and keypoints moved back into the photo's pixels and clipped to it.

Measured against ultralytics' torch path on the 900 hand-labelled DeepFashion photos and the
labelled keypoint sets (docs/pose.md): the same people, keypoints within 0.01 px, scores within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SIZE = 640
STRIDE = 32
PAD_VALUE = 114
IOU = 0.7            # ultralytics' default `iou` for predict
MAX_DETECTIONS = 300
NUM_JOINTS = 17
# One intra-op thread: prep-pose and pose run one detector per worker process (--jobs), and a
# second thread per process only competes with the other workers (measured: benchmarks/bench_pose.py).
THREADS = 1


def letterbox(rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """(letterboxed uint8 image, (x gain, y gain), (left, top) padding), as ultralytics' LetterBox
    with auto=True."""
    height, width = rgb.shape[:2]
    ratio = min(IMAGE_SIZE / height, IMAGE_SIZE / width)
    new_width, new_height = max(round(width * ratio), 1), max(round(height * ratio), 1)
    pad_x, pad_y = (IMAGE_SIZE - new_width) % STRIDE / 2, (IMAGE_SIZE - new_height) % STRIDE / 2
    top, bottom = round(pad_y - 0.1), round(pad_y + 0.1)
    left, right = round(pad_x - 0.1), round(pad_x + 0.1)
    if (new_width, new_height) != (width, height):
        rgb = cv2.resize(rgb, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return padded, (new_width / width, new_height / height), (left, top)


class PoseSession:
    """An onnxruntime session of the exported model; `predict` returns what ultralytics' Results hold."""

    def __init__(self, path: str | Path, threads: int = THREADS):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, rgb: np.ndarray, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """People in an (H, W, 3) uint8 RGB image scoring > conf: (boxes (n, 4) x1 y1 x2 y2, scores (n,),
        keypoints (n, 17, 3) x, y, score), in the image's pixels, best score first."""
        image, gain, pad = letterbox(rgb)
        batch = (image.transpose(2, 0, 1)[None].astype(np.float32)) / np.float32(255)
        output = self.session.run(None, {self.input_name: batch})[0][0]        # (56, anchors)
        return decode(output.T, conf, gain, pad, rgb.shape[:2])


def decode(rows: np.ndarray, conf: float, gain: tuple[float, float], pad: tuple[int, int],
           shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ultralytics' non_max_suppression (one class) and scale_boxes / scale_coords on the rows
    (anchors, 56) of the network's output."""
    rows = rows[rows[:, 4] > conf]
    centre, size = rows[:, 0:2], rows[:, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    scores = rows[:, 4]
    kept = _non_max_suppression(boxes, scores)[:MAX_DETECTIONS]
    boxes, scores = boxes[kept], scores[kept]
    keypoints = rows[kept, 5:].reshape(-1, NUM_JOINTS, 3).copy()
    height, width = shape
    for points in (boxes[:, 0::2], keypoints[..., 0]):
        points -= pad[0]
        points /= gain[0]
    for points in (boxes[:, 1::2], keypoints[..., 1]):
        points -= pad[1]
        points /= gain[1]
    for points, limit in ((boxes[:, 0::2], width), (boxes[:, 1::2], height),
                          (keypoints[..., 0], width), (keypoints[..., 1], height)):
        np.clip(points, 0, limit, out=points)
    return boxes, scores, keypoints


def _non_max_suppression(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices kept, best score first (OpenCV: a box is dropped when its IoU with a kept one is > IOU)."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    corners_and_size = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
    kept = cv2.dnn.NMSBoxes(corners_and_size.tolist(), scores.astype(np.float64).tolist(), 0.0, IOU)
    return np.asarray(kept, np.int64).reshape(-1)
