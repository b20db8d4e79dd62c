"""`vsam experiment label-noise` end to end at tiny scale on real DeepFashion-attr shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main as vsam
from pose_prep.shard_format import Shard, collection_vocabulary, live_rows, verify_collection
from vsam_train.evaluate import predict_split
from vsam_train.experiments.label_noise import choose_dropped

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.epochs=1", "--set", "train.batch_size=16",
            "--set", "train.max_steps_per_epoch=2", "--set", "data.num_workers=0", "--set", "data.max_val_batches=1"]


def _labels_by_path(folder: Path, split: str) -> dict[str, np.ndarray]:
    found = {}
    for shard_path, rows in live_rows(folder, (split,)).items():
        with Shard(shard_path) as shard:
            data = shard.read(("path", "attributes"))
        found.update({data["path"][row]: data["attributes"][row] for row in rows})
    return found


def _categories_by_path(folder: Path, split: str) -> dict[str, int]:
    found = {}
    for shard_path, rows in live_rows(folder, (split,)).items():
        with Shard(shard_path) as shard:
            data = shard.read(("path", "category"))
        found.update({data["path"][row]: int(data["category"][row]) for row in rows})
    return found


def _auc(positives, negatives) -> float:
    """The chance that a positive outscores a negative (ties half), over every pair."""
    pairs = [(a > b) + 0.5 * (a == b) for a in positives for b in negatives]
    return sum(pairs) / len(pairs)


def _check_training_groups(out: Path, shards: Path, model: str, attribute: int, dropped: list[str],
                           figures: dict, category: int | None = None) -> None:
    """The report's dropped / kept positives / negatives against the checkpoint's own scores of
    the original training split, grouped again here by path, label and category."""
    scored, _ = predict_split(out / model / "checkpoints" / "last.pt", shards, "train", workers=0)
    groups = {"dropped": [], "kept_positives": [], "negatives": []}
    for path, scores, labels, item_category in zip(scored["paths"], scored["attribute_scores"],
                                                   scored["attribute_labels"], scored["category_labels"]):
        if category is not None and item_category != category:
            continue
        if labels[attribute] == 1:
            groups["dropped" if path in dropped else "kept_positives"].append(float(scores[attribute]))
        elif labels[attribute] == 0:
            groups["negatives"].append(float(scores[attribute]))
    train = figures["train"]
    for name, scores in groups.items():
        assert train[name]["n"] == len(scores), name
        assert train[name]["mean"] == pytest.approx(np.mean(scores), abs=1e-6), name
        assert train[name]["median"] == pytest.approx(np.median(scores), abs=1e-6), name
        assert sum(train[name]["histogram_counts"]) == len(scores)
        assert train[name]["at_or_above"]["0.5"] == pytest.approx(np.mean([v >= 0.5 for v in scores]))
    assert sorted(train["dropped"]["scores"]) == pytest.approx(sorted(groups["dropped"]), abs=1e-6)
    assert train["AUC_dropped_vs_negatives"] == pytest.approx(_auc(groups["dropped"], groups["negatives"]), abs=1e-6)
    assert train["AUC_dropped_vs_kept_positives"] == pytest.approx(
        _auc(groups["dropped"], groups["kept_positives"]), abs=1e-6)


def _assert_png(path: Path) -> None:
    with Image.open(path) as figure:
        figure.load()
        assert figure.format == "PNG" and figure.width > figure.height > 200


def test_label_noise_end_to_end_writes_the_figure_and_recalls(df_shards, tmp_path):
    names = collection_vocabulary(df_shards).attributes
    train, val = _labels_by_path(df_shards, "train"), _labels_by_path(df_shards, "val")
    train_positives = np.sum([labels == 1 for labels in train.values()], axis=0)
    val_positives = np.sum([labels == 1 for labels in val.values()], axis=0)
    attribute = int(np.argmax(np.where(val_positives > 0, train_positives, -1)))
    name = names[attribute]

    out = tmp_path / "experiment"
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(df_shards), "--attribute", name,
                                       "--drop", "0.75", "--out", str(out), "--seed", "3", *TINY_RUN])
    assert result.exit_code == 0, result.output
    n_dropped = round(0.75 * train_positives[attribute])
    assert f"{name}: {n_dropped} of {train_positives[attribute]} training positives dropped" in result.output

    # The noisy copy: exactly the listed training labels of that attribute are 0, nothing else changed.
    noise = json.loads((out / "noise.json").read_text())
    assert noise["dropped"] == len(noise["dropped_paths"]) == n_dropped
    assert verify_collection(out / "shards") == []
    noisy_train, noisy_val = _labels_by_path(out / "shards", "train"), _labels_by_path(out / "shards", "val")
    assert set(noisy_train) == set(train) and set(noisy_val) == set(val)
    for path, labels in train.items():
        expected = labels.copy()
        if path in noise["dropped_paths"]:
            assert labels[attribute] == 1
            expected[attribute] = 0
        np.testing.assert_array_equal(noisy_train[path], expected)
    for path, labels in val.items():
        np.testing.assert_array_equal(noisy_val[path], labels)

    report = json.loads((out / "label_noise.json").read_text())
    assert report["eval_positives"] == val_positives[attribute] and report["eval_items"] == len(val)
    assert list(report["models"]) == ["vsam", "vgg16"]
    for model, figures in report["models"].items():
        assert (out / model / "checkpoints" / "last.pt").is_file() and (out / model / "metrics.jsonl").is_file()
        scores = np.array(figures["scores"])
        assert len(scores) == figures["n_true_positives"] == val_positives[attribute]
        assert figures["recall"] == {f"{t:.1f}": pytest.approx(float((scores >= t).mean())) for t in (0.4, 0.5, 0.6)}
        assert sum(figures["histogram"]["counts"]) == len(scores) and len(figures["histogram"]["edges"]) == 21
        assert 0 <= figures["AP"] <= 1
        _check_training_groups(out, df_shards, model, attribute, noise["dropped_paths"], figures)
        assert figures["train"]["dropped"]["n"] == n_dropped
        assert figures["train"]["kept_positives"]["n"] == train_positives[attribute] - n_dropped
    _assert_png(out / "label_noise.png")
    _assert_png(out / "label_noise_dropped.png")
    assert report["category"] is None and noise["category"] is None

    again = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(df_shards), "--attribute", name,
                                      "--out", str(out), *TINY_RUN])
    assert again.exit_code == 1 and "is not empty" in again.output


def test_dropped_labels_depend_only_on_seed_and_positives():
    paths = [f"img/{i:03d}.jpg" for i in range(40)]
    labels = np.zeros((40, 3), np.int8)
    labels[::2, 1] = 1                                  # 20 positives
    first = choose_dropped(paths, labels, 1, 0.75, seed=0)
    assert len(first) == 15 and all(labels[paths.index(p), 1] == 1 for p in first)
    assert choose_dropped(paths[::-1], labels[::-1], 1, 0.75, seed=0) == first   # order of items does not matter
    assert choose_dropped(paths, labels, 1, 0.75, seed=1) != first
    assert choose_dropped(paths, labels, 1, 0.0, seed=0) == [] and len(choose_dropped(paths, labels, 1, 1.0, 0)) == 20


def test_an_unknown_attribute_is_named(df_shards, tmp_path):
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(df_shards),
                                       "--attribute", "paisley", "--out", str(tmp_path / "x"), *TINY_RUN])
    assert result.exit_code == 1 and "has no attribute 'paisley'" in result.output


# --- the paper's setting: drop within one category (category_collection.py) ---------------

def test_label_noise_within_a_category_drops_and_compares_only_its_items(category_shards, tmp_path):
    vocabulary = collection_vocabulary(category_shards)
    assert vocabulary.categories == ["Jacket", "Dress"] and vocabulary.attributes == ["floral", "long sleeve"]
    out = tmp_path / "experiment"
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(category_shards),
                                       "--attribute", "long sleeve", "--category", "Jacket", "--drop", "0.5",
                                       "--out", str(out), *TINY_RUN])
    assert result.exit_code == 0, result.output
    assert "long sleeve among Jacket: 8 of 16 training positives dropped; 4 val positives" in result.output
    assert "AUC dropped vs negatives" in result.output

    noise = json.loads((out / "noise.json").read_text())
    assert noise["category"] == "Jacket" and noise["items"] == 24 and noise["positives"] == 16
    categories = _categories_by_path(category_shards, "train")
    train = _labels_by_path(category_shards, "train")
    assert noise["dropped"] == len(noise["dropped_paths"]) == 8
    assert all(categories[path] == 0 and train[path][1] == 1 for path in noise["dropped_paths"])
    # Dress items keep every label; only the listed Jacket labels change
    noisy = _labels_by_path(out / "shards", "train")
    for path, labels in train.items():
        expected = labels.copy()
        if path in noise["dropped_paths"]:
            expected[1] = 0
        np.testing.assert_array_equal(noisy[path], expected)

    report = json.loads((out / "label_noise.json").read_text())
    assert (report["category"], report["train_items"], report["eval_items"], report["eval_positives"]) == \
        ("Jacket", 24, 8, 4)
    for model, figures in report["models"].items():
        assert figures["n_true_positives"] == 4           # held-out long-sleeved Jackets only
        assert (figures["train"]["dropped"]["n"], figures["train"]["kept_positives"]["n"],
                figures["train"]["negatives"]["n"]) == (8, 8, 7)   # the unknown one left out
        _check_training_groups(out, category_shards, model, 1, noise["dropped_paths"], figures, category=0)
    _assert_png(out / "label_noise_dropped.png")
    _assert_png(out / "label_noise.png")


def test_a_category_the_collection_lacks_is_named(category_shards, df_shards, tmp_path):
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(category_shards),
                                       "--attribute", "long sleeve", "--category", "Coat",
                                       "--out", str(tmp_path / "a"), *TINY_RUN])
    assert result.exit_code == 1 and "has no category 'Coat'; it has Jacket, Dress" in result.output
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(category_shards),
                                       "--attribute", "floral", "--category", "Dress",
                                       "--out", str(tmp_path / "b"), *TINY_RUN])
    assert result.exit_code == 1 and "no train item of category 'Dress' is labelled 'floral'" in result.output
    name = collection_vocabulary(df_shards).attributes[0]
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(df_shards), "--attribute", name,
                                       "--category", "Jacket", "--out", str(tmp_path / "c"), *TINY_RUN])
    assert result.exit_code == 1 and "has no categories" in result.output
