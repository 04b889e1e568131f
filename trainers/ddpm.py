"""Unconditional DDPM (ε-prediction UNet, models/unet.py + models/diffusion.py) on UNLABELLED images, Ray Train DDP.

Write-up: an unconditional ε-prediction DDPM on unlabelled wafer maps (or images), Fast-AD's diffusion prior.

It learns what wafer maps look like in general, never their classes. Its default data are wafer maps from a
different generator seed and a different class mix than the teacher's training set, written with label −1, so the
data-free student never depends on the teacher's data.

    L_simple = E_{x0, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²    (DDPM Eq. 14; GaussianDiffusion.training_loss)

AdamW, linear warm-up then a constant (or cosine) rate (trainers/common.py lr_at), gradient clipping, EMA of
parameters and buffers (trainers/common.py ema_update; the EMA is what sampling and Fast-AD use).

    python -m apps.train ddpm --config configs/ddpm_wafer.yaml                  # Ray Train (checkpoints, resume)
    python -m apps.train ddpm --config ... --set run.num_workers=0               # the same loop in-process
    python -m apps.sample ddpm --checkpoint runs/ddpm_wafer --n 64 --out runs/ddpm_samples

Exported checkpoint (`<run>/model/`): state["ema"] (and "model"), meta {"kind": "ddpm", UNet meta, "num_timesteps",
"schedule", "encoding"}; `load_ddpm(path) -> (unet, diffusion, meta)` (fabdistill/inference/ddpm.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from data.schema import NUM_WAFER_CLASSES
from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.ddpm import (SampleSettings, ddpm_meta, grid_png, load_ddpm,  # noqa: F401
                                       sample_images, sample_to_files, to_uint8)
from fabdistill.methods import Method, TrainOutcome
from models.diffusion import SCHEDULES, GaussianDiffusion
from models.unet import UNET_SIZES, UNet, build_unet
from trainers.classifier import random_dihedral, split_dataset
from trainers.common import SCHEDULES as LR_SCHEDULES
from trainers.common import Cadence, RunningMeans, derive_seed, ema_update, generator, infinite_batches, lr_at, \
    set_lr
from trainers.launch import RunSection, TrainSession, launch, save_state

# Teacher data default: uniform mix, seed 1. The prior sees another seed and a skewed, WM-811K-like mix
# (many "none" maps, fewer near-full ones), in WAFER_CLASSES order.
PRIOR_CLASS_WEIGHTS = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 3.0]
assert len(PRIOR_CLASS_WEIGHTS) == NUM_WAFER_CLASSES


####################################################################################################################
# One step, checkpoints
####################################################################################################################


def ddpm_step(model: nn.Module, ema: Optional[nn.Module], opt: torch.optim.Optimizer, diffusion: GaussianDiffusion,
              x0: Tensor, ema_decay: float, grad_clip: float, gen: Optional[torch.Generator] = None,
              step: Optional[int] = None, amp: Optional[contextlib.AbstractContextManager] = None) -> float:
    """One optimisation step of L_simple on a batch x0 (B, C, H, W) in [−1, 1] at the optimiser's current lr;
    t and ε are drawn with `gen`; `step` (1-based) drives the EMA's warm-up; `amp` is the context of the forward
    pass and loss (`TrainSession.autocast()`; None: float32). Returns the loss."""
    model.train()
    with amp if amp is not None else contextlib.nullcontext():
        loss = diffusion.training_loss(model, x0, generator=gen).mean()  # per-sample (B,) → scalar
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if ema is not None:
        ema_update(ema, model, ema_decay, step)
    return float(loss.detach())


def save_ddpm(directory: str, ema: UNet, diffusion: GaussianDiffusion, encoding: str = "wafer_pm1",
              extra_meta: Optional[dict[str, Any]] = None) -> None:
    """A fabdistill checkpoint folder holding the EMA weights, readable by load_ddpm."""
    state = {"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}}
    save_state(directory, state, {**ddpm_meta(ema, diffusion, encoding), **(extra_meta or {})})


def _write_samples(ema: UNet, diffusion: GaussianDiffusion, n: int, out_dir: str, seed: int, encoding: str) -> None:
    """A PNG grid (`out_dir/samples.png`) of n DDIM-50 samples, wafer maps drawn in their three levels."""
    from fabdistill import storage

    x = sample_images(ema, diffusion, n, steps=50, seed=seed)
    storage.write_bytes(storage.join(out_dir, "samples.png"), grid_png(to_uint8(x, encoding)))


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
    class_weights: list[float] = knob(PRIOR_CLASS_WEIGHTS, help=f"class mix of the generated maps "
                                      f"({NUM_WAFER_CLASSES} weights), unlike the teacher's")


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
    lr_schedule: str = knob("constant", choices=LR_SCHEDULES, help="after warm-up (trainers/common.py lr_at)")
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
        if len(self.data.class_weights) not in (0, NUM_WAFER_CLASSES):
            raise ConfigError(f"data.class_weights needs {NUM_WAFER_CLASSES} weights, "
                              f"got {len(self.data.class_weights)}")


####################################################################################################################
# The training loop (Ray Train workers, or in-process with run.num_workers=0)
####################################################################################################################


def loop(config: dict) -> None:
    """Per-worker loop (trainers.launch.launch): DDP on the UNet, EMA on every rank, rank 0 checkpoints."""
    from data.encoding import encode_tensors

    sess = TrainSession.current()
    seed = config["seed"]
    torch.manual_seed(derive_seed(seed, "init"))  # identical initial weights on every rank
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

    kind = config["kind"]
    x_all = encode_tensors(sess.load_shard("train", kind), kind)  # labels, if any, are ignored
    # Streams derived from (seed, rank, the step this attempt starts at): a resumed run draws fresh, reproducible
    # batches and noise rather than replaying the first steps' ones.
    batch_gen = generator(seed, "batches", sess.rank, step)
    noise_gen = generator(seed, "noise", sess.rank, step)
    batches = infinite_batches({"x": x_all}, config["batch_size"], batch_gen)
    cadence = Cadence(config["log_every"], config["checkpoint_every"], config["steps"])
    means = RunningMeans()

    def training_state() -> dict:
        return {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}

    meta = ddpm_meta(ema, diffusion, config["encoding"])
    while step < config["steps"]:
        x = next(batches)["x"]
        if config["augment"]:
            x = random_dihedral(x, batch_gen)
        step += 1
        set_lr(opt, lr_at(step, config["steps"], config["lr"], warmup_steps=config["warmup_steps"],
                          schedule=config["lr_schedule"]))
        means.add({"loss": ddpm_step(model, ema, opt, diffusion, sess.to_device(x), config["ema_decay"],
                                     config["grad_clip"], noise_gen, step, sess.autocast())})
        if cadence.report(step):
            (loss,) = sess.all_reduce_mean([means.pop()["loss"]])
            sess.report({"loss": loss, "lr": opt.param_groups[0]["lr"]}, step=step,
                        state=training_state if cadence.checkpoint(step) else None, meta=meta)
    if sess.is_main and config["sample_count"] > 0:
        _write_samples(ema, diffusion, config["sample_count"], sess.run_dir, seed, config["encoding"])


def unlabelled_wafer_table(n: int, seed: int, size: int, class_weights: Optional[list[float]]) -> Any:
    """Generated wafer maps with the labels removed (label −1): what a fab could share without its annotations."""
    from data.schema import from_fixed_list
    from data.wafer import generate_wafer, wafer_table

    table = generate_wafer(n, seed=seed, size=size, class_weights=class_weights or None)
    maps = from_fixed_list(table["wafer_map"], (size, size))
    return wafer_table(maps, None, np.full(n, -1), table["lot_id"].to_pylist(), table["wafer_id"].to_pylist())


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Generate (or take) the unlabelled Parquet data and run `loop` through trainers.launch (Ray Train workers,
    or in-process with run.num_workers=0); the final checkpoint is exported to `<storage_path>/<name>/model/`."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from trainers.classifier import dataset_kind, dataset_schema
    from trainers.launch import run_dir

    d, m = cfg.data, cfg.model
    uri = d.uri
    if uri is not None:
        uri, _ = split_dataset(uri, d.split, "", storage.join(run_dir(cfg.run), "data"))
        kind = dataset_kind(dataset_schema(uri))
    else:
        if m.in_channels != 1:
            raise ConfigError("generated wafer maps have one channel: set model.in_channels=1 or give data.uri")
        uri = storage.join(run_dir(cfg.run), "data", "train")
        if not storage.exists(uri):
            write_dataset(unlabelled_wafer_table(d.n_train, d.seed, d.size, d.class_weights), uri, "wafer")
        kind = "wafer"
    loop_config = {
        "size": m.size, "in_channels": m.in_channels, "image_size": d.size, "dropout": m.dropout,
        "num_timesteps": cfg.diffusion.num_timesteps, "schedule": cfg.diffusion.schedule,
        **{k: getattr(cfg.optim, k) for k in ("steps", "batch_size", "lr", "lr_schedule", "warmup_steps",
                                              "ema_decay", "grad_clip", "augment", "log_every", "checkpoint_every",
                                              "sample_count")},
        "seed": cfg.run.seed, "kind": kind, "encoding": "wafer_pm1" if kind == "wafer" else "image_pm1",
    }
    return launch(loop, loop_config, cfg.run, datasets={"train": uri}, full_config=cfg, extra_callbacks=callbacks)


METHOD = Method(
    name="ddpm",
    summary="unconditional DDPM on unlabelled wafer maps (Fast-AD's diffusion prior)",
    Config=Config,
    train=train,
    load="fabdistill.inference.ddpm:load_ddpm",
    sample="fabdistill.inference.ddpm:sample_to_files", SampleSettings=SampleSettings,
    default_config="configs/ddpm_wafer.yaml",
)
