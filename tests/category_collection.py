"""A small real collection WITH categories, in the DeepFashion benchmark format.

The attribute-challenge collection of the other fixtures (`df_shards`) has no categories. This one
takes 56 of its stored photos (their JPEG bytes), puts them under img/<item folder>/ and writes the
benchmark's label files for them (count line, header line, rows: `Anno/list_category_cloth.txt`,
`list_attr_cloth.txt`, `list_category_img.txt`, `list_attr_img.txt` with 1 / -1 / 0,
`Eval/list_eval_partition.txt`), with two of DeepFashion's category names and two of its attribute
names; `pose_prep.prep` then builds the collection as `vsam prep-pose --labels-format deepfashion`
does. The labels are synthetic, laid out for the label-noise experiment within a category:

    train  24 Jacket: long sleeve 16 true, 7 false, 1 unknown; floral true on every third
           16 Dress:  long sleeve 8 true, 8 false; floral false
    val     8 Jacket and 8 Dress: long sleeve 4 true, 4 false each; floral false
"""
from __future__ import annotations

from pathlib import Path

from pose_prep.shard_format import Shard, live_rows

CATEGORIES = [("Jacket", 1), ("Dress", 3)]           # names and types as in DeepFashion's list_category_cloth.txt
ATTRIBUTES = [("floral", 1), ("long sleeve", 4)]     # ... and list_attr_cloth.txt


def plan() -> list[tuple[str, int, list[int]]]:
    """(split, category index, [floral, long sleeve] as the benchmark file writes them) per item."""
    items = []
    for i in range(24):
        items.append(("train", 0, [1 if i % 3 == 0 else -1, 1 if i < 16 else (0 if i == 23 else -1)]))
    for i in range(16):
        items.append(("train", 1, [-1, 1 if i % 2 else -1]))
    for i in range(16):
        items.append(("val", i // 8, [-1, 1 if i % 2 else -1]))
    return items


def _table(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(rows)}\n{header}\n" + "".join(row + "\n" for row in rows))


def write_benchmark_folder(root: Path, source_shards: Path) -> None:
    """The benchmark-format folder under `root`, its photos taken from `source_shards`."""
    photos = []
    for split in ("train", "val"):
        for shard_path, rows in live_rows(source_shards, (split,)).items():
            with Shard(shard_path) as shard:
                photos += [shard.image(int(row)) for row in rows]
    rows = {"category": [], "attr": [], "partition": []}
    for k, (split, category, attributes) in enumerate(plan()):
        name = f"img/Sheer_{CATEGORIES[category][0]}_{k // 2}/img_{k % 2 + 1:08d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(photos[k])
        rows["category"].append(f"{name:<64}{category + 1}")
        rows["attr"].append(f"{name:<64}" + " ".join(f"{v:2d}" for v in attributes))
        rows["partition"].append(f"{name:<64}{split}")
    _table(root / "Anno" / "list_category_cloth.txt", "category_name  category_type",
           [f"{name:<15}{kind}" for name, kind in CATEGORIES])
    _table(root / "Anno" / "list_attr_cloth.txt", "attribute_name  attribute_type",
           [f"{name:<29}{kind}" for name, kind in ATTRIBUTES])
    _table(root / "Anno" / "list_category_img.txt", "image_name  category_label", rows["category"])
    _table(root / "Anno" / "list_attr_img.txt", "image_name  attribute_labels", rows["attr"])
    _table(root / "Eval" / "list_eval_partition.txt", "image_name  evaluation_status", rows["partition"])


def build(root: Path, source_shards: Path) -> Path:
    """Write the folder under root/deepfashion and prep it into root/shards; returns the shards."""
    from pose_prep.prep import PrepOptions, run

    folder = root / "deepfashion"
    write_benchmark_folder(folder, source_shards)
    out = root / "shards"
    report = run(PrepOptions(images=folder, labels=folder, labels_format="deepfashion", out=out, shard_size=40,
                             max_side=128, progress=False))
    assert report.exit_code == 0, report
    return out
