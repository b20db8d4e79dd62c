"""The paper's unified ResNet-50 baseline: torchvision's ResNet-50 trunk + vsam's two heads."""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .heads import TwoHeads, init_from_scratch
from .vgg import HEAD_CHANNELS, scaled

RESNET50_BLOCKS = (3, 4, 6, 3)


def resnet50_trunk(width: float = 1.0) -> ResNet:
    """torchvision's ResNet-50 (same module names, so its state_dict loads) with every channel
    count × `width`, without `avgpool` and `fc`."""
    trunk = ResNet(Bottleneck, [1, 1, 1, 1])   # replaced below; only the container and its helpers are kept
    stem = scaled(64, width)
    trunk.inplanes = stem
    trunk.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1 = nn.BatchNorm2d(stem)
    for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET50_BLOCKS)):
        layer = trunk._make_layer(Bottleneck, scaled(planes, width), blocks, stride=1 if index == 0 else 2)
        setattr(trunk, f"layer{index + 1}", layer)
    del trunk.avgpool, trunk.fc
    return trunk


class ResNet50(TwoHeads):
    def __init__(self, num_categories: int, num_attributes: int, *, width: float = 1.0, image_size: int = 224,
                 dropout: float = 0.5):
        out_channels = scaled(512, width) * Bottleneck.expansion
        super().__init__(out_channels, scaled(HEAD_CHANNELS, width), num_categories, num_attributes, dropout)
        self.width = width
        self.image_size = image_size
        self.features = resnet50_trunk(width)
        init_from_scratch(self)

    def trunk(self, images):
        t = self.features
        x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x)))), None
