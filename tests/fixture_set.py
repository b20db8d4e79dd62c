"""The test fixture set in tests/data/ (origins and licences: tests/data/SOURCES.md).

51 real photos (coco-mini, CC BY / CC BY-SA, at most 480 px) with their COCO person keypoints, and
synthetic labels for them in each supported format, with the real DeepFashion vocabularies:

    PHOTOS            photos/coco-<id>.jpg
    KEYPOINTS         keypoints.json (COCO person keypoints, coordinates of the scaled photos)
    ATTR_CHALLENGE    deepfashion-attr/ (split/list_attr_cloth.txt, {train,val,test}.txt, *_attr.txt, *_bbox.txt)
    BENCHMARK         deepfashion/ (Anno/list_category_cloth.txt ... Eval/list_eval_partition.txt)
    CSV               labels.csv

Splits of the attribute-challenge labels: 32 train, 8 val, 8 test and 3 photos no split lists.
`build_fixtures.py` beside them wrote all of it from ../shared/data; tests only read it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image, ImageOps

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = DATA / "photos"
KEYPOINTS = DATA / "keypoints.json"
ATTR_CHALLENGE = DATA / "deepfashion-attr"
BENCHMARK = DATA / "deepfashion"
CSV = DATA / "labels.csv"
SPLIT_COUNTS = {"train": 32, "val": 8, "test": 8, "none": 3}


def split_names(split: str) -> list[str]:
    """File names of the photos the attribute-challenge labels put in `split` (train, val, test, none)."""
    if split == "none":
        listed = {name for s in ("train", "val", "test") for name in split_names(s)}
        return sorted(p.name for p in PHOTOS.glob("*.jpg") if p.name not in listed)
    return [Path(line).name for line in (ATTR_CHALLENGE / "split" / f"{split}.txt").read_text().split()]


def attr_rows(split: str) -> dict[str, list[int]]:
    """{file name: the six group indices of its `split`_attr.txt row} for train or val."""
    rows = (ATTR_CHALLENGE / "split" / f"{split}_attr.txt").read_text().splitlines()
    return {name: [int(v) for v in row.split()] for name, row in zip(split_names(split), rows)}


def bboxes(split: str) -> dict[str, tuple[int, int, int, int]]:
    rows = (ATTR_CHALLENGE / "split" / f"{split}_bbox.txt").read_text().splitlines()
    return {name: tuple(int(v) for v in row.split()) for name, row in zip(split_names(split), rows)}


def copy_photos(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(PHOTOS / name, folder / name)
    return folder


def keypoint_annotations() -> dict:
    """keypoints.json as a dict (a fresh copy: change it freely)."""
    return json.loads(KEYPOINTS.read_text())


def _box_crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The label box (the annotated person, or the central 80 % without one) and a tenth more each side."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) // 10, (y2 - y1) // 10
    return image.crop((max(0, x1 - dx), max(0, y1 - dy), min(image.width, x2 + dx), min(image.height, y2 + dy)))


def write_attr_challenge_variants(folder: Path, splits=("train", "val")) -> dict[str, list[str]]:
    """An attribute-challenge folder (img/, split/) holding each photo of `splits` three ways: as
    taken, mirrored, and cropped to its label box as catalog photos are (three distinct images of one
    scene, each with the photo's label row; no box files). Returns {split: the relative image paths
    in the order of its split files}."""
    (folder / "img").mkdir(parents=True)
    (folder / "split").mkdir()
    shutil.copyfile(ATTR_CHALLENGE / "split" / "list_attr_cloth.txt", folder / "split" / "list_attr_cloth.txt")
    written = {}
    for split in splits:
        paths, rows, boxes = [], [], bboxes(split)
        for name, row in attr_rows(split).items():
            with Image.open(PHOTOS / name) as photo:
                photo.load()
            variants = {"": photo, "-mirrored": ImageOps.mirror(photo), "-cropped": _box_crop(photo, boxes[name])}
            for suffix, image in variants.items():
                relative = f"img/{Path(name).stem}{suffix}.jpg"
                image.save(folder / relative, "JPEG", quality=90)
                paths.append(relative)
                rows.append(" ".join(map(str, row)))
        (folder / "split" / f"{split}.txt").write_text("".join(p + "\n" for p in paths))
        (folder / "split" / f"{split}_attr.txt").write_text("".join(r + "\n" for r in rows))
        written[split] = paths
    return written
