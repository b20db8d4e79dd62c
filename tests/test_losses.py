import math

import numpy as np
import pytest
import torch

from vsam_train.losses import VsamLoss, category_loss, focal_loss, heatmap_loss


def _focal_by_hand(logits: np.ndarray, labels: np.ndarray, gamma: float, alpha: float) -> float:
    """Lin et al.'s binary focal loss written out per label, unknown (-1) labels skipped."""
    total = 0.0
    for row_logits, row_labels in zip(logits, labels):
        for z, y in zip(row_logits, row_labels):
            if y < 0:
                continue
            p = 1.0 / (1.0 + math.exp(-z))
            if y == 1:
                total += -alpha * (1 - p) ** gamma * math.log(p)
            else:
                total += -(1 - alpha) * p ** gamma * math.log(1 - p)
    return total / len(logits)


def test_focal_loss_matches_the_formula_and_ignores_unknown_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (5, 7))
    labels = rng.integers(-1, 2, (5, 7))
    ours = focal_loss(torch.tensor(logits), torch.tensor(labels, dtype=torch.float64), gamma=2.0, alpha=0.6)
    assert ours.item() == pytest.approx(_focal_by_hand(logits, labels, 2.0, 0.6), rel=1e-9)
    changed = logits.copy()
    changed[labels < 0] += 50.0                    # unknown labels: their scores must not matter
    again = focal_loss(torch.tensor(changed), torch.tensor(labels, dtype=torch.float64), gamma=2.0, alpha=0.6)
    assert again.item() == pytest.approx(ours.item(), rel=1e-9)


def test_focal_loss_down_weights_easy_examples_compared_with_bce():
    easy = torch.tensor([[4.0]]), torch.tensor([[1.0]])
    hard = torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert focal_loss(*easy) / bce(*easy) < 0.01 < focal_loss(*hard) / bce(*hard)


def test_category_loss_ignores_unknown_and_is_zero_without_categories():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, -1, 2, -1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(category_loss(logits, labels), expected)
    none = category_loss(logits, torch.full((4,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_heatmap_l2_is_pixelwise_and_skips_items_without_pose():
    torch.manual_seed(0)
    attention, target = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    has_pose = torch.tensor([True, False, True])
    expected = ((attention[[0, 2]] - target[[0, 2]]) ** 2).mean()
    torch.testing.assert_close(heatmap_loss(attention, target, has_pose, "l2"), expected)
    attention[1] = 0.0                             # the item without pose does not count
    torch.testing.assert_close(heatmap_loss(attention, target, has_pose, "l2"), expected)
    assert heatmap_loss(attention, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_heatmap_softmax_l2_follows_the_released_code():
    rng = np.random.default_rng(1)
    attention, target = rng.random((2, 1, 3, 3)), rng.random((2, 1, 3, 3))
    expected = 0.0
    for a, s in zip(attention, target):                # spatial softmax of Ŝ, then an L2 norm per image, summed
        soft = np.exp(a.ravel()) / np.exp(a.ravel()).sum()
        expected += np.sqrt(((soft - s.ravel()) ** 2).sum())
    ours = heatmap_loss(torch.tensor(attention), torch.tensor(target), torch.tensor([True, True]), "softmax_l2")
    assert ours.item() == pytest.approx(expected, rel=1e-6)


def test_heatmap_terms_of_items_without_pose_are_masked_out_with_no_gradient():
    torch.manual_seed(0)
    attention, target = torch.rand(3, 1, 4, 4, requires_grad=True), torch.rand(3, 1, 4, 4)
    has_pose = torch.tensor([True, False, True])
    for kind in ("l2", "softmax_l2"):
        attention.grad = None
        loss = heatmap_loss(attention, target, has_pose, kind)
        posed = heatmap_loss(attention[[0, 2]], target[[0, 2]], torch.tensor([True, True]), kind)
        torch.testing.assert_close(loss, posed)
        loss.backward()
        assert attention.grad[1].abs().sum() == 0 and attention.grad[[0, 2]].abs().sum() > 0


def test_heatmap_shapes_must_agree():
    with pytest.raises(ValueError, match="image_size / 4"):
        heatmap_loss(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 56, 56), torch.tensor([True]))


def test_total_is_the_weighted_sum_and_baselines_have_no_heatmap_term():
    torch.manual_seed(0)
    batch = {"category": torch.tensor([1, -1]), "attributes": torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]),
             "heatmap": torch.rand(2, 1, 8, 8), "has_pose": torch.tensor([True, True])}
    outputs = {"category": torch.randn(2, 4), "attributes": torch.randn(2, 3), "attention": torch.rand(2, 1, 8, 8)}
    criterion = VsamLoss(category_weight=0.5, attribute_weight=2.0, heatmap_kind="l2", heatmap_weight=10.0)
    total, parts = criterion(outputs, batch)
    assert total.item() == pytest.approx(0.5 * parts["category"].item() + 2.0 * parts["attributes"].item()
                                         + 10.0 * parts["heatmap"].item(), rel=1e-6)
    assert all(v.item() > 0 for v in parts.values())
    baseline = dict(outputs, attention=None, category=None)
    total, parts = criterion(baseline, batch)
    assert parts["heatmap"].item() == 0.0 and parts["category"].item() == 0.0
    assert total.item() == pytest.approx(2.0 * parts["attributes"].item())
    with pytest.raises(ValueError, match="unknown heatmap loss"):
        VsamLoss(heatmap_kind="l1")
