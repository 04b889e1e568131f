"""Multi-scale logits for SDD (Wei et al., CVPR 2024, "Scale Decoupled Distillation"): the final feature map is
average-pooled over an m×m grid for every scale m in M, and every region's pooled feature goes through the network's
own final linear classifier, giving one logit vector per region.

Layout (as the SDD reference): (N, K, R) with R = Σ_m m² regions, ordered scale by scale in the order of M and
row-major within a scale; M must start with 1, so region 0 is the global logit — exactly the plain classifier's
output (a linear classifier commutes with averaging). M = [1, 2, 4] gives R = 1 + 4 + 16 = 21.

The reference pools 4×4 first and the coarser grids from it; pooling every scale straight from the feature map is
identical whenever the map's side is divisible by max(M) (equal-size bins) and well defined otherwise (adaptive
bins), so 52×52 wafer maps need no special case.

`MultiScaleNet(net, M)` wraps any classifier of this repo (models/resnet_cifar.py, shufflenet.py, mobilenetv2.py:
`forward(x, return_features=True)` → (logits, feature map), final linear layer `fc`). Called plainly it IS the
wrapped network (same call, no extra work); only `multi_scale=True` pools regions. Checkpoints and serving should
save `wrapper.net.state_dict()` (a plain classifier's keys, loadable without the wrapper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["check_scales", "num_regions", "region_pool", "multi_scale_logits", "classifier_of", "MultiScaleNet"]


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validate M: distinct positive ints, strictly increasing, starting with 1 (region 0 must be the global one)."""
    try:
        m = tuple(int(s) for s in scales)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scales M must be a sequence of ints, got {scales!r}") from e
    if any(int(s) != s for s in scales):
        raise ValueError(f"scales M must be integers, got {list(scales)}")
    if not m or m[0] != 1 or any(b <= a for a, b in zip(m, m[1:])):
        raise ValueError(f"scales M must be strictly increasing and start with 1 (e.g. [1], [1, 2], [1, 2, 4]), "
                         f"got {list(m)}")
    return m


def num_regions(scales: Sequence[int]) -> int:
    """R = Σ_m m² regions of M (21 for [1, 2, 4])."""
    return sum(m * m for m in check_scales(scales))


def region_pool(feat: Tensor, scales: Sequence[int]) -> Tensor:
    """Average-pool a feature map (N, C, H, W) over each m×m grid of M → (N, C, R) (region order: module docstring)."""
    if feat.ndim != 4:
        raise ValueError(f"region_pool expects a feature map (N, C, H, W), got shape {tuple(feat.shape)}")
    pooled = [F.adaptive_avg_pool2d(feat, m).flatten(2) for m in check_scales(scales)]  # each (N, C, m²)
    return torch.cat(pooled, dim=2)  # (N, C, R)


def multi_scale_logits(feat: Tensor, classifier: nn.Module, scales: Sequence[int]) -> Tensor:
    """Per-region logits (N, K, R): every pooled region (N, C, R) through the shared linear classifier C → K."""
    regions = region_pool(feat, scales)  # (N, C, R)
    return classifier(regions.transpose(1, 2)).transpose(1, 2)  # (N, R, C) → (N, R, K) → (N, K, R)


def classifier_of(net: nn.Module) -> nn.Linear:
    """The final linear classifier (`fc`) of a network, which SDD shares across regions."""
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"{type(net).__name__} has no final nn.Linear `fc`; SDD needs the network's own classifier")
    return fc


class MultiScaleNet(nn.Module):
    """A classifier that can also give SDD's multi-scale logits.

    forward(x)                    → logits (N, K): the wrapped network's own call, nothing added
    forward(x, multi_scale=True)  → (logits (N, K), multi-scale logits (N, K, R)); region 0 equals logits
    """

    def __init__(self, net: nn.Module, scales: Sequence[int] = (1, 2, 4)):
        super().__init__()
        self.net = net
        self.scales = check_scales(scales)
        classifier_of(net)  # fail early; looked up per call (not registered twice, so keys stay `net.*`)

    def forward(self, x: Tensor, multi_scale: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not multi_scale:
            return self.net(x)  # (N, K)
        logits, feat = self.net(x, return_features=True)  # (N, K), (N, C, h, w)
        return logits, multi_scale_logits(feat, classifier_of(self.net), self.scales)  # (N, K), (N, K, R)
