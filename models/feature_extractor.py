"""DomainFeatureNet: a small CNN whose penultimate layer is the feature space for FID/KID on fab imagery.

ImageNet-Inception weights cannot be downloaded on offline fab machines, and Inception features say little
about overlay fingerprints anyway. This network is trained (trainers/feature_extractor.py) to classify a
domain label, so its features capture what conditional generation must reproduce:

    domain   input                          label
    overlay  (2, H, W) dx, dy in nm         equipment fingerprint (scanner × chuck)
    wafer    (1, H, W) 0 no die/1 pass/2 fail  the nine WM-811K pattern classes
    sem      (1, H, W) grey level in [0, 1]  defect type

Input encoding (data/encoding.py, fixed, part of the weights file): ``x_net = (x_native - offset) / scale`` with
overlay offset 0, scale 20 nm; wafer offset 1, scale 1 (→ −1, 0, +1); SEM offset 0.5, scale 0.5 (→ [−1, 1]).
The net is fully convolutional with global average pooling, so 32×32 and 64×64 inputs both work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.encoding import Encoding, encoding_for
from fabdistill.checkpoints import load_weights

WEIGHTS_FORMAT = "fabdistill-domain-feature-net/1"


#################################################################################
#                               Input encodings                                 #
#################################################################################

# The domain's encoding is the data kind's one (data/encoding.py, the single registry); offset and scale are
# written into every weights file and checked on load.
ENCODINGS: dict[str, Encoding] = {domain: encoding_for(domain) for domain in ("overlay", "wafer", "sem")}


#################################################################################
#                                    Network                                    #
#################################################################################

class ConvBlock(nn.Module):
    """Two 3×3 convs with GroupNorm (batch-size independent, so features do not depend on how FID batches)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.skip = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                     if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))        # (N, out, H/s, W/s)
        h = self.norm2(self.conv2(h))                # (N, out, H/s, W/s)
        return F.silu(h + self.skip(x))              # (N, out, H/s, W/s)


class DomainFeatureNet(nn.Module):
    """Residual CNN: stem → `len(widths)` stages (each halves H, W after the first) → GAP → features → logits.

    Args:
        in_channels: channels of the encoded input (2 for overlay dx/dy, 1 for wafer/SEM).
        num_classes: classes of the domain label the net is trained on.
        feature_dim: size of the feature vector used by FID/KID.
        width: channels of the first stage; stages use width × (1, 2, 4, 4).
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128, width: int = 32):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or feature_dim < 1 or width < 8:
            raise ValueError(f"DomainFeatureNet: bad sizes in_channels={in_channels} num_classes={num_classes} "
                             f"feature_dim={feature_dim} width={width}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.width = width
        widths = (width, 2 * width, 4 * width, 4 * width)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        stages, prev = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(ConvBlock(prev, w, stride=1 if i == 0 else 2))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(prev, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # Per-dimension standardisation of the metric features, fitted on training data by calibrate(); it puts
        # every dimension on the unit scale that KID's polynomial kernel (x·y/d + 1)^3 is designed for.
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded input (N, C, H, W) → feature vectors (N, feature_dim)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DomainFeatureNet expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.stem(x)                             # (N, w, H, W)
        h = self.stages(h)                           # (N, 4w, H/8, W/8)
        h = h.mean(dim=(2, 3))                       # (N, 4w)
        return F.silu(self.proj(h))                  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded input (N, C, H, W) → class logits (N, num_classes)."""
        return self.head(self.features(x))           # (N, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded input (N, C, H, W) → standardised features (N, feature_dim): what FID/KID compare."""
        return (self.features(x) - self.feat_mean) / self.feat_std

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int = 512) -> None:
        """Fit feat_mean / feat_std on encoded training inputs x (N, C, H, W).

        Dimensions that barely vary on the training data get their std floored at 0.1 × the median std, so a
        sample that does activate them moves the features by a bounded amount rather than exploding.
        """
        if x.shape[0] < 2:
            raise ValueError(f"calibrate needs at least 2 samples, got {x.shape[0]}")
        was_training = self.training
        self.eval()
        device = self.feat_mean.device
        f = torch.cat([self.features(x[i:i + batch_size].to(device)).double()
                       for i in range(0, x.shape[0], batch_size)])                # (N, D)
        std = f.std(dim=0)
        floor = 0.1 * float(std.median()) if float(std.median()) > 0 else 1.0
        self.feat_mean.copy_(f.mean(dim=0).float())
        self.feat_std.copy_(std.clamp_min(floor).float())
        self.train(was_training)


#################################################################################
#                          Sizes, weights files                                 #
#################################################################################

# name → constructor arguments other than in_channels/num_classes
FEATURE_NET_SIZES: dict[str, dict[str, int]] = {
    "S": {"width": 16, "feature_dim": 64},     # 0.16 M params, ≈0.65 MB on disk: the committed weights
    "M": {"width": 32, "feature_dim": 128},    # 0.64 M params, ≈2.6 MB
    "L": {"width": 48, "feature_dim": 256},    # 1.44 M params, ≈5.8 MB (too big to commit; train it on the cluster)
}


def build_feature_net(size: str, in_channels: int, num_classes: int) -> DomainFeatureNet:
    if size not in FEATURE_NET_SIZES:
        raise KeyError(f"unknown feature-net size '{size}' (known: {', '.join(FEATURE_NET_SIZES)})")
    return DomainFeatureNet(in_channels, num_classes, **FEATURE_NET_SIZES[size])


def _plain(v: Any) -> Any:
    """Metadata as plain Python (dict/list/str/int/float/bool/None), so `weights_only=True` can read it back."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or type(v) in (bool, int, float, str):
        return v
    if hasattr(v, "item"):  # numpy / torch scalars
        return _plain(v.item())
    return str(v)  # e.g. torch.__version__ is a str subclass that weights_only refuses


def save_feature_net(path: str | Path, model: DomainFeatureNet, domain: str, class_names: list[str],
                     extra: dict[str, Any] | None = None) -> None:
    """Write a weights file: plain tensors, numbers and strings only (loads with ``weights_only=True``)."""
    if domain not in ENCODINGS:
        raise KeyError(f"unknown domain '{domain}' (known: {', '.join(ENCODINGS)})")
    enc = ENCODINGS[domain]
    payload = {
        "format": WEIGHTS_FORMAT,
        "domain": domain,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "feature_dim": model.feature_dim,
        "width": model.width,
        "encoding": {"offset": enc.offset, "scale": enc.scale},
        "class_names": [str(c) for c in class_names],
        "extra": _plain(dict(extra or {})),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_feature_net(path: str | Path, domain: str | None = None) -> tuple[DomainFeatureNet, dict[str, Any]]:
    """Load (model in eval mode, metadata) from a weights file written by :func:`save_feature_net`.

    Raises FileNotFoundError if the file is missing and ValueError if it is not a readable weights file of
    the expected domain.
    """
    path = Path(path)
    payload = load_weights(path, map_location="cpu", what="feature-extractor weights")
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a DomainFeatureNet weights file (expected format '{WEIGHTS_FORMAT}')")
    if domain is not None and payload["domain"] != domain:
        raise ValueError(f"{path}: weights are for domain '{payload['domain']}', not '{domain}'")
    enc = ENCODINGS.get(payload["domain"])
    if enc is None or payload["encoding"] != {"offset": enc.offset, "scale": enc.scale}:
        raise ValueError(f"{path}: input encoding {payload.get('encoding')} does not match this code's "
                         f"encoding for '{payload['domain']}'; regenerate the weights")
    model = DomainFeatureNet(payload["in_channels"], payload["num_classes"],
                             feature_dim=payload["feature_dim"], width=payload["width"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit DomainFeatureNet ({exc})") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
