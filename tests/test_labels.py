"""Label readers: the DeepFashion attribute challenge, the DeepFashion benchmark format and CSV, on
the fixture set's label files (tests/data: synthetic labels, the real vocabularies); `realdata`: the
real attribute-challenge files of ../shared/data."""
from __future__ import annotations

import numpy as np
import pytest

import fixture_set
from deepfashion_benchmark import make_benchmark_folder
from pose_prep.labels import (ATTR_CHALLENGE_GROUPS, LabelError, Labels, detect_format, read_labels)


@pytest.fixture(scope="module")
def challenge() -> Labels:
    return read_labels(fixture_set.ATTR_CHALLENGE)


def _true_names(labels: Labels, relative: str) -> list[str]:
    item = labels.for_item(relative)
    return [labels.vocabulary.attributes[i] for i in np.flatnonzero(item.attributes == 1)]


def test_attribute_challenge_vocabulary_keeps_the_six_exclusive_groups(challenge):
    vocabulary = challenge.vocabulary
    assert challenge.format == "deepfashion-attr"
    assert len(vocabulary.attributes) == 26 and vocabulary.exclusive_groups
    assert vocabulary.group_names == list(ATTR_CHALLENGE_GROUPS)
    assert [len(v) for v in vocabulary.group_indices().values()] == [7, 3, 3, 4, 6, 3]
    assert vocabulary.categories == []


def test_attribute_challenge_rows_become_one_true_attribute_per_group(challenge):
    # train.txt line 1 is img/coco-000000000790.jpg, train_attr.txt row 1 "3 2 1 3 4 2", train_bbox.txt "325 101 472 316".
    first_train = "coco-000000000790.jpg"
    assert _true_names(challenge, first_train) == ["embroidered", "sleeveless", "mini_length", "no_neckline", "faux",
                                                   "conventional"]
    first_val = (fixture_set.ATTR_CHALLENGE / "split/val_attr.txt").read_text().split("\n")[0].split()
    item = challenge.for_item(fixture_set.split_names("val")[0])
    assert item.split == "val"
    for group, pick in zip(ATTR_CHALLENGE_GROUPS, first_val):
        members = challenge.vocabulary.group_indices()[group]
        assert item.attributes[members].tolist() == [int(m == members[int(pick)]) for m in members]
    assert challenge.for_item(first_train).bbox == (325, 101, 472, 316)


def test_attribute_challenge_splits_match_the_split_files(challenge):
    splits = [item.split for item in challenge.items.values()]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (32, 8, 8)
    test_item = challenge.for_item(fixture_set.split_names("test")[0])
    assert test_item.split == "test" and (challenge.attributes(test_item) == -1).all()
    unlisted = challenge.for_item(fixture_set.split_names("none")[0])        # in no split file: unlabelled
    assert unlisted.split == "none" and unlisted.category == -1 and unlisted.attributes is None
    assert challenge.joint_group(challenge.for_item("coco-000000000790.jpg")) == "full"   # no category: whole body


def test_paths_match_by_their_common_suffix(challenge):
    same = challenge.for_item("coco-000000000790.jpg")
    assert challenge.for_item("img/coco-000000000790.jpg") is same
    assert challenge.for_item("drop-2026-11/img/coco-000000000790.jpg") is same
    assert challenge.lookup("other/coco-000000999999.jpg") is None


@pytest.mark.realdata
def test_the_real_attribute_challenge_files_are_read_whole(shared_data):
    labels = read_labels(shared_data / "deepfashion-attr")
    assert labels.vocabulary.group_names == list(ATTR_CHALLENGE_GROUPS) and len(labels.vocabulary.attributes) == 26
    splits = [item.split for item in labels.items.values()]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (5000, 500, 1000)
    # train_attr.txt row 1 is "5 0 2 0 2 2": solid, long sleeve, no dress, crew neckline, cotton, conventional.
    assert _true_names(labels, "00000.jpg") == ["solid", "long_sleeve", "no_dress", "crew_neckline", "cotton",
                                               "conventional"]
    assert labels.for_item("00000.jpg").bbox == (62, 62, 165, 300)
    assert labels.for_item("05600.jpg").split == "none"            # 05500-06999 outside test.txt: unlabelled
    assert detect_format(shared_data / "deepfashion-attr") == "deepfashion-attr"


def test_benchmark_fixture_is_read_with_the_real_vocabularies(tmp_path):
    expected = make_benchmark_folder(tmp_path / "bench")
    labels = read_labels(tmp_path / "bench")
    assert labels.format == "deepfashion"
    vocabulary = labels.vocabulary
    assert len(vocabulary.categories) == 50 and len(vocabulary.attributes) == 1000
    assert "abstract chevron" in vocabulary.attributes            # names with spaces survive
    assert set(vocabulary.category_types) == {1, 2, 3}
    assert set(vocabulary.group_names) == {"texture", "fabric", "shape", "part", "style"}
    assert not vocabulary.exclusive_groups
    for name, want in expected.items():
        item = labels.for_item(name)
        assert item.category == want.category and item.split == want.split and item.bbox == want.bbox
        np.testing.assert_array_equal(item.attributes, want.attributes)
        assert vocabulary.category_types[item.category] == want.category_type
        assert labels.joint_group(item) == {1: "upper", 2: "lower", 3: "body"}[want.category_type]
    # The same file name sits in several folders: the bare name is ambiguous, the folder decides.
    assert labels.lookup("img_00000001.jpg") is None
    first = next(iter(expected))
    assert labels.for_item(first.removeprefix("img/")).category == expected[first].category


def test_benchmark_attribute_values_map_1_minus1_0_to_true_false_unknown(tmp_path):
    expected = make_benchmark_folder(tmp_path / "bench", n_images=3)
    labels = read_labels(tmp_path / "bench", "deepfashion")
    line = (tmp_path / "bench/Anno/list_attr_img.txt").read_text().splitlines()[2].split()
    raw, stored = np.array(line[1:], int), labels.for_item(line[0]).attributes
    assert ((raw == 1) == (stored == 1)).all() and ((raw == -1) == (stored == 0)).all()
    assert ((raw == 0) == (stored == -1)).all() and len(expected) == 3


def test_the_fixture_sets_benchmark_and_csv_files_carry_the_same_labels():
    benchmark, table = read_labels(fixture_set.BENCHMARK), read_labels(fixture_set.CSV)
    assert (benchmark.format, table.format) == ("deepfashion", "csv")
    assert len(benchmark.vocabulary.categories) == 50 and len(benchmark.vocabulary.attributes) == 1000
    listed = fixture_set.SPLIT_COUNTS["train"] + fixture_set.SPLIT_COUNTS["val"] + fixture_set.SPLIT_COUNTS["test"]
    assert len(benchmark.items) == listed and len(table.items) == len(list(fixture_set.PHOTOS.glob("*.jpg")))
    for name in fixture_set.split_names("train") + fixture_set.split_names("test"):
        ours, theirs = benchmark.for_item(name), table.for_item(name)     # img/<Item_Folder>/name vs name
        assert ours.split == theirs.split
        assert benchmark.vocabulary.categories[ours.category] == table.vocabulary.categories[theirs.category]
        assert benchmark.joint_group(ours) == table.joint_group(theirs)
        true = {benchmark.vocabulary.attributes[i] for i in np.flatnonzero(ours.attributes == 1)}
        assert true == {table.vocabulary.attributes[i] for i in np.flatnonzero(theirs.attributes == 1)}
        assert (ours.attributes == -1).sum() > 0                    # the benchmark's 0: unknown
    assert table.for_item(fixture_set.split_names("none")[0]).split == "none"


def test_csv_labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,category,attributes,split\n"
                    "shop/a.jpg,Dress,floral;maxi,train\n"
                    "shop/b.jpg,Jeans,,val\n"
                    "shop/c.jpg,,floral,\n")
    labels = read_labels(path)
    assert labels.format == "csv"
    assert labels.vocabulary.categories == ["Dress", "Jeans"]
    assert labels.vocabulary.attributes == ["floral", "maxi"]
    a, b, c = (labels.for_item(f"{n}.jpg") for n in "abc")
    assert (a.category, a.attributes.tolist(), a.split) == (0, [1, 1], "train")
    assert (b.category, b.attributes.tolist(), b.split) == (1, [0, 0], "val")
    assert (c.category, c.attributes.tolist(), c.split) == (-1, [1, 0], "none")
    assert labels.joint_group(a) == "full"                       # no category_type column
    assert labels.for_item("unlisted.jpg").split == "none"


def test_csv_category_type_column_picks_the_joint_group(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,category,attributes,split,category_type\na.jpg,Jeans,,train,2\nb.jpg,Tee,,train,1\n")
    labels = read_labels(path)
    assert labels.joint_group(labels.for_item("a.jpg")) == "lower"
    assert labels.joint_group(labels.for_item("b.jpg")) == "upper"


@pytest.mark.parametrize("text, message", [
    ("path,category,attributes,split\na.jpg,Dress,,holdout\n", "labels.csv:2: split 'holdout'"),
    ("path,category,attributes,split\na.jpg,Dress,,train\na.jpg,Coat,,train\n", "labels.csv:3: a.jpg is listed twice"),
    ("image,category\na.jpg,Dress\n", "needs a header with a 'path' column"),
])
def test_bad_csv_names_file_line_and_reason(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(LabelError, match=message.replace("(", r"\(")):
        read_labels(tmp_path / "labels.csv")


def test_bad_deepfashion_files_name_file_and_reason(tmp_path):
    make_benchmark_folder(tmp_path / "bench", n_images=4)
    partition = tmp_path / "bench/Eval/list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("4\n", "5\n", 1))
    with pytest.raises(LabelError, match="list_eval_partition.txt: the first line says 5 rows, the file has 4"):
        read_labels(tmp_path / "bench")

    split = tmp_path / "attr/split"
    split.mkdir(parents=True)
    for name in ("list_attr_cloth.txt", "train.txt"):
        (split / name).write_text((fixture_set.ATTR_CHALLENGE / "split" / name).read_text())
    (split / "train_attr.txt").write_text("5 0 2 0 2 9\n" + "0 0 0 0 0 0\n" * 31)
    with pytest.raises(LabelError, match=r"train_attr.txt:1: group 6 \(fit\) has 3 attributes, got index 9"):
        read_labels(tmp_path / "attr")


def test_format_detection(tmp_path):
    assert detect_format(fixture_set.ATTR_CHALLENGE) == "deepfashion-attr"
    assert detect_format(fixture_set.ATTR_CHALLENGE / "split") == "deepfashion-attr"
    assert detect_format(fixture_set.BENCHMARK) == "deepfashion"
    assert detect_format(fixture_set.CSV) == "csv"
    (tmp_path / "x.csv").write_text("path\n")
    assert detect_format(tmp_path / "x.csv") == "csv"
    with pytest.raises(LabelError, match="not a known labels format"):
        detect_format(tmp_path)
