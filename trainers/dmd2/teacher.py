"""Phase 1: the class-conditional EDM teacher (Karras et al. 2022) on wafer maps or SEM images.

D(x; σ, y) = c_skip·x + c_out·F(c_in·x, ¼ ln σ, y) (models/edm_unet.EDMDenoiser over the core's EDMPrecond),
trained with λ(σ)·‖D(y + σn; σ) − y‖², ln σ ~ N(P_mean, P_std²) (trainers/dmd2/losses.edm_denoising_loss),
σ_data measured from the training set on the driver (:func:`prepare_training_data`) and passed to every worker.
AdamW with warm-up, gradient clipping, EMA (trainers/common.ema_update): the EMA weights are the teacher that
is sampled and distilled.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from fabdistill.inference.dmd2 import CLASS_NAMES, LABEL_KEYS, domain_encoding
from models.edm import edm_sample_sigma
from models.edm_unet import EDMDenoiser, build_edm_denoiser
from trainers.common import Cadence, RunningMeans, ema_update, generator, infinite_batches, lr_at, set_lr
from trainers.dmd2.losses import edm_denoising_loss
from trainers.launch import TrainSession

__all__ = ["prepare_training_data", "measure_sigma_data", "net_args", "build_teacher", "encoded_shard",
           "teacher_config", "teacher_loop", "teacher_meta"]


# --------------------------------------------------------------------------- data (driver side)

def measure_sigma_data(table: Any, domain: str) -> float:
    """σ_data: the standard deviation of the encoded training samples over every pixel (EDM's σ_d)."""
    from data.datasets import table_to_tensors

    enc = domain_encoding(domain)
    x = enc.encode(table_to_tensors(table, enc.kind)[enc.key])  # (N, 1, H, W) in the network's range
    return float(max(x.std().item(), 1e-3))


def prepare_training_data(cfg: Any) -> tuple[str, float]:
    """The training set's URI (generated into the run storage when data.train_uri is empty) and its σ_data."""
    from data.parquet_io import read_dataset, write_dataset
    from fabdistill import storage
    from trainers.launch import run_dir

    d = cfg.data
    uri = d.train_uri
    if not uri:
        uri = storage.join(run_dir(cfg.run), "data", f"{d.domain}_train")
        if not storage.exists(uri):
            print(f"[dmd2] generating {d.num_train} synthetic {d.domain} samples ({d.image_size}²) -> {uri}",
                  flush=True)
            if d.domain == "wafer":
                from data.wafer import generate_wafer

                table = generate_wafer(d.num_train, seed=d.seed, size=d.image_size)
            else:
                from data.sem import generate_sem

                table = generate_sem(d.num_train, seed=d.seed, size=d.image_size)
            write_dataset(table, uri, d.domain)
    table = read_dataset(uri)
    size = int(table.column("height")[0].as_py())
    if size != d.image_size:
        raise ValueError(f"{uri}: samples are {size}×{size} but data.image_size is {d.image_size}")
    return uri, measure_sigma_data(table, d.domain)


# --------------------------------------------------------------------------- networks

def net_args(cfg: Any, sigma_data: float) -> dict:
    """Everything build_teacher needs, as plain values for the worker config."""
    return {"size": cfg.model.size, "in_channels": 1, "image_size": cfg.data.image_size,
            "num_classes": len(CLASS_NAMES[cfg.data.domain]), "sigma_data": sigma_data,
            "label_dropout": cfg.model.label_dropout, "dropout": cfg.model.dropout}


def build_teacher(args: dict) -> EDMDenoiser:
    return build_edm_denoiser(args["size"], args["in_channels"], args["image_size"], args["num_classes"],
                              args["sigma_data"], label_dropout=args["label_dropout"], dropout=args["dropout"])


def encoded_shard(sess: TrainSession, domain: str) -> dict[str, torch.Tensor]:
    """This worker's shard in memory: {"x": (N, 1, H, W) network range, "y": (N,) int64 class}."""
    from data.datasets import keep_labelled

    enc = domain_encoding(domain)
    data = keep_labelled(sess.load_shard("train", enc.kind), LABEL_KEYS[domain])
    return {"x": enc.encode(data[enc.key]), "y": data[LABEL_KEYS[domain]]}


def teacher_meta(config: dict, net: EDMDenoiser) -> dict:
    return {"method": "dmd2", "role": "teacher", "net": net.meta(), "domain": config["domain"],
            "class_names": list(CLASS_NAMES[config["domain"]]), "sigma_data": net.sigma_data,
            "p_mean": config["teacher"]["p_mean"], "p_std": config["teacher"]["p_std"]}


# --------------------------------------------------------------------------- the per-worker loop

def teacher_loop(config: dict) -> None:
    sess = TrainSession.current()
    tc = config["teacher"]
    torch.manual_seed(sess.run.seed)  # identical init on every worker (DDP broadcasts too)
    raw = build_teacher(config["net"])
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    opt = torch.optim.AdamW(raw.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        raw.load_state_dict(state["teacher_raw"])
        ema.load_state_dict(state["teacher"])
        opt.load_state_dict(state["opt"])
        start = meta["step"]
    model = sess.prepare(raw)
    ema.to(sess.device)
    data = encoded_shard(sess, config["domain"])
    gen = generator(sess.run.seed, "dmd2", "teacher", sess.rank, start)  # a resumed run draws anew
    batches = infinite_batches(data, tc["batch_size"], gen)
    cadence = Cadence(tc["log_every"], tc["checkpoint_every"], tc["steps"])
    running = RunningMeans()
    for step in range(start + 1, tc["steps"] + 1):
        set_lr(opt, lr_at(step, tc["steps"], tc["lr"], warmup_steps=tc["warmup_steps"], schedule="constant"))
        batch = next(batches)
        x, y = sess.to_device((batch["x"], batch["y"]))
        sigma = edm_sample_sigma(x.shape[0], tc["p_mean"], tc["p_std"], generator=gen).to(sess.device)  # (N,)
        noise = torch.randn(x.shape, generator=gen).to(sess.device)
        with sess.autocast():  # run.precision
            loss = edm_denoising_loss(model, x, y, sigma=sigma, noise=noise).mean()  # Eq. 8 (EDM)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        ema_update(ema, raw, tc["ema_decay"], step)
        running.add({"loss": loss})
        if cadence.report(step):
            checkpoint = cadence.checkpoint(step)
            state = (lambda: {"teacher": ema.state_dict(), "teacher_raw": raw.state_dict(), "opt": opt.state_dict()})
            sess.report(running.pop(), step=step, state=state if checkpoint else None,
                        meta=teacher_meta(config, ema) if checkpoint else None)


def teacher_config(cfg: Any, sigma_data: float) -> dict:
    return {"teacher": dataclasses.asdict(cfg.teacher), "net": net_args(cfg, sigma_data), "domain": cfg.data.domain,
            "sigma_data": sigma_data}

