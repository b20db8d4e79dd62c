"""benchmarks/deepfashion_subset.py: fewer training labels, the same val, read back by pose_prep.labels."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pose_prep.labels import read_labels

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "deepfashion_subset.py"
SOURCE = REPO / "tests" / "data" / "deepfashion-attr"


def run_subset(out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--source", str(SOURCE), "--out", str(out), *options],
                          capture_output=True, text=True, timeout=60)


def split_items(labels, split: str) -> dict:
    return {key: item for key, item in labels.items.items() if item.split == split}


def test_the_subset_keeps_n_training_rows_with_their_own_labels_and_the_whole_val_split(tmp_path):
    done = run_subset(tmp_path / "sub", "--train", "10", "--seed", "3")
    assert done.returncode == 0, done.stderr
    source, subset = read_labels(SOURCE), read_labels(tmp_path / "sub")
    train = split_items(subset, "train")
    assert len(train) == 10 and len(split_items(source, "train")) == 32
    for key, item in train.items():
        original = source.items[key]
        assert original.split == "train" and item.bbox == original.bbox
        assert np.array_equal(item.attributes, original.attributes)
    assert split_items(subset, "val").keys() == split_items(source, "val").keys()
    assert subset.vocabulary == source.vocabulary


def test_the_same_seed_draws_the_same_rows_and_another_seed_others(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run_subset(tmp_path / name, "--train", "10", "--seed", seed).returncode == 0
    train = {name: (tmp_path / name / "split" / "train.txt").read_text() for name in "abc"}
    assert train["a"] == train["b"] != train["c"]


def test_more_rows_than_the_split_has_is_refused_and_writes_nothing(tmp_path):
    done = run_subset(tmp_path / "sub", "--train", "33")
    assert done.returncode == 2
    assert "--train 33" in done.stderr and "32 rows" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "sub").exists()


def test_an_existing_out_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    done = run_subset(tmp_path / "sub", "--train", "5")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert list((tmp_path / "sub").iterdir()) == []
