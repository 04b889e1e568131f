"""Unconditional DDPM (ε-prediction UNet, models/unet.py + models/diffusion.py) on UNLABELLED images, Ray Train DDP.

Fast-AD's diffusion prior: it learns what wafer maps look like in general, never their classes. Its default data
are wafer maps from a different generator seed and a different class mix than the teacher's training set, written
with label −1, so the data-free student never depends on the teacher's data.

    L_simple = E_{x0, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²    (DDPM Eq. 14; GaussianDiffusion.training_loss)

AdamW, linear warm-up, gradient clipping, EMA of the weights (the EMA is what sampling and Fast-AD use).

    python -m apps.train ddpm --config configs/ddpm_wafer.yaml       # Ray Train (checkpoints, resume)
    fit_ddpm(unet, diffusion, x, steps=...)                           # in-process (benchmarks, tests)

Exported checkpoint (`<run>/model/`): state["ema"] (and "model"), meta {"kind": "ddpm", UNet meta, "num_timesteps",
"schedule", "encoding"}; `load_ddpm(path) -> (unet, diffusion, meta)`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from fabdistill.config import ConfigError, knob, section
from models.diffusion import SCHEDULES, GaussianDiffusion
from models.unet import UNET_SIZES, UNet, build_unet, unet_from_meta
from trainers.classifier import batch_to_tensors, random_dihedral, table_to_tensors
from trainers.launch import RunSection, TrainOutcome, TrainSession, launch, load_state, resolve_checkpoint, \
    save_state

# Teacher data default: uniform mix, seed 1. The prior sees another seed and a skewed, WM-811K-like mix
# (many "none" maps, fewer near-full ones), in WAFER_CLASSES order.
PRIOR_CLASS_WEIGHTS = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 3.0]


####################################################################################################################
# Pieces shared by the Ray loop and the in-process fit
####################################################################################################################


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # θ_ema ← decay·θ_ema + (1 − decay)·θ
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ddpm_step(model: nn.Module, ema: Optional[nn.Module], opt: torch.optim.Optimizer, diffusion: GaussianDiffusion,
              x0: Tensor, lr: float, ema_decay: float, grad_clip: float,
              generator: Optional[torch.Generator] = None) -> float:
    """One optimisation step of L_simple on a batch x0 (B, C, H, W) in [−1, 1]; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    loss = diffusion.training_loss(model, x0, generator=generator).mean()  # per-sample (B,) → scalar
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if ema is not None:
        ema_update(ema, getattr(model, "module", model), ema_decay)
    return float(loss.detach())


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(1, warmup_steps))


def fit_ddpm(unet: UNet, diffusion: GaussianDiffusion, x: Tensor, *, steps: int = 1000, batch_size: int = 64,
             lr: float = 1e-3, ema_decay: float = 0.995, warmup_steps: int = 100, grad_clip: float = 1.0,
             augment: bool = True, seed: int = 0, log_every: int = 0) -> UNet:
    """In-process DDPM training on tensors x (N, C, H, W) in [−1, 1]; returns the EMA network (eval mode)."""
    if x.shape[0] < batch_size:
        raise ValueError(f"{x.shape[0]} samples are fewer than batch_size {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    running = None
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = random_dihedral(x[idx], gen) if augment else x[idx]
        loss = ddpm_step(unet, ema, opt, diffusion, xb, warmup_lr(step, lr, warmup_steps), ema_decay, grad_clip, gen)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if log_every and (step + 1) % log_every == 0:
            print(f"[ddpm] step {step + 1}/{steps} loss={running:.4f}", flush=True)
    return ema


def ddpm_meta(unet: UNet, diffusion: GaussianDiffusion, encoding: str = "wafer_pm1") -> dict[str, Any]:
    return {"kind": "ddpm", **unet.meta(), "num_timesteps": diffusion.num_timesteps, "schedule": diffusion.schedule,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end, "encoding": encoding}


def save_ddpm(directory: str, ema: UNet, diffusion: GaussianDiffusion, encoding: str = "wafer_pm1",
              extra_meta: Optional[dict[str, Any]] = None) -> None:
    """A fabdistill checkpoint folder holding the EMA weights, readable by load_ddpm."""
    state = {"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}}
    save_state(directory, state, {**ddpm_meta(ema, diffusion, encoding), **(extra_meta or {})})


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


####################################################################################################################
# Config
####################################################################################################################


@dataclasses.dataclass
class DataSection:
    """Unlabelled images: generated wafer maps (labels dropped) or a Parquet dataset (labels ignored)."""

    uri: Optional[str] = knob(None, help="Parquet dataset (local or s3://); None generates unlabelled wafer maps")
    split: str = knob("train", help="rows of `uri` used when it has a split column (a CIFAR import)")
    n_train: int = knob(6000, ge=1, help="generated maps (when uri is None)")
    seed: int = knob(2, ge=0, help="generator seed; differs from the teacher's (1) on purpose")
    size: int = knob(32, ge=8, le=256)
    class_weights: list[float] = knob(PRIOR_CLASS_WEIGHTS,
                                      help="class mix of the generated maps (9 weights), unlike the teacher's")


@dataclasses.dataclass
class ModelSection:
    size: str = knob("tiny", choices=tuple(UNET_SIZES), help="UNet size (models/unet.py)")
    in_channels: int = knob(1, ge=1, le=4, help="1 for wafer maps, 3 for CIFAR")
    dropout: float = knob(0.0, ge=0, lt=1)


@dataclasses.dataclass
class DiffusionSection:
    num_timesteps: int = knob(1000, ge=2, le=10000)
    schedule: str = knob("linear", choices=SCHEDULES)


@dataclasses.dataclass
class OptimSection:
    steps: int = knob(3000, ge=1, help="optimisation steps")
    batch_size: int = knob(64, ge=1, help="per-worker batch size")
    lr: float = knob(1e-3, gt=0, le=1, help="AdamW learning rate after warm-up")
    warmup_steps: int = knob(100, ge=0)
    ema_decay: float = knob(0.995, ge=0, lt=1)
    grad_clip: float = knob(1.0, ge=0, help="max gradient norm (0: off)")
    augment: bool = knob(True, help="random flips / 90° rotations")
    log_every: int = knob(100, ge=1)
    checkpoint_every: int = knob(500, ge=1)
    sample_count: int = knob(16, ge=0, le=256, help="DDIM-50 samples written as samples.png at the end (0: none)")


@dataclasses.dataclass
class Config:
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    diffusion: DiffusionSection = section(DiffusionSection)
    optim: OptimSection = section(OptimSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        if len(self.data.class_weights) not in (0, 9):
            raise ConfigError(f"data.class_weights needs 9 weights, got {len(self.data.class_weights)}")


####################################################################################################################
# Ray Train loop
####################################################################################################################


def loop(config: dict) -> None:
    """Per-worker loop (trainers.launch.launch): DDP on the UNet, EMA on every rank, rank 0 checkpoints."""
    sess = TrainSession.current()
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    net = build_unet(config["size"], config["in_channels"], config["image_size"], dropout=config["dropout"])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    model = sess.prepare(net)
    net = getattr(model, "module", model)
    ema = ema.to(sess.device)
    diffusion = GaussianDiffusion(config["num_timesteps"], config["schedule"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    step = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(meta["step"])

    gen = torch.Generator().manual_seed(config["seed"] * 7919 + sess.rank + step)
    shard = sess.dataset("train")
    encoding = "wafer_pm1"
    running: Optional[float] = None
    epoch = 0
    while step < config["steps"]:
        batches = shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=4 * config["batch_size"],
                                     local_shuffle_seed=config["seed"] * 10_007 + epoch * 101 + sess.rank)
        epoch += 1
        for batch in batches:
            if step >= config["steps"]:
                break
            x, _, encoding = batch_to_tensors(batch)  # labels, if any, are ignored
            if config["augment"]:
                x = random_dihedral(x, gen)
            loss = ddpm_step(model, ema, opt, diffusion, x.to(sess.device),
                             warmup_lr(step, config["lr"], config["warmup_steps"]), config["ema_decay"],
                             config["grad_clip"], None)
            step += 1
            running = loss if running is None else 0.98 * running + 0.02 * loss
            last = step == config["steps"]
            if step % config["checkpoint_every"] == 0 or last:
                state = {"model": net.state_dict(), "ema": ema.state_dict(),
                         "optimizer": opt.state_dict()} if sess.is_main else {}
                sess.report({"loss": running, "epoch": epoch}, step=step, state=state,
                            meta=ddpm_meta(ema, diffusion, encoding))
            elif step % config["log_every"] == 0:
                sess.report({"loss": running, "epoch": epoch}, step=step)
    if sess.is_main and config["sample_count"] > 0:
        _write_samples(ema, diffusion, config["sample_count"], sess.run_dir, config["seed"], encoding)


def _write_samples(ema: UNet, diffusion: GaussianDiffusion, n: int, out_dir: str, seed: int, encoding: str) -> None:
    """A PNG grid of DDIM-50 samples (wafer maps drawn in their three levels) next to the checkpoints."""
    import io

    from PIL import Image

    from fabdistill import storage

    device = next(ema.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = diffusion.ddim_sample(ema, (n, ema.in_channels, ema.image_size, ema.image_size), steps=50, generator=gen,
                              device=device, clip_x0=1.0).cpu()
    img = ((x.clamp(-1, 1).round() if encoding == "wafer_pm1" else x.clamp(-1, 1)) + 1) * 127.5  # (N, C, H, W)
    img = img.to(torch.uint8)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    c, h, w = img.shape[1:]
    grid = torch.zeros(c, rows * (h + 2), cols * (w + 2), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = img[i]
    arr = grid.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if c == 1 else arr).resize((grid.shape[2] * 4, grid.shape[1] * 4),
                                                                   Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    storage.write_bytes(storage.join(out_dir, "samples.png"), buf.getvalue())


def unlabelled_wafer_table(n: int, seed: int, size: int, class_weights: Optional[list[float]]) -> Any:
    """Generated wafer maps with the labels removed (label −1): what a fab could share without its annotations."""
    from data.parquet_io import from_fixed_list
    from data.wafer import generate_wafer, wafer_table

    table = generate_wafer(n, seed=seed, size=size, class_weights=class_weights or None)
    maps = from_fixed_list(table["wafer_map"], (size, size))
    return wafer_table(maps, None, np.full(n, -1), table["lot_id"].to_pylist(), table["wafer_id"].to_pylist())


def train(cfg: Config) -> TrainOutcome:
    """Generate (or take) the unlabelled Parquet data and run `loop` on Ray Train; the final checkpoint is
    exported to `<storage_path>/<name>/model/` (load it with load_ddpm)."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from trainers.launch import run_dir

    d, m = cfg.data, cfg.model
    uri = d.uri
    if uri is not None:
        from trainers.classifier import _split_dataset

        uri, _ = _split_dataset(uri, d.split, "", storage.join(run_dir(cfg.run), "data"))
    else:
        if m.in_channels != 1:
            raise ConfigError("generated wafer maps have one channel: set model.in_channels=1 or give data.uri")
        uri = storage.join(run_dir(cfg.run), "data", "train")
        if not storage.exists(uri):
            write_dataset(unlabelled_wafer_table(d.n_train, d.seed, d.size, d.class_weights), uri, "wafer")
    loop_config = {
        "size": m.size, "in_channels": m.in_channels, "image_size": d.size, "dropout": m.dropout,
        "num_timesteps": cfg.diffusion.num_timesteps, "schedule": cfg.diffusion.schedule,
        **{k: getattr(cfg.optim, k) for k in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "grad_clip",
                                              "augment", "log_every", "checkpoint_every", "sample_count")},
        "seed": cfg.run.seed,
    }
    return launch(loop, loop_config, cfg.run, datasets={"train": uri}, full_config=cfg)


def tensors_from_uri(uri: str) -> Tensor:
    """All images of a Parquet dataset as (N, C, H, W) in [−1, 1] (labels ignored)."""
    from data.parquet_io import read_dataset

    x, _, _ = table_to_tensors(read_dataset(uri))
    return x
