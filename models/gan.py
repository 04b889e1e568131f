"""KDCDDM networks besides the VAE: the one-step student generator, its PatchGAN discriminator, and the conditional
denoiser that ICDDM and the CDLDM teacher train.

Networks only; the losses live in trainers/kdcddm/losses.py.

Student generator (`LatentGenerator`): defect latent (N, L, h, w) → clean latent (N, L, h, w) in one forward pass,
replacing the teacher's multi-step reverse diffusion. A small residual UNet without timestep input: conv_in →
encoder levels of residual blocks with stride-2 downsampling → middle (res, [attn], res) → decoder with skip
connections → GN, SiLU, 3×3 conv. It predicts a residual, G(z) = z + Δ(z), with Δ's output conv zero-initialised,
so a fresh student is the identity map: most of a defect latent is already its clean twin's.

Discriminator (`PatchDiscriminator`): the authors' D sees latents only, D(G(z)) against D(teacher(z)) (METHOD_NOTES;
teacher outputs are "real"), so it works on (N, L, h, w) latents. PatchGAN-style (pix2pix): 3×3 conv → LeakyReLU(0.2),
`n_down` × (4×4 stride-2 conv → GN → LeakyReLU), 3×3 conv → GN → LeakyReLU, 3×3 conv → 1 logit per patch.
3×3 convs instead of pix2pix's final 4×4 ones keep the grid on 8×8 latents. GroupNorm instead of BatchNorm: batch
statistics of all-real and all-fake batches differ and leak the label. `cond_channels > 0` makes it conditional
(pix2pix concatenates the input, here the defect latent); 0 is the authors' unconditional choice.

Conditional denoiser (`ConditionalUNet`): models/unet.py's ε-prediction UNet with the condition image concatenated
as extra input channels; forward(x_t, t, cond) → ε̂ for x_t's channels (the UNet returns as many channels as it
takes; the condition's are dropped; they start at zero from its zero-initialised output conv).

Named sizes (parameter counts at 4 latent channels, 16×16 latents; authors' config: 128 channels for G and D):

    generator      base  mults  res blocks  mid attn  params
    tiny           16    1, 2   1           no        0.14 M
    small          64    1, 2   1           yes       2.3 M
    base           128   1, 2   1           yes       9.2 M

    discriminator  base  n_down  params   output for a 16×16 latent
    tiny           16    1       0.02 M   (N, 1, 8, 8)
    small          64    2       1.3 M    (N, 1, 4, 4)
    base           128   2       5.0 M    (N, 1, 4, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.unet import AttnBlock, Downsample, UNet, Upsample, build_unet, unet_from_meta
from models.vae import ResBlock, count_params, group_norm  # noqa: F401  (count_params re-exported)

__all__ = ["GeneratorSpec", "GENERATOR_SIZES", "LatentGenerator", "build_generator", "generator_from_meta",
           "DiscriminatorSpec", "DISCRIMINATOR_SIZES", "PatchDiscriminator", "build_discriminator",
           "discriminator_from_meta", "ConditionalUNet", "build_conditional_unet", "conditional_unet_from_meta"]


####################################################################################################################
# One-step student generator
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2)  # latent side must be divisible by 2^(len − 1)
    num_res_blocks: int = 1  # per encoder level (the decoder has one more)
    mid_attention: bool = True
    dropout: float = 0.0


GENERATOR_SIZES: dict[str, GeneratorSpec] = {
    "tiny": GeneratorSpec(16, (1, 2), 1, mid_attention=False),
    "small": GeneratorSpec(64, (1, 2), 1),
    "base": GeneratorSpec(128, (1, 2), 1),
}


class LatentGenerator(nn.Module):
    """G: defect latent (N, L, h, w) → clean latent (N, L, h, w), G(z) = z + Δ(z), Δ zero at initialisation."""

    def __init__(self, spec: GeneratorSpec = GeneratorSpec(), latent_channels: int = 4, latent_size: int = 16,
                 size: str = "custom"):
        super().__init__()
        levels = len(spec.channel_mults)
        if latent_channels < 1 or levels < 1:
            raise ValueError(f"latent_channels and channel_mults must be non-empty, got {latent_channels}, "
                             f"{spec.channel_mults}")
        if latent_size % (2 ** (levels - 1)):
            raise ValueError(f"latent_size {latent_size} must be divisible by 2^{levels - 1} for {levels} levels")
        self.spec, self.size = spec, size
        self.latent_channels, self.latent_size = latent_channels, latent_size
        base = spec.base_channels
        self.conv_in = nn.Conv2d(latent_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for level, mult in enumerate(spec.channel_mults):
            for _ in range(spec.num_res_blocks):
                self.down.append(ResBlock(ch, base * mult, spec.dropout))
                ch = base * mult
                skips.append(ch)
            if level != levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.Sequential(ResBlock(ch, ch, spec.dropout),
                                 AttnBlock(ch) if spec.mid_attention else nn.Identity(),
                                 ResBlock(ch, ch, spec.dropout))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.channel_mults))):
            for i in range(spec.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), base * mult, spec.dropout)]
                ch = base * mult
                if level != 0 and i == spec.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(nn.Sequential(*layers))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # G starts as the identity map
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: Tensor) -> Tensor:
        f = 2 ** (len(self.spec.channel_mults) - 1)
        if z.ndim != 4 or z.shape[1] != self.latent_channels or z.shape[2] % f or z.shape[3] % f:
            raise ValueError(f"LatentGenerator: expected z (N, {self.latent_channels}, h, w) with h, w divisible by "
                             f"{f}, got {tuple(z.shape)}")
        h = self.conv_in(z)  # (N, base, h, w)
        hs = [h]
        for layer in self.down:
            h = layer(h)  # (N, C_l, h_l, w_l)
            hs.append(h)
        h = self.mid(h)  # (N, C_max, h_min, w_min)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1))  # (N, C_l, h_l, w_l)
        return z + self.conv_out(F.silu(self.norm_out(h)))  # (N, L, h, w)

    def meta(self) -> dict[str, Any]:
        return {"size": self.size, "latent_channels": self.latent_channels, "latent_size": self.latent_size,
                "spec": dataclasses.asdict(self.spec)}


def build_generator(size: str = "small", latent_channels: int = 4, latent_size: int = 16,
                    **overrides: Any) -> LatentGenerator:
    """A student generator of a named size from GENERATOR_SIZES; keyword overrides replace GeneratorSpec fields."""
    if size not in GENERATOR_SIZES:
        raise ValueError(f"unknown generator size {size!r}; choose one of {', '.join(GENERATOR_SIZES)}")
    spec = dataclasses.replace(GENERATOR_SIZES[size], **overrides) if overrides else GENERATOR_SIZES[size]
    return LatentGenerator(spec, latent_channels, latent_size, size=size)


def generator_from_meta(meta: dict[str, Any]) -> LatentGenerator:
    """Rebuild from LatentGenerator.meta(); weights not loaded."""
    if "spec" not in meta or "latent_channels" not in meta:
        raise ValueError(f"checkpoint meta lacks 'spec'/'latent_channels': not a generator? (keys: {sorted(meta)})")
    s = dict(meta["spec"])
    spec = GeneratorSpec(int(s["base_channels"]), tuple(int(m) for m in s["channel_mults"]),
                         int(s["num_res_blocks"]), bool(s["mid_attention"]), float(s["dropout"]))
    return LatentGenerator(spec, int(meta["latent_channels"]), int(meta["latent_size"]),
                           size=str(meta.get("size", "custom")))


####################################################################################################################
# PatchGAN discriminator
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class DiscriminatorSpec:
    base_channels: int = 64
    n_down: int = 2  # stride-2 convs: one logit per 2^n_down × 2^n_down latent patch (receptive field larger)
    max_mult: int = 8  # width cap, base · 2^i ≤ base · max_mult


DISCRIMINATOR_SIZES: dict[str, DiscriminatorSpec] = {
    "tiny": DiscriminatorSpec(16, 1),
    "small": DiscriminatorSpec(64, 2),
    "base": DiscriminatorSpec(128, 2),
}


class PatchDiscriminator(nn.Module):
    """D: latent (N, L, h, w) [+ condition (N, L_c, h, w)] → patch logits (N, 1, h / 2^n_down, w / 2^n_down)."""

    def __init__(self, spec: DiscriminatorSpec = DiscriminatorSpec(), in_channels: int = 4, cond_channels: int = 0,
                 size: str = "custom"):
        super().__init__()
        if in_channels < 1 or cond_channels < 0 or spec.n_down < 0:
            raise ValueError(f"need in_channels >= 1, cond_channels >= 0, n_down >= 0; got {in_channels}, "
                             f"{cond_channels}, {spec.n_down}")
        self.spec, self.size = spec, size
        self.in_channels, self.cond_channels = in_channels, cond_channels
        base = spec.base_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels + cond_channels, base, 3, padding=1), nn.LeakyReLU(0.2)]
        ch = base
        for i in range(spec.n_down):
            out = base * min(2 ** (i + 1), spec.max_mult)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        layers += [nn.Conv2d(ch, ch, 3, padding=1), group_norm(ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        f = 2 ** self.spec.n_down
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"PatchDiscriminator: expected x (N, {self.in_channels}, h, w) with h, w divisible by "
                             f"{f}, got {tuple(x.shape)}")
        if self.cond_channels:
            if cond is None or cond.shape != (x.shape[0], self.cond_channels, *x.shape[2:]):
                raise ValueError(f"PatchDiscriminator: expected cond of shape "
                                 f"{(x.shape[0], self.cond_channels, *x.shape[2:])}, "
                                 f"got {None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond], dim=1)  # (N, L + L_c, h, w)
        elif cond is not None:
            raise ValueError("PatchDiscriminator: built unconditional (cond_channels=0) but got a cond")
        return self.net(x)  # (N, 1, h/f, w/f)

    def meta(self) -> dict[str, Any]:
        return {"size": self.size, "in_channels": self.in_channels, "cond_channels": self.cond_channels,
                "spec": dataclasses.asdict(self.spec)}


def build_discriminator(size: str = "small", in_channels: int = 4, cond_channels: int = 0,
                        **overrides: Any) -> PatchDiscriminator:
    """A PatchGAN discriminator of a named size from DISCRIMINATOR_SIZES."""
    if size not in DISCRIMINATOR_SIZES:
        raise ValueError(f"unknown discriminator size {size!r}; choose one of {', '.join(DISCRIMINATOR_SIZES)}")
    spec = dataclasses.replace(DISCRIMINATOR_SIZES[size], **overrides) if overrides else DISCRIMINATOR_SIZES[size]
    return PatchDiscriminator(spec, in_channels, cond_channels, size=size)


def discriminator_from_meta(meta: dict[str, Any]) -> PatchDiscriminator:
    """Rebuild from PatchDiscriminator.meta(); weights not loaded."""
    if "spec" not in meta or "in_channels" not in meta:
        raise ValueError(f"checkpoint meta lacks 'spec'/'in_channels': not a discriminator? (keys: {sorted(meta)})")
    s = dict(meta["spec"])
    spec = DiscriminatorSpec(int(s["base_channels"]), int(s["n_down"]), int(s["max_mult"]))
    return PatchDiscriminator(spec, int(meta["in_channels"]), int(meta.get("cond_channels", 0)),
                              size=str(meta.get("size", "custom")))


####################################################################################################################
# Conditional denoiser (ICDDM in pixels, CDLDM in latents)
####################################################################################################################


class ConditionalUNet(nn.Module):
    """ε_θ(x_t, t, y): x_t (N, C, H, W), t (N,) long, cond y (N, C_y, H, W) or None → ε̂ (N, C, H, W).

    cond_channels = 0 is the unconditional denoiser (ICDDM-unpaired's clean-domain prior, or one of CDLDM's
    per-domain denoisers), so every variant has one call signature.
    """

    def __init__(self, unet: UNet, channels: int, cond_channels: int):
        super().__init__()
        if channels < 1 or cond_channels < 0 or unet.in_channels != channels + cond_channels:
            raise ValueError(f"the UNet must take channels + cond_channels = {channels} + {cond_channels} inputs, "
                             f"it takes {unet.in_channels}")
        self.unet, self.channels, self.cond_channels = unet, channels, cond_channels

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.channels:
            raise ValueError(f"ConditionalUNet: expected x_t (N, {self.channels}, H, W), got {tuple(x_t.shape)}")
        if self.cond_channels:
            want = (x_t.shape[0], self.cond_channels, *x_t.shape[2:])
            if cond is None or tuple(cond.shape) != want:
                raise ValueError(f"ConditionalUNet: expected cond of shape {want}, "
                                 f"got {None if cond is None else tuple(cond.shape)}")
            x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (N, C + C_y, H, W)
        elif cond is not None:
            raise ValueError("ConditionalUNet: built unconditional (cond_channels=0) but got a cond")
        return self.unet(x_t, t)[:, : self.channels]  # (N, C, H, W)

    def meta(self) -> dict[str, Any]:
        return {"channels": self.channels, "cond_channels": self.cond_channels, "unet": self.unet.meta()}


def build_conditional_unet(size: str = "small", channels: int = 1, cond_channels: int = 1, image_size: int = 32,
                           **overrides: Any) -> ConditionalUNet:
    """ConditionalUNet around build_unet(size) with channels + cond_channels inputs."""
    unet = build_unet(size, in_channels=channels + cond_channels, image_size=image_size, **overrides)
    return ConditionalUNet(unet, channels, cond_channels)


def conditional_unet_from_meta(meta: dict[str, Any]) -> ConditionalUNet:
    """Rebuild from ConditionalUNet.meta(); weights not loaded."""
    if "unet" not in meta or "channels" not in meta:
        raise ValueError(f"checkpoint meta lacks 'unet'/'channels': not a conditional UNet? (keys: {sorted(meta)})")
    return ConditionalUNet(unet_from_meta(meta["unet"]), int(meta["channels"]), int(meta.get("cond_channels", 0)))
