"""VSAM's training objective: category CE + attribute focal loss + λ · heatmap term.

Unknown labels (-1) never contribute. Items without a pose contribute no heatmap term; the
baselines (no Ŝ) have none at all.

Two heatmap terms (`kind`):

* "l2" (the paper): pixelwise squared error between Ŝ and the pose heatmap S, averaged over the
  pixels of each image and over the images that have a pose. The default: see docs/train.md, "Losses".
* "softmax_l2" (the authors' released code): Ŝ goes through a spatial softmax inside the loss,
  then the L2 norm of (softmax(Ŝ) − S) per image, summed over the batch; they used λ = 10.

The attribute-group model has one map per group: its heatmap term is the same kind of term per
group map against that group's heatmap, over the items whose group heatmap is lit
("group_has_pose"), summed over the groups that have such items in the batch (`group_reduction`
"sum", the default: each map is weighted by λ as the single model's Ŝ is) or averaged ("mean":
λ shared by all maps, which measurably starves them; docs/attention-groups.md). A batch
without group heatmaps (e.g. `vsam eval`'s loader) scores the model's combined Ŝ against the
stored heatmap instead, as for the single model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

HEATMAP_KINDS = ("l2", "softmax_l2")
GROUP_REDUCTIONS = ("sum", "mean")


# Every term is a masked sum rather than a boolean index or an `if mask.any()`: either would make
# the host wait for the GPU at every training step.

def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean of `values` where `mask` holds, along `dim`; 0 where it holds nowhere."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def category_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the items whose category is known; 0 when none is."""
    per_item = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return _masked_mean(per_item, labels >= 0)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.6) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.; α weighs the positives, 1 − α the negatives), summed over
    each item's known attributes and averaged over items, as per-sample Keras losses are."""
    known = labels >= 0
    per_label = sigmoid_focal_loss(logits, labels.clamp(min=0).to(logits.dtype), alpha=alpha, gamma=gamma,
                                   reduction="none")
    return (per_label * known).sum() / max(logits.shape[0], 1)


def _per_map_terms(attention: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, C, h, w) maps vs targets → (B, C): each map's mean squared error ("l2") or the L2 norm of
    its spatial softmax minus the target ("softmax_l2")."""
    attention, target = attention.float().flatten(2), target.float().flatten(2)
    if kind == "l2":
        return (attention - target).pow(2).mean(2)
    if kind == "softmax_l2":
        return (F.softmax(attention, dim=2) - target).norm(dim=2)
    raise ValueError(f"unknown heatmap loss {kind!r}; choose one of {HEATMAP_KINDS}")


def heatmap_loss(attention: torch.Tensor, target: torch.Tensor, has_pose: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Ŝ (B, 1, h, w) after its sigmoid vs S (B, 1, h, w) in [0, 1]; see the module docstring."""
    if attention.shape != target.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and heatmap {tuple(target.shape)} differ: the "
                         "loader renders heatmaps at image_size / 4, the grid of Ŝ")
    per_image = _per_map_terms(attention, target, kind)[:, 0]
    if kind == "l2":
        return _masked_mean(per_image, has_pose)
    return (per_image * has_pose.to(per_image.dtype)).sum()


def group_heatmap_loss(group_attention: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       kind: str = "l2", reduction: str = "sum") -> torch.Tensor:
    """Group maps (B, G, h, w) vs group heatmaps (B, G, h, w), mask (B, G): `heatmap_loss` of each
    group over its masked items, summed (or averaged) over the groups with at least one; 0 when
    none has."""
    if group_attention.shape != targets.shape:
        raise ValueError(f"group attention {tuple(group_attention.shape)} and group heatmaps "
                         f"{tuple(targets.shape)} differ")
    if reduction not in GROUP_REDUCTIONS:
        raise ValueError(f"unknown group reduction {reduction!r}; choose one of {GROUP_REDUCTIONS}")
    per_map = _per_map_terms(group_attention, targets, kind)                       # (B, G)
    per_group = _masked_mean(per_map, mask) if kind == "l2" else (per_map * mask.to(per_map.dtype)).sum(0)
    present = mask.any(0).to(per_group.dtype)                                      # (G,)
    total = (per_group * present).sum()
    return total if reduction == "sum" else total / present.sum().clamp(min=1)


class VsamLoss(nn.Module):
    """total = w_c · CE(category) + w_a · focal(attributes) + λ · heatmap(Ŝ, S).

    `forward(outputs, batch)` takes the model's output dict and a loader batch and returns
    (total, {"category": …, "attributes": …, "heatmap": …}) with detached parts (absent terms are 0)."""

    def __init__(self, category_weight: float = 1.0, attribute_weight: float = 1.0, focal_gamma: float = 2.0,
                 focal_alpha: float = 0.6, heatmap_kind: str = "l2", heatmap_weight: float = 10.0,
                 group_reduction: str = "sum"):
        super().__init__()
        if heatmap_kind not in HEATMAP_KINDS:
            raise ValueError(f"unknown heatmap loss {heatmap_kind!r}; choose one of {HEATMAP_KINDS}")
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"unknown group reduction {group_reduction!r}; choose one of {GROUP_REDUCTIONS}")
        self.category_weight, self.attribute_weight = category_weight, attribute_weight
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        self.heatmap_kind, self.heatmap_weight = heatmap_kind, heatmap_weight
        self.group_reduction = group_reduction

    @classmethod
    def from_config(cls, loss: dict) -> "VsamLoss":
        return cls(category_weight=loss["category_weight"], attribute_weight=loss["attribute_weight"],
                   focal_gamma=loss["focal_gamma"], focal_alpha=loss["focal_alpha"],
                   heatmap_kind=loss["heatmap_loss"]["kind"], heatmap_weight=loss["heatmap_loss"]["weight"],
                   group_reduction=loss.get("group_heatmap_reduction", "sum"))

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = next(v for v in outputs.values() if v is not None).new_zeros((), dtype=torch.float32)
        parts = {"category": zero, "attributes": zero, "heatmap": zero}
        if outputs.get("category") is not None:
            parts["category"] = category_loss(outputs["category"].float(), batch["category"])
        if outputs.get("attributes") is not None:
            parts["attributes"] = focal_loss(outputs["attributes"].float(), batch["attributes"],
                                             self.focal_gamma, self.focal_alpha)
        if outputs.get("group_attention") is not None and "group_heatmap" in batch and self.heatmap_weight:
            parts["heatmap"] = group_heatmap_loss(outputs["group_attention"], batch["group_heatmap"],
                                                  batch["group_has_pose"], self.heatmap_kind, self.group_reduction)
        elif outputs.get("attention") is not None and self.heatmap_weight:
            parts["heatmap"] = heatmap_loss(outputs["attention"], batch["heatmap"], batch["has_pose"], self.heatmap_kind)
        total = (self.category_weight * parts["category"] + self.attribute_weight * parts["attributes"]
                 + self.heatmap_weight * parts["heatmap"])
        return total, {name: value.detach() for name, value in parts.items()}
