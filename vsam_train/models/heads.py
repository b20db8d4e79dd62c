"""The two classification heads that every model of vsam ends with (the paper's Fig. 3)."""
from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """3×3 conv + ReLU → global average pool → dropout → linear.

    `fc` is the linear layer and `conv` the convolution whose ReLU output `forward` returns as
    features, so a class activation map is CAM_c = Σ_k fc.weight[c, k] · features[:, k]."""

    def __init__(self, in_channels: int, channels: int, outputs: int, dropout: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, outputs), features (B, channels, h, w))."""
        features = self.relu(self.conv(x))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.fc(self.dropout(pooled)), features


class TwoHeads(nn.Module):
    """Base of the models: a trunk (subclass) feeding a category head (absent when the data has no
    categories) and an attribute head. Subclasses implement `trunk(images) -> (features, attention)`."""

    def __init__(self, in_channels: int, head_channels: int, num_categories: int, num_attributes: int,
                 dropout: float):
        super().__init__()
        if num_categories <= 0 and num_attributes <= 0:
            raise ValueError("a model needs categories or attributes to predict (both counts are 0)")
        self.num_categories = num_categories
        self.num_attributes = num_attributes
        self.category_head = Head(in_channels, head_channels, num_categories, dropout) if num_categories > 0 else None
        self.attribute_head = Head(in_channels, head_channels, num_attributes, dropout) if num_attributes > 0 else None

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor | None]:
        features, attention = self.trunk(images)
        out: dict[str, torch.Tensor | None] = {"category": None, "attributes": None, "attention": attention,
                                               "group_attention": None}
        for key, head in (("category", self.category_head), ("attribute", self.attribute_head)):
            logits, head_features = head(features) if head is not None else (None, None)
            out["category" if key == "category" else "attributes"] = logits
            if return_features:
                out[f"{key}_features"] = head_features
        return out


def init_from_scratch(module: nn.Module) -> None:
    """Kaiming (He) initialisation, as torchvision initialises VGG and ResNet."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
