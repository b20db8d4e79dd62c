"""Which label row an image gets (`Labels.match`): only a whole-path-component suffix match that pairs
one row with one image; everything else unlabelled and reported, by `Labels.match` and by a real
`vsam prep-pose` run (stderr, the report, --strict)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import bad_images
from cli import main
from pose_prep.labels import Labels, read_labels
from pose_prep.shard_format import Shard, live_items

HEADER = "path,category,attributes,split\n"


def csv_labels(tmp_path: Path, rows: str) -> Labels:
    path = tmp_path / "labels.csv"
    path.write_text(HEADER + rows)
    return read_labels(path)


def test_an_unlisted_image_does_not_borrow_the_labels_of_a_file_of_the_same_name(tmp_path):
    labels = csv_labels(tmp_path, "dresses/001.jpg,Dress,,train\ndresses/002.jpg,Dress,,val\n")
    matching = labels.match(["dresses/001.jpg", "dresses/002.jpg", "tops/001.jpg"])
    assert matching.for_item("dresses/001.jpg").split == "train"
    assert matching.for_item("dresses/002.jpg").split == "val"
    tops = matching.for_item("tops/001.jpg")
    assert (tops.split, tops.category, tops.attributes) == ("none", -1, None)
    assert matching.unlabelled == ["tops/001.jpg"] and matching.unmatched_rows == []
    assert labels.lookup("tops/001.jpg") is None                  # one image alone: the same rule


def test_a_row_matches_when_one_path_is_a_whole_component_suffix_of_the_other(tmp_path):
    labels = csv_labels(tmp_path, "img/00000.jpg,Dress,,train\nimg/00001.jpg,Tee,,val\nimg/00002.jpg,Tee,,test\n")
    # --images data/img: the image path is the row's tail; --images data/..: the row is the image path's tail.
    matching = labels.match(["00000.jpg", "data/img/00001.jpg", "ximg/00002.jpg", "img/100000.jpg"])
    assert set(matching.items) == {"00000.jpg", "data/img/00001.jpg"}
    assert matching.unlabelled == ["img/100000.jpg", "ximg/00002.jpg"]     # not whole components
    assert matching.unmatched_rows == ["img/00002.jpg"]


def test_an_ambiguous_pairing_leaves_every_image_of_it_unlabelled(tmp_path):
    labels = csv_labels(tmp_path, "001.jpg,Dress,,train\nshop/a/002.jpg,Dress,,train\nshop/b/002.jpg,Tee,,val\n")
    matching = labels.match(["dresses/001.jpg", "tops/001.jpg", "002.jpg", "shop/a/003.jpg"])
    assert matching.items == {}
    assert matching.unlabelled == ["002.jpg", "dresses/001.jpg", "shop/a/003.jpg", "tops/001.jpg"]
    assert matching.unmatched_rows == ["001.jpg", "shop/a/002.jpg", "shop/b/002.jpg"]
    assert sorted(matching.ambiguous) == [
        "image 002.jpg matches 2 label rows (shop/a/002.jpg, shop/b/002.jpg)",
        "label row 001.jpg matches 2 images (dresses/001.jpg, tops/001.jpg)"]


def test_paths_that_differ_only_in_letter_case_are_reported_not_guessed(tmp_path):
    labels = csv_labels(tmp_path, "Dresses/001.JPG,Dress,,train\ndresses/002.jpg,Dress,,val\n")
    matching = labels.match(["dresses/001.jpg", "dresses/002.jpg"])
    assert set(matching.items) == {"dresses/002.jpg"}
    assert matching.unlabelled == ["dresses/001.jpg"] and matching.unmatched_rows == ["Dresses/001.JPG"]
    assert matching.case_only == [("Dresses/001.JPG", "dresses/001.jpg")]


def test_the_summary_counts_everything_and_lists_the_first(tmp_path):
    rows = "".join(f"gone/{n:03d}.jpg,Tee,,train\n" for n in range(150))
    matching = csv_labels(tmp_path, rows).match([f"new/{n:03d}.jpg" for n in range(120)])
    summary = matching.summary(limit=100)
    assert (summary["matched"], summary["unlabelled"], summary["unmatched_rows"]) == (0, 120, 150)
    assert len(summary["first"]["unlabelled"]) == 100 and summary["first"]["unmatched_rows"][0] == "gone/000.jpg"


# --- a real prep-pose run -------------------------------------------------------------------

@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A catalog with two dresses, an unlisted top of the same file name, a coat whose label row
    differs in letter case, and a label row for a file that is not there."""
    root = tmp_path_factory.mktemp("shop")
    photo = bad_images.grace_hopper(96)
    for name in ("dresses/001.jpg", "dresses/002.jpg", "tops/001.jpg", "coats/003.jpg"):
        (root / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        photo.save(root / "img" / name, quality=90)
    (root / "labels.csv").write_text(HEADER + "dresses/001.jpg,Dress,floral,train\ndresses/002.jpg,Dress,,val\n"
                                     "Coats/003.JPG,Coat,,train\ngone/404.jpg,Tee,,train\n")
    return root


def prep_pose(shop: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, [
        "prep-pose", "--images", str(shop / "img"), "--labels", str(shop / "labels.csv"), "--out", str(out),
        "--detector", "blazepose", "--no-progress", *extra])


def test_prep_pose_stores_unmatched_images_unlabelled_and_reports_both_sides(shop, tmp_path):
    result = prep_pose(shop, tmp_path / "shards")
    assert result.exit_code == 0, result.stderr
    stored = {}
    for item in live_items(tmp_path / "shards"):
        with Shard(tmp_path / "shards" / item["shard"]) as shard:
            stored[item["path"]] = shard.item(item["row"])
    assert (stored["tops/001.jpg"].split, stored["tops/001.jpg"].category) == ("none", -1)
    assert (stored["tops/001.jpg"].attributes == -1).all()
    assert (stored["dresses/001.jpg"].split, stored["dresses/001.jpg"].attributes.tolist()) == ("train", [1])
    assert "unlabelled: tops/001.jpg" in result.stderr and "unlabelled: coats/003.jpg" in result.stderr
    assert "unmatched label row: gone/404.jpg" in result.stderr
    assert "case only: label row Coats/003.JPG and image coats/003.jpg" in result.stderr
    report = json.loads((tmp_path / "shards/reports/latest.json").read_text())
    assert {k: report["labels_match"][k] for k in ("matched", "unlabelled", "unmatched_rows", "case_only")} == \
        {"matched": 2, "unlabelled": 2, "unmatched_rows": 2, "case_only": 1}

    strict = prep_pose(shop, tmp_path / "shards", "--strict")
    assert strict.exit_code == 1
    assert "--strict and the labels do not pair one to one with the images: 2 image(s) unlabelled, " \
           "2 label row(s) match no image" in strict.stderr
