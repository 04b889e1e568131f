"""MobileNetV2 (Sandler et al., CVPR 2018) sized for 32×32 inputs: the CIFAR variant of mdistiller's `mobile_half`
(expansion 6, width ×0.5), the "MobileNetV2" student of the SDD / DKD CIFAR-100 tables, plus a full-width and a
tiny size.

Networks only: no losses, no training logic. `forward(x, return_features=True)` also returns the final feature map
(after the last 1×1 conv, before pooling), so that SDD's multi-scale pooling (models/multiscale.py) can reuse the
shared classifier `fc`.

Sizes (parameter counts at 100 classes, 3 input channels; checked in tests/test_student_nets.py):

    name               expansion  width  blocks per stage      last conv  final map (32×32 in)  params
    mobilenetv2        6          0.5    1, 2, 3, 4, 3, 3, 1   1280       1280×2×2              0.81 M
    mobilenetv2_w1     6          1.0    1, 2, 3, 4, 3, 3, 1   1280       1280×2×2              2.35 M
    mobilenetv2_tiny   2          0.25   1, 1, 1, 1, 1, 1, 1   128        128×2×2               0.04 M

Stage table (t = expansion, c = channels before the width multiplier, s = first block's stride), as mdistiller:
(1, 16, s1) (t, 24, s1) (t, 32, s2) (t, 64, s2) (t, 96, s1) (t, 160, s2) (t, 320, s1) after a 3×3 stride-2 stem of
32·width channels; a 32×32 input ends as 2×2. Inverted residual: 1×1 expand → 3×3 depthwise → 1×1 linear
projection, with an identity shortcut when stride 1 and widths match. The global pool is adaptive, so any input
size works (52×52 wafer maps end as 4×4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MobileNetV2Spec", "MOBILENETV2_SIZES", "MobileNetV2", "build_mobilenetv2", "mobilenetv2_from_meta"]

# (channels, blocks, stride) of the seven stages; the first stage never expands (t = 1)
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


####################################################################################################################
# Blocks
####################################################################################################################


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand (×t) → 3×3 depthwise (stride s) → 1×1 linear projection; identity shortcut when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            conv_bn_relu(in_ch, hidden, 1),  # pointwise expand
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_ch, 1, bias=False),  # linear bottleneck: no ReLU
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # (N, out, H/s, W/s)
        return x + out if self.use_residual else out


####################################################################################################################
# Network
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class MobileNetV2Spec:
    """Architecture of one named size."""

    expansion: int  # t of every stage but the first
    width: float  # channel multiplier
    last_channel: int  # channels of the final 1×1 conv (the feature map the classifier pools)
    blocks: tuple[int, ...] = tuple(n for _, n, _ in _STAGES)  # inverted residuals per stage (7 stages)


MOBILENETV2_SIZES: dict[str, MobileNetV2Spec] = {
    "mobilenetv2": MobileNetV2Spec(expansion=6, width=0.5, last_channel=1280),  # mdistiller mobile_half
    "mobilenetv2_w1": MobileNetV2Spec(expansion=6, width=1.0, last_channel=1280),
    "mobilenetv2_tiny": MobileNetV2Spec(expansion=2, width=0.25, last_channel=128, blocks=(1,) * 7),  # tests
}


class MobileNetV2(nn.Module):
    """MobileNetV2 for (N, in_channels, H, W) images → (N, num_classes) logits.

    Args:
        spec:        expansion / width / last conv / blocks (see MOBILENETV2_SIZES).
        num_classes: classifier outputs.
        in_channels: 1 for wafer maps, 3 for CIFAR.
        arch:        the registry name, kept for checkpoint metadata.
    """

    def __init__(self, spec: MobileNetV2Spec, num_classes: int = 100, in_channels: int = 3, arch: str = "custom"):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if len(spec.blocks) != len(_STAGES) or min(spec.blocks) < 1 or spec.width <= 0 or spec.expansion < 1:
            raise ValueError(f"MobileNetV2 spec needs 7 stages of >= 1 block, width > 0, expansion >= 1: {spec}")
        self.arch, self.spec = arch, spec
        self.num_classes, self.in_channels = num_classes, in_channels
        ch = max(1, int(32 * spec.width))
        self.stem = conv_bn_relu(in_channels, ch, 3, stride=2)
        stages = []
        for s, ((c, _, stride), n) in enumerate(zip(_STAGES, spec.blocks)):
            out = max(1, int(c * spec.width))
            t = 1 if s == 0 else spec.expansion
            units = []
            for i in range(n):
                units.append(InvertedResidual(ch, out, stride if i == 0 else 1, t))
                ch = out
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn_relu(ch, spec.last_channel, 1)
        self.feature_channels = spec.last_channel
        self.fc = nn.Linear(spec.last_channel, num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # mdistiller: conv N(0, 2/(k²·out)) = Kaiming fan-out, BN (1, 0), linear N(0, 0.01²) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.arch}: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.stem(x)  # (N, 32·w, H/2, W/2)
        h = self.stages(h)  # (N, 320·w, H/16, W/16)
        feat = self.head(h)  # (N, last_channel, H/16, W/16): 2×2 at 32×32
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))  # (N, num_classes)
        if return_features:
            return logits, feat
        return logits

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see mobilenetv2_from_meta)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels}


def build_mobilenetv2(arch: str, num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """A MobileNetV2 of a named size from MOBILENETV2_SIZES (models/classifiers.py builds every family)."""
    from models.classifiers import build_classifier  # lazy: models.classifiers imports this module

    return build_classifier(arch, num_classes, in_channels, family="mobilenetv2")


def mobilenetv2_from_meta(meta: dict[str, Any]) -> MobileNetV2:
    """Rebuild from checkpoint metadata {"arch", "num_classes", "in_channels"} (weights not loaded); kept for
    callers of this family, models.classifiers.classifier_from_meta rebuilds any family."""
    from models.classifiers import classifier_from_meta

    return classifier_from_meta(meta, family="mobilenetv2")

