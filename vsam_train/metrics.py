"""Evaluation metrics of the paper (VSAM, Table 1) and of DeepFashion (Liu & Lu), in plain numpy.

Inputs are `scores` (N items, A attributes; probabilities or logits: only their order matters, except
that they must be finite) and `labels` (N, A) with 1 true, 0 false, -1 unknown.

Conventions shared by every function here:

* An unknown (-1) label is never evaluated: it is neither a positive nor a negative, and an
  attribute whose label is unknown for an item cannot take one of that item's predicted slots
  (ranking happens among the item's known attributes only). One exception, so that figures
  compare with the published ones: `top_k_recall` (the `top3_recall` / `top5_recall` of
  `vsam eval`) follows Liu & Lu's DeepFashion evaluator, which ranks every attribute and counts
  an unknown label as a negative; `top_k_recall_known_only` is the same recall with unknown
  attributes left out of the ranking.
* Ties in scores are broken by attribute (or category) index: the lower index ranks first, as in
  a stable sort by descending score, so results never depend on the platform's sort. (Liu &
  Lu's evaluator sorts with pandas' default quicksort, which leaves the order of ties to chance;
  with continuous scores ties are rare.)
* P@k, R@k, F1@k follow scikit-learn's `precision_recall_fscore_support` with
  `zero_division=0` by default: an attribute never predicted has precision 0, one without a
  positive has recall 0, and F1 = 2tp / (2tp + fp + fn) is 0 when that denominator is 0. These
  attributes stay in the macro average. With `zero_division=nan` they are left out of it instead.
  The support-weighted average falls back to the plain mean when no attribute has a positive, as
  scikit-learn's does. Category precision, recall and F1 follow the same function on the top-1
  category (`category_precision_recall_f1`).
* NaN means undefined and appears only where there is nothing to measure: AP when no attribute has
  a positive, a top-k recall of a group without a single true label, a group top-1 accuracy or a
  category accuracy without one evaluable item, and an empty average (no attributes).
  `json.dumps` writes it as `NaN`, which strict JSON has not: files get `without_nan` (null).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from pose_prep.shard_format import Vocabulary

TOP_K_RECALL = (3, 5)
CATEGORY_TOP_K = (1, 5)
RESERVED_GROUP_NAMES = ("all", "mean")
ZERO_DIVISION = 0.0

_PER_ATTRIBUTE_K = ("each item predicts its k best-ranked known attributes, k = its number of true ones; "
                    "per attribute over the items whose label is known, unknown labels masked")
_TOP_K_RECALL = ("DeepFashion top-{k} recall of Liu & Lu (ECCV 2018 workshops): per item every attribute of the "
                 "group (all: every attribute) is ranked by score, an unknown label counts as a negative; true "
                 "labels among the top {k}, summed over items, / true labels of the group, summed; ties: lower "
                 "attribute index first")
_CATEGORY_PRF = ("category {0} of the top-1 category (argmax, ties: lower index) over the items with a known "
                 "category, per category then averaged {1} over the categories that are true or predicted at "
                 "least once (scikit-learn's precision_recall_fscore_support, zero_division=0)")
PROTOCOLS = {
    "n_items": "items scored",
    "n_attributes": "attributes in the vocabulary",
    "P@k": f"precision at k, macro over attributes: {_PER_ATTRIBUTE_K}; 0/0 = 0",
    "R@k": f"recall at k, macro over attributes: {_PER_ATTRIBUTE_K}; 0/0 = 0",
    "F1@k": f"F1 = 2tp / (2tp + fp + fn) at k, macro over attributes: {_PER_ATTRIBUTE_K}; 0/0 = 0",
    "P@k_weighted": "P@k averaged over attributes weighted by their number of true labels",
    "R@k_weighted": "R@k averaged over attributes weighted by their number of true labels",
    "F1@k_weighted": "F1@k averaged over attributes weighted by their number of true labels",
    "n_attributes_without_positive": "attributes without a true label among the items (recall 0/0)",
    "n_attributes_never_predicted": "attributes in no item's top k (precision 0/0)",
    "AP": "mean over attributes with a true label of scikit-learn's average precision, each over the items "
          "whose label is known",
    "AP_excluded": "attributes without a true label, left out of AP",
    "top3_recall": _TOP_K_RECALL.format(k=3),
    "top5_recall": _TOP_K_RECALL.format(k=5),
    "top3_recall_known_only": "as top3_recall, but an item's unknown attributes are left out of its ranking "
                              "(this project's earlier figure; higher than Liu & Lu's when labels are unknown)",
    "top5_recall_known_only": "as top5_recall, but an item's unknown attributes are left out of its ranking",
    "group_positives": "true labels per attribute group (the denominators of the top-k recalls)",
    "group_top1": "exclusive groups: share of the items with a true attribute in the group whose best-ranked "
                  "known attribute of the group is the true one; mean: over the groups",
    "category_top1": "share of the items with a known category whose true category has the highest logit "
                     "(ties: lower index first)",
    "category_top5": "share of the items with a known category whose true category is among the 5 highest logits "
                     "(ties: lower index first)",
    "n_category_items": "items with a known category",
    "category_precision_macro": _CATEGORY_PRF.format("precision", "plainly"),
    "category_recall_macro": _CATEGORY_PRF.format("recall", "plainly"),
    "category_f1_macro": _CATEGORY_PRF.format("F1 = 2tp / (2tp + fp + fn)", "plainly"),
    "category_precision_weighted": _CATEGORY_PRF.format("precision", "weighted by the true count"),
    "category_recall_weighted": _CATEGORY_PRF.format("recall", "weighted by the true count"),
    "category_f1_weighted": _CATEGORY_PRF.format("F1", "weighted by the true count"),
    "per_category": "per category: true count (support), times predicted, precision, recall, F1 of the top-1 "
                    "category; null where the category is neither true nor predicted",
    "per_attribute": "per attribute: the terms of P@k, R@k, F1@k and AP",
}


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


def _check_zero_division(zero_division) -> None:
    if not (zero_division in (0, 1) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division must be 0, 1 or nan, not {zero_division!r}")


def precision_recall_f1_at_k(scores, labels, zero_division: float = 0.0) -> dict:
    """P@k, R@k, F1@k of the paper: every item predicts its top-k attributes, k = its number of
    true attributes; precision, recall and F1 are then computed per attribute (over the items
    whose label of it is known) and averaged over attributes, plainly (macro) and weighted by
    support. A per-item average with that k would make P@k equal R@k; per attribute they differ."""
    _check_zero_division(zero_division)
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


def _grouped_recall(scores, labels, k: int, groups) -> dict[str, float]:
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    groups = _check_groups(groups, scores.shape[1])
    result = {name: _pooled_recall(scores[:, idx], labels[:, idx], k) for name, idx in groups.items()}
    result["all"] = _pooled_recall(scores, labels, k)
    return result


def top_k_recall(scores, labels, k: int, groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
    """DeepFashion's top-k recall as Liu & Lu's evaluator computes it: for each item rank every
    attribute of a group by score (an unknown label is a negative: it takes part in the ranking and
    is never a hit), count the item's true attributes among the top k, sum over all items and
    divide by the number of true attributes of the group over all items (pooled, not averaged per
    attribute). One entry per group, plus `all`: the same with every attribute ranked together. A
    group of k attributes or fewer scores 1; a group without a true label scores NaN."""
    scores, labels = _check_scores_labels(scores, labels)
    return _grouped_recall(scores, np.where(labels == -1, 0, labels).astype(np.int8), k, groups)


def top_k_recall_known_only(scores, labels, k: int,
                            groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
    """`top_k_recall` with an item's unknown attributes left out of its ranking (they cannot take
    one of the k slots), the rule of every other metric here. Equal to `top_k_recall` without
    unknown labels; with them, at least as high."""
    return _grouped_recall(*_check_scores_labels(scores, labels), k, groups)


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


def _check_categories(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the items whose category is known."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"category logits {logits.shape} must be (items, categories), labels {labels.shape} (items,)")
    if not np.all(np.isfinite(logits)):
        raise ValueError("category logits contain NaN or infinite values")
    if labels.size and (labels.min() < -1 or labels.max() >= logits.shape[1]):
        raise ValueError(f"category labels must be -1 (unknown) or 0..{logits.shape[1] - 1}")
    known = labels >= 0
    return logits[known], labels[known].astype(np.int64)


def category_accuracy(logits, labels, ks: Sequence[int] = CATEGORY_TOP_K) -> dict:
    """Top-k category accuracy over the items whose category is known (label -1 is skipped).
    Ties rank the lower category index first; with fewer than k categories every item is a hit."""
    logits, labels = _check_categories(logits, labels)
    true_logit = logits[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > true_logit).sum(axis=1) + ((logits == true_logit) & lower_index).sum(axis=1)
    result = {f"category_top{k}": float((rank < k).mean()) if len(labels) else math.nan for k in ks}
    result["n_category_items"] = int(len(labels))
    return result


def category_precision_recall_f1(logits, labels, zero_division: float = ZERO_DIVISION) -> dict:
    """Precision, recall and F1 of the top-1 category (argmax; ties: the lower index, as
    `category_accuracy`) over the items whose category is known, per category and averaged over
    categories plainly (macro) and weighted by their true count, as scikit-learn's
    `precision_recall_fscore_support` with its default labels: a category that is neither true nor
    predicted for any item is undefined (NaN in `per_category`) and left out of the averages. A
    category never predicted has precision `zero_division`, one predicted but never true has recall
    `zero_division`; F1 = 2tp / (2tp + fp + fn) needs no such rule for the categories averaged."""
    _check_zero_division(zero_division)
    logits, labels = _check_categories(logits, labels)
    n_categories = logits.shape[1]
    predicted = logits.argmax(axis=1)           # the first maximum: ties go to the lower index
    true_positives = np.bincount(labels[predicted == labels], minlength=n_categories)
    n_predicted = np.bincount(predicted, minlength=n_categories)
    support = np.bincount(labels, minlength=n_categories)
    present = (support + n_predicted) > 0
    undefined = np.where(present, 0.0, math.nan)
    precision = _divide(true_positives, n_predicted, zero_division) + undefined
    recall = _divide(true_positives, support, zero_division) + undefined
    f1 = _divide(2 * true_positives, n_predicted + support, zero_division) + undefined
    return {
        "precision_macro": _mean(precision), "recall_macro": _mean(recall), "f1_macro": _mean(f1),
        "precision_weighted": _mean(precision, support), "recall_weighted": _mean(recall, support),
        "f1_weighted": _mean(f1, support), "n_category_items": int(len(labels)),
        "per_category": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                         "support": support.tolist(), "n_predicted": n_predicted.tolist()},
    }


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
    for k in TOP_K_RECALL:
        metrics[f"top{k}_recall_known_only"] = top_k_recall_known_only(scores, labels, k, groups)
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
        prf = category_precision_recall_f1(category_logits, category_labels)
        metrics.update({f"category_{key}": value for key, value in prf.items()
                        if key not in ("per_category", "n_category_items")})
        per = prf["per_category"]
        names = vocabulary.categories or [f"#{c}" for c in range(len(per["support"]))]
        metrics["per_category"] = [
            {"name": name, "support": per["support"][c], "n_predicted": per["n_predicted"][c],
             "precision": per["precision"][c], "recall": per["recall"][c], "f1": per["f1"][c]}
            for c, name in enumerate(names)]
    columns = at_k["per_attribute"]
    group_of = vocabulary.attribute_groups or [""] * len(vocabulary.attributes)
    metrics["per_attribute"] = [
        {"name": name, "group": group_of[a],
         "support": columns["support"][a], "n_predicted": columns["n_predicted"][a],
         "precision": columns["precision"][a], "recall": columns["recall"][a], "f1": columns["f1"][a],
         "AP": ap["per_attribute"][a]}
        for a, name in enumerate(vocabulary.attributes)]
    metrics["protocols"] = {key: PROTOCOLS[key] for key in metrics}
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
    """The metrics of `compute_metrics` as text tables for the terminal; n/a = undefined. Each
    table's header says which protocol its figures follow (`PROTOCOLS` has the full wording)."""
    lines = [f"items: {metrics['n_items']}   attributes: {metrics['n_attributes']}", "",
             "attributes at k (paper): each item predicts its top k known attributes, k = its number of true ones;",
             "per attribute, unknown labels masked, 0/0 = 0; macro = mean over attributes, weighted = by true count"]
    lines += _table(["", "macro", "weighted"],
                    [[name, _number(metrics[name]), _number(metrics[f"{name}_weighted"])]
                     for name in ("P@k", "R@k", "F1@k")])
    lines += ["", f"AP  {_number(metrics['AP'])}   (mean of scikit-learn's AP per attribute, unknown labels masked; "
                  f"{metrics['AP_excluded']} attributes without a positive excluded)"]
    groups = list(metrics["top3_recall"])
    recall_rows = [[f"top-{k} recall (Liu & Lu)"] + [_number(metrics[f"top{k}_recall"][g]) for g in groups]
                   for k in TOP_K_RECALL]
    recall_rows += [[f"top-{k} recall, known only"] + [_number(metrics[f"top{k}_recall_known_only"][g]) for g in groups]
                    for k in TOP_K_RECALL]
    if "group_top1" in metrics:
        top1 = metrics["group_top1"]
        recall_rows.append(["top-1 accuracy"] + [_number(top1[g]) for g in groups[:-1]] + [f"mean {_number(top1['mean'])}"])
    lines += ["", "top-k recall (Liu & Lu): every attribute of the group ranked per item, unknown = negative, "
                  "pooled over items;", "known only: unknown attributes left out of the ranking; "
                  "top-1 accuracy: exclusive groups, known attributes ranked"]
    lines += _table([""] + groups, recall_rows)
    if "n_category_items" in metrics:
        lines += ["", f"category ({metrics['n_category_items']} labelled items):  "
                      + "  ".join(f"top-{k} accuracy {_number(metrics[f'category_top{k}'])}" for k in CATEGORY_TOP_K)]
        if "category_f1_macro" in metrics:
            lines += ["top-1 category (ties: lower index); averaged over the categories true or predicted at least "
                      "once; 0/0 = 0"]
            lines += _table(["", "macro", "weighted"],
                            [[f"category {label}", _number(metrics[f"category_{name}_macro"]),
                              _number(metrics[f"category_{name}_weighted"])]
                             for name, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))])
    if per_attribute and metrics.get("per_attribute"):
        lines += [""] + _table(["attribute", "group", "support", "predicted", "precision", "recall", "F1", "AP"],
                               [[r["name"], r["group"], str(r["support"]), str(r["n_predicted"]), _number(r["precision"]),
                                 _number(r["recall"]), _number(r["f1"]), _number(r["AP"])]
                                for r in metrics["per_attribute"]])
    if per_attribute and metrics.get("per_category"):
        lines += [""] + _table(["category", "support", "predicted", "precision", "recall", "F1"],
                               [[r["name"], str(r["support"]), str(r["n_predicted"]), _number(r["precision"]),
                                 _number(r["recall"]), _number(r["f1"])] for r in metrics["per_category"]])
    return "\n".join(lines)


def without_nan(value):
    """NaN and ±inf → None, recursively: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value
