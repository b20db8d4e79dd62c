"""Keypoints that a real OpenPose run wrote with `--write_json`: `<stem>_keypoints.json` per image.

`openpose-json:DIR` reads them instead of running a network. OpenPose writes every file flat into
one folder; `vsam pose` mirrors the image folder's tree. Both layouts are found: first
`DIR/<relative path without extension>_keypoints.json`, then `DIR/<stem>_keypoints.json`.
"""
from __future__ import annotations

from pathlib import Path, PurePath

import numpy as np

from ..keypoints import drop_outside, read_openpose_json

SUFFIX = "_keypoints.json"


def keypoints_file_name(relative_path: str | PurePath) -> str:
    """`a/b/photo.jpg` → `a/b/photo_keypoints.json` (the name OpenPose gives, with the tree kept)."""
    relative_path = PurePath(relative_path)
    return str(relative_path.with_name(relative_path.stem + SUFFIX))


class OpenPoseJson:
    name = "openpose-json"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"openpose-json: {self.folder} is not a directory")
        self.name = f"openpose-json:{self.folder}"
        self.version = "openpose-json"

    def find(self, relative_path: str) -> Path:
        nested = self.folder / keypoints_file_name(relative_path)
        if nested.is_file():
            return nested
        flat = self.folder / (PurePath(relative_path).stem + SUFFIX)
        if flat.is_file():
            return flat
        raise FileNotFoundError(f"no OpenPose keypoints for {relative_path} (looked for {nested} and {flat})")

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        if relative_path is None:
            raise ValueError("openpose-json reads precomputed keypoints: it needs the image's relative path")
        height, width = rgb.shape[:2]
        persons = [drop_outside(p, width, height) for p in read_openpose_json(self.find(relative_path))]
        return [p for p in persons if p[:, 2].any()]
