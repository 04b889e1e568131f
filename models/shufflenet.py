"""ShuffleNetV1 (Zhang et al., CVPR 2018) sized for 32×32 inputs: the CIFAR variant of mdistiller's `ShuffleV1`,
the heterogeneous student of the SDD / DKD CIFAR-100 tables, plus tiny sizes for tests.

Networks only: no losses, no training logic. `forward(x, return_features=True)` also returns the final feature map
(before pooling), so that SDD's multi-scale pooling (models/multiscale.py) can reuse the shared classifier `fc`.

Sizes (parameter counts at 100 classes, 3 input channels; checked in tests/test_student_nets.py):

    name             stem  stages (out channels)  blocks/stage  groups  final map (32×32 in)  params
    shufflev1        24    240, 480, 960          4, 8, 4       3       960×4×4               0.95 M
    shufflev1_tiny   12    48, 96, 192            1, 1, 1       3       192×4×4               0.02 M

CIFAR adaptation (as mdistiller): a 1×1 stem conv with no stride and no max-pool, so a 32×32 input reaches the
classifier as 4×4 after the three stride-2 stages; the global pool is adaptive, so 52×52 wafer maps work too (7×7).
Each stage's first block has stride 2 and concatenates an average-pooled shortcut (its residual branch produces
`out − in` channels); the first 1×1 group conv of the first stage is ungrouped, its input (the stem) being narrow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ShuffleNetSpec", "SHUFFLENET_SIZES", "ShuffleNetV1", "build_shufflenet", "shufflenet_from_meta"]


####################################################################################################################
# Blocks
####################################################################################################################


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(N, g·c, H, W) → (N, c·g, H, W): interleave the groups so the next group conv sees every group."""
    n, ch, h, w = x.shape
    return x.reshape(n, groups, ch // groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


class ShuffleUnit(nn.Module):
    """1×1 group conv → shuffle → 3×3 depthwise (stride s) → 1×1 group conv; add (s=1) or concat (s=2) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        branch = out_ch - in_ch if stride == 2 else out_ch  # concat shortcut supplies the input's channels
        mid = branch // 4
        for name, ch, g in (("input", in_ch, first_groups), ("bottleneck", mid, first_groups),
                            ("bottleneck", mid, groups), ("branch output", branch, groups)):
            if ch <= 0 or ch % g:
                raise ValueError(f"ShuffleNet unit {in_ch}→{out_ch}: {name} width {ch} not a positive multiple "
                                 f"of {g} groups")
        self.stride, self.first_groups = stride, first_groups
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (N, mid, H, W)
        out = channel_shuffle(out, self.first_groups)  # (N, mid, H, W)
        out = F.relu(self.bn2(self.conv2(out)))  # (N, mid, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (N, branch, H/s, W/s)
        res = self.shortcut(x)  # (N, in, H/s, W/s)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)  # (N, out, H/s, W/s)


####################################################################################################################
# Network
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class ShuffleNetSpec:
    """Architecture of one named size."""

    stem: int  # channels of the 1×1 stem conv
    widths: tuple[int, ...]  # output channels of each stage
    blocks: tuple[int, ...]  # ShuffleUnits per stage (the first has stride 2)
    groups: int  # groups of the 1×1 group convs


SHUFFLENET_SIZES: dict[str, ShuffleNetSpec] = {
    "shufflev1": ShuffleNetSpec(stem=24, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3),  # mdistiller ShuffleV1
    "shufflev1_tiny": ShuffleNetSpec(stem=12, widths=(48, 96, 192), blocks=(1, 1, 1), groups=3),  # tests, CPU demos
}


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for (N, in_channels, H, W) images → (N, num_classes) logits.

    Args:
        spec:        stem / stage widths / blocks / groups (see SHUFFLENET_SIZES).
        num_classes: classifier outputs.
        in_channels: 1 for wafer maps, 3 for CIFAR.
        arch:        the registry name, kept for checkpoint metadata.
    """

    def __init__(self, spec: ShuffleNetSpec, num_classes: int = 100, in_channels: int = 3, arch: str = "custom"):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if len(spec.widths) != len(spec.blocks) or min(spec.blocks) < 1:
            raise ValueError(f"spec widths and blocks must have equal length and >= 1 block per stage: {spec}")
        self.arch, self.spec = arch, spec
        self.num_classes, self.in_channels = num_classes, in_channels
        self.conv1 = nn.Conv2d(in_channels, spec.stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem)
        stages, ch = [], spec.stem
        for s, (width, n) in enumerate(zip(spec.widths, spec.blocks)):
            units = []
            for i in range(n):
                first_groups = 1 if (s == 0 and i == 0) else spec.groups
                units.append(ShuffleUnit(ch, width, 2 if i == 0 else 1, spec.groups, first_groups))
                ch = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.feature_channels = ch
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
        h = F.relu(self.bn1(self.conv1(x)))  # (N, stem, H, W)
        feat = self.stages(h)  # (N, C, H/8, W/8): 4×4 at 32×32
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))  # (N, num_classes)
        if return_features:
            return logits, feat
        return logits

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see shufflenet_from_meta)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels}


def build_shufflenet(arch: str, num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """A ShuffleNetV1 of a named size from SHUFFLENET_SIZES (models/classifiers.py builds every family)."""
    from models.classifiers import build_classifier  # lazy: models.classifiers imports this module

    return build_classifier(arch, num_classes, in_channels, family="shufflenet")


def shufflenet_from_meta(meta: dict[str, Any]) -> ShuffleNetV1:
    """Rebuild from checkpoint metadata {"arch", "num_classes", "in_channels"} (weights not loaded); kept for
    callers of this family, models.classifiers.classifier_from_meta rebuilds any family."""
    from models.classifiers import classifier_from_meta

    return classifier_from_meta(meta, family="shufflenet")

