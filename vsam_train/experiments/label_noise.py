"""`vsam experiment label-noise`: the robustness experiment of the paper (Fig. 4).

A fraction of one attribute's positive TRAINING labels is set to 0 (missing tags, as in real
catalogs), VSAM and the VGG16 baseline are trained identically on those labels, and the scores
they give the held-out true positives of that attribute are compared: a model that keeps scoring
them high has learned the attribute despite the noise.

Steps, all inside the output folder:

1. `shards/`: a copy of the collection in which the chosen labels are 0 (the training labels
   are read by `vsam_train.data.ShardStream` from the shards, so the noisy labels are written
   into a copy with `pose_prep.shard_format`'s writers; held-out splits are copied unchanged).
   `noise.json` lists the positives and the dropped items. Which items lose their label is
   drawn from `seed` over the positives sorted by path, so it does not depend on shard layout.
2. `vsam/`, `vgg16/`: run folders of `vsam_train.train.main`, one per model, with the same config
   (and seed) except `model.name`.
3. `label_noise.png`: histograms of the held-out true positives' scores, one panel per model;
   `label_noise.json`: recall at the thresholds 0.4, 0.5, 0.6, the histograms' counts, mean and
   median score and the attribute's AP per model.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from pose_prep.shard_format import (Shard, ShardMetadata, collection_metadata, commit_shard, file_records,
                                    live_rows, open_index, record_files, set_meta, shard_name, write_shard)

from ..config import load_config
from ..data import read_collection
from ..evaluate import predict_split, without_nan, write_json
from ..train import main as train_main

THRESHOLDS = (0.4, 0.5, 0.6)
HISTOGRAM_BINS = 20
MODELS = ("vsam", "vgg16")


class ExperimentError(RuntimeError):
    """The experiment cannot run as asked; the message says why."""


def split_labels(folder: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(paths, attribute labels (N, A) int8) of the live items of one split."""
    paths, labels = [], []
    for shard_path, rows in live_rows(folder, (split,)).items():
        with Shard(shard_path) as shard:
            data = shard.read(("path", "attributes"))
        paths += data["path"][rows].tolist()
        labels.append(data["attributes"][rows])
    return paths, (np.concatenate(labels) if labels else np.zeros((0, 0), np.int8))


def choose_dropped(paths: list[str], labels: np.ndarray, attribute: int, fraction: float, seed: int) -> list[str]:
    """`fraction` of the items positive for `attribute` (rounded), drawn with `seed`; sorted paths."""
    positives = sorted(path for path, row in zip(paths, labels) if row[attribute] == 1)
    n_dropped = int(round(fraction * len(positives)))
    chosen = np.random.default_rng(seed).choice(len(positives), size=n_dropped, replace=False)
    return sorted(positives[i] for i in chosen)


def copy_with_dropped_labels(source: str | Path, target: str | Path, attribute: int, dropped: set[str],
                             split: str = "train") -> int:
    """Copy the live items of the collection `source` into the new collection `target`, setting
    label `attribute` of the `split` items in `dropped` to 0. Returns how many labels changed."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True)
    changed = 0
    meta = collection_metadata(source)
    with open_index(source, readonly=True) as connection:
        records = file_records(connection)
    with open_index(target) as connection:
        with connection:
            for key, value in meta.items():
                if key != "schema_version":
                    set_meta(connection, key, value)
        for number, (shard_path, rows) in enumerate(live_rows(source).items(), start=1):
            with Shard(shard_path) as shard:
                attrs = shard.attrs()
                metadata = ShardMetadata(shard.vocabulary, shard.heatmap_params, attrs["detector"],
                                         attrs["detector_version"], json.loads(attrs["image_encoding"]))
                items = [shard.item(int(row)) for row in rows]
            for item in items:
                if item.split == split and item.path in dropped and item.attributes[attribute] == 1:
                    item.attributes = np.array(item.attributes, np.int8)
                    item.attributes[attribute] = 0
                    changed += 1
            write_shard(target / shard_name(number), items, metadata)
            commit_shard(connection, number, [replace(records[item.path]) for item in items])
        record_files(connection, [r for r in records.values() if r.shard_id is None])   # rejected files
    return changed


def run(shards: str | Path, attribute: str, drop: float, out: str | Path, *, config_file: str | Path | None = None,
        overrides: dict | None = None, seed: int = 0, eval_split: str = "val", models=MODELS,
        device: str | None = None) -> dict:
    """The whole experiment (see the module docstring); returns what label_noise.json holds."""
    if not 0 <= drop <= 1:
        raise ExperimentError(f"--drop is a fraction in [0, 1], not {drop}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty: choose a new --out for each experiment")
    configs = {name: load_config(config_file, {**(overrides or {}), "train.seed": seed, "model.name": name})
               for name in models}
    train_split = configs[models[0]]["data"]["train_split"]
    vocabulary_names = read_collection(shards).vocabulary.attributes
    if attribute not in vocabulary_names:
        raise ExperimentError(f"{shards} has no attribute {attribute!r}; it has {', '.join(vocabulary_names)}")
    index = vocabulary_names.index(attribute)
    paths, labels = split_labels(shards, train_split)
    held_out_paths, held_out = split_labels(shards, eval_split)
    for split, split_rows in ((train_split, labels), (eval_split, held_out)):
        if not len(split_rows) or not (split_rows[:, index] == 1).any():
            raise ExperimentError(f"{shards}: no {split} item is labelled {attribute!r}, nothing to measure")

    dropped = choose_dropped(paths, labels, index, drop, seed)
    noisy = out / "shards"
    changed = copy_with_dropped_labels(shards, noisy, index, set(dropped), train_split)
    noise = {"attribute": attribute, "drop": drop, "seed": seed, "split": train_split,
             "positives": int((labels[:, index] == 1).sum()), "dropped": changed, "dropped_paths": dropped}
    write_json(noise, out / "noise.json")

    results = {}
    for name in models:
        summary = train_main(configs[name], noisy, out / name, device=device)
        result, _ = predict_split(summary["checkpoint"], shards, eval_split, device=device,
                                  workers=configs[name]["data"]["num_workers"])
        results[name] = score_summary(result["attribute_scores"][:, index], result["attribute_labels"][:, index])
        results[name]["checkpoint"] = summary["checkpoint"]
    report = {"attribute": attribute, "drop": drop, "seed": seed, "train_positives": noise["positives"],
              "dropped": changed, "eval_split": eval_split,
              "eval_positives": int((held_out[:, index] == 1).sum()), "eval_items": len(held_out_paths),
              "thresholds": list(THRESHOLDS), "config": config_file and str(config_file), "models": results}
    plot_histograms(report, out / "label_noise.png")
    write_json(report, out / "label_noise.json")
    return without_nan(report)


def score_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Recall of the true positives at each threshold, their score histogram, and the attribute's AP."""
    from sklearn.metrics import average_precision_score

    known = labels != -1
    positive_scores = np.asarray(scores, np.float64)[labels == 1]
    counts, edges = np.histogram(positive_scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return {
        "n_true_positives": int(len(positive_scores)),
        "recall": {f"{t:.1f}": float((positive_scores >= t).mean()) for t in THRESHOLDS},
        "mean_score": float(positive_scores.mean()), "median_score": float(np.median(positive_scores)),
        "AP": float(average_precision_score(labels[known] == 1, scores[known])),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "scores": positive_scores.tolist(),
    }


def plot_histograms(report: dict, path: Path) -> None:
    """One panel per model: the held-out true positives' scores, thresholds dashed (as Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), sharey=True, squeeze=False)
    for axis, (name, result) in zip(axes[0], models.items()):
        axis.hist(result["scores"], bins=result["histogram"]["edges"], color="tab:blue", edgecolor="white")
        for threshold in THRESHOLDS:
            axis.axvline(threshold, color="gray", linestyle="--", linewidth=1)
        recall = result["recall"]["0.5"]
        axis.set_title(f"{name}: recall@0.5 = {recall:.2f}" if not math.isnan(recall) else name)
        axis.set_xlim(0, 1)
        axis.set_xlabel("predicted score")
    axes[0][0].set_ylabel("held-out true positives")
    figure.suptitle(f"{report['attribute']}: {report['drop']:.0%} of {report['train_positives']} training positives "
                    f"dropped; {report['eval_positives']} {report['eval_split']} positives", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
