"""The per-image work of `vsam prep-pose`, run in worker processes (or Dask workers).

A worker reads the file, hashes it, decodes it (EXIF orientation applied), runs the detector on the
whole image, optionally crops to the annotated box, renders the heatmap and re-encodes the stored
image. It never touches the shards or the index: only the parent process writes those. Each worker
builds its detector once and keeps it for every later task (per thread, for threaded Dask workers).
"""
from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import heatmaps
from .images import MAX_PIXELS, BadImage, decode, read_bytes
from .keypoints import drop_outside, empty


@dataclass(frozen=True)
class Settings:
    """What decides how an image is processed (part of every item's fingerprint)."""
    detector: str = "blazepose"
    max_side: int = 256            # longer side of the stored image; 0 keeps the original size
    jpeg_quality: int = 90
    heatmap_size: int = heatmaps.DEFAULT_SIZE
    heatmap_sigma: float = heatmaps.DEFAULT_SIGMA
    max_pixels: int = MAX_PIXELS


@dataclass
class Task:
    path: str                      # absolute (or relative to the working directory) path to read
    relative: str                  # path relative to --images, POSIX separators
    bbox: tuple[int, int, int, int] | None = None   # crop to this box (x1, y1, x2, y2)
    joint_group: str = heatmaps.DEFAULT_GROUP


@dataclass
class Processed:
    relative: str
    sha256: str | None = None
    image: bytes | None = None     # the stored JPEG
    keypoints: np.ndarray | None = None   # (18, 3) in pixels of the stored frame (before resizing)
    heatmap: np.ndarray | None = None     # (size, size) uint8
    width: int = 0                 # of the stored frame: the EXIF-corrected image, or its crop
    height: int = 0
    detector_version: str = ""
    joint_group: str | None = None  # the subset `heatmap` was rendered with
    reason: str | None = None      # set when the file was rejected

    @property
    def rejected(self) -> bool:
        return self.reason is not None


_local = threading.local()


def detector_for(name: str):
    """This worker's detector, built on first use."""
    cache = getattr(_local, "detectors", None)
    if cache is None:
        cache = _local.detectors = {}
    if name not in cache:
        from .detectors import make_detector
        cache[name] = make_detector(name)
    return cache[name]


def process(task: Task, settings: Settings) -> Processed:
    try:
        data = read_bytes(task.path)
    except BadImage as error:
        return Processed(task.relative, reason=error.reason)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        rgb = decode(data, task.relative, settings.max_pixels).rgb
    except BadImage as error:
        return Processed(task.relative, sha256=sha256, reason=error.reason)
    detector = detector_for(settings.detector)
    try:
        from .detectors import main_person
        keypoints = main_person(detector, rgb, task.relative)
    except Exception as error:  # noqa: BLE001 - one image that breaks the detector must not stop the batch
        return Processed(task.relative, sha256=sha256, reason=f"detector failed ({type(error).__name__}: {error})")
    keypoints = empty() if keypoints is None else keypoints
    rgb, keypoints = crop(rgb, keypoints, task.bbox)
    height, width = rgb.shape[:2]
    heatmap = render_heatmap(keypoints, width, height, task.joint_group, settings)
    return Processed(task.relative, sha256=sha256, image=encode_jpeg(rgb, settings.max_side, settings.jpeg_quality),
                     keypoints=keypoints, heatmap=heatmap, width=width, height=height,
                     detector_version=detector.version, joint_group=task.joint_group)


def crop(rgb: np.ndarray, keypoints: np.ndarray, bbox: tuple[int, int, int, int] | None):
    """The image cut to `bbox` (clamped to the image; ignored when nothing is left) and the
    keypoints moved into the crop, those outside it dropped."""
    if bbox is None:
        return rgb, keypoints
    height, width = rgb.shape[:2]
    x1, y1 = max(int(bbox[0]), 0), max(int(bbox[1]), 0)
    x2, y2 = min(int(bbox[2]), width), min(int(bbox[3]), height)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return rgb, keypoints
    moved = np.array(keypoints, np.float32, copy=True)
    present = moved[:, 2] > 0
    moved[present, 0] -= x1
    moved[present, 1] -= y1
    return np.ascontiguousarray(rgb[y1:y2, x1:x2]), drop_outside(moved, x2 - x1, y2 - y1)


def render_heatmap(keypoints: np.ndarray, width: int, height: int, joint_group: str, settings: Settings) -> np.ndarray:
    return heatmaps.to_uint8(heatmaps.render(keypoints, (width, height), size=settings.heatmap_size,
                                             sigma=settings.heatmap_sigma, joints=joint_group))


def encode_jpeg(rgb: np.ndarray, max_side: int, quality: int) -> bytes:
    """Baseline RGB JPEG, no metadata, longer side at most `max_side` (0: unchanged)."""
    height, width = rgb.shape[:2]
    scale = max_side / max(width, height) if max_side else 1.0
    if scale < 1.0:
        import cv2

        # Bilinear is exact enough for a mild reduction and 6x faster than area averaging, which
        # large reductions need against aliasing (a 1.6 ms PIL bicubic was ~5 % of a BlazePose call).
        interpolation = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=interpolation)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
