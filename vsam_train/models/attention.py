"""The attention layers of VSAM, apart from the networks that use them (as timm keeps its layers in
`timm/layers/`): `SpatialAttention` (the paper's Ŝ), `GroupAttention` (one Ŝ per attribute group) and
`group_pooling_weights` (attribute pooling under the group maps). `vgg.VSAM` assembles them.

Lineage: the paper's Ŝ is CBAM's spatial attention (Woo et al., 2018, "CBAM: Convolutional Block
Attention Module"): [channel mean, channel max] → 7×7 conv → sigmoid, as timm's
`timm/layers/cbam.py:SpatialAttn`. It is not timm's layer (timm is not a dependency either): timm's
conv is a ConvNormAct (no bias, batch norm) and its forward returns the gated features x · σ(·);
VSAM's conv has a bias and no norm, and the layer returns the map itself, because Ŝ is supervised by
the pose heatmap and VSAM pools the gated features and adds them to block4_pool. `GroupAttention` is the same form once per attribute group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# A group map starts flat at this value: about the mean of a group heatmap, so the heatmap loss
# begins small instead of dragging a 0.5 map down hard (see docs/attention-groups.md, "Stability").
GROUP_PRIOR = 0.05


class SpatialAttention(nn.Module):
    """[channel mean, channel max] → 7×7 conv → sigmoid: Ŝ, one map (B, 1, h, w)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class GroupAttention(nn.Module):
    """One Ŝ per attribute group, each in the paper's form: a per-group 1×1 projection of the
    combined features (+ ReLU), then [channel mean, channel max] → 7×7 conv → sigmoid of that
    projection. All groups run as one 1×1 conv and one grouped 7×7 conv: (B, G, h, w)."""

    def __init__(self, in_channels: int, groups: int, channels_per_group: int):
        super().__init__()
        self.groups, self.channels_per_group = groups, channels_per_group
        self.project = nn.Conv2d(in_channels, groups * channels_per_group, kernel_size=1)
        self.conv = nn.Conv2d(2 * groups, groups, kernel_size=7, padding=3, groups=groups)

    def reset_parameters(self) -> None:
        """Kaiming for the projection (as every conv); the 7×7 conv starts near zero with its bias at
        logit(GROUP_PRIOR): every map starts flat at about a heatmap's mean value. A map starting
        around 0.5 (Kaiming weights, zero bias) is first pulled down everywhere by the heatmap loss
        (its targets are mostly 0), and its logits can run into the sigmoid's flat tail, where a
        map stops learning; a flat map also makes attention pooling start as plain averaging."""
        nn.init.kaiming_normal_(self.project.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.project.bias)
        nn.init.normal_(self.conv.weight, 0.0, 1e-3)
        nn.init.constant_(self.conv.bias, math.log(GROUP_PRIOR / (1 - GROUP_PRIOR)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        projected = F.relu(self.project(x)).view(batch, self.groups, self.channels_per_group, height, width)
        pooled = torch.stack([projected.mean(dim=2), projected.amax(dim=2)], dim=2)
        return torch.sigmoid(self.conv(pooled.view(batch, 2 * self.groups, height, width)))


# Ŝ is at S/4, the heads' features at S/32: a group map is averaged over 8×8 cells per feature cell.
MAP_TO_HEAD = 8


def group_pooling_weights(maps: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Group maps (B, G, S/4, S/4) → pooling weights (B, G + 1, S/32, S/32) on the heads' grid, each
    summing to 1: the map area-averaged to the grid and normalised (so the classification loss can
    move where a map looks but not how bright it is), blended with uniform weights by `mix` (0:
    plain average pooling, 1: the map alone; the warm-up). The last slot is uniform, for
    attributes without a group. (Shapes come from tensors only, so the model exports to ONNX.)"""
    weights = F.avg_pool2d(maps.float(), kernel_size=MAP_TO_HEAD)
    weights = weights / weights.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    uniform = torch.ones_like(weights[:, :1])
    uniform = uniform / uniform.sum(dim=(2, 3), keepdim=True)
    return torch.cat([mix * weights + (1 - mix) * uniform, uniform], dim=1)
