"""A small DDPM UNet predicting ε for (N, C, H, W) images (Ho et al. 2020, Appendix B, scaled down).

Networks only: `forward(x_t, t) -> ε̂`; the noise schedule, losses and samplers live in models/diffusion.py.

Structure: sinusoidal timestep embedding → MLP; an encoder of residual blocks (GroupNorm, SiLU, 3×3 convs, the
timestep embedding added between the convs) with stride-2 downsampling; optional self-attention at the listed
resolutions; a middle block (res, attn, res); a decoder mirroring the encoder with skip connections; a zero-initialised
output conv so that a fresh model predicts ε̂ = 0.

Named sizes (UNET_SIZES; parameter counts at 1 input channel, 32×32):

    name   base  mults      res blocks  attention at  params
    tiny   16    1, 2       1           —             0.16 M
    small  32    1, 2, 2    1           8             1.1 M
    base   64    1, 2, 2, 2 2           16            8.9 M
    ddpm   128   1, 2, 2, 2 2           16            35.7 M   (DDPM's CIFAR-10 model, dropout 0.1)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetSpec", "UNET_SIZES", "UNet", "build_unet", "unet_from_meta", "timestep_embedding"]


####################################################################################################################
# Embeddings and blocks
####################################################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer positional encoding): (N,) → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(ch: int) -> int:
    # 32 groups as in DDPM for wide layers; at least 4 channels per group for the narrow ones.
    return max(1, math.gcd(ch, min(32, max(1, ch // 4))))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(ch), ch)


class ResBlock(nn.Module):
    """GN → SiLU → conv, + timestep embedding, GN → SiLU → dropout → conv (zero init), + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # (N, out, H, W) + (N, out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, out, H, W)
        return self.skip(x) + h  # (N, out, H, W)


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, residual, output projection zero-initialised."""

    def __init__(self, ch: int, num_heads: int = 1):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention channels {ch} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)  # (N, 3, h, d, L)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (N, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, d)
        out = out.transpose(-1, -2).reshape(n, c, h, w)  # (N, C, H, W)
        return x + self.proj(out)  # (N, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


####################################################################################################################
# UNet
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    base_channels: int = 32  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 1  # residual blocks per level (encoder; the decoder has one more)
    attn_resolutions: tuple[int, ...] = (8,)  # spatial sizes that get self-attention
    dropout: float = 0.0
    num_heads: int = 1


UNET_SIZES: dict[str, UNetSpec] = {
    "tiny": UNetSpec(16, (1, 2), 1, ()),
    "small": UNetSpec(32, (1, 2, 2), 1, (8,)),
    "base": UNetSpec(64, (1, 2, 2, 2), 2, (16,)),
    "ddpm": UNetSpec(128, (1, 2, 2, 2), 2, (16,), dropout=0.1),
}


class UNet(nn.Module):
    """ε-prediction UNet: forward(x_t (N, C, H, W), t (N,) long) → ε̂ (N, C, H, W).

    H and W must be divisible by 2^(len(channel_mults) − 1).
    """

    def __init__(self, spec: UNetSpec = UNetSpec(), in_channels: int = 1, image_size: int = 32, size: str = "custom"):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        levels = len(spec.channel_mults)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{levels - 1} for {levels} levels")
        self.spec = spec
        self.size = size
        self.in_channels = in_channels
        self.image_size = image_size
        base = spec.base_channels
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
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
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.spec.base_channels))  # (N, 4·base)
        h = self.conv_in(x)  # (N, base, H, W)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)  # (N, C_l, H_l, W_l)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)  # (N, C_max, H_min, W_min)
        for block in self.up:
            h = torch.cat([h, hs.pop()], dim=1)  # (N, C + C_skip, H_l, W_l)
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_in, H, W)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network (see unet_from_meta)."""
        return {"size": self.size, "in_channels": self.in_channels, "image_size": self.image_size,
                "spec": dataclasses.asdict(self.spec)}


def build_unet(size: str = "small", in_channels: int = 1, image_size: int = 32, **overrides: Any) -> UNet:
    """A UNet of a named size from UNET_SIZES; keyword overrides replace fields of the spec (e.g. dropout=0.1)."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown UNet size {size!r}; choose one of {', '.join(UNET_SIZES)}")
    spec = dataclasses.replace(UNET_SIZES[size], **overrides) if overrides else UNET_SIZES[size]
    return UNet(spec, in_channels=in_channels, image_size=image_size, size=size)


def unet_from_meta(meta: dict[str, Any]) -> UNet:
    """Rebuild from checkpoint metadata (UNet.meta()); weights not loaded."""
    if "spec" not in meta or "in_channels" not in meta:
        raise ValueError(f"checkpoint meta lacks 'spec'/'in_channels': not a UNet checkpoint? (keys: {sorted(meta)})")
    s = dict(meta["spec"])
    spec = UNetSpec(base_channels=int(s["base_channels"]), channel_mults=tuple(s["channel_mults"]),
                    num_res_blocks=int(s["num_res_blocks"]), attn_resolutions=tuple(s["attn_resolutions"]),
                    dropout=float(s["dropout"]), num_heads=int(s["num_heads"]))
    return UNet(spec, in_channels=int(meta["in_channels"]), image_size=int(meta.get("image_size", 32)),
                size=str(meta.get("size", "custom")))
