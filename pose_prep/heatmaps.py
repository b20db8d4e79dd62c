"""Pose heatmaps that supervise VSAM's attention: Gaussians on joints and along limbs.

A heatmap covers the whole image on a small grid (56×56 for a 224 input: the grid of VSAM's Ŝ).
Each joint is a 2D Gaussian of peak 1; each limb is a Gaussian of the distance to its segment, so
the whole limb is lit and not only its ends; overlaps are max-merged. Only joints of the chosen
subset are drawn, and a limb only when both its ends are present and in the subset.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .keypoints import LIMBS, NUM_JOINTS

# Named joint subsets (COCO-18 indices).
JOINT_GROUPS: dict[str, tuple[int, ...]] = {
    "full": tuple(range(NUM_JOINTS)),
    "body": tuple(range(1, 14)),                 # all but the face: dresses, full-body items
    "upper": (1, 2, 3, 4, 5, 6, 7, 8, 11),       # tops: neck, shoulders, elbows, wrists, hips
    "lower": (8, 9, 10, 11, 12, 13),             # trousers, skirts: hips, knees, ankles
    "arms": (2, 3, 4, 5, 6, 7),                  # shoulders, elbows, wrists
    "neckline": (0, 1, 2, 5, 14, 15, 16, 17),    # nose, neck, shoulders, eyes, ears
    "torso": (1, 2, 5, 8, 11),                   # neck, shoulders, hips
}

# DeepFashion category types (list_category_cloth.txt): 1 upper, 2 lower, 3 full body (Fig. 2).
CATEGORY_TYPE_GROUP = {1: "upper", 2: "lower", 3: "body"}
DEFAULT_GROUP = "full"

DEFAULT_SIZE = 56
DEFAULT_SIGMA = 1.5  # in heatmap pixels: 6 px of a 224 input


def joint_subset(joints: str | Iterable[int] | None) -> tuple[int, ...]:
    """A group name, an explicit list of joint indices, or None (the full body)."""
    if joints is None:
        return JOINT_GROUPS[DEFAULT_GROUP]
    if isinstance(joints, str):
        try:
            return JOINT_GROUPS[joints]
        except KeyError:
            raise ValueError(f"unknown joint group {joints!r}; known: {sorted(JOINT_GROUPS)}") from None
    subset = tuple(int(j) for j in joints)
    if any(not 0 <= j < NUM_JOINTS for j in subset):
        raise ValueError(f"joint indices must lie in 0..{NUM_JOINTS - 1}: {subset}")
    return subset


# Beyond this many sigmas a Gaussian is below 1/255 (exp(-4**2 / 2) = 3e-4): not worth computing.
_REACH = 4.0


def render(keypoints: np.ndarray, image_size: tuple[int, int], size: int | tuple[int, int] = DEFAULT_SIZE,
           sigma: float = DEFAULT_SIGMA, joints: str | Iterable[int] | None = None,
           limbs: bool = True) -> np.ndarray:
    """Heatmap (H, W) float32 in [0, 1] of COCO-18 `keypoints` given in pixels of an image of
    `image_size` = (width, height)."""
    height, width = (size, size) if isinstance(size, int) else size
    image_width, image_height = image_size
    subset = np.zeros(NUM_JOINTS, bool)
    subset[list(joint_subset(joints))] = True
    keypoints = np.asarray(keypoints, np.float32)
    present = subset & (keypoints[:, 2] > 0)
    heatmap = np.zeros((height, width), np.float32)
    if not present.any():
        return heatmap

    x = keypoints[:, 0] * np.float32(width / image_width)
    y = keypoints[:, 1] * np.float32(height / image_height)
    pairs = [(a, b) for a, b in LIMBS if present[a] and present[b]] if limbs else []
    # A joint already at the end of a drawn limb is covered by that limb's distance; the others
    # become zero-length segments, so joints and limbs share one distance computation.
    on_limb = {j for pair in pairs for j in pair}
    lone = [j for j in np.flatnonzero(present) if j not in on_limb]
    starts = np.array([a for a, _ in pairs] + lone, np.int64)
    ends = np.array([b for _, b in pairs] + lone, np.int64)

    # Only the cells within reach of some segment can be lit.
    reach = _REACH * sigma
    x_lo, x_hi = _cell_range(x[present], reach, width)
    y_lo, y_hi = _cell_range(y[present], reach, height)
    if x_lo >= x_hi or y_lo >= y_hi:
        return heatmap
    cells_x = np.arange(x_lo, x_hi, dtype=np.float32) + 0.5
    cells_y = np.arange(y_lo, y_hi, dtype=np.float32) + 0.5
    nearest = _squared_distance_to_segments(cells_x, cells_y, x[starts], y[starts], x[ends], y[ends])
    heatmap[y_lo:y_hi, x_lo:x_hi] = np.exp(nearest * np.float32(-0.5 / (sigma * sigma)))
    return heatmap


def _cell_range(coordinates: np.ndarray, reach: float, limit: int) -> tuple[int, int]:
    low = int(np.floor(coordinates.min() - reach))
    high = int(np.ceil(coordinates.max() + reach))
    return max(low, 0), min(high, limit)


def _squared_distance_to_segments(cells_x, cells_y, x0, y0, x1, y1) -> np.ndarray:
    """(h, w): per cell centre, the squared distance to the nearest segment (x0, y0)→(x1, y1)."""
    x0, y0 = x0[:, None, None], y0[:, None, None]
    dx, dy = x1[:, None, None] - x0, y1[:, None, None] - y0
    inverse_length2 = 1.0 / np.maximum(dx * dx + dy * dy, np.float32(1e-12))
    offset_x = cells_x[None, None, :] - x0                          # (S, 1, w)
    offset_y = cells_y[None, :, None] - y0                          # (S, h, 1)
    t = offset_x * dx + offset_y * dy                               # (S, h, w)
    t *= inverse_length2
    np.clip(t, 0.0, 1.0, out=t)
    gap_x = offset_x - t * dx
    gap_y = offset_y - t * dy
    gap_x *= gap_x
    gap_y *= gap_y
    gap_x += gap_y
    return gap_x.min(axis=0)


def group_for_category_type(category_type: int | None) -> str:
    """Joint subset for a DeepFashion category type (1 upper, 2 lower, 3 full); else the full body."""
    return CATEGORY_TYPE_GROUP.get(category_type, DEFAULT_GROUP)


def to_uint8(heatmap: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(heatmap * 255.0), 0, 255).astype(np.uint8)


def from_uint8(heatmap: np.ndarray) -> np.ndarray:
    return np.asarray(heatmap, np.float32) / 255.0
