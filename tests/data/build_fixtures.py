"""Build the test fixture set in tests/data/ from ../shared/data (run once; the output is committed).

    .venv/bin/python tests/data/build_fixtures.py [--shared ../shared/data]

What it writes (see SOURCES.md for origins and licences):

    photos/coco-<id>.jpg      the coco-mini photos whose Flickr licence is CC BY 2.0 or CC BY-SA 2.0
                              (NonCommercial and NoDerivs ones are left out), scaled to at most 480 px
    keypoints.json            their COCO person-keypoint annotations, coordinates scaled to match
    deepfashion-attr/split/   attribute-challenge labels (26 attributes, 6 exclusive groups)
    deepfashion/Anno, Eval/   DeepFashion benchmark labels (50 categories, 1000 attributes)
    labels.csv                the same labels as CSV (path,category,attributes,split,category_type)

The labels are synthetic: drawn with a fixed seed from the real DeepFashion vocabularies, they
exercise the formats and the pipeline and say nothing true about the photos. The label boxes are
the annotated people's boxes where there are any. Rerunning the builder gives the same files.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
MAX_SIDE = 480
JPEG_QUALITY = 85
SEED = 11
REDISTRIBUTABLE = ("Attribution License", "Attribution-ShareAlike License")
SPLIT_FILES = ("train", "val", "test")
# How many photos with annotated body keypoints, then without, go into each split; the rest of
# each kind is listed in no split file (unlabelled).
SPLIT_SIZES = {"train": (11, 21), "val": (3, 5), "test": (1, 7)}
ATTR_CHALLENGE_GROUP_SIZES = (7, 3, 3, 4, 6, 3)


def coco_photos(coco: Path) -> list[tuple[dict, list[dict], Path, str]]:
    """(image entry, its annotations, file, licence name) of every redistributable coco-mini photo."""
    chosen = []
    for split in ("train2017", "val2017"):
        data = json.loads((coco / "annotations" / f"person_keypoints_{split}.json").read_text())
        licences = {entry["id"]: entry for entry in data["licenses"]}
        for image in data["images"]:
            licence = licences[image["license"]]
            path = coco / split / image["file_name"]
            if licence["name"] in REDISTRIBUTABLE and path.is_file():
                annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
                chosen.append((image, annotations, path, licence))
    return sorted(chosen, key=lambda c: c[0]["id"])


def write_photo(source: Path, target: Path) -> float:
    """Scale to MAX_SIDE and re-encode without metadata; return the scale applied."""
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(rgb.size))
    if scale < 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS)
    rgb.save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return scale


def scaled_annotation(annotation: dict, scale: float, image_id: int) -> dict:
    keypoints = annotation["keypoints"]
    for i in range(0, len(keypoints), 3):
        if keypoints[i + 2] > 0:
            keypoints[i], keypoints[i + 1] = round(keypoints[i] * scale, 2), round(keypoints[i + 1] * scale, 2)
    return {**annotation, "image_id": image_id, "keypoints": keypoints,
            "bbox": [round(v * scale, 2) for v in annotation["bbox"]],
            "area": round(annotation["area"] * scale * scale, 2), "segmentation": []}


def person_box(annotations: list[dict], width: int, height: int) -> tuple[int, int, int, int]:
    """The largest annotated person's box (x1, y1, x2, y2), or the central 80 % without one."""
    people = [a for a in annotations if a["num_keypoints"] > 0] or annotations
    if not people:
        return round(0.1 * width), round(0.1 * height), round(0.9 * width), round(0.9 * height)
    x, y, w, h = max(people, key=lambda a: a["bbox"][2] * a["bbox"][3])["bbox"]
    return max(0, round(x)), max(0, round(y)), min(width, round(x + w)), min(height, round(y + h))


def vocabulary(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    return [(line.rsplit(None, 1)[0].strip(), int(line.rsplit(None, 1)[1])) for line in lines[2:] if line.strip()]


def assign_splits(photos: list[dict]) -> dict[str, str]:
    """{file name: train | val | test | none}, the people spread over every split."""
    posed = [p["file_name"] for p in photos if p["posed"]]
    other = [p["file_name"] for p in photos if not p["posed"]]
    splits = {}
    for split, (n_posed, n_other) in SPLIT_SIZES.items():
        for name in posed[:n_posed] + other[:n_other]:
            splits[name] = split
        posed, other = posed[n_posed:], other[n_other:]
    for name in posed + other:
        splits[name] = "none"
    return splits


def table(path: Path, header: str, lines: list[str]) -> None:
    """A DeepFashion table: a count line, a column-name line, the rows."""
    path.write_text(f"{len(lines)}\n{header}\n" + "".join(line + "\n" for line in lines))


def write_attribute_challenge(folder: Path, vocabulary_file: Path, photos: list[dict], rng: random.Random) -> None:
    split_folder = folder / "split"
    split_folder.mkdir(parents=True)
    shutil.copyfile(vocabulary_file, split_folder / "list_attr_cloth.txt")
    for split in SPLIT_FILES:
        rows = [p for p in photos if p["split"] == split]
        (split_folder / f"{split}.txt").write_text("".join(f"img/{p['file_name']}\n" for p in rows))
        (split_folder / f"{split}_bbox.txt").write_text("".join("{:03d} {:03d} {:03d} {:03d}\n".format(*p["bbox"])
                                                                for p in rows))
        if split != "test":      # as in the challenge: the test split has no attribute file
            (split_folder / f"{split}_attr.txt").write_text("".join(
                " ".join(str(rng.randrange(size)) for size in ATTR_CHALLENGE_GROUP_SIZES) + "\n" for _ in rows))


def benchmark_labels(photos: list[dict], categories, attributes, rng: random.Random) -> list[dict]:
    """Per photo: category, its type, the 1 / -1 / 0 attribute row and the item folder."""
    labelled = []
    by_type = {t: [i for i, (_, kind) in enumerate(categories) if kind == t] for t in (1, 2, 3)}
    textures = [name for name, kind in attributes if kind == 1]
    for k, photo in enumerate(photos):
        category = rng.choice(by_type[k % 3 + 1])
        raw = [-1] * len(attributes)
        for i in rng.sample(range(len(attributes)), 30):
            raw[i] = 0                                          # unknown
        for i in rng.sample(range(len(attributes)), 4):
            raw[i] = 1
        texture = rng.choice(textures).title().replace(" ", "_")
        folder = f"{texture}_{categories[category][0]}"
        labelled.append({**photo, "category": category, "category_type": categories[category][1], "raw": raw,
                         "image_name": f"img/{folder}/{photo['file_name']}"})
    return labelled


def write_benchmark(folder: Path, vocabulary_folder: Path, labelled: list[dict]) -> None:
    (folder / "Anno").mkdir(parents=True)
    (folder / "Eval").mkdir()
    for name in ("list_category_cloth.txt", "list_attr_cloth.txt"):
        shutil.copyfile(vocabulary_folder / name, folder / "Anno" / name)
    listed = [p for p in labelled if p["split"] != "none"]
    table(folder / "Anno" / "list_category_img.txt", "image_name  category_label",
          [f"{p['image_name']:<64}{p['category'] + 1}" for p in listed])
    table(folder / "Anno" / "list_attr_img.txt", "image_name  attribute_labels",
          [f"{p['image_name']:<64}" + " ".join(f"{v:2d}" for v in p["raw"]) for p in listed])
    table(folder / "Anno" / "list_bbox.txt", "image_name  x_1  y_1  x_2  y_2",
          [f"{p['image_name']:<64}" + "".join(f"{v:<5}" for v in p["bbox"]).rstrip() for p in listed])
    table(folder / "Eval" / "list_eval_partition.txt", "image_name  evaluation_status",
          [f"{p['image_name']:<64}{p['split']}" for p in listed])


def write_csv(path: Path, labelled: list[dict], categories, attributes) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "category", "attributes", "split", "category_type"])
        for p in labelled:
            true = [attributes[i][0] for i, v in enumerate(p["raw"]) if v == 1]
            split = "" if p["split"] == "none" else p["split"]
            writer.writerow([p["file_name"], categories[p["category"]][0], ";".join(true), split,
                             p["category_type"]])


SOURCES_HEAD = """# tests/data: where each file comes from, and its licence

Written by `build_fixtures.py` (run it to regenerate this page with the files). Everything here may be
redistributed under the licence named; nothing research-only is stored here.

## photos/: {count} photos from COCO 2017 (via coco-mini)

The images of `../shared/data/keypoints/coco-mini` (public repo Obmutescence/COCO-MINI, a subset of COCO
2017) whose licence in the COCO annotation JSON is "Attribution License" (CC BY 2.0) or
"Attribution-ShareAlike License" (CC BY-SA 2.0); the NonCommercial and NoDerivs ones are left out.

- **Changes made** (both licences allow adaptation): each photo is scaled to at most {max_side} px on its
  longer side and re-encoded as JPEG quality {quality}, without its metadata. The adapted files of CC BY-SA
  photos are licensed under CC BY-SA 2.0 as well (ShareAlike); those of CC BY photos under CC BY 2.0.
- **Authors**: the COCO JSON names no author. Each photo's Flickr page (the last column, made from the
  photo id in its `flickr_url`) shows the photographer, to be credited as the licence asks.
- Licences: CC BY 2.0 <http://creativecommons.org/licenses/by/2.0/>, CC BY-SA 2.0
  <http://creativecommons.org/licenses/by-sa/2.0/>.

## keypoints.json

The COCO 2017 person-keypoint annotations of these photos (COCO Consortium, CC BY 4.0
<https://creativecommons.org/licenses/by/4.0/>), from coco-mini's `person_keypoints_{{train,val}}2017.json`,
with keypoints, boxes and areas scaled to the photos here and segmentations dropped. Each image entry keeps
its licence id, `coco_url` and `flickr_url`, and adds `original_width`/`original_height`.

## Labels: deepfashion-attr/, deepfashion/, labels.csv

Synthetic: drawn with a fixed seed, they exercise the formats and the pipeline and say nothing true about
the photos (the boxes are the annotated people's boxes where there are any). Written by `build_fixtures.py`.

The **vocabularies** are the real DeepFashion ones (Liu et al., CVPR 2016): `deepfashion-attr/split/list_attr_cloth.txt`
(26 attributes in 6 groups, as packaged for the CE7454 attribute challenge) and `deepfashion/Anno/list_category_cloth.txt`,
`list_attr_cloth.txt` (50 categories, 1000 attributes, from the benchmark's `Anno/`). These three files are
lists of label names, copied so that the fixtures are in the exact formats with the exact vocabularies; no
DeepFashion photo and no DeepFashion per-image annotation is stored here. DeepFashion's terms restrict its
data to non-commercial research; whether they reach a list of attribute names is for the maintainers to
confirm. If not, `build_fixtures.py` reads the names from those files alone: swap them for invented names.

## Photos that installed packages ship (used by the tests, not stored here)

| image | package | author | licence |
|---|---|---|---|
| grace_hopper.jpg | matplotlib (`cbook.get_sample_data`) | U.S. Navy (official portrait of Grace Hopper) | public domain |
| astronaut | scikit-image (`skimage.data`) | NASA (Eileen Collins) | public domain |
| camera | scikit-image | Lav Varshney | CC0 |
| chelsea | scikit-image | Stefan van der Walt | CC0 |
| coffee | scikit-image | Rachel Michetti (Pikolo Espresso Bar) | CC0 |

## Other files

`single_attention_reference.pt`: model outputs written by `make_single_attention_reference.py` from this
repository's own code (no outside data).

## The photos, one by one

| file | COCO image id | COCO split | licence | people annotated | flickr_url | Flickr page |
|---|---|---|---|---|---|---|
"""


def write_sources(path: Path, rows: list[dict]) -> None:
    lines = [SOURCES_HEAD.format(count=len(rows), max_side=MAX_SIDE, quality=JPEG_QUALITY)]
    for r in rows:
        photo_id = r["flickr_url"].rsplit("/", 1)[1].split("_")[0]
        lines.append(f"| {r['file_name']} | {r['id']} | {r['coco_split']} | {r['licence']} | {r['people']} | "
                     f"{r['flickr_url']} | https://www.flickr.com/photo.gne?id={photo_id} |\n")
    path.write_text("".join(lines))


def build(shared: Path, out: Path) -> None:
    for generated in ("photos", "deepfashion-attr", "deepfashion"):
        shutil.rmtree(out / generated, ignore_errors=True)
    (out / "photos").mkdir(parents=True)
    images, annotations, photos, sources, licences = [], [], [], [], {}
    for image, image_annotations, source, licence in coco_photos(shared / "keypoints" / "coco-mini"):
        name = f"coco-{image['id']:012d}.jpg"
        scale = write_photo(source, out / "photos" / name)
        with Image.open(out / "photos" / name) as written:
            width, height = written.size
        licences[licence["id"]] = licence
        images.append({"id": image["id"], "file_name": name, "width": width, "height": height,
                       "license": image["license"], "coco_url": image["coco_url"], "flickr_url": image["flickr_url"],
                       "original_width": image["width"], "original_height": image["height"]})
        scaled = [scaled_annotation(a, scale, image["id"]) for a in image_annotations]
        annotations += scaled
        photos.append({"file_name": name, "posed": any(a["num_keypoints"] > 0 for a in scaled),
                       "bbox": person_box(scaled, width, height)})
        sources.append({"file_name": name, "id": image["id"], "coco_split": source.parent.name,
                        "licence": {"Attribution License": "CC BY 2.0",
                                    "Attribution-ShareAlike License": "CC BY-SA 2.0"}[licence["name"]],
                        "people": sum(1 for a in scaled if a["num_keypoints"] > 0),
                        "flickr_url": image["flickr_url"]})
    (out / "keypoints.json").write_text(json.dumps({
        "info": {"description": "coco-mini photos under CC BY 2.0 / CC BY-SA 2.0, scaled to at most "
                                f"{MAX_SIDE} px; COCO 2017 person keypoints (CC BY 4.0, COCO Consortium), scaled "
                                "to match. See SOURCES.md."},
        "licenses": sorted(licences.values(), key=lambda entry: entry["id"]), "images": images,
        "annotations": annotations, "categories": json.loads(
            (shared / "keypoints/coco-mini/annotations/person_keypoints_val2017.json").read_text())["categories"]},
        indent=1) + "\n")

    write_sources(out / "SOURCES.md", sources)

    splits = assign_splits(photos)
    for photo in photos:
        photo["split"] = splits[photo["file_name"]]
    rng = random.Random(SEED)
    write_attribute_challenge(out / "deepfashion-attr", shared / "deepfashion-attr/split/list_attr_cloth.txt",
                              photos, rng)
    categories = vocabulary(shared / "deepfashion-anno/list_category_cloth.txt")
    attributes = vocabulary(shared / "deepfashion-anno/list_attr_cloth.txt")
    labelled = benchmark_labels(photos, categories, attributes, rng)
    write_benchmark(out / "deepfashion", shared / "deepfashion-anno", labelled)
    write_csv(out / "labels.csv", labelled, categories, attributes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    build(args.shared, args.out)


if __name__ == "__main__":
    main()
