"""Overlays for checking keypoints by eye: the pose heatmap (as VSAM's attention is trained to see it)
and the skeleton, drawn over the photo."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import heatmaps
from .keypoints import LIMBS

HEATMAP_WEIGHT = 0.45
# Right side warm, left side cool, centre line green: a glance tells whether left and right are swapped.
_RIGHT = {2, 3, 4, 8, 9, 10, 14, 16}
_LEFT = {5, 6, 7, 11, 12, 13, 15, 17}
_COLOURS = {"right": (255, 80, 40), "left": (40, 140, 255), "centre": (60, 220, 60)}  # RGB


def _side(joint: int) -> str:
    return "right" if joint in _RIGHT else "left" if joint in _LEFT else "centre"


def draw(rgb: np.ndarray, persons: list[np.ndarray], joints: str | None = None) -> np.ndarray:
    """The photo with each person's heatmap (rendered on the 56×56 grid, stretched back to the
    photo) blended in and the skeleton drawn on top. Returns a new RGB uint8 array."""
    height, width = rgb.shape[:2]
    canvas = rgb.copy()
    if persons:
        grid = np.max([heatmaps.render(p, (width, height), joints=joints) for p in persons], axis=0)
        heat = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)
        coloured = cv2.applyColorMap(heatmaps.to_uint8(heat), cv2.COLORMAP_JET)[:, :, ::-1]
        weight = (HEATMAP_WEIGHT * heat)[:, :, None]
        canvas = (canvas * (1 - weight) + coloured * weight).astype(np.uint8)
    thickness = max(2, round(max(width, height) / 250))
    for person in persons:
        _draw_skeleton(canvas, person, thickness)
    return canvas


def _draw_skeleton(canvas: np.ndarray, person: np.ndarray, thickness: int) -> None:
    points = np.rint(person[:, :2]).astype(int)
    present = person[:, 2] > 0
    for a, b in LIMBS:
        if present[a] and present[b]:
            side = _side(b) if _side(a) == "centre" else _side(a)
            cv2.line(canvas, tuple(points[a]), tuple(points[b]), _COLOURS[side], thickness, cv2.LINE_AA)
    for joint in np.flatnonzero(present):
        cv2.circle(canvas, tuple(points[joint]), thickness + 1, _COLOURS[_side(joint)], -1, cv2.LINE_AA)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """PNG through an in-memory encode, so any file name (unicode included) works."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
