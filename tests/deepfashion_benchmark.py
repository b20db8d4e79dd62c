"""A small folder in the exact format of the DeepFashion Category and Attribute Prediction Benchmark.

`make_benchmark_folder` writes random labels (it returns them, for the tests to compare) for a few
photos of the fixture set with the REAL vocabularies (50 categories, 1000 attributes; the fixture set
keeps them in tests/data/deepfashion/Anno), in the benchmark's own layout, where the same file name
sits in several item folders. Layout and headers as in the benchmark:

    img/<Item_Folder>/img_00000001.jpg
    Anno/list_category_cloth.txt   count line, "category_name  category_type", rows
    Anno/list_attr_cloth.txt       count line, "attribute_name  attribute_type", rows
    Anno/list_category_img.txt     count line, "image_name  category_label" (1-based)
    Anno/list_attr_img.txt         count line, "image_name  attribute_labels" (1 / -1 / 0 per attribute)
    Anno/list_bbox.txt             count line, "image_name  x_1  y_1  x_2  y_2"
    Eval/list_eval_partition.txt   count line, "image_name  evaluation_status"
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fixture_set


@dataclass
class Expected:
    category: int                   # 0-based index into list_category_cloth.txt
    category_type: int              # 1 upper, 2 lower, 3 full body
    attributes: np.ndarray          # (1000,) as vsam stores them: 1 true, 0 false, -1 unknown
    split: str
    bbox: tuple[int, int, int, int]


def _vocabulary(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    return [(line.rsplit(None, 1)[0].strip(), int(line.rsplit(None, 1)[1])) for line in lines[2:] if line.strip()]


def make_benchmark_folder(root: Path, n_images: int = 12, seed: int = 0) -> dict[str, Expected]:
    """Write the fixture under `root`; return {image_name as the files write it: Expected}."""
    rng = random.Random(seed)
    anno_source = fixture_set.BENCHMARK / "Anno"
    categories = _vocabulary(anno_source / "list_category_cloth.txt")
    attributes = _vocabulary(anno_source / "list_attr_cloth.txt")
    (root / "Anno").mkdir(parents=True)
    (root / "Eval").mkdir()
    for name in ("list_category_cloth.txt", "list_attr_cloth.txt"):
        shutil.copyfile(anno_source / name, root / "Anno" / name)

    by_type = {t: [i for i, (_, kind) in enumerate(categories) if kind == t] for t in (1, 2, 3)}
    photos = sorted(fixture_set.PHOTOS.glob("*.jpg"))[:n_images]
    expected: dict[str, Expected] = {}
    rows: dict[str, list[str]] = {"category": [], "attr": [], "bbox": [], "partition": []}
    for k, photo in enumerate(photos):
        category = rng.choice(by_type[k % 3 + 1])
        # Two items per folder, and the same file names in every folder, as in the benchmark.
        folder = f"{rng.choice(['Floral', 'Striped', 'Faux_Leather', 'Sheer'])}_{categories[category][0]}_{k // 2}"
        name = f"img/{folder}/img_{k % 2 + 1:08d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, root / name)
        raw = np.full(len(attributes), -1, np.int64)                    # mostly negative
        raw[rng.sample(range(len(attributes)), 5)] = 1
        raw[rng.sample(range(len(attributes)), 40)] = 0                 # some unknown
        split = ("train", "train", "val", "test")[k % 4]
        bbox = (rng.randint(0, 30), rng.randint(0, 30), rng.randint(150, 199), rng.randint(250, 299))
        expected[name] = Expected(category, categories[category][1],
                                  np.select([raw == 1, raw == -1], [1, 0], -1).astype(np.int8), split, bbox)
        rows["category"].append(f"{name:<64}{category + 1}")
        rows["attr"].append(f"{name:<64}" + " ".join(f"{v:2d}" for v in raw))
        rows["bbox"].append(f"{name:<64}{bbox[0]:<5}{bbox[1]:<5}{bbox[2]:<5}{bbox[3]}")
        rows["partition"].append(f"{name:<64}{split}")

    def table(path: Path, header: str, lines: list[str]) -> None:
        path.write_text(f"{len(lines)}\n{header}\n" + "".join(line + "\n" for line in lines))

    table(root / "Anno" / "list_category_img.txt", "image_name  category_label", rows["category"])
    table(root / "Anno" / "list_attr_img.txt", "image_name  attribute_labels", rows["attr"])
    table(root / "Anno" / "list_bbox.txt", "image_name  x_1  y_1  x_2  y_2", rows["bbox"])
    table(root / "Eval" / "list_eval_partition.txt", "image_name  evaluation_status", rows["partition"])
    return expected
