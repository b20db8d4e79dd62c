"""Metrics against scikit-learn, against re-computations written as plain loops, and on small
cases worked out by hand (in the comments)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from pose_prep.shard_format import Vocabulary
from vsam_train.metrics import (PROTOCOLS, attribute_ranks, average_precision, category_accuracy,
                                category_precision_recall_f1, compute_metrics, format_table, group_top1_accuracy,
                                precision_recall_f1_at_k, top_k_predictions, top_k_recall, top_k_recall_known_only)

SEEDS = (0, 1, 2, 3, 4)


def random_case(seed, n=60, a=12, unknown=0.0, ties=False):
    """Labels with rows of no positive, a column with no positive, scores loosely tied to labels."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, a)) < rng.uniform(0.05, 0.5, a)).astype(np.int8)
    labels[: n // 10] = 0          # items with zero true attributes
    labels[:, -1] = 0              # an attribute with no positive
    scores = rng.random((n, a)) + 0.5 * labels
    if ties:
        scores = np.round(scores, 1)
    if unknown:
        labels[rng.random((n, a)) < unknown] = -1
    return scores, labels


def loop_top_k(scores, labels, k=None):
    """Independent top-k: per item, sort the known attributes by (-score, index)."""
    predicted = np.zeros(labels.shape, bool)
    for i in range(labels.shape[0]):
        known = [j for j in range(labels.shape[1]) if labels[i, j] != -1]
        ranked = sorted(known, key=lambda j: (-scores[i, j], j))
        n = sum(labels[i] == 1) if k is None else k
        for j in ranked[:n]:
            predicted[i, j] = True
    return predicted


def exclusive_case(seed, n=80, sizes=(4, 3, 2)):
    rng = np.random.default_rng(seed)
    names = [f"g{g}" for g, size in enumerate(sizes) for _ in range(size)]
    labels = np.zeros((n, sum(sizes)), np.int8)
    start = 0
    for size in sizes:
        labels[np.arange(n), start + rng.integers(0, size, n)] = 1
        start += size
    labels[rng.random(n) < 0.1, :sizes[0]] = -1          # group g0 unknown for some items
    scores = np.round(rng.random(labels.shape) + 0.4 * (labels == 1), 1)
    vocabulary = Vocabulary(attributes=[f"a{j}" for j in range(len(names))], attribute_groups=names,
                            exclusive_groups=True)
    return scores, labels, vocabulary


# --- P@k, R@k, F1@k --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
def test_precision_recall_f1_match_sklearn(seed, zero_division):
    scores, labels = random_case(seed, ties=seed % 2 == 1)
    predicted = loop_top_k(scores, labels).astype(int)
    ours = precision_recall_f1_at_k(scores, labels, zero_division=zero_division)
    for average, suffix in (("macro", ""), ("weighted", "_weighted")):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, average=average, zero_division=zero_division)
        np.testing.assert_allclose([ours[f"P@k{suffix}"], ours[f"R@k{suffix}"], ours[f"F1@k{suffix}"]], [p, r, f])
    p, r, f, support = precision_recall_fscore_support(labels, predicted, average=None, zero_division=zero_division)
    per = ours["per_attribute"]
    np.testing.assert_allclose(per["precision"], p)
    np.testing.assert_allclose(per["recall"], r)
    np.testing.assert_allclose(per["f1"], f)
    assert per["support"] == support.tolist()
    assert ours["n_attributes_without_positive"] == int((support == 0).sum()) >= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_unknown_labels_are_masked_like_sklearn_per_attribute(seed):
    scores, labels = random_case(seed, unknown=0.2, ties=True)
    predicted = top_k_predictions(scores, labels)
    assert not (predicted & (labels == -1)).any()
    np.testing.assert_array_equal(predicted, loop_top_k(scores, labels))
    ours = precision_recall_f1_at_k(scores, labels)
    per_attribute = []
    for j in range(labels.shape[1]):
        known = labels[:, j] != -1
        per_attribute.append(precision_recall_fscore_support(
            labels[known, j], predicted[known, j].astype(int), average="binary", zero_division=0)[:3])
    np.testing.assert_allclose([ours["P@k"], ours["R@k"], ours["F1@k"]], np.mean(per_attribute, axis=0))


def test_hand_computed_case_with_ties_and_an_item_without_labels():
    scores = np.array([[0.9, 0.8, 0.1],     # k=1 -> a0 (true)
                       [0.2, 0.7, 0.6],     # k=2 -> a1 (false), a2 (true); a0 missed
                       [0.5, 0.5, 0.5],     # k=1, three-way tie -> a0 by index (false); a1 missed
                       [0.3, 0.9, 0.2],     # k=1 -> a1 (false); a2 missed
                       [0.99, 0.99, 0.99]])  # k=0: predicts nothing
    labels = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    expected_predictions = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_array_equal(top_k_predictions(scores, labels), expected_predictions)
    # a0: tp 1 fp 1 fn 1 -> P 1/2 R 1/2 F1 1/2;  a1: tp 0 fp 2 fn 1 -> 0 0 0;  a2: tp 1 fp 0 fn 1 -> 1 1/2 2/3
    result = precision_recall_f1_at_k(scores, labels)
    assert result["P@k"] == pytest.approx(1.5 / 3)
    assert result["R@k"] == pytest.approx(1 / 3)
    assert result["F1@k"] == pytest.approx((0.5 + 2 / 3) / 3)
    # support 2, 1, 2
    assert result["P@k_weighted"] == pytest.approx((2 * 0.5 + 2 * 1) / 5)
    assert result["R@k_weighted"] == pytest.approx((2 * 0.5 + 2 * 0.5) / 5)
    assert result["F1@k_weighted"] == pytest.approx((2 * 0.5 + 2 * 2 / 3) / 5)
    # The paper's property: per attribute P@k != R@k, although pooled over items they are equal.
    assert result["P@k"] != pytest.approx(result["R@k"])
    predicted = expected_predictions
    assert (predicted & (labels == 1)).sum() / predicted.sum() == (predicted & (labels == 1)).sum() / (labels == 1).sum()


def test_unknown_label_cannot_take_a_predicted_slot():
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    labels = np.array([[-1, 1, 0], [0, 0, 1]])
    # item 0: k=1; a0 scores best but is unknown, so a1 is predicted (a hit)
    np.testing.assert_array_equal(top_k_predictions(scores, labels), [[False, True, False], [False, False, True]])
    result = precision_recall_f1_at_k(scores, labels)
    # a0: never predicted, no known positive -> 0 (zero_division); a1, a2: perfect
    assert result["P@k"] == pytest.approx(2 / 3) and result["R@k"] == pytest.approx(2 / 3)
    assert result["n_attributes_without_positive"] == 1 and result["n_attributes_never_predicted"] == 1
    assert result["R@k_weighted"] == pytest.approx(1.0)


def test_ranks_break_ties_by_index_and_put_unknowns_last():
    ranks = attribute_ranks([[0.5, 0.7, 0.5, 0.9, 0.5]], [[0, 0, -1, 1, 0]])
    np.testing.assert_array_equal(ranks, [[2, 1, 4, 0, 3]])
    # a fixed k larger than the known attributes selects the known ones only
    np.testing.assert_array_equal(top_k_predictions([[0.9, 0.1, 0.5]], [[-1, 0, 1]], k=3), [[False, True, True]])


# --- AP --------------------------------------------------------------------------------------

def loop_average_precision(y_true, y_score):
    """AP = sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n."""
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(y_score.tolist()), reverse=True):
        chosen = y_score >= threshold
        tp = int((chosen & (y_true == 1)).sum())
        recall = tp / int((y_true == 1).sum())
        ap += (recall - previous_recall) * tp / int(chosen.sum())
        previous_recall = recall
    return ap


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_macro(seed):
    scores, labels = random_case(seed, ties=seed % 2 == 0)
    labels[0, -1] = 1                      # give every attribute a positive: sklearn's macro then agrees
    result = average_precision(scores, labels)
    assert result["AP_excluded"] == 0
    assert result["AP"] == pytest.approx(average_precision_score(labels, scores, average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_masks_unknowns_and_excludes_attributes_without_positive(seed):
    scores, labels = random_case(seed, unknown=0.2, ties=True)
    result = average_precision(scores, labels)
    expected = []
    for j in range(labels.shape[1]):
        known = labels[:, j] != -1
        if (labels[known, j] == 1).any():
            expected.append(loop_average_precision(labels[known, j], scores[known, j]))
        else:
            assert math.isnan(result["per_attribute"][j])
    assert result["AP_excluded"] == labels.shape[1] - len(expected) >= 1
    assert result["AP"] == pytest.approx(np.mean(expected))


def test_average_precision_without_any_positive_is_nan():
    result = average_precision(np.random.default_rng(0).random((5, 3)), np.zeros((5, 3)))
    assert math.isnan(result["AP"]) and result["AP_excluded"] == 3


# --- DeepFashion top-k recall and group top-1 -------------------------------------------------

def liu_lu_top_k_recall(scores, labels, k, groups):
    """Liu & Lu's DeepFashion evaluator, written out from its description: every label that is not
    1 counts as 0 (their data preparation turns the benchmark's -1 into 0 and keeps 0 as 0); per
    image, all attributes are sorted by descending score once; a group's top k are the first k
    attributes of that group in this order; hits and true labels are summed over all images, per
    group and over every attribute ("all"), and divided. Ties: (-score, index)."""
    named = dict(groups or {})
    named["all"] = list(range(labels.shape[1]))
    hits = dict.fromkeys(named, 0)
    positives = dict.fromkeys(named, 0)
    for i in range(labels.shape[0]):
        target = [1 if labels[i, j] == 1 else 0 for j in range(labels.shape[1])]
        order = sorted(range(labels.shape[1]), key=lambda j: (-scores[i, j], j))
        for name, members in named.items():
            head = [j for j in order if j in members][:k]
            hits[name] += sum(target[j] for j in head)
            positives[name] += sum(target[j] for j in members)
    return {name: hits[name] / positives[name] if positives[name] else math.nan for name in named}


def test_top_k_recall_hand_computed_pooled_not_averaged():
    scores = np.array([[0.9, 0.8, 0.7, 0.6],      # top-3 a0 a1 a2: 0 of 1
                       [0.1, 0.2, 0.3, 0.4],      # top-3 a3 a2 a1: 1 of 2
                       [0.5, 0.5, 0.5, 0.5],      # tie -> a0 a1 a2: 0 of 1
                       [0.4, 0.3, 0.2, 0.95]])    # a3 unknown, see below
    labels = np.array([[0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, -1]])
    # Liu & Lu: the unknown a3 is a negative that still takes a slot -> a3 a0 a1: 2 of 3
    result = top_k_recall(scores, labels, 3, {"g": [0, 1, 2, 3]})
    assert result["g"] == pytest.approx(3 / 7)          # averaged per attribute it would be 0.5
    assert result["all"] == pytest.approx(3 / 7)
    # known only: a3 is left out of item 3's ranking -> a0 a1 a2: 3 of 3
    known_only = top_k_recall_known_only(scores, labels, 3, {"g": [0, 1, 2, 3]})
    assert known_only["g"] == known_only["all"] == pytest.approx(4 / 7)
    assert top_k_recall(scores, labels, 5, {"g": [0, 1, 2, 3]})["g"] == 1.0   # k >= group size


def test_the_two_top_k_recalls_differ_only_by_unknown_labels_that_outscore_a_true_one():
    scores = np.array([[0.9, 0.8, 0.1],       # a0 unknown outranks the true a1
                       [0.2, 0.9, 0.3]])      # no unknown: both protocols agree (a1, a miss)
    labels = np.array([[-1, 1, 0], [0, 0, 1]])
    # top-1, Liu & Lu: item 0 -> a0 (not a positive), item 1 -> a1: 0 of 2
    assert top_k_recall(scores, labels, 1) == {"all": 0.0}
    # known only: item 0 -> a1 (hit), item 1 -> a1: 1 of 2
    assert top_k_recall_known_only(scores, labels, 1) == {"all": 0.5}
    # Liu & Lu read the unknown as a negative: making it one changes nothing there, and known only agrees
    labels[0, 0] = 0
    assert top_k_recall(scores, labels, 1) == top_k_recall_known_only(scores, labels, 1) == {"all": 0.0}


def test_top_k_recall_group_without_positive_is_nan_and_no_groups_gives_only_all():
    scores = np.array([[0.1, 0.9, 0.8], [0.7, 0.2, 0.6]])
    labels = np.array([[1, 0, 0], [0, 1, 0]])
    result = top_k_recall(scores, labels, 1, {"first": [0, 1], "empty": [2]})
    # within "first", item 0 ranks a1 first (a miss) and item 1 ranks a0 first (a miss)
    assert result["first"] == 0.0 and math.isnan(result["empty"])
    assert result["all"] == 0.0
    # over all attributes the top 2 are a1 a2 for item 0 and a0 a2 for item 1: both true ones missed
    assert top_k_recall(scores, labels, 2, None) == {"all": 0.0}
    assert top_k_recall(scores, labels, 3, None) == {"all": 1.0}


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_recall_matches_a_reference_of_liu_and_lu(seed):
    scores, labels = random_case(seed, unknown=0.25, ties=True)
    groups = {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7], "c": [8, 9, 10, 11]}
    for k in (1, 3, 5):
        expected = liu_lu_top_k_recall(scores, labels, k, groups)
        assert top_k_recall(scores, labels, k, groups) == pytest.approx(expected, nan_ok=True), k
    # with a quarter of the labels unknown the published protocol gives other numbers
    assert top_k_recall(scores, labels, 3, groups) != top_k_recall_known_only(scores, labels, 3, groups)


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_recall_known_only_matches_loop(seed):
    scores, labels = random_case(seed, unknown=0.15, ties=True)
    groups = {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7], "c": [8, 9, 10, 11]}
    for k in (1, 3, 5):
        result = top_k_recall_known_only(scores, labels, k, groups)
        for name, idx in list(groups.items()) + [("all", list(range(labels.shape[1])))]:
            hits = loop_top_k(scores[:, idx], labels[:, idx], k) & (labels[:, idx] == 1)
            positives = (labels[:, idx] == 1).sum()
            expected = hits.sum() / positives if positives else math.nan
            assert result[name] == pytest.approx(expected, nan_ok=True), (k, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_top1_matches_loop_and_top1_recall(seed):
    scores, labels, vocabulary = exclusive_case(seed)
    groups = vocabulary.group_indices()
    result = group_top1_accuracy(scores, labels, groups)
    for name, idx in groups.items():
        correct = total = 0
        for i in range(len(labels)):
            truth = [j for j in idx if labels[i, j] == 1]
            if not truth:
                continue
            known = [j for j in idx if labels[i, j] != -1]
            best = max(known, key=lambda j: (scores[i, j], -j))
            correct += best == truth[0]
            total += 1
        assert result[name] == pytest.approx(correct / total)
    assert result["mean"] == pytest.approx(np.mean([result[name] for name in groups]))
    recall_at_1 = top_k_recall_known_only(scores, labels, 1, groups)   # both rank known attributes only
    for name in groups:
        assert result[name] == pytest.approx(recall_at_1[name])


def test_group_top1_hand_case_with_a_group_without_truth():
    scores = np.array([[0.2, 0.8, 0.5, 0.5], [0.6, 0.6, 0.1, 0.9]])
    labels = np.array([[0, 1, 0, 0], [1, 0, 0, 0]])
    result = group_top1_accuracy(scores, labels, {"x": [0, 1], "y": [2, 3]})
    assert result["x"] == 1.0                 # item 1: tie 0.6/0.6 goes to a0, the true one
    assert math.isnan(result["y"]) and result["mean"] == 1.0
    with pytest.raises(ValueError, match="'x'.*item 0 has 2"):
        group_top1_accuracy(scores, [[1, 1, 0, 0], [1, 0, 0, 0]], {"x": [0, 1]})


# --- categories ------------------------------------------------------------------------------

def test_category_accuracy_hand_computed():
    logits = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],    # true 1: rank 0
                       [0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],    # true 1: tie with 0 -> rank 1
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],    # true 6: rank 6
                       [0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6],    # true 4: all tied -> rank 4
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])   # unknown: skipped
    result = category_accuracy(logits, np.array([1, 1, 6, 4, -1]))
    assert result == {"category_top1": 0.25, "category_top5": 0.75, "n_category_items": 4}
    assert category_accuracy(logits[:, :3], np.array([2, 0, 1, 2, -1]))["category_top5"] == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_category_accuracy_matches_loop(seed):
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(size=(70, 9)), 1)
    labels = rng.integers(-1, 9, 70)
    result = category_accuracy(logits, labels)
    for k in (1, 5):
        hits = [y in sorted(range(9), key=lambda c: (-logits[i, c], c))[:k] for i, y in enumerate(labels) if y >= 0]
        assert result[f"category_top{k}"] == pytest.approx(np.mean(hits))
    assert result["n_category_items"] == int((labels >= 0).sum())


def sklearn_category_scores(logits, labels, zero_division):
    """scikit-learn on the labelled items, the prediction an independent argmax (ties: lower index)."""
    known = [i for i, y in enumerate(labels) if y >= 0]
    y_true = [int(labels[i]) for i in known]
    y_pred = [min(range(logits.shape[1]), key=lambda c: (-logits[i, c], c)) for i in known]
    averages = {average: precision_recall_fscore_support(y_true, y_pred, average=average,
                                                         zero_division=zero_division)[:3]
                for average in ("macro", "weighted")}
    present = sorted(set(y_true) | set(y_pred))
    per_class = precision_recall_fscore_support(y_true, y_pred, labels=present, average=None,
                                                zero_division=zero_division)
    return averages, present, per_class


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
def test_category_precision_recall_f1_match_sklearn(seed, zero_division):
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(size=(70, 9)), 1)          # ties
    logits[:, 8] -= 5                                       # category 8: never true, (almost) never predicted
    labels = rng.integers(-1, 7, 70)                        # category 7 predicted but never true
    result = category_precision_recall_f1(logits, labels, zero_division=zero_division)
    averages, present, (precision, recall, f1, support) = sklearn_category_scores(logits, labels, zero_division)
    for average, (p, r, f) in averages.items():
        np.testing.assert_allclose([result[f"precision_{average}"], result[f"recall_{average}"],
                                    result[f"f1_{average}"]], [p, r, f])
    per = result["per_category"]
    np.testing.assert_allclose(np.array(per["precision"])[present], precision)
    np.testing.assert_allclose(np.array(per["recall"])[present], recall)
    np.testing.assert_allclose(np.array(per["f1"])[present], f1)
    assert np.array(per["support"])[present].tolist() == support.tolist()
    absent = [c for c in range(9) if c not in present]
    assert all(math.isnan(per[key][c]) for c in absent for key in ("precision", "recall", "f1"))
    assert result["n_category_items"] == int((labels >= 0).sum())
    # the top-1 prediction is the one category_top1 counts
    assert sum(per["support"]) == sum(per["n_predicted"]) == result["n_category_items"]
    accuracy = category_accuracy(logits, labels)["category_top1"]
    assert accuracy == pytest.approx(sum(r * s for r, s in zip(np.nan_to_num(per["recall"]), per["support"]))
                                     / sum(per["support"]))


def test_category_precision_recall_f1_hand_computed():
    logits = np.array([[2.0, 1.0, 0.0, 0.0],     # true 0, predicted 0
                       [1.0, 1.0, 0.0, 0.0],     # true 1, tie -> predicted 0
                       [0.0, 3.0, 0.0, 0.0],     # true 1, predicted 1
                       [0.0, 0.0, 5.0, 0.0],     # true 0, predicted 2
                       [0.0, 9.0, 0.0, 0.0]])    # unknown: skipped
    result = category_precision_recall_f1(logits, np.array([0, 1, 1, 0, -1]))
    # class 0: tp 1 fp 1 fn 1 -> P 1/2 R 1/2 F1 1/2; class 1: tp 1 fp 0 fn 1 -> 1, 1/2, 2/3;
    # class 2: tp 0 fp 1 fn 0 -> P 0, R 0/0 = 0 (zero_division), F1 0; class 3: absent -> NaN, not averaged
    per = result["per_category"]
    assert per["precision"][:3] == pytest.approx([0.5, 1.0, 0.0])
    assert per["recall"][:3] == pytest.approx([0.5, 0.5, 0.0])
    assert per["f1"][:3] == pytest.approx([0.5, 2 / 3, 0.0])
    assert per["support"] == [2, 2, 0, 0] and per["n_predicted"] == [2, 1, 1, 0]
    assert all(math.isnan(per[key][3]) for key in ("precision", "recall", "f1"))
    assert result["precision_macro"] == pytest.approx(1.5 / 3)
    assert result["recall_macro"] == pytest.approx(1 / 3)
    assert result["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert result["f1_weighted"] == pytest.approx((2 * 0.5 + 2 * 2 / 3) / 4)
    nothing = category_precision_recall_f1(logits, np.full(5, -1))
    assert nothing["n_category_items"] == 0 and math.isnan(nothing["f1_macro"])


# --- compute_metrics and format_table --------------------------------------------------------

def test_compute_metrics_with_groups_and_categories_is_json():
    scores, labels, vocabulary = exclusive_case(7)
    vocabulary.categories = ["tee", "dress", "skirt"]
    rng = np.random.default_rng(7)
    logits, categories = rng.normal(size=(len(labels), 3)), rng.integers(-1, 3, len(labels))
    metrics = compute_metrics(scores, labels, vocabulary, logits, categories)
    for key in ("P@k", "R@k", "F1@k", "P@k_weighted", "R@k_weighted", "F1@k_weighted", "AP", "AP_excluded",
                "category_top1", "category_top5", "category_precision_macro", "category_recall_macro",
                "category_f1_macro", "category_precision_weighted", "category_recall_weighted",
                "category_f1_weighted"):
        assert key in metrics and isinstance(metrics[key], (int, float)), key
    # every reported figure names its protocol
    reported = set(metrics) - {"protocols"}
    assert set(metrics["protocols"]) == reported and all(metrics["protocols"][key] == PROTOCOLS[key] for key in reported)
    assert metrics["n_items"] == len(labels)
    for key in ("top3_recall", "top5_recall", "top3_recall_known_only", "top5_recall_known_only"):
        assert set(metrics[key]) == {"g0", "g1", "g2", "all"}, key
    assert metrics["top3_recall"] == top_k_recall(scores, labels, 3, vocabulary.group_indices())
    assert metrics["top5_recall_known_only"] == top_k_recall_known_only(scores, labels, 5, vocabulary.group_indices())
    assert [row["name"] for row in metrics["per_category"]] == vocabulary.categories
    assert metrics["category_f1_macro"] == category_precision_recall_f1(logits, categories)["f1_macro"]
    assert set(metrics["group_top1"]) == {"g0", "g1", "g2", "mean"}
    assert metrics["top3_recall"]["g1"] == metrics["top3_recall"]["g2"] == 1.0   # groups of 3 and 2
    assert metrics["P@k"] == precision_recall_f1_at_k(scores, labels)["P@k"]
    assert metrics["AP"] == average_precision(scores, labels)["AP"]
    assert metrics["group_positives"]["all"] == int((labels == 1).sum())
    assert [row["name"] for row in metrics["per_attribute"]] == vocabulary.attributes
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics

    table = format_table(metrics, per_attribute=True)
    for text in ("P@k", "top-3 recall", "g0", "category", f"{metrics['AP']:.4f}", "a8", "skirt",
                 "Liu & Lu", "unknown = negative", "known only", "macro", "weighted",
                 f"{metrics['category_f1_macro']:.4f}"):
        assert text in table, text


def test_compute_metrics_without_groups_or_categories():
    scores, labels = random_case(3, unknown=0.1)
    vocabulary = Vocabulary(attributes=[f"a{j}" for j in range(labels.shape[1])])
    metrics = compute_metrics(scores, labels, vocabulary)
    # What train.evaluate returns for a model without a category head: labels, no logits.
    without_head = compute_metrics(scores, labels, vocabulary, None, np.full(len(labels), -1))
    assert json.dumps(without_head) == json.dumps(metrics)
    assert metrics["top3_recall"].keys() == {"all"} and metrics["top5_recall"].keys() == {"all"}
    assert "group_top1" not in metrics and "category_top1" not in metrics and "per_category" not in metrics
    assert set(metrics["protocols"]) == set(metrics) - {"protocols"}
    assert metrics["AP_excluded"] >= 1
    assert "n/a" not in format_table(metrics)
    labels[:, :3] = 0
    groups = ["x"] * 3 + ["y"] * (labels.shape[1] - 3)
    metrics = compute_metrics(scores, labels, Vocabulary(attributes=vocabulary.attributes, attribute_groups=groups))
    assert math.isnan(metrics["top3_recall"]["x"]) and "n/a" in format_table(metrics)


@pytest.mark.parametrize("scores, labels, message", [
    (np.zeros((2, 3)), np.zeros((2, 2)), "must both be"),
    (np.array([[0.1, math.nan]]), np.zeros((1, 2)), "NaN"),
    (np.zeros((1, 2)), np.array([[2, 0]]), "labels must be"),
    (np.zeros((1, 2)), np.array([[0.5, 1.0]]), "labels must be"),
])
def test_bad_input_is_refused(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        precision_recall_f1_at_k(scores, labels)


def test_compute_metrics_refuses_mismatched_vocabulary():
    with pytest.raises(ValueError, match="3 attribute columns but 2"):
        compute_metrics(np.zeros((2, 3)), np.zeros((2, 3)), Vocabulary(attributes=["a", "b"]))
    with pytest.raises(ValueError, match="do not match the 2 categories"):
        compute_metrics(np.zeros((2, 1)), np.zeros((2, 1)), Vocabulary(categories=["c", "d"], attributes=["a"]),
                        np.zeros((2, 3)), np.zeros(2, int))
