"""`vsam shards info | list | verify` and the prep-pose command line, on a small real collection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixture_set
from cli import EXIT_FAILED, main
from shard_faults import flip_at, flip_byte, flip_text

# Fixture photos: three train, three val, two test and two that no split file lists; most show people.
NAMES = [f"coco-{number:012d}.jpg" for number in (790, 129648, 165518, 397133, 433998, 358083, 442450, 423617,
                                                  519208, 557172)]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    images = fixture_set.copy_photos(root / "img", NAMES)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = CliRunner().invoke(main, ["prep-pose", "--images", str(images), "--labels",
                                       str(fixture_set.ATTR_CHALLENGE), "--out", str(root / "shards"),
                                       "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    assert "prep-pose: 10 new" in result.output and "1 rejected" in result.output
    return root / "shards"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def split_counts_from_split_files() -> dict[str, int]:
    listed = {}
    for split in ("train", "val", "test"):
        for line in (fixture_set.ATTR_CHALLENGE / f"split/{split}.txt").read_text().split():
            listed[Path(line).name] = split
    counts = dict.fromkeys(("train", "val", "test", "none"), 0)
    for name in NAMES:
        counts[listed.get(name, "none")] += 1
    return counts


def test_info_matches_the_split_files(collection):
    result = invoke("shards", "info", str(collection))
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["splits"] == split_counts_from_split_files() == {"train": 3, "val": 3, "test": 2, "none": 2}
    assert info["items"] == 10 and info["with_pose"] + info["without_pose"] == 10 and info["with_pose"] >= 5
    assert info["schema_version"] == 2 and info["detector"] == "auto" and info["detector_version"]   # the default
    assert info["vocabulary"]["attribute_groups"][:8] == ["texture"] * 7 + ["sleeve"]
    assert info["vocabulary"]["exclusive_groups"] is True
    assert info["heatmap"]["size"] == [56, 56]
    assert len(info["rejected"]) == 1 and info["rejected"][0]["path"] == "broken.jpg"
    assert "truncated" in info["rejected"][0]["reason"] or "corrupt" in info["rejected"][0]["reason"]


def test_list_prints_one_json_line_per_live_item(collection):
    result = invoke("shards", "list", str(collection))
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(NAMES)
    assert all(set(line) == {"path", "sha256", "split", "has_pose", "shard", "row"} for line in lines)
    assert {(line["shard"], line["row"]) for line in lines} == {(f"shard-00000{i // 4 + 1}.h5", i % 4)
                                                                 for i in range(10)}


def test_verify_passes_then_names_a_flipped_byte(collection, tmp_path):
    assert invoke("shards", "verify", str(collection)).exit_code == 0
    broken = tmp_path / "shards"
    shutil.copytree(collection, broken)
    path = broken / "shard-000002.h5"
    flip_byte(path, "keypoints", 5, mask=0x01)
    result = invoke("shards", "verify", str(broken))
    assert result.exit_code == EXIT_FAILED
    assert f"broken: {path}: dataset keypoints does not match its checksum" in result.output

    (broken / "shard-000003.h5").unlink()
    result = invoke("shards", "verify", str(broken))
    assert result.exit_code == EXIT_FAILED and "shard-000003.h5: listed in the index but missing" in result.output


def test_verify_names_each_damaged_file_once_and_goes_on_to_the_others(collection, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(collection, broken)
    flip_at(broken / "shard-000001.h5", 1)                       # the HDF5 signature
    flip_text(broken / "shard-000002.h5", '"sigma": ', at=len('"sigma": '))   # a heatmap parameter
    flip_text(broken / "index.sqlite", '"sigma": ', at=len('"sigma": '))      # the same, in the index's meta
    result = invoke("shards", "verify", str(broken))
    assert result.exit_code == EXIT_FAILED and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("broken: ")] == [
        f"broken: {broken / 'index.sqlite'}: meta row 'heatmap' does not match its checksum",
        f"broken: {broken / 'shard-000001.h5'}: not a readable HDF5 shard (Unable to synchronously open file "
        "(file signature not found))",
        f"broken: {broken / 'shard-000002.h5'}: file attributes do not match their checksum"]   # and 3 is sound


def test_prep_pose_and_train_stop_with_one_line_naming_a_damaged_index_row(collection, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(collection, broken)
    item = json.loads(invoke("shards", "list", str(broken)).output.splitlines()[0])
    flip_text(broken / "index.sqlite", item["sha256"], at=7)
    expected = f"{broken / 'index.sqlite'}: files row {item['path']!r} does not match its checksum"
    result = invoke("prep-pose", "--images", str(collection.parent / "img"), "--labels", str(fixture_set.ATTR_CHALLENGE),
                    "--out", str(broken), "--shard-size", "4")
    assert (result.exit_code, result.output) == (EXIT_FAILED, f"vsam prep-pose: {expected}\n")
    result = invoke("train", "--shards", str(broken), "--out", str(tmp_path / "run"), "--config",
                    str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), "--device", "cpu")
    assert (result.exit_code, result.output) == (EXIT_FAILED, f"vsam train: {expected}\n")


def test_a_relabelling_prep_pose_stops_at_a_damaged_shard_instead_of_copying_its_rows(collection, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(collection, broken)
    flip_byte(broken / "shard-000002.h5", "keypoints", 5, mask=0x01)
    labels = tmp_path / "labels.csv"                   # new labels: every stored row is copied, not detected again
    labels.write_text("path,category,split\n" + "".join(f"{name},Tee,train\n" for name in NAMES))
    result = invoke("prep-pose", "--images", str(collection.parent / "img"), "--labels", str(labels), "--out",
                    str(broken), "--shard-size", "4")
    assert (result.exit_code, result.output) == (
        EXIT_FAILED, f"vsam prep-pose: {broken / 'shard-000002.h5'}: dataset keypoints does not match its checksum\n")


def test_not_a_collection_is_a_clear_error(tmp_path):
    result = invoke("shards", "info", str(tmp_path))
    assert result.exit_code == EXIT_FAILED and "no shard index here" in result.output


def test_bad_labels_stop_prep_pose_before_anything_is_written(tmp_path):
    (tmp_path / "labels.csv").write_text("path,split\na.jpg,holdout\n")
    result = invoke("prep-pose", "--images", str(fixture_set.PHOTOS), "--labels",
                    str(tmp_path / "labels.csv"), "--out", str(tmp_path / "shards"))
    assert result.exit_code == EXIT_FAILED and "labels.csv:2: split 'holdout'" in result.output
    assert not list((tmp_path / "shards").glob("shard-*.h5")) and not (tmp_path / "shards/index.sqlite").exists()
