"""Attribute-group attention: which attribute groups get a map, which joints supervise each map,
the per-group heatmap targets (rendered from the stored keypoints) and how well a map matches its
target (Pearson correlation).

A *group plan* is derived from the label vocabulary and the config's `model.group_joints`:

* one map per attribute group named in the vocabulary, in the vocabulary's order;
* a group's joints come from `model.group_joints`: a joint subset name of
  `pose_prep.heatmaps.JOINT_GROUPS` ("arms", "torso", ...), a list of COCO-18 joint names or
  indices, or an empty list / null (the map is learned without a heatmap loss);
* a group the vocabulary names but `model.group_joints` does not list falls back to the whole
  body (FALLBACK_JOINTS, the single VSAM's target), so an unforeseen vocabulary still trains;
* attributes without a group are pooled by plain global average pooling, as in the single model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from pose_prep.heatmaps import DEFAULT_GROUP, JOINT_GROUPS, render
from pose_prep.keypoints import JOINT_INDEX, NUM_JOINTS

FALLBACK_JOINTS = DEFAULT_GROUP        # "full": every joint and limb


class GroupPlanError(ValueError):
    """A vocabulary or a group → joints map that the groups model cannot use."""


@dataclass(frozen=True)
class GroupPlan:
    names: tuple[str, ...]                          # one attention map per group, in this order
    joints: tuple[tuple[int, ...] | None, ...]      # COCO-18 joints per group; None = no heatmap loss
    attribute_group: tuple[int, ...]                # group index per attribute, -1 = none (plain pooling)
    fallback: tuple[str, ...] = ()                  # groups that got FALLBACK_JOINTS

    @property
    def supervised(self) -> tuple[bool, ...]:
        return tuple(bool(j) for j in self.joints)


def resolve_joints(spec, where: str = "") -> tuple[int, ...] | None:
    """A `model.group_joints` value → sorted COCO-18 indices, or None (no heatmap for the group)."""
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        return None
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, (list, tuple)):
        raise GroupPlanError(f"{where}: expected a joint subset name or a list of joints, got {spec!r}")
    joints = set()
    for joint in spec:
        if isinstance(joint, str) and joint in JOINT_GROUPS:
            joints.update(JOINT_GROUPS[joint])
        elif isinstance(joint, str) and joint in JOINT_INDEX:
            joints.add(JOINT_INDEX[joint])
        elif isinstance(joint, int) and not isinstance(joint, bool) and 0 <= joint < NUM_JOINTS:
            joints.add(joint)
        else:
            raise GroupPlanError(f"{where}: {joint!r} is neither a COCO-18 joint name ({', '.join(JOINT_INDEX)}), "
                                 f"an index 0..{NUM_JOINTS - 1} nor a joint subset name")
    return tuple(sorted(joints))


def check_group_joints(group_joints: Mapping) -> None:
    """Raise GroupPlanError for any value of `model.group_joints` that cannot be resolved."""
    if not isinstance(group_joints, Mapping):
        raise GroupPlanError(f"model.group_joints must map group names to joints, got {group_joints!r}")
    for name, spec in group_joints.items():
        resolve_joints(spec, f"model.group_joints.{name}")


def group_plan(attribute_groups: Iterable[str], group_joints: Mapping) -> GroupPlan:
    """The plan for a vocabulary's `attribute_groups` (one group name per attribute, "" = none)."""
    attribute_groups = list(attribute_groups)
    names = list(dict.fromkeys(g for g in attribute_groups if g))
    if not names:
        raise GroupPlanError("model.attention: groups needs attribute groups in the label vocabulary, and this one "
                             "has none (a csv label file has no groups); use model.attention: single")
    check_group_joints(group_joints)
    joints, fallback = [], []
    for name in names:
        if name in group_joints:
            joints.append(resolve_joints(group_joints[name], f"model.group_joints.{name}"))
        else:
            joints.append(tuple(sorted(JOINT_GROUPS[FALLBACK_JOINTS])))
            fallback.append(name)
    index = {name: i for i, name in enumerate(names)}
    return GroupPlan(tuple(names), tuple(joints), tuple(index.get(g, -1) for g in attribute_groups), tuple(fallback))


def plan_for(config: dict, vocabulary) -> GroupPlan | None:
    """The group plan of a run (None unless `model.attention` is "groups")."""
    if config["model"].get("attention", "single") != "groups":
        return None
    return group_plan(vocabulary.attribute_groups or [""] * len(vocabulary.attributes), config["model"]["group_joints"])


# --- targets ------------------------------------------------------------------------------------

def render_group_heatmaps(keypoints: np.ndarray, width: int, height: int, joints: Iterable[tuple[int, ...] | None],
                          size: tuple[int, int], sigma: float) -> np.ndarray:
    """(G, H, W) float32 in [0, 1]: `pose_prep.heatmaps.render` of each group's joints (zeros for a
    group without joints). Groups with the same joints are rendered once."""
    joints = list(joints)
    out = np.zeros((len(joints), *size), np.float32)
    rendered: dict[tuple[int, ...], np.ndarray] = {}
    for g, subset in enumerate(joints):
        if not subset:
            continue
        if subset not in rendered:
            rendered[subset] = render(keypoints, (width, height), size=size, sigma=sigma, joints=subset)
        out[g] = rendered[subset]
    return out


# --- how well the maps match their targets ----------------------------------------------------

class CorrelationAccumulator:
    """Pearson correlation per channel between predicted maps and their targets, pooled over every
    pixel of every item that counts (item × group mask): streaming sums, so a whole split is
    measured without keeping the maps. NaN where nothing counted or a side is constant."""

    def __init__(self, channels: int):
        self.sums = torch.zeros(channels, 6, dtype=torch.float64)   # n, Σx, Σy, Σx², Σy², Σxy

    def update(self, predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """predicted, target (B, C, h, w); mask (B, C) bool (or (B,) for every channel)."""
        if predicted.shape != target.shape:
            raise ValueError(f"maps {tuple(predicted.shape)} and targets {tuple(target.shape)} differ")
        x, y = predicted.detach().double().cpu(), target.detach().double().cpu()
        mask = mask.detach().cpu().bool()
        if mask.dim() == 1:
            mask = mask[:, None].expand(x.shape[0], x.shape[1])
        weight = mask.double()[:, :, None, None].expand_as(x)
        pixels = x.shape[2] * x.shape[3]
        self.sums += torch.stack([mask.double().sum(0) * pixels, (weight * x).sum((0, 2, 3)),
                                  (weight * y).sum((0, 2, 3)), (weight * x * x).sum((0, 2, 3)),
                                  (weight * y * y).sum((0, 2, 3)), (weight * x * y).sum((0, 2, 3))], dim=1)

    def mean_squared_error(self) -> list[float]:
        """Per channel: the mean of (predicted − target)² over the pixels that counted; NaN where none did."""
        return [(sxx - 2 * sxy + syy) / n if n else math.nan for n, _, _, sxx, syy, sxy in self.sums.tolist()]

    def compute(self) -> list[float]:
        result = []
        for n, sx, sy, sxx, syy, sxy in self.sums.tolist():
            if n == 0:
                result.append(math.nan)
                continue
            covariance, var_x, var_y = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
            result.append(covariance / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else math.nan)
        return result


def attention_correlation(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Pearson correlation of each map channel with its target over the masked items' pixels
    (see CorrelationAccumulator); e.g. group_attention (B, G, h, w) vs group_heatmap with
    group_has_pose, or Ŝ (B, 1, h, w) vs heatmap with has_pose."""
    accumulator = CorrelationAccumulator(predicted.shape[1])
    accumulator.update(predicted, target, mask)
    return accumulator.compute()
