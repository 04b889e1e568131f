"""ResNets sized for 32×32 inputs: the CIFAR family (resnet8 … resnet110, resnet8x4, resnet32x4) and
ImageNet-style BasicBlock ResNet-18/34 adapted to 32×32 (3×3 stem, no max-pool), plus tiny sizes for tests.

Networks only: no losses, no training logic. `forward(x, return_features=True)` also returns the final feature map
(before pooling) so that feature-based distillers (SDD's multi-scale pooling) can reuse the shared `fc`.

Sizes (parameter counts at 100 classes, 3 input channels; checked in tests/test_resnet_unet.py):

    name          family    stages (channels)         blocks/stage  final map   params
    resnet8       cifar     16 | 16, 32, 64           1             64×8×8      0.08 M
    resnet20      cifar     16 | 16, 32, 64           3             64×8×8      0.28 M
    resnet56      cifar     16 | 16, 32, 64           9             64×8×8      0.86 M
    resnet8x4     cifar     32 | 64, 128, 256         1             256×8×8     1.23 M
    resnet32x4    cifar     32 | 64, 128, 256         5             256×8×8     7.43 M
    resnet18      imagenet  64 | 64, 128, 256, 512    2,2,2,2       512×4×4     11.2 M
    resnet34      imagenet  64 | 64, 128, 256, 512    3,4,6,3       512×4×4     21.3 M
    resnet18_w16  imagenet  16 | 16, 32, 64, 128      2,2,2,2       128×4×4     0.71 M
    tiny          cifar      8 | 8, 16, 32            1             32×8×8      0.02 M

The CIFAR family follows mdistiller's `resnet.py` (He et al. 2016, Sec. 4.2: 6n+2 layers, three stages,
1×1-conv projection shortcuts when the shape changes); "x4" widens the stages to [32, 64, 128, 256].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ResNetSpec", "RESNET_ARCHS", "ResNet", "build_resnet", "resnet_from_meta", "count_params"]


####################################################################################################################
# Blocks
####################################################################################################################


class BasicBlock(nn.Module):
    """Two 3×3 convs with BN and a residual connection (projection shortcut when stride or width change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, out, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (N, out, H/s, W/s)
        return self.relu(out + self.shortcut(x))  # (N, out, H/s, W/s)


####################################################################################################################
# Network
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """Architecture of one named size: stem width, per-stage widths, blocks and strides."""

    stem: int  # channels of the 3×3 stem conv
    widths: tuple[int, ...]  # channels of each stage
    blocks: tuple[int, ...]  # BasicBlocks per stage
    strides: tuple[int, ...]  # stride of each stage's first block


def _cifar(depth: int, widths: tuple[int, int, int, int]) -> ResNetSpec:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNetSpec(stem=widths[0], widths=widths[1:], blocks=(n, n, n), strides=(1, 2, 2))


def _imagenet(blocks: tuple[int, int, int, int], base: int = 64) -> ResNetSpec:
    return ResNetSpec(stem=base, widths=(base, 2 * base, 4 * base, 8 * base), blocks=blocks, strides=(1, 2, 2, 2))


RESNET_ARCHS: dict[str, ResNetSpec] = {
    # CIFAR family (mdistiller): 6n+2 layers
    "resnet8": _cifar(8, (16, 16, 32, 64)),
    "resnet14": _cifar(14, (16, 16, 32, 64)),
    "resnet20": _cifar(20, (16, 16, 32, 64)),
    "resnet32": _cifar(32, (16, 16, 32, 64)),
    "resnet44": _cifar(44, (16, 16, 32, 64)),
    "resnet56": _cifar(56, (16, 16, 32, 64)),
    "resnet110": _cifar(110, (16, 16, 32, 64)),
    "resnet8x4": _cifar(8, (32, 64, 128, 256)),
    "resnet32x4": _cifar(32, (32, 64, 128, 256)),
    # ImageNet-style BasicBlock ResNets adapted to 32×32 (Fast-AD / DFKD teacher ResNet-34 → student ResNet-18)
    "resnet18": _imagenet((2, 2, 2, 2)),
    "resnet34": _imagenet((3, 4, 6, 3)),
    "resnet18_w16": _imagenet((2, 2, 2, 2), base=16),
    "resnet34_w16": _imagenet((3, 4, 6, 3), base=16),
    # tiny sizes for tests and CPU demos
    "tiny": _cifar(8, (8, 8, 16, 32)),
}


class ResNet(nn.Module):
    """ResNet for (N, in_channels, 32, 32) images → (N, num_classes) logits.

    Args:
        spec:        stage widths/blocks/strides (see RESNET_ARCHS).
        num_classes: classifier outputs.
        in_channels: 1 for wafer maps, 3 for CIFAR.
        arch:        the registry name, kept for checkpoint metadata.
    """

    def __init__(self, spec: ResNetSpec, num_classes: int = 100, in_channels: int = 3, arch: str = "custom"):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if not (len(spec.widths) == len(spec.blocks) == len(spec.strides)):
            raise ValueError(f"spec widths/blocks/strides differ in length: {spec}")
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, spec.stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        ch = spec.stem
        for width, n, stride in zip(spec.widths, spec.blocks, spec.strides):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(ch, width, stride if i == 0 else 1))
                ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_channels = ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.arch}: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.relu(self.bn1(self.conv1(x)))  # (N, stem, H, W)
        feat = self.stages(h)  # (N, C, 8, 8) for the CIFAR family at 32×32, (N, C, 4, 4) ImageNet-style
        logits = self.fc(torch.flatten(self.pool(feat), 1))  # (N, num_classes)
        if return_features:
            return logits, feat
        return logits

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see resnet_from_meta)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels}


def build_resnet(arch: str, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """A ResNet of a named size from RESNET_ARCHS (models/classifiers.py builds every family)."""
    from models.classifiers import build_classifier  # lazy: models.classifiers imports this module

    return build_classifier(arch, num_classes, in_channels, family="resnet")


def resnet_from_meta(meta: dict[str, Any]) -> ResNet:
    """Rebuild from checkpoint metadata {"arch", "num_classes", "in_channels"} (weights not loaded); kept for
    callers of this family, models.classifiers.classifier_from_meta rebuilds any family."""
    from models.classifiers import classifier_from_meta

    return classifier_from_meta(meta, family="resnet")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
