"""DDPM inference: load an unconditional ε-prediction UNet checkpoint (trainers/ddpm.py) and sample from it.

    unet, diffusion, meta = load_ddpm("runs/ddpm_wafer")
    x = sample_images(unet, diffusion, n=64, steps=50, seed=0)             # (64, C, H, W) in [−1, 1]
    sample_to_files("runs/ddpm_wafer", "runs/ddpm_samples", SampleSettings(n=64))   # Parquet + samples.png

Samples are decoded with the checkpoint's encoding (data/encoding.py): wafer_pm1 → wafer maps {0, 1, 2} written
as a "wafer" dataset (label −1: the prior is unconditional), image_pm1 → uint8 images as an "image" dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob
from models.diffusion import GaussianDiffusion
from models.unet import UNet, unet_from_meta


def ddpm_meta(unet: UNet, diffusion: GaussianDiffusion, encoding: str = "wafer_pm1") -> dict[str, Any]:
    return {"kind": "ddpm", **unet.meta(), "num_timesteps": diffusion.num_timesteps, "schedule": diffusion.schedule,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end, "encoding": encoding}


def load_ddpm(path: str, map_location: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion, dict[str, Any]]:
    """(EMA UNet in eval mode, its GaussianDiffusion, meta) from a checkpoint folder or a run folder."""
    state, meta = load_state(resolve_checkpoint(path), map_location=map_location)
    if meta.get("kind") != "ddpm":
        raise ValueError(f"{path}: not a DDPM checkpoint (meta kind {meta.get('kind')!r})")
    unet = unet_from_meta(meta)
    unet.load_state_dict(state["ema"] if "ema" in state else state["model"])
    diffusion = GaussianDiffusion(int(meta["num_timesteps"]), str(meta["schedule"]),
                                  float(meta.get("beta_start", 1e-4)), float(meta.get("beta_end", 0.02)))
    return unet.to(map_location).eval().requires_grad_(False), diffusion, meta


@torch.no_grad()
def sample_images(unet: UNet, diffusion: GaussianDiffusion, n: int, steps: int = 50, seed: int = 0,
                  batch_size: int = 256) -> Tensor:
    """n DDIM samples (eta 0, x̂0 clipped to [−1, 1]) as (n, C, H, W) on the CPU, in the network range."""
    if n < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n, steps and batch_size must be >= 1, got {n}, {steps}, {batch_size}")
    device = next(unet.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        out.append(diffusion.ddim_sample(unet, (b, unet.in_channels, unet.image_size, unet.image_size),
                                         steps=steps, generator=gen, device=device, clip_x0=1.0).cpu())
    return torch.cat(out)


def to_uint8(x: Tensor, encoding: str) -> Tensor:
    """Network-range samples (N, C, H, W) → uint8 (N, C, H, W) for pictures: wafer maps drawn in their three levels
    (0, 127, 255), images as they are."""
    from data.encoding import decode_images, decode_wafer

    if encoding == "wafer_pm1":
        return (decode_wafer(x).unsqueeze(1).float() * 127.5).to(torch.uint8)  # 0, 127, 255
    return decode_images(x)


def grid_png(images: Tensor, zoom: int = 4) -> bytes:
    """uint8 (N, C, H, W) → PNG bytes of a near-square grid with 2-pixel gaps, enlarged `zoom` times."""
    import io

    from PIL import Image

    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = torch.zeros(c, rows * (h + 2), cols * (w + 2), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = images[i]
    arr = grid.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if c == 1 else arr).resize((grid.shape[2] * zoom, grid.shape[1] * zoom),
                                                                   Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def samples_table(x: Tensor, encoding: str, seed: int) -> tuple[Any, str]:
    """Network-range samples → (pyarrow Table, dataset kind) in the schema of the encoding's kind."""
    import pyarrow as pa

    from data.encoding import decode_images, decode_wafer
    from data.schema import to_fixed_list

    n = x.shape[0]
    ids = [f"ddpm-S{seed}-{i:06d}" for i in range(n)]
    if encoding == "wafer_pm1":
        from data.wafer import wafer_table

        return wafer_table(decode_wafer(x).numpy(), None, np.full(n, -1), ids, ids), "wafer"
    if encoding == "image_pm1":
        images = decode_images(x).numpy()
        c, h, w = images.shape[1:]
        table = pa.table({
            "image": to_fixed_list(images), "label": pa.array(np.full(n, 0), type=pa.int16()),
            "coarse_label": pa.array(np.full(n, -1), type=pa.int16()),
            "label_name": pa.array([""] * n), "split": pa.array(["generated"] * n), "filename": pa.array(ids),
            "channels": pa.array(np.full(n, c), type=pa.int32()), "height": pa.array(np.full(n, h), type=pa.int32()),
            "width": pa.array(np.full(n, w), type=pa.int32())})
        return table, "image"
    raise ValueError(f"cannot write samples of encoding {encoding!r} (wafer_pm1 or image_pm1)")


@dataclasses.dataclass
class SampleSettings:
    """`python -m apps.sample ddpm` settings."""

    n: int = knob(64, ge=1, le=1_000_000, help="samples to generate")
    steps: int = knob(50, ge=1, le=10_000, help="DDIM steps")
    seed: int = knob(0, ge=0, help="sampling seed")
    batch_size: int = knob(256, ge=1, le=65_536)
    grid: int = knob(64, ge=0, le=1024, help="samples drawn in samples.png (0: no picture)")


def sample_to_files(checkpoint: str, out_dir: str, settings: Optional[SampleSettings] = None) -> str:
    """Sample a DDPM checkpoint into `out_dir`: samples/ (Parquet of the encoding's kind) and samples.png."""
    from data.parquet_io import write_dataset
    from fabdistill import storage

    settings = settings or SampleSettings()
    unet, diffusion, meta = load_ddpm(checkpoint)
    x = sample_images(unet, diffusion, settings.n, settings.steps, settings.seed, settings.batch_size)
    encoding = meta.get("encoding", "wafer_pm1")
    table, kind = samples_table(x, encoding, settings.seed)
    data_uri = storage.join(out_dir, "samples")
    write_dataset(table, data_uri, kind)
    message = f"wrote {settings.n} {kind} samples (DDIM-{settings.steps}, seed {settings.seed}) to {data_uri}"
    if settings.grid:
        png = storage.join(out_dir, "samples.png")
        storage.write_bytes(png, grid_png(to_uint8(x[:settings.grid], encoding)))
        message += f" and {png}"
    return message
