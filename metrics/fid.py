"""FID / KID through torch-fidelity, with fab-domain feature extractors or a user-supplied Inception.

Two feature spaces:

* **Domain extractor** (default, offline): a :class:`models.feature_extractor.DomainFeatureNet` trained on the
  project's own data, registered with torch-fidelity as ``fabdistill-overlay`` / ``fabdistill-wafer`` /
  ``fabdistill-sem``. Custom extractors in torch-fidelity receive whatever tensors the input Dataset yields (only
  the Inception extractor insists on uint8), so these take float maps in the domain's native units and apply the
  net's documented encoding themselves: no quantisation. Features are returned as float64 so that
  the FID of a set against itself is ~0 to machine precision.
* **Inception-v3** (``inception-v3-compat``), used when the caller passes ``feature_extractor_weights_path``
  (torch-fidelity's own Inception weights file, e.g. ``weights-inception-2015-12-05-6726825d.pth`` copied from a
  machine with internet). Maps become 3-channel uint8 images (:func:`to_uint8_rgb`); torch-fidelity's
  TF-compatible bilinear resize then brings them to 299×299 inside the extractor, the same protocol as
  CIFAR-10 FID.

Numbers from the two feature spaces are not comparable with each other, nor domain-extractor numbers across
different weights files: always report which extractor (``result["feature_extractor"]``) and weights were used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from fabdistill.checkpoints import WeightsFileError, load_weights
from models.feature_extractor import ENCODINGS, DomainFeatureNet, load_feature_net

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INCEPTION_NAME = "inception-v3-compat"
# Inception images: overlay dx, dy are clipped to ±OVERLAY_RGB_RANGE_NM before quantising (0.5 nm per level).
OVERLAY_RGB_RANGE_NM = 64.0


def extractor_name(domain: str) -> str:
    """torch-fidelity registry name of a domain's feature extractor."""
    _check_domain(domain)
    return f"fabdistill-{domain}"


def default_weights_path(domain: str) -> Path:
    """The committed weights file of a domain: metrics/weights/<domain>_fe.pt."""
    _check_domain(domain)
    return WEIGHTS_DIR / f"{domain}_fe.pt"


def regenerate_command(domain: str) -> str:
    return f"python -m trainers.feature_extractor --domain {domain} --export metrics/weights/{domain}_fe.pt"


def _check_domain(domain: str) -> None:
    if domain not in ENCODINGS:
        raise ValueError(f"unknown domain '{domain}' (known: {', '.join(ENCODINGS)})")


def load_domain_net(domain: str, weights_path: Optional[str | Path] = None) -> tuple[DomainFeatureNet, dict]:
    """The domain net from `weights_path`, or from the committed file, with an error naming the fix."""
    _check_domain(domain)
    if weights_path is None:
        path = default_weights_path(domain)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: committed feature-extractor weights for '{domain}' are missing; regenerate them with "
                f"`{regenerate_command(domain)}` or pass a weights file explicitly")
        return load_feature_net(path, domain)
    return load_feature_net(weights_path, domain)


#################################################################################
#                    torch-fidelity feature extractors                          #
#################################################################################

class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper around a DomainFeatureNet. Input: float (N, C, H, W) in native units.

    Provides ``features`` (N, feature_dim), standardised with the net's calibration, for FID/KID/PRC and
    ``logits`` (N, num_classes) for IS.
    ``feature_extractor_weights_path`` (torch-fidelity's kwarg) selects a weights file; default: the committed one.
    """

    DOMAIN = ""

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: Optional[str] = None, **kwargs: Any):
        super().__init__(name, features_list)
        self.net, self.meta = load_domain_net(self.DOMAIN, feature_extractor_weights_path)
        self.encoding = ENCODINGS[self.DOMAIN]
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def get_dummy_input_for_compile(self) -> torch.Tensor:
        return torch.zeros(1, self.encoding.in_channels, 32, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"{self.name}: expects float (N, C, H, W) in native units, got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        feats = self.net.features(self.encoding.encode(x.float()))          # (N, D)
        std_feats = (feats - self.net.feat_mean) / self.net.feat_std        # (N, D), unit scale for KID
        out = {"features": std_feats.double(), "logits": self.net.head(feats).double()}
        return tuple(out[name] for name in self.features_list)


def _make_extractor_class(domain: str) -> type[DomainFeatureExtractor]:
    return type(f"DomainFeatureExtractor_{domain}", (DomainFeatureExtractor,), {"DOMAIN": domain})


def register_domain_extractors() -> None:
    """Register ``fabdistill-<domain>`` for every domain (idempotent)."""
    for domain in ENCODINGS:
        name = extractor_name(domain)
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, _make_extractor_class(domain))


register_domain_extractors()


#################################################################################
#                   Inputs: float maps, uint8 images                            #
#################################################################################

def to_uint8_rgb(x: torch.Tensor, domain: str) -> torch.Tensor:
    """Native-unit maps (N, C, H, W) → uint8 RGB images (N, 3, H, W) for Inception.

    overlay: R = dx, G = dy mapped from [−64, 64] nm to [0, 255] (0.5 nm per level, clipped beyond);
             B = |d| from [0, 64·√2] nm to [0, 255].
    wafer / SEM: the net encoding (→ [−1, 1]) mapped to [0, 255], repeated on the three channels
             (wafer: no die 0, pass 128, fail 255).
    """
    _check_domain(domain)
    x = x.float()
    if domain == "overlay":
        r = OVERLAY_RGB_RANGE_NM
        dxy = (x.clamp(-r, r) / r + 1.0) * 127.5                               # (N, 2, H, W)
        mag = (x.pow(2).sum(1, keepdim=True).sqrt() / (r * math.sqrt(2.0))).clamp(0, 1) * 255.0  # (N, 1, H, W)
        rgb = torch.cat([dxy, mag], dim=1)                                      # (N, 3, H, W)
    else:
        v = ENCODINGS[domain].encode(x).clamp(-1, 1)
        rgb = ((v + 1.0) * 127.5).repeat(1, 3, 1, 1)                            # (N, 3, H, W)
    return rgb.round().clamp(0, 255).to(torch.uint8)


class _Samples(Dataset):
    """A tensor as a torch-fidelity input: item i is sample i, transformed lazily by `fn` (per item)."""

    def __init__(self, x: torch.Tensor, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.x = x
        self.fn = fn

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.x[i]
        return item if self.fn is None else self.fn(item[None])[0]


def _check_samples(x: Any, which: str, domain: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{which}: expected a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{which}: expected shape (N, C, H, W), got {tuple(x.shape)}")
    channels = ENCODINGS[domain].in_channels
    if x.shape[1] != channels:
        raise ValueError(f"{which}: domain '{domain}' has {channels} channel(s), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{which}: FID/KID need at least 2 samples, got {x.shape[0]}")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{which}: contains NaN or inf")
    return x.detach().cpu().float().contiguous()


def _check_inception_weights(path: str | Path) -> str:
    """Refuse missing, unreadable or pickled-code files before torch-fidelity loads them (it unpickles freely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights file not found")
    try:
        state = load_weights(path, map_location="cpu", what="Inception weights")
    except WeightsFileError as exc:
        raise ValueError(f"{path}: not a readable weights-only state dict: {exc.reason}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not torch.is_tensor(fc) or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path}: not a torch-fidelity InceptionV3 state dict (expected keys such as "
                         f"'Conv2d_1a_3x3.conv.weight' and 'fc.weight' of shape (1008, 2048))")
    return str(path)


#################################################################################
#                                 Public API                                    #
#################################################################################

def compute_fid_kid(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    domain: str = "overlay",
    feature_extractor_weights_path: Optional[str | Path] = None,
    domain_weights_path: Optional[str | Path] = None,
    kid_subset_size: Optional[int] = None,
    kid_subsets: int = 100,
    batch_size: int = 64,
    device: Optional[str] = None,
    seed: int = 2020,
) -> dict[str, Any]:
    """FID and KID between two sample sets (float (N, C, H, W) in the domain's native units).

    Args:
        domain: overlay | wafer | sem.
        feature_extractor_weights_path: a torch-fidelity InceptionV3 weights file; when given, Inception features
            (2048-d pool) are used instead of the domain extractor.
        domain_weights_path: a DomainFeatureNet weights file replacing the committed one (not with Inception).
        kid_subset_size: samples per KID subset; default min(1000, N_a, N_b).
        device: "cuda" or "cpu"; default cuda when available.

    Returns:
        {"fid", "kid_mean", "kid_std", "feature_extractor", "weights", "n_a", "n_b"}.
    """
    _check_domain(domain)
    if feature_extractor_weights_path is not None and domain_weights_path is not None:
        raise ValueError("give either feature_extractor_weights_path (Inception) or domain_weights_path, not both")
    a = _check_samples(samples_a, "samples_a", domain)
    b = _check_samples(samples_b, "samples_b", domain)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"samples_a {tuple(a.shape)} and samples_b {tuple(b.shape)} differ in (C, H, W)")
    n_min = min(a.shape[0], b.shape[0])
    subset = min(1000, n_min) if kid_subset_size is None else int(kid_subset_size)
    if not 2 <= subset <= n_min:
        raise ValueError(f"kid_subset_size={subset} must be in [2, min(N_a, N_b) = {n_min}]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")

    if feature_extractor_weights_path is not None:
        name = INCEPTION_NAME
        weights = _check_inception_weights(feature_extractor_weights_path)
        fn = lambda x: to_uint8_rgb(x, domain)  # noqa: E731  (per item, so 299×299 floats never pile up)
        input1, input2 = _Samples(a, fn), _Samples(b, fn)
    else:
        name = extractor_name(domain)
        weights = str(domain_weights_path) if domain_weights_path is not None else None
        load_domain_net(domain, weights)  # fail here, with the regenerate command, rather than deep inside
        input1, input2 = _Samples(a), _Samples(b)

    try:
        res = torch_fidelity.calculate_metrics(
            input1=input1, input2=input2, fid=True, kid=True,
            feature_extractor=name, feature_extractor_weights_path=weights,
            kid_subset_size=subset, kid_subsets=kid_subsets, batch_size=batch_size,
            cuda=use_cuda, save_cpu_ram=True,  # save_cpu_ram: no DataLoader worker processes
            cache=False, verbose=False, rng_seed=seed,
        )
    except RuntimeError as exc:
        if name == INCEPTION_NAME and "state_dict" in str(exc):
            raise ValueError(f"{weights}: weights do not fit torch-fidelity's InceptionV3 ({exc})") from None
        raise
    return {
        "fid": float(res["frechet_inception_distance"]),
        "kid_mean": float(res["kernel_inception_distance_mean"]),
        "kid_std": float(res["kernel_inception_distance_std"]),
        "feature_extractor": name,
        "weights": weights if weights is not None else str(default_weights_path(domain)),
        "n_a": int(a.shape[0]),
        "n_b": int(b.shape[0]),
    }


class DomainClassifier(nn.Module):
    """A domain net that takes native units: (N, C, H, W) → logits (N, num_classes); `class_names` from its file."""

    def __init__(self, net: DomainFeatureNet, domain: str, class_names: Optional[list[str]] = None):
        super().__init__()
        _check_domain(domain)
        self.net = net.eval()
        self.encoding = ENCODINGS[domain]
        self.class_names = list(class_names or [])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoding.encode(x.float()))                       # (N, num_classes)


def load_domain_classifier(domain: str = "overlay", weights_path: Optional[str | Path] = None) -> DomainClassifier:
    """The committed (or given) domain net as a classifier over native-unit inputs."""
    net, meta = load_domain_net(domain, weights_path)
    return DomainClassifier(net, domain, meta.get("class_names"))
