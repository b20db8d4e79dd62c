"""VGG16 and VSAM: VGG16 whose block-5 input is re-weighted by a pose-guided spatial attention.

The convolutional trunk is built exactly as torchvision's `vgg16` / `vgg16_bn` `features`
(same module indices), so torchvision's ImageNet weights load into `model.features` unchanged.
The attention layers VSAM assembles live in `attention.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import GroupAttention, SpatialAttention, group_pooling_weights
from .heads import TwoHeads, init_from_scratch

# torchvision's configuration "D": channels per 3×3 conv, "M" = 2×2 max pool ending a block.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HEAD_CHANNELS = 1024
ATTENTION_SCALE = 20.0   # the released graph multiplies the pooled attended features by 20
GROUP_CHANNELS = 64      # per-group 1×1 projection of the combined features (× width)


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def vgg16_features(width: float = 1.0, batch_norm: bool = False) -> tuple[nn.Sequential, tuple[int, ...]]:
    """torchvision's VGG16 `features` with every channel count × `width`, and the index just past
    each block's max pool (5 entries: block1_pool … block5_pool)."""
    layers: list[nn.Module] = []
    block_ends = []
    in_channels = 3
    for spec in VGG16_LAYOUT:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            block_ends.append(len(layers))
            continue
        out_channels = scaled(spec, width)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers), tuple(block_ends)


class _VGGTrunk(TwoHeads):
    def __init__(self, num_categories: int, num_attributes: int, width: float, image_size: int,
                 batch_norm: bool, dropout: float):
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (VGG16 pools 5 times), got {image_size}")
        super().__init__(scaled(512, width), scaled(HEAD_CHANNELS, width), num_categories, num_attributes, dropout)
        self.width = width
        self.image_size = image_size
        self.features, self.block_ends = vgg16_features(width, batch_norm)

    def _run(self, x: torch.Tensor, first_block: int, last_block: int) -> torch.Tensor:
        """Blocks first_block..last_block (1-based, inclusive), each ending with its pool."""
        start = self.block_ends[first_block - 2] if first_block > 1 else 0
        for index in range(start, self.block_ends[last_block - 1]):
            x = self.features[index](x)
        return x


class VGG16(_VGGTrunk):
    """The paper's "VGG" baseline: VGG16 block5_pool → the two heads; no attention."""

    def __init__(self, num_categories: int, num_attributes: int, *, width: float = 1.0, image_size: int = 224,
                 batch_norm: bool = False, dropout: float = 0.5):
        super().__init__(num_categories, num_attributes, width, image_size, batch_norm, dropout)
        init_from_scratch(self)

    def trunk(self, images):
        return self._run(images, 1, 5), None


class VSAM(_VGGTrunk):
    """Visual Semantic Attention Model (Quintino Ferreira et al., 2019).

    block2_pool (S/4), block3_pool (S/8) and block4_pool (S/16) are brought to S/4 (bilinear,
    align_corners=True), concatenated and mixed by a 1×1 conv + ReLU (`combine`); the spatial
    attention Ŝ (S/4 × S/4, 56×56 at 224) re-weights that map, which is average-pooled (kernel 2,
    stride 4) to S/16, multiplied by `attention_scale` and added to block4_pool before block 5."""

    def __init__(self, num_categories: int, num_attributes: int, *, width: float = 1.0, image_size: int = 224,
                 batch_norm: bool = False, dropout: float = 0.5, attention_scale: float = ATTENTION_SCALE,
                 attribute_groups: list[int] | None = None, group_names: list[str] | None = None,
                 group_channels: int = GROUP_CHANNELS):
        super().__init__(num_categories, num_attributes, width, image_size, batch_norm, dropout)
        combined_in = scaled(128, width) + scaled(256, width) + scaled(512, width)
        self.combine = nn.Conv2d(combined_in, scaled(512, width), kernel_size=1)
        self.group_names = list(group_names) if group_names is not None else None
        if self.group_names is None:
            self.attention = SpatialAttention()
        else:
            self._check_groups(attribute_groups, num_attributes)
            self.attention = GroupAttention(scaled(512, width), len(self.group_names), scaled(group_channels, width))
            # Group index per attribute column (the uniform slot G for attributes without a group).
            index = [g if g >= 0 else len(self.group_names) for g in attribute_groups]
            self.register_buffer("attribute_slot", torch.tensor(index, dtype=torch.long), persistent=False)
            # Share of the group maps in attribute pooling: the warm-up sets it before every step; it
            # is saved with the weights, so a checkpoint predicts as it was trained.
            self.register_buffer("pooling_mix", torch.ones(()))
        self.attention_scale = attention_scale
        init_from_scratch(self)
        if self.group_names is not None:
            self.attention.reset_parameters()

    def _check_groups(self, attribute_groups, num_attributes: int) -> None:
        if not self.group_names:
            raise ValueError("attention groups: at least one attribute group is needed")
        if attribute_groups is None or len(attribute_groups) != num_attributes:
            raise ValueError(f"attention groups: attribute_groups must give one group index per attribute "
                             f"({num_attributes}), got {attribute_groups!r}")
        if any(not -1 <= g < len(self.group_names) for g in attribute_groups):
            raise ValueError(f"attention groups: group indices must lie in -1..{len(self.group_names) - 1}")

    @property
    def attention_kind(self) -> str:
        return "single" if self.group_names is None else "groups"

    def set_pooling_mix(self, value: float) -> None:
        """Groups model: the share of the group maps in attribute pooling (the warm-up schedule)."""
        self.pooling_mix.fill_(float(value))

    def _attend(self, images):
        """(block5 features, Ŝ (B, 1, h, w), group maps (B, G, h, w) or None)."""
        block2 = self._run(images, 1, 2)
        block3 = self._run(block2, 3, 3)
        block4 = self._run(block3, 4, 4)
        grid = block2.shape[-2:]
        upsampled = [F.interpolate(b, size=grid, mode="bilinear", align_corners=True) for b in (block3, block4)]
        combined = F.relu(self.combine(torch.cat([block2, *upsampled], dim=1)))
        group_maps = None
        if self.group_names is None:
            attention = self.attention(combined)
        else:
            # The block-5 feedback gets one Ŝ: the union (max) of the group maps, the counterpart of
            # the single model's whole-body map (the union of the default groups' joints is the body).
            group_maps = self.attention(combined)
            attention = group_maps.amax(dim=1, keepdim=True)
        attended = F.avg_pool2d(combined * attention, kernel_size=2, stride=4)
        block5 = self._run(block4 + self.attention_scale * attended, 5, 5)
        return block5, attention, group_maps

    def trunk(self, images):
        block5, attention, _ = self._attend(images)
        return block5, attention

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor | None]:
        if self.group_names is None:
            return super().forward(images, return_features)
        features, attention, group_maps = self._attend(images)
        out: dict[str, torch.Tensor | None] = {"category": None, "attributes": None, "attention": attention,
                                               "group_attention": group_maps}
        category_features = attribute_features = None
        if self.category_head is not None:
            out["category"], category_features = self.category_head(features)
        if self.attribute_head is not None:
            out["attributes"], attribute_features = self._group_pooled_attributes(features, group_maps)
        if return_features:
            out["category_features"], out["attribute_features"] = category_features, attribute_features
        return out

    def _group_pooled_attributes(self, features: torch.Tensor, group_maps: torch.Tensor):
        """Each attribute's logit from the head features pooled under its own group's map: the
        shared linear layer applied to one pooled vector per group, then each column taken from
        its group's row. (logits (B, A), head features (B, K, h, w))."""
        head = self.attribute_head
        head_features = head.relu(head.conv(features))
        weights = group_pooling_weights(group_maps, self.pooling_mix)
        pooled = torch.einsum("bghw,bkhw->bgk", weights.to(head_features.dtype), head_features)
        logits = head.fc(head.dropout(pooled))                                  # (B, G + 1, A)
        slot = self.attribute_slot.view(1, 1, -1).expand(logits.shape[0], 1, -1)
        return logits.gather(1, slot).squeeze(1), head_features
