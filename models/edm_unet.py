"""Class-conditional EDM denoiser backbone (the DMD2 seed's SimpleUNet shape), its preconditioned wrapper, and
the GAN classifier head DMD2 puts on the fake score network's bottleneck.

Networks only: the σ schedule, losses and samplers live in models/edm.py and trainers/dmd2/losses.py.

    EDMUNet        F_θ(x_in, c_noise, class_labels) -> F_x (N, C, H, W), or the bottleneck features
    EDMDenoiser    EDMPrecond (the core's Eq. 7 (EDM) wrapper) + `bottleneck(x, σ, labels)` for the GAN head
    GANHead        bottleneck (N, C_b, h, w) -> one realism logit per sample (N,)

Structure of EDMUNet: Fourier/positional features of c_noise = ¼ ln σ → MLP (the σ embedding); a label
embedding (a linear map of the one-hot label, as EDM's map_label) added to it; an encoder of residual blocks
with stride-2 downsampling, a middle block (res, attn, res) whose output is THE bottleneck, a decoder
mirroring the encoder with skip connections; a zero-initialised output conv, so a fresh denoiser is
D(x; σ) = c_skip(σ)·x. The residual/attention blocks are the DDPM UNet's (models/unet.py): one
implementation of each block.

Labels: `class_labels` is (N,) int64 in [0, num_classes) or (N, num_classes) float (one-hot or soft); a zero
row (or None) is the null class = unconditional, which `label_dropout` trains for (EDM's label dropout).
Conditioning targets: the 9 wafer classes (data.schema.NUM_WAFER_CLASSES) or the SEM defect types
(data.schema.NUM_SEM_DEFECTS); num_classes=0 builds an unconditional network.

Named sizes (EDM_UNET_SIZES; parameter counts at 1 channel, 32×32, 9 classes; bottleneck at 32×32 / 64×64):

    name  base  mults       res blocks  attention at  params   bottleneck 32×32   bottleneck 64×64
    tiny  16    1, 2        1           —             0.16 M   (32, 16, 16)       (32, 32, 32)
    S     32    1, 2, 2     1           8             1.1 M    (64, 8, 8)         (64, 16, 16)
    B     64    1, 2, 2, 2  2           16            8.9 M    (128, 4, 4)        (128, 8, 8)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.unet import AttnBlock, Downsample, ResBlock, Upsample, _norm

from models.edm import EDMPrecond, edm_precond_coeffs

__all__ = [
    "EDMUNetSpec",
    "EDM_UNET_SIZES",
    "NoiseEmbedding",
    "EDMUNet",
    "EDMDenoiser",
    "GANHead",
    "build_edm_unet",
    "build_edm_denoiser",
    "edm_denoiser_from_meta",
]

NOISE_EMBEDDINGS = ("positional", "fourier")


####################################################################################################################
# Embeddings
####################################################################################################################


class NoiseEmbedding(nn.Module):
    """Features of the continuous noise label c_noise = ¼ ln σ: (N,) → (N, dim).

    positional: sinusoids at frequencies (1/max_positions)^(i/(half−1)), i = 0 … half−1 (EDM's
    PositionalEmbedding with endpoint=True, used by DDPM++/ADM); fourier: random Gaussian frequencies × scale,
    a fixed buffer (EDM's FourierEmbedding for NCSN++, scale 16). c_noise spans only ≈ [−1.6, 1.1] over
    σ ∈ [0.002, 80]: the positional features vary slowly there (EDM's DDPM++ uses them nonetheless), the
    Fourier ones resolve σ more finely.
    """

    def __init__(self, dim: int, kind: str = "positional", max_positions: float = 10000.0,
                 scale: float = 16.0):
        super().__init__()
        if kind not in NOISE_EMBEDDINGS:
            raise ValueError(f"noise embedding must be one of {NOISE_EMBEDDINGS}, got {kind!r}")
        if dim < 2 or dim % 2:
            raise ValueError(f"noise embedding dim must be an even int >= 2, got {dim}")
        half = dim // 2
        self.kind = kind
        if kind == "positional":
            freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        else:
            freqs = torch.randn(half) * scale
        self.register_buffer("freqs", freqs)  # (half,), saved with the weights so fourier features reload

    def forward(self, c_noise: Tensor) -> Tensor:
        args = c_noise.float()[:, None] * self.freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, dim)


####################################################################################################################
# UNet
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class EDMUNetSpec:
    base_channels: int = 32  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 1  # residual blocks per level (encoder; the decoder has one more)
    attn_resolutions: tuple[int, ...] = (8,)  # spatial sizes that get self-attention
    dropout: float = 0.0
    num_heads: int = 1
    label_dropout: float = 0.0  # training-time probability of replacing the label by the null class
    noise_embedding: str = "positional"  # "positional" | "fourier"


EDM_UNET_SIZES: dict[str, EDMUNetSpec] = {
    "tiny": EDMUNetSpec(16, (1, 2), 1, ()),
    "S": EDMUNetSpec(32, (1, 2, 2), 1, (8,)),
    "B": EDMUNetSpec(64, (1, 2, 2, 2), 2, (16,)),
}


def _check_spec(spec: EDMUNetSpec) -> None:
    if spec.base_channels < 1 or not spec.channel_mults or any(m < 1 for m in spec.channel_mults):
        raise ValueError(f"need base_channels >= 1 and positive channel_mults, got {spec}")
    if spec.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {spec.num_res_blocks}")
    if not 0.0 <= spec.label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {spec.label_dropout}")
    if spec.noise_embedding not in NOISE_EMBEDDINGS:
        raise ValueError(f"noise_embedding must be one of {NOISE_EMBEDDINGS}, got {spec.noise_embedding!r}")


class EDMUNet(nn.Module):
    """EDM backbone F_θ: forward(x_in (N, C, H, W), c_noise (N,), class_labels) → F_x (N, C, H, W).

    `return_bottleneck=True` returns the middle block's output (N, C_max, H/2^(L−1), W/2^(L−1)) instead,
    without running the decoder (DMD2's GAN head reads it). H and W must be divisible by 2^(L−1), L =
    len(channel_mults).
    """

    def __init__(self, spec: EDMUNetSpec = EDMUNetSpec(), in_channels: int = 1, image_size: int = 32,
                 num_classes: int = 0, size: str = "custom"):
        super().__init__()
        _check_spec(spec)
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        levels = len(spec.channel_mults)
        if image_size < 1 or image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{levels - 1} for {levels} "
                             "levels")
        self.spec, self.size = spec, size
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        base = spec.base_channels
        emb_dim = 4 * base
        self.map_noise = NoiseEmbedding(base, spec.noise_embedding)
        self.map_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # EDM's map_label: a linear map of the one-hot label, so that a zero row (null class) adds nothing
        self.map_label = nn.Linear(num_classes, emb_dim, bias=False) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)

        # encoder; remember the channels of every skip tensor
        self.down = nn.ModuleList()
        skips = [base]
        ch, res = base, image_size
        for level, mult in enumerate(spec.channel_mults):
            for _ in range(spec.num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, base * mult, emb_dim, spec.dropout)])
                ch = base * mult
                if res in spec.attn_resolutions:
                    block.append(AttnBlock(ch, spec.num_heads))
                self.down.append(block)
                skips.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                res //= 2
        self.bottleneck_channels, self.bottleneck_resolution = ch, res

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, spec.dropout), AttnBlock(ch, spec.num_heads),
                                  ResBlock(ch, ch, emb_dim, spec.dropout)])

        # decoder: num_res_blocks + 1 blocks per level, each eating one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.channel_mults))):
            for i in range(spec.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), base * mult, emb_dim, spec.dropout)])
                ch = base * mult
                if res in spec.attn_resolutions:
                    block.append(AttnBlock(ch, spec.num_heads))
                if level != 0 and i == spec.num_res_blocks:
                    block.append(Upsample(ch))
                    res *= 2
                self.up.append(block)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # F_x = 0 at init: D(x; σ) = c_skip·x, the best σ-only guess
        nn.init.zeros_(self.conv_out.bias)

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        """(C_b, h_b, w_b) of the `return_bottleneck=True` output for this image_size."""
        return self.bottleneck_channels, self.bottleneck_resolution, self.bottleneck_resolution

    def label_onehot(self, class_labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """(N,) int64 or (N, K) float (None = null) → (N, K) float32; raises on out-of-range or mis-shaped
        labels."""
        if self.map_label is None:
            if class_labels is not None:
                raise ValueError("this EDMUNet is unconditional (num_classes=0) but got class_labels")
            return None
        if class_labels is None:
            return torch.zeros(n, self.num_classes, device=device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a tensor or None, got {type(class_labels).__name__}")
        if class_labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if class_labels.shape != (n,):
                raise ValueError(f"integer class_labels must have shape ({n},), got "
                                 f"{tuple(class_labels.shape)}")
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got values in "
                                 f"[{lo}, {hi}]")
            return F.one_hot(class_labels.long(), self.num_classes).float().to(device)
        if not class_labels.is_floating_point() or class_labels.shape != (n, self.num_classes):
            raise ValueError(f"class_labels must be (N,) int64 or ({n}, {self.num_classes}) float, got "
                             f"{tuple(class_labels.shape)} {class_labels.dtype}")
        return class_labels.float().to(device)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                return_bottleneck: bool = False) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EDMUNet: expected x of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        n = x.shape[0]
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(n)
        if c_noise.shape != (n,):
            raise ValueError(f"EDMUNet: c_noise must have shape ({n},), got {tuple(c_noise.shape)}")
        emb = self.map_mlp(self.map_noise(c_noise))  # (N, 4·base)
        onehot = self.label_onehot(class_labels, n, x.device)  # (N, K) or None
        if onehot is not None:
            if self.training and self.spec.label_dropout > 0:
                keep = torch.rand(n, 1, device=x.device) >= self.spec.label_dropout  # (N, 1)
                onehot = onehot * keep.to(onehot.dtype)
            emb = emb + self.map_label(onehot.to(emb.dtype))  # (N, 4·base)
        h = self.conv_in(x)  # (N, base, H, W)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)  # (N, C_l, H_l, W_l)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)  # (N, C_b, h_b, w_b)
        if return_bottleneck:
            return h  # (N, C_b, h_b, w_b)
        for block in self.up:
            h = torch.cat([h, hs.pop()], dim=1)  # (N, C + C_skip, H_l, W_l)
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_in, H, W)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see edm_denoiser_from_meta)."""
        return {"size": self.size, "in_channels": self.in_channels, "image_size": self.image_size,
                "num_classes": self.num_classes, "spec": dataclasses.asdict(self.spec)}


####################################################################################################################
# Preconditioned denoiser and GAN head
####################################################################################################################


def _sigma_per_sample(sigma: float | Tensor, x: Tensor) -> Tensor:
    """σ as a float, a 0-d tensor, (N,) or (N, 1, 1, 1) → (N,) float32 (float64 kept) on x's device."""
    n = x.shape[0]
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        return torch.full((n,), float(sigma), device=x.device)
    if not isinstance(sigma, Tensor):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(n)
    if sigma.numel() != n:
        raise ValueError(f"sigma must be a scalar or hold one value per sample ({n}), got "
                         f"{tuple(sigma.shape)}")
    return sigma.reshape(n).to(device=x.device, dtype=torch.promote_types(sigma.dtype, torch.float32))


class EDMDenoiser(EDMPrecond):
    """D(x; σ, labels) = c_skip·x + c_out·F_θ(c_in·x, c_noise, labels) (Eq. 7 (EDM), the core's EDMPrecond).

    forward(x (N, C, H, W), sigma, class_labels=None) -> D (N, C, H, W). Adds what the core's wrapper cannot
    give: `bottleneck(x, sigma, class_labels)` -> (N, C_b, h_b, w_b), the backbone's middle features at the
    same preconditioned input (the core's wrapper insists on an output shaped like x).
    """

    backbone: EDMUNet

    def __init__(self, backbone: EDMUNet, sigma_data: float = 0.5):  # sigma_data: expected std of the data
        if not isinstance(backbone, EDMUNet):
            raise TypeError(f"EDMDenoiser wraps an EDMUNet, got {type(backbone).__name__}")
        super().__init__(backbone, sigma_data)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        return super().forward(x, sigma, class_labels=class_labels)  # (N, C, H, W)

    def bottleneck(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
        sig = _sigma_per_sample(sigma, x)  # (N,)
        c = edm_precond_coeffs(sig, self.sigma_data)
        x_in = (c.c_in.reshape(-1, 1, 1, 1) * x.to(sig.dtype)).to(x.dtype)  # (N, C, H, W) unit variance
        return self.backbone(x_in, c.c_noise, class_labels, return_bottleneck=True)  # (N, C_b, h_b, w_b)

    def meta(self) -> dict[str, Any]:
        return {**self.backbone.meta(), "sigma_data": self.sigma_data}


class GANHead(nn.Module):
    """DMD2's classification branch: bottleneck (N, C, r, r) → realism logit (N,).

    The reference, sized for an 8×8 bottleneck: conv4×4/s2 → GN → SiLU → conv4×4/s4 → GN → SiLU → conv1×1.
    Adapted to any r: conv4×4/s2 (+GN, SiLU) while the map is larger than 4×4, then one conv whose kernel
    spans the remaining map (4×4/s4 at r = 8, as the reference) → GN → SiLU → conv1×1 → 1 logit.
    """

    def __init__(self, in_channels: int, resolution: int):
        super().__init__()
        if in_channels < 1 or resolution < 1:
            raise ValueError(f"need positive in_channels and resolution, got {in_channels}, {resolution}")
        self.in_channels, self.resolution = in_channels, resolution
        layers: list[nn.Module] = []
        res = resolution
        while res > 4:
            layers += [nn.Conv2d(in_channels, in_channels, 4, stride=2, padding=1), _norm(in_channels),
                       nn.SiLU()]
            res = (res - 2) // 2 + 1  # (r + 2·1 − 4) // 2 + 1: halves even maps
        layers += [nn.Conv2d(in_channels, in_channels, res, stride=res), _norm(in_channels), nn.SiLU(),
                   nn.Conv2d(in_channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    @classmethod
    def for_backbone(cls, backbone: EDMUNet) -> GANHead:
        c, r, _ = backbone.bottleneck_shape
        return cls(c, r)

    def forward(self, feats: Tensor) -> Tensor:
        if feats.ndim != 4 or feats.shape[1:] != (self.in_channels, self.resolution, self.resolution):
            r = self.resolution
            raise ValueError(f"GANHead expects (N, {self.in_channels}, {r}, {r}), got {tuple(feats.shape)}")
        return self.net(feats).reshape(feats.shape[0])  # (N, 1, 1, 1) → (N,)


####################################################################################################################
# Sizes and builders
####################################################################################################################


def build_edm_unet(size: str = "S", in_channels: int = 1, image_size: int = 32, num_classes: int = 0,
                   **overrides: Any) -> EDMUNet:
    """An EDMUNet of a named size from EDM_UNET_SIZES; keyword overrides replace spec fields (e.g.
    dropout=0.1)."""
    if size not in EDM_UNET_SIZES:
        raise ValueError(f"unknown EDM UNet size {size!r}; choose one of {', '.join(EDM_UNET_SIZES)}")
    spec = dataclasses.replace(EDM_UNET_SIZES[size], **overrides) if overrides else EDM_UNET_SIZES[size]
    return EDMUNet(spec, in_channels=in_channels, image_size=image_size, num_classes=num_classes, size=size)


def build_edm_denoiser(size: str = "S", in_channels: int = 1, image_size: int = 32, num_classes: int = 0,
                       sigma_data: float = 0.5, **overrides: Any) -> EDMDenoiser:
    """EDMDenoiser around build_edm_unet(...). sigma_data: the data's std (measure it; EDM's default 0.5)."""
    return EDMDenoiser(build_edm_unet(size, in_channels, image_size, num_classes, **overrides), sigma_data)


def edm_denoiser_from_meta(meta: dict[str, Any]) -> EDMDenoiser:
    """Rebuild from checkpoint metadata (EDMDenoiser.meta()); weights not loaded."""
    missing = {"spec", "in_channels", "num_classes", "sigma_data"} - set(meta)
    if missing:
        raise ValueError(f"checkpoint meta lacks {sorted(missing)}: not an EDM denoiser checkpoint? "
                         f"(keys: {sorted(meta)})")
    s = dict(meta["spec"])
    spec = EDMUNetSpec(base_channels=int(s["base_channels"]), channel_mults=tuple(s["channel_mults"]),
                       num_res_blocks=int(s["num_res_blocks"]), attn_resolutions=tuple(s["attn_resolutions"]),
                       dropout=float(s["dropout"]), num_heads=int(s["num_heads"]),
                       label_dropout=float(s["label_dropout"]), noise_embedding=str(s["noise_embedding"]))
    unet = EDMUNet(spec, in_channels=int(meta["in_channels"]), image_size=int(meta.get("image_size", 32)),
                   num_classes=int(meta["num_classes"]), size=str(meta.get("size", "custom")))
    return EDMDenoiser(unet, float(meta["sigma_data"]))
