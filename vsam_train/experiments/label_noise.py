"""`vsam experiment label-noise`: the robustness experiment of the paper (Fig. 4).

A fraction of one attribute's positive TRAINING labels is set to 0 (missing tags, as in real
catalogs), VSAM and the VGG16 baseline are trained identically on those labels, and the scores
they give the items that lost their label are compared with those of the positives that kept it
and of the negatives: a model that keeps scoring the dropped items high has learned the attribute
despite the noise. The paper drops a share of Longsleeved among Coats & Jackets only: `category`
restricts the drop, and every comparison, to the items of one category (the collection needs
categories: the DeepFashion benchmark format has them, the attribute-challenge subset not).

Steps, all inside the output folder:

1. `shards/`: a copy of the collection in which the chosen labels are 0 (the training labels
   are read by `vsam_train.data.ShardStream` from the shards, so the noisy labels are written
   into a copy with `pose_prep.shard_format`'s writers; held-out splits are copied unchanged).
   `noise.json` lists the positives and the dropped items. Which items lose their label is
   drawn from `seed` over the positives (of the category) sorted by path, so it does not depend
   on shard layout.
2. `vsam/`, `vgg16/`: run folders of `vsam_train.train.main`, one per model, with the same config
   (and seed) except `model.name`.
3. Each model then scores the ORIGINAL collection's training split (no augmentation) and its
   held-out split. `label_noise_dropped.png`: per model, the score distributions of the dropped
   training items, the training positives that kept their label and the training negatives (of
   the category), as the paper's figure; `label_noise.png`: the held-out true positives' scores.
   `label_noise.json` holds the numbers of both: per group its size, mean, median, quartiles,
   share at or above 0.4, 0.5, 0.6 and histogram counts (the dropped items' scores one by one),
   the AUC of dropped vs negatives and of dropped vs kept positives (scikit-learn's
   roc_auc_score: the chance that a dropped item outscores a negative, resp. a kept positive),
   and for the held-out positives recall at 0.4, 0.5, 0.6, mean and median score and the
   attribute's AP per model.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from pose_prep.shard_format import (Shard, ShardItem, ShardMetadata, collection_metadata, commit_shard,
                                    file_records, live_rows, open_index, record_files, set_meta, shard_name,
                                    write_shard)

from ..config import load_config
from ..data import read_collection
from ..evaluate import predict_split, without_nan, write_json
from ..train import main as train_main

THRESHOLDS = (0.4, 0.5, 0.6)
HISTOGRAM_BINS = 20
MODELS = ("vsam", "vgg16")


class ExperimentError(RuntimeError):
    """The experiment cannot run as asked; the message says why."""


def split_labels(folder: str | Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, attribute labels (N, A) int8, category labels (N,), -1 unknown) of the live items of one split."""
    paths, labels, categories = [], [], []
    for shard_path, rows in live_rows(folder, (split,)).items():
        with Shard(shard_path) as shard:
            data = shard.read(("path", "attributes", "category"))
        paths += data["path"][rows].tolist()
        labels.append(data["attributes"][rows])
        categories.append(data["category"][rows].astype(np.int64))
    if not labels:
        return paths, np.zeros((0, 0), np.int8), np.zeros(0, np.int64)
    return paths, np.concatenate(labels), np.concatenate(categories)


def choose_dropped(paths: list[str], labels: np.ndarray, attribute: int, fraction: float, seed: int) -> list[str]:
    """`fraction` of the items positive for `attribute` (rounded), drawn with `seed`; sorted paths."""
    positives = sorted(path for path, row in zip(paths, labels) if row[attribute] == 1)
    n_dropped = int(round(fraction * len(positives)))
    chosen = np.random.default_rng(seed).choice(len(positives), size=n_dropped, replace=False)
    return sorted(positives[i] for i in chosen)


def copy_collection(source: str | Path, target: str | Path, edit: Callable[[ShardItem], bool]) -> int:
    """Copy the live items of the collection `source` into the new collection `target` with
    shard_format's writers, passing each item through `edit` first, which may change its labels or
    its path in place and returns whether it did. Returns how many items it changed."""
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
            sources = [item.path for item in items]
            for item in items:
                item.attributes = np.array(item.attributes, np.int8)
                changed += bool(edit(item))
            write_shard(target / shard_name(number), items, metadata)
            commit_shard(connection, number, [replace(records[path], path=item.path)
                                              for path, item in zip(sources, items)])
        record_files(connection, [r for r in records.values() if r.shard_id is None])   # rejected files
    return changed


def copy_with_dropped_labels(source: str | Path, target: str | Path, attribute: int, dropped: set[str],
                             split: str = "train") -> int:
    """Copy the collection `source` into the new collection `target`, setting label `attribute` of
    the `split` items in `dropped` to 0. Returns how many labels changed."""
    def drop(item: ShardItem) -> bool:
        if item.split == split and item.path in dropped and item.attributes[attribute] == 1:
            item.attributes[attribute] = 0
            return True
        return False

    return copy_collection(source, target, drop)


def run(shards: str | Path, attribute: str, drop: float, out: str | Path, *, category: str | None = None,
        config_file: str | Path | None = None, overrides: dict | None = None, seed: int = 0,
        eval_split: str = "val", models=MODELS, device: str | None = None) -> dict:
    """The whole experiment (see the module docstring); returns what label_noise.json holds."""
    if not 0 <= drop <= 1:
        raise ExperimentError(f"--drop is a fraction in [0, 1], not {drop}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty: choose a new --out for each experiment")
    configs = {name: load_config(config_file, {**(overrides or {}), "train.seed": seed, "model.name": name})
               for name in models}
    train_split = configs[models[0]]["data"]["train_split"]
    vocabulary = read_collection(shards).vocabulary
    if attribute not in vocabulary.attributes:
        raise ExperimentError(f"{shards} has no attribute {attribute!r}; it has {', '.join(vocabulary.attributes)}")
    index = vocabulary.attributes.index(attribute)
    category_index = _category_index(shards, vocabulary, category)
    where = f" of category {category!r}" if category is not None else ""
    paths, labels, categories = split_labels(shards, train_split)
    held_out_paths, held_out, held_out_categories = split_labels(shards, eval_split)
    in_train = _in_category(categories, category_index)
    in_held_out = _in_category(held_out_categories, category_index)
    for split, split_rows, members in ((train_split, labels, in_train), (eval_split, held_out, in_held_out)):
        if not len(split_rows) or not (split_rows[members, index] == 1).any():
            raise ExperimentError(f"{shards}: no {split} item{where} is labelled {attribute!r}, nothing to measure")

    dropped = choose_dropped([p for p, m in zip(paths, in_train) if m], labels[in_train], index, drop, seed)
    noisy = out / "shards"
    changed = copy_with_dropped_labels(shards, noisy, index, set(dropped), train_split)
    noise = {"attribute": attribute, "category": category, "drop": drop, "seed": seed, "split": train_split,
             "items": int(in_train.sum()), "positives": int((labels[in_train, index] == 1).sum()),
             "dropped": changed, "dropped_paths": dropped}
    write_json(noise, out / "noise.json")

    results = {}
    for name in models:
        summary = train_main(configs[name], noisy, out / name, device=device)
        workers = configs[name]["data"]["num_workers"]
        result, _ = predict_split(summary["checkpoint"], shards, eval_split, device=device, workers=workers)
        members = _in_category(result["category_labels"], category_index)
        results[name] = score_summary(result["attribute_scores"][members, index],
                                      result["attribute_labels"][members, index])
        trained_on, _ = predict_split(summary["checkpoint"], shards, train_split, device=device, workers=workers)
        results[name]["train"] = dropped_summary(trained_on, index, set(dropped), category_index)
        results[name]["checkpoint"] = summary["checkpoint"]
    report = {"attribute": attribute, "category": category, "drop": drop, "seed": seed,
              "train_items": noise["items"], "train_positives": noise["positives"], "dropped": changed,
              "eval_split": eval_split, "eval_positives": int((held_out[in_held_out, index] == 1).sum()),
              "eval_items": int(in_held_out.sum()), "thresholds": list(THRESHOLDS),
              "config": config_file and str(config_file), "models": results}
    plot_histograms(report, out / "label_noise.png")
    plot_dropped(report, out / "label_noise_dropped.png")
    write_json(report, out / "label_noise.json")
    return without_nan(report)


def _category_index(shards, vocabulary, category: str | None) -> int | None:
    if category is None:
        return None
    if not vocabulary.categories:
        raise ExperimentError(f"{shards} has no categories (an attribute-challenge collection?): --category needs "
                              "labels with categories, e.g. the DeepFashion benchmark format")
    if category not in vocabulary.categories:
        raise ExperimentError(f"{shards} has no category {category!r}; it has {', '.join(vocabulary.categories)}")
    return vocabulary.categories.index(category)


def _in_category(categories: np.ndarray, category_index: int | None) -> np.ndarray:
    categories = np.asarray(categories)
    return np.ones(len(categories), bool) if category_index is None else categories == category_index


def dropped_summary(result: dict, attribute: int, dropped: set[str], category_index: int | None = None) -> dict:
    """The training items (of the category) by what training saw of `attribute`: "dropped" (true
    positives whose label was set to 0), "kept_positives" and "negatives" (true 0; unknown labels
    are left out), each as `group_summary`, and the AUC of the dropped items against each other
    group. `result` is `train.evaluate`'s on the original collection's training split."""
    from sklearn.metrics import roc_auc_score

    members = _in_category(result["category_labels"], category_index)
    scores = np.asarray(result["attribute_scores"][:, attribute], np.float64)
    truth = result["attribute_labels"][:, attribute]
    lost = np.array([path in dropped for path in result["paths"]], bool)
    groups = {"dropped": members & lost & (truth == 1), "kept_positives": members & ~lost & (truth == 1),
              "negatives": members & (truth == 0)}
    summary = {name: group_summary(scores[mask], keep_scores=name == "dropped") for name, mask in groups.items()}
    for other in ("negatives", "kept_positives"):
        a, b = scores[groups["dropped"]], scores[groups[other]]
        summary[f"AUC_dropped_vs_{other}"] = (
            float(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])) if len(a) and len(b)
            else math.nan)
    return summary


def group_summary(scores: np.ndarray, keep_scores: bool = False) -> dict:
    """Size, mean, median, quartiles, share at or above each threshold and histogram counts of one
    group's scores (NaN where the group is empty); the scores themselves with `keep_scores`."""
    scores = np.asarray(scores, np.float64)
    counts, _ = np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    empty = len(scores) == 0
    quartiles = [math.nan] * 3 if empty else np.percentile(scores, [25, 50, 75]).tolist()
    summary = {
        "n": int(len(scores)), "mean": math.nan if empty else float(scores.mean()), "median": quartiles[1],
        "quartiles": quartiles,
        "at_or_above": {f"{t:.1f}": math.nan if empty else float((scores >= t).mean()) for t in THRESHOLDS},
        "histogram_counts": counts.tolist(),
    }
    if keep_scores:
        summary["scores"] = scores.tolist()
    return summary


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
    within = f" among {report['category']}" if report.get("category") is not None else ""
    figure.suptitle(f"{report['attribute']}{within}: {report['drop']:.0%} of {report['train_positives']} training "
                    f"positives dropped; {report['eval_positives']} {report['eval_split']} positives", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_dropped(report: dict, path: Path) -> None:
    """One panel per model: the score distributions (density) of the dropped training items, the
    kept positives and the negatives, as the paper's Fig. 4 compares them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), sharey=True, squeeze=False)
    for axis, (name, result) in zip(axes[0], models.items()):
        train = result["train"]
        for group, colour in (("negatives", "tab:gray"), ("kept_positives", "tab:blue"), ("dropped", "tab:red")):
            counts = np.asarray(train[group]["histogram_counts"], np.float64)
            if counts.sum():
                axis.stairs(counts / counts.sum(), edges, color=colour, linewidth=1.6,
                            label=f"{group.replace('_', ' ')} ({train[group]['n']})")
        auc = train["AUC_dropped_vs_negatives"]
        axis.set_title(f"{name}: AUC dropped vs negatives {auc:.2f}" if not math.isnan(auc) else name, fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_xlabel("predicted score")
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("share of the group's training items")
    within = f" among {report['category']}" if report["category"] is not None else ""
    figure.suptitle(f"{report['attribute']}{within}: {report['dropped']} of {report['train_positives']} training "
                    "positives dropped", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
