"""Evaluation metrics of the paper (VSAM, Table 1) and of DeepFashion (Liu & Lu), in plain numpy.

Inputs are `scores` (N items, A attributes; probabilities or logits: only their order matters, except
that they must be finite) and `labels` (N, A) with 1 true, 0 false, -1 unknown.

Conventions shared by every function here:

* An unknown (-1) label is never evaluated: it is neither a positive nor a negative, and an
  attribute whose label is unknown for an item cannot take one of that item's predicted slots
  (ranking happens among the item's known attributes only).
* Ties in scores are broken by attribute (or category) index: the lower index ranks first, as in
  a stable sort by descending score, so results never depend on the platform's sort.
* P@k, R@k, F1@k follow scikit-learn's `precision_recall_fscore_support` with
  `zero_division=0` by default: an attribute never predicted has precision 0, one without a
  positive has recall 0, and F1 = 2tp / (2tp + fp + fn) is 0 when that denominator is 0. These
  attributes stay in the macro average. With `zero_division=nan` they are left out of it instead.
  The support-weighted average falls back to the plain mean when no attribute has a positive, as
  scikit-learn's does.
* NaN means undefined and appears only where there is nothing to measure: AP when no attribute has
  a positive, a top-k recall of a group without a single true label, a group top-1 accuracy or a
  category accuracy without one evaluable item, and an empty average (no attributes).
  `json.dumps` writes it as `NaN`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from pose_prep.shard_format import Vocabulary

TOP_K_RECALL = (3, 5)
CATEGORY_TOP_K = (1, 5)
RESERVED_GROUP_NAMES = ("all", "mean")


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (items, attributes)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    in_range = labels.size == 0 or (labels.min() >= -1 and labels.max() <= 1)
    as_int8 = labels.astype(np.int8) if in_range else None
    if not in_range or (labels.dtype != as_int8.dtype and (as_int8 != labels).any()):
        raise ValueError("labels must be 1 (true), 0 (false) or -1 (unknown)")
    return scores, as_int8


def attribute_ranks(scores, labels) -> np.ndarray:
    """(N, A) int: each attribute's place in its item's ranking, 0 = best. Known attributes come
    first, by descending score, ties by attribute index; unknown ones come after all known ones."""
    return _ranks(*_check_scores_labels(scores, labels))


def _ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    keys = np.where(labels == -1, np.inf, -scores)   # scores are finite, so +inf sorts unknowns last
    order = np.argsort(keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(scores.shape[1]), order.shape), axis=1)
    return ranks


def top_k_predictions(scores, labels, k=None) -> np.ndarray:
    """(N, A) bool: the k best-ranked known attributes of each item. k is an int, or one per item;
    by default each item's number of true attributes (so an item without one predicts nothing)."""
    return _top_k(*_check_scores_labels(scores, labels), k)


def _top_k(scores: np.ndarray, labels: np.ndarray, k=None) -> np.ndarray:
    # Same selection as `_ranks(...) < k`, without sorting whole rows: find each item's k-th best
    # key, take every key better than it, then fill the remaining places from the keys equal to
    # it in index order (the tie rule).
    known = labels != -1
    if k is None:
        k = (labels == 1).sum(axis=1)
    k = np.minimum(np.broadcast_to(np.asarray(k), (scores.shape[0],)), known.sum(axis=1))
    if k.size == 0 or k.max() <= 0:
        return np.zeros(scores.shape, bool)
    keys = np.where(known, -scores, np.inf)
    k_max = int(k.max())
    best = np.sort(np.partition(keys, k_max - 1, axis=1)[:, :k_max], axis=1)
    kth = best[np.arange(len(k)), np.maximum(k - 1, 0)][:, None]
    better = keys < kth
    tied = keys == kth
    room = k - better.sum(axis=1)
    chosen = better | (tied & (np.cumsum(tied, axis=1) <= room[:, None]))
    return chosen & known & (k > 0)[:, None]


def _divide(numerator: np.ndarray, denominator: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(numerator.shape, float(zero_division))
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """scikit-learn's averaging: NaNs left out; all-zero weights fall back to the plain mean."""
    defined = ~np.isnan(values)
    if not defined.any():
        return math.nan
    values = values[defined]
    if weights is not None and weights[defined].sum() > 0:
        return float(np.average(values, weights=weights[defined]))
    return float(values.mean())


def precision_recall_f1_at_k(scores, labels, zero_division: float = 0.0) -> dict:
    """P@k, R@k, F1@k of the paper: every item predicts its top-k attributes, k = its number of
    true attributes; precision, recall and F1 are then computed per attribute (over the items
    whose label of it is known) and averaged over attributes, plainly (macro) and weighted by
    support. A per-item average with that k would make P@k equal R@k; per attribute they differ."""
    if not (zero_division in (0, 1) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division must be 0, 1 or nan, not {zero_division!r}")
    scores, labels = _check_scores_labels(scores, labels)
    predicted = _top_k(scores, labels)
    positive = labels == 1
    true_positives = (predicted & positive).sum(axis=0)
    n_predicted = predicted.sum(axis=0)
    support = positive.sum(axis=0)
    precision = _divide(true_positives, n_predicted, zero_division)
    recall = _divide(true_positives, support, zero_division)
    f1 = _divide(2 * true_positives, n_predicted + support, zero_division)
    return {
        "P@k": _mean(precision), "R@k": _mean(recall), "F1@k": _mean(f1),
        "P@k_weighted": _mean(precision, support), "R@k_weighted": _mean(recall, support),
        "F1@k_weighted": _mean(f1, support),
        "n_attributes_without_positive": int((support == 0).sum()),
        "n_attributes_never_predicted": int((n_predicted == 0).sum()),
        "per_attribute": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                          "support": support.tolist(), "n_predicted": n_predicted.tolist()},
    }


def average_precision(scores, labels) -> dict:
    """Mean over attributes of scikit-learn's average precision, each over the items whose label
    of that attribute is known. Attributes without a positive have no AP: they are left out of the
    mean and counted in `AP_excluded` (their entry in `per_attribute` is NaN)."""
    from sklearn.metrics import average_precision_score

    scores, labels = _check_scores_labels(scores, labels)
    per_attribute = np.full(scores.shape[1], math.nan)
    for a, (column_scores, column_labels) in enumerate(zip(scores.T.copy(), labels.T.copy())):
        known = column_labels != -1
        if (column_labels[known] == 1).any():
            per_attribute[a] = average_precision_score(column_labels[known], column_scores[known])
    return {"AP": _mean(per_attribute), "AP_excluded": int(np.isnan(per_attribute).sum()),
            "per_attribute": per_attribute.tolist()}


def _check_groups(groups: Mapping[str, Sequence[int]] | None, n_attributes: int) -> dict[str, list[int]]:
    groups = dict(groups or {})
    for name, indices in groups.items():
        if name in RESERVED_GROUP_NAMES:
            raise ValueError(f"attribute group {name!r}: the name is reserved for a summary entry")
        if not indices or min(indices) < 0 or max(indices) >= n_attributes:
            raise ValueError(f"attribute group {name!r}: indices {list(indices)} outside 0..{n_attributes - 1}")
    return {name: list(indices) for name, indices in groups.items()}


def _pooled_recall(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    positive = labels == 1
    n_positive = int(positive.sum())
    if n_positive == 0:
        return math.nan
    hits = _top_k(scores, labels, k) & positive
    return int(hits.sum()) / n_positive


def top_k_recall(scores, labels, k: int, groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
    """DeepFashion's top-k recall (Liu & Lu): for each image rank the attributes of a group, count
    its true attributes among the top k over all images, and divide by the number of true
    attributes of the group over all images (pooled, not averaged per attribute). One entry per
    group, plus `all`: the same with every attribute ranked together. A group of k attributes or
    fewer scores 1; a group without a true label scores NaN."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    scores, labels = _check_scores_labels(scores, labels)
    groups = _check_groups(groups, scores.shape[1])
    result = {name: _pooled_recall(scores[:, idx], labels[:, idx], k) for name, idx in groups.items()}
    result["all"] = _pooled_recall(scores, labels, k)
    return result


def group_top1_accuracy(scores, labels, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """For mutually exclusive groups: the fraction of items whose best-ranked known attribute of
    the group is its true one. Items without a true attribute in the group are skipped; an item
    with two is an error (the group is not exclusive). `mean` averages the defined groups."""
    scores, labels = _check_scores_labels(scores, labels)
    groups = _check_groups(groups, scores.shape[1])
    result = {}
    for name, idx in groups.items():
        group_labels = labels[:, idx]
        n_true = (group_labels == 1).sum(axis=1)
        if (n_true > 1).any():
            item = int(np.flatnonzero(n_true > 1)[0])
            raise ValueError(f"exclusive attribute group {name!r}: item {item} has {int(n_true[item])} true attributes")
        evaluable = n_true == 1
        if not evaluable.any():
            result[name] = math.nan
            continue
        best = _top_k(scores[evaluable][:, idx], group_labels[evaluable], 1).argmax(axis=1)
        result[name] = float((group_labels[evaluable][np.arange(len(best)), best] == 1).mean())
    result["mean"] = _mean(np.array([result[name] for name in groups], dtype=np.float64))
    return result


def category_accuracy(logits, labels, ks: Sequence[int] = CATEGORY_TOP_K) -> dict:
    """Top-k category accuracy over the items whose category is known (label -1 is skipped).
    Ties rank the lower category index first; with fewer than k categories every item is a hit."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"category logits {logits.shape} must be (items, categories), labels {labels.shape} (items,)")
    if not np.all(np.isfinite(logits)):
        raise ValueError("category logits contain NaN or infinite values")
    if labels.size and (labels.min() < -1 or labels.max() >= logits.shape[1]):
        raise ValueError(f"category labels must be -1 (unknown) or 0..{logits.shape[1] - 1}")
    known = labels >= 0
    logits, labels = logits[known], labels[known].astype(np.int64)
    true_logit = logits[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > true_logit).sum(axis=1) + ((logits == true_logit) & lower_index).sum(axis=1)
    result = {f"category_top{k}": float((rank < k).mean()) if len(labels) else math.nan for k in ks}
    result["n_category_items"] = int(len(labels))
    return result


def compute_metrics(attribute_scores, attribute_labels, vocabulary: Vocabulary,
                    category_logits=None, category_labels=None) -> dict:
    """Every metric of `vsam eval` as one JSON-serialisable dict (see the module docstring).
    `category_labels` are read only with `category_logits` (a model with a category head)."""
    scores, labels = _check_scores_labels(attribute_scores, attribute_labels)
    if len(vocabulary.attributes) != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} attribute columns but {len(vocabulary.attributes)} attributes in the vocabulary")
    if scores.shape[0] == 0:
        raise ValueError("no items to evaluate")
    groups = vocabulary.group_indices()
    at_k = precision_recall_f1_at_k(scores, labels)
    ap = average_precision(scores, labels)
    metrics = {"n_items": int(scores.shape[0]), "n_attributes": int(scores.shape[1])}
    metrics.update({key: value for key, value in at_k.items() if key != "per_attribute"})
    metrics.update({"AP": ap["AP"], "AP_excluded": ap["AP_excluded"]})
    for k in TOP_K_RECALL:
        metrics[f"top{k}_recall"] = top_k_recall(scores, labels, k, groups)
    metrics["group_positives"] = {name: int((labels[:, idx] == 1).sum()) for name, idx in groups.items()}
    metrics["group_positives"]["all"] = int((labels == 1).sum())
    if vocabulary.exclusive_groups and groups:
        metrics["group_top1"] = group_top1_accuracy(scores, labels, groups)
    if category_logits is not None:
        if category_labels is None:
            raise ValueError("category logits given without category labels")
        n_categories = np.shape(category_logits)[1] if np.ndim(category_logits) == 2 else None
        if vocabulary.categories and n_categories != len(vocabulary.categories):
            raise ValueError(f"category logits {np.shape(category_logits)} do not match the "
                             f"{len(vocabulary.categories)} categories of the vocabulary")
        if np.shape(category_logits)[0] != scores.shape[0]:
            raise ValueError(f"{np.shape(category_logits)[0]} category rows for {scores.shape[0]} items")
        metrics.update(category_accuracy(category_logits, category_labels))
    columns = at_k["per_attribute"]
    group_of = vocabulary.attribute_groups or [""] * len(vocabulary.attributes)
    metrics["per_attribute"] = [
        {"name": name, "group": group_of[a],
         "support": columns["support"][a], "n_predicted": columns["n_predicted"][a],
         "precision": columns["precision"][a], "recall": columns["recall"][a], "f1": columns["f1"][a],
         "AP": ap["per_attribute"][a]}
        for a, name in enumerate(vocabulary.attributes)]
    return metrics


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                     for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths), _row(["-" * w for w in widths], widths)] + [_row(r, widths) for r in rows]


def format_table(metrics: dict, per_attribute: bool = False) -> str:
    """The metrics of `compute_metrics` as text tables for the terminal; n/a = undefined."""
    lines = [f"items: {metrics['n_items']}   attributes: {metrics['n_attributes']}", ""]
    lines += _table(["", "macro", "weighted"],
                    [[name, _number(metrics[name]), _number(metrics[f"{name}_weighted"])]
                     for name in ("P@k", "R@k", "F1@k")])
    lines += ["", f"AP  {_number(metrics['AP'])}   ({metrics['AP_excluded']} attributes without a positive excluded)"]
    groups = list(metrics["top3_recall"])
    recall_rows = [[f"top-{k} recall"] + [_number(metrics[f"top{k}_recall"][g]) for g in groups] for k in TOP_K_RECALL]
    if "group_top1" in metrics:
        top1 = metrics["group_top1"]
        recall_rows.append(["top-1 accuracy"] + [_number(top1[g]) for g in groups[:-1]] + [f"mean {_number(top1['mean'])}"])
    lines += [""] + _table([""] + groups, recall_rows)
    if "n_category_items" in metrics:
        lines += ["", f"category ({metrics['n_category_items']} labelled items):  "
                      + "  ".join(f"top-{k} {_number(metrics[f'category_top{k}'])}" for k in CATEGORY_TOP_K)]
    if per_attribute and metrics.get("per_attribute"):
        lines += [""] + _table(["attribute", "group", "support", "predicted", "precision", "recall", "F1", "AP"],
                               [[r["name"], r["group"], str(r["support"]), str(r["n_predicted"]), _number(r["precision"]),
                                 _number(r["recall"]), _number(r["f1"]), _number(r["AP"])]
                                for r in metrics["per_attribute"]])
    return "\n".join(lines)
