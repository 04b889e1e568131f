"""A KL-regularised convolutional autoencoder, as the first stage of latent diffusion (Rombach et al. 2022, LDM).

Networks only: `encode(x) -> (mean, logvar)`, `sample_latent(mean, logvar)`, `decode(z) -> x̂`; the losses (L1
reconstruction + a small-weight KL to N(0, I)) live in trainers/kdcddm/losses.py.

Structure (LDM's AutoencoderKL, scaled down): encoder = conv_in → per level `num_res_blocks` residual blocks
(GroupNorm, SiLU, 3×3 convs) and a stride-2 conv between levels → middle (res, [attn], res) → GN, SiLU, 3×3 conv to
2·latent_channels (mean, log-variance). The decoder mirrors it with one more residual block per level and
nearest-neighbour upsampling. Downsampling factor f = 2^(levels − 1): an (N, C, H, W) image has an
(N, latent_channels, H/f, W/f) latent. The decoder's output is linear (no tanh): the trainer picks the pixel range
(the diffusion code uses [−1, 1]).

Two options make a fast decoder, for pipelines that decode every request (KDCDDM's one-step student decodes twice
per image, so at narrow widths the VAE, not the generator, sets its speed): `subpixel=True` runs the first level at
half resolution (PixelUnshuffle(2) in, a 3×3 conv to 4·C channels and PixelShuffle(2) out, as ESPCN, Shi et al.
2016), and `decoder_res_blocks` sets the decoder's blocks per level (−1: num_res_blocks + 1, as LDM). For the
benchmark's 32×32 VAE (base 8, f 4) a batch of 128 latents decodes in 73 ms plain, 21 ms subpixel, 14 ms with
decoder_res_blocks 1 too and 7 ms with 0, on one CPU thread; docs/kdcddm.md measures what each costs in IoU.

CDLDM runs its diffusion on `scale_latent(mean)`: LDM scales latents to unit variance (0.18215 for Stable
Diffusion's KL-f8); here the factor is the buffer `latent_scale` (1.0 until the trainer sets it to 1/std of the
training latents), saved in the state dict so the teacher, the KDCDDM student and inference agree on it. The KDCDDM
authors' own VAE (stubs) flattens to a 128-d vector; a spatial latent keeps the defect's location, which the mask
needs.

Named sizes (VAE_SIZES; parameter counts at 1 input channel):

    name   base  mults       res blocks  latent ch  f  mid attn  params
    tiny   16    1, 2        1           4          2  no        0.16 M
    small  32    1, 2, 2     1           4          4  yes       0.95 M
    base   64    1, 2, 4     2           4          4  yes       13.9 M
    kl_f8  128   1, 2, 4, 4  2           4          8  yes       83.6 M  (LDM's KL-f8 layout, same count)

`build_vae(size, latent_channels=..., downsample=...)` overrides the latent width and the factor (a power of two:
levels are dropped from the end of the multiplier list, or its last multiplier repeated).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.unet import AttnBlock, Downsample, Upsample

__all__ = ["VAESpec", "VAE_SIZES", "KLAutoencoder", "ResBlock", "build_vae", "vae_from_meta", "count_params"]

LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps log σ² so exp() stays finite early in training


####################################################################################################################
# Blocks
####################################################################################################################


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups for wide layers, ≥ 4 channels per group for narrow ones (as models/unet.py)."""
    return nn.GroupNorm(max(1, math.gcd(ch, min(32, max(1, ch // 4)))), ch)


class ResBlock(nn.Module):
    """GN → SiLU → 3×3 conv → GN → SiLU → dropout → 3×3 conv, + (1×1-projected) skip; no timestep input."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, out, H, W)
        return self.skip(x) + h  # (N, out, H, W)


####################################################################################################################
# Autoencoder
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class VAESpec:
    base_channels: int = 32  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; f = 2^(len − 1)
    num_res_blocks: int = 1  # residual blocks per encoder level (the decoder has one more)
    latent_channels: int = 4  # channels of the latent z
    mid_attention: bool = True  # self-attention in the middle block (at the latent resolution)
    dropout: float = 0.0
    # The first level runs at half resolution: PixelUnshuffle(2) before the encoder's conv_in, a sub-pixel conv to
    # 4·C channels and PixelShuffle(2) after the decoder (ESPCN, Shi et al. 2016). f is unchanged; at narrow widths
    # the full-resolution convolutions are most of a decode, so this makes it ~2-3× cheaper.
    subpixel: bool = False
    decoder_res_blocks: int = -1  # residual blocks per decoder level; −1: num_res_blocks + 1, as LDM's decoder

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


VAE_SIZES: dict[str, VAESpec] = {
    "tiny": VAESpec(16, (1, 2), 1, 4, mid_attention=False),
    "small": VAESpec(32, (1, 2, 2), 1, 4),
    "base": VAESpec(64, (1, 2, 4), 2, 4),
    "kl_f8": VAESpec(128, (1, 2, 4, 4), 2, 4),
}


class Encoder(nn.Module):
    """(N, C, H, W) image → (N, 2·latent, H/f, W/f): mean and log-variance stacked along channels."""

    def __init__(self, spec: VAESpec, in_channels: int):
        super().__init__()
        base = spec.base_channels
        self.unshuffle: nn.Module = nn.PixelUnshuffle(2) if spec.subpixel else nn.Identity()
        self.conv_in = nn.Conv2d(in_channels * (4 if spec.subpixel else 1), base, 3, padding=1)
        layers: list[nn.Module] = []
        ch = base
        for level, mult in enumerate(spec.channel_mults):
            for _ in range(spec.num_res_blocks):
                layers.append(ResBlock(ch, base * mult, spec.dropout))
                ch = base * mult
            if level != len(spec.channel_mults) - 1 and not (spec.subpixel and level == 0):
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch, spec.dropout)]
        layers += [AttnBlock(ch)] if spec.mid_attention else []
        layers += [ResBlock(ch, ch, spec.dropout)]
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * spec.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.conv_in(self.unshuffle(x)))  # (N, base·mult_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2·latent, H/f, W/f)


class Decoder(nn.Module):
    """(N, latent, h, w) latent → (N, C, h·f, w·f) image (linear output)."""

    def __init__(self, spec: VAESpec, out_channels: int):
        super().__init__()
        base = spec.base_channels
        ch = base * spec.channel_mults[-1]
        self.conv_in = nn.Conv2d(spec.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch, spec.dropout)]
        layers += [AttnBlock(ch)] if spec.mid_attention else []
        layers += [ResBlock(ch, ch, spec.dropout)]
        for level, mult in reversed(list(enumerate(spec.channel_mults))):
            for _ in range(spec.num_res_blocks + 1 if spec.decoder_res_blocks < 0 else spec.decoder_res_blocks):
                layers.append(ResBlock(ch, base * mult, spec.dropout))
                ch = base * mult
            if level != 0 and not (spec.subpixel and level == 1):
                layers.append(Upsample(ch))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels * (4 if spec.subpixel else 1), 3, padding=1)
        self.shuffle: nn.Module = nn.PixelShuffle(2) if spec.subpixel else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        h = self.body(self.conv_in(z))  # (N, base, H, W); (N, base, H/2, W/2) when subpixel
        return self.shuffle(self.conv_out(F.silu(self.norm_out(h))))  # (N, C, H, W)


class KLAutoencoder(nn.Module):
    """KL-regularised autoencoder: encode (N, C, H, W) → mean, logvar (N, L, H/f, W/f); decode back.

    H and W must be divisible by f = spec.downsample.
    """

    def __init__(self, spec: VAESpec = VAESpec(), in_channels: int = 1, image_size: int = 64, size: str = "custom"):
        super().__init__()
        if in_channels < 1 or spec.latent_channels < 1 or spec.base_channels < 1:
            raise ValueError(f"in_channels, latent_channels and base_channels must be positive, got "
                             f"{in_channels}, {spec.latent_channels}, {spec.base_channels}")
        if not spec.channel_mults:
            raise ValueError("channel_mults must list at least one level")
        if spec.subpixel and len(spec.channel_mults) < 2:
            raise ValueError("subpixel needs a downsampling factor of at least 2 (two or more channel_mults)")
        if spec.decoder_res_blocks < -1:
            raise ValueError(f"decoder_res_blocks must be >= 0, or -1 for num_res_blocks + 1; got "
                             f"{spec.decoder_res_blocks}")
        if image_size % spec.downsample:
            raise ValueError(f"image_size {image_size} must be divisible by the downsampling factor "
                             f"{spec.downsample}")
        self.spec = spec
        self.size = size
        self.in_channels = in_channels
        self.image_size = image_size
        self.encoder = Encoder(spec, in_channels)
        self.decoder = Decoder(spec, in_channels)
        self.register_buffer("latent_scale", torch.ones(()))  # set by the trainer; in the state dict

    @property
    def latent_channels(self) -> int:
        return self.spec.latent_channels

    @property
    def downsample(self) -> int:
        return self.spec.downsample

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(L, H/f, W/f) of the latent of an image of the given (default: configured) size."""
        h, w = height or self.image_size, width or self.image_size
        return self.spec.latent_channels, h // self.downsample, w // self.downsample

    def _check_image(self, x: Tensor) -> None:
        f = self.downsample
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"KLAutoencoder: expected images (N, {self.in_channels}, H, W) with H, W divisible "
                             f"by {f}, got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) → (mean, logvar), each (N, L, H/f, W/f); logvar clamped to LOGVAR_RANGE."""
        self._check_image(x)
        moments = self.encoder(x)  # (N, 2L, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # each (N, L, H/f, W/f)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample_latent(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised z = μ + σ·ε, ε ~ N(0, I): (N, L, h, w) each; gradients flow to mean and logvar."""
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps  # (N, L, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """z (N, L, h, w) (unscaled) → image (N, C, h·f, w·f)."""
        if z.ndim != 4 or z.shape[1] != self.spec.latent_channels:
            raise ValueError(f"KLAutoencoder.decode: expected z (N, {self.spec.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C, H, W) → (reconstruction (N, C, H, W), mean, logvar (N, L, H/f, W/f)).

        sample=False decodes the mean (evaluation); True decodes a reparameterised sample (training).
        """
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar, generator) if sample else mean
        return self.decode(z), mean, logvar

    # The diffusion model sees unit-variance latents; decode() takes unscaled ones.
    def scale_latent(self, z: Tensor) -> Tensor:
        return z * self.latent_scale

    def unscale_latent(self, z: Tensor) -> Tensor:
        return z / self.latent_scale

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see vae_from_meta); latent_scale is in the weights."""
        return {"size": self.size, "in_channels": self.in_channels, "image_size": self.image_size,
                "spec": dataclasses.asdict(self.spec)}


def _with_downsample(spec: VAESpec, factor: int) -> VAESpec:
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"downsample must be a power of two >= 1, got {factor}")
    levels = int(math.log2(factor)) + 1
    mults = spec.channel_mults[:levels] + (spec.channel_mults[-1],) * max(0, levels - len(spec.channel_mults))
    return dataclasses.replace(spec, channel_mults=mults)


def build_vae(size: str = "small", in_channels: int = 1, image_size: int = 64, *,
              latent_channels: int | None = None, downsample: int | None = None,
              **overrides: Any) -> KLAutoencoder:
    """A KL autoencoder of a named size from VAE_SIZES; `latent_channels`, `downsample` (a power of two) and keyword
    overrides of VAESpec fields (e.g. base_channels=8) replace the named values."""
    if size not in VAE_SIZES:
        raise ValueError(f"unknown VAE size {size!r}; choose one of {', '.join(VAE_SIZES)}")
    spec = VAE_SIZES[size]
    if latent_channels is not None:
        overrides["latent_channels"] = int(latent_channels)
    try:
        spec = dataclasses.replace(spec, **overrides)
    except TypeError as e:
        raise ValueError(f"bad VAE override: {e}; fields are {[f.name for f in dataclasses.fields(VAESpec)]}") from e
    if downsample is not None:
        spec = _with_downsample(spec, int(downsample))
    return KLAutoencoder(spec, in_channels=in_channels, image_size=image_size, size=size)


def vae_from_meta(meta: dict[str, Any]) -> KLAutoencoder:
    """Rebuild from checkpoint metadata (KLAutoencoder.meta()); weights not loaded."""
    if "spec" not in meta or "in_channels" not in meta:
        raise ValueError(f"checkpoint meta lacks 'spec'/'in_channels': not a VAE checkpoint? (keys: {sorted(meta)})")
    s = dict(meta["spec"])
    spec = VAESpec(base_channels=int(s["base_channels"]), channel_mults=tuple(int(m) for m in s["channel_mults"]),
                   num_res_blocks=int(s["num_res_blocks"]), latent_channels=int(s["latent_channels"]),
                   mid_attention=bool(s["mid_attention"]), dropout=float(s["dropout"]),
                   subpixel=bool(s.get("subpixel", False)),  # these two are absent from older checkpoints
                   decoder_res_blocks=int(s.get("decoder_res_blocks", -1)))
    return KLAutoencoder(spec, in_channels=int(meta["in_channels"]), image_size=int(meta.get("image_size", 64)),
                         size=str(meta.get("size", "custom")))


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
