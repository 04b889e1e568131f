"""Train the domain feature extractor (models/feature_extractor.py) that FID/KID use on fab imagery.

The net classifies a domain label: the equipment fingerprint (equipment_id = scanner × num_chucks + chuck) of
an overlay map, the WM-811K class of a wafer map, the defect type of an SEM image. Loss: cross-entropy,
L = −log softmax(f(x))_y, AdamW, linear warm-up then cosine decay.

Two ways to run it:

* on Ray Train (`train(cfg)`, also `python -m apps.train feature_extractor --config configs/feature_extractor.yaml`):
  DDP workers read Parquet shards through Ray Data, checkpoint every `trainer.checkpoint_every` steps and at
  every epoch end, and resume from the latest checkpoint when the same run name is started again;
* in-process and deterministic (`fit_feature_extractor`), which produces the committed weights:

      python -m trainers.feature_extractor --domain overlay --export metrics/weights/overlay_fe.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fabdistill.config import ConfigError, knob, section
from models.feature_extractor import ENCODINGS, FEATURE_NET_SIZES, DomainFeatureNet, build_feature_net, \
    save_feature_net
from trainers.launch import RunSection, TrainOutcome, TrainSession, launch, load_state

DOMAINS = ("overlay", "wafer", "sem")


#################################################################################
#                              Domain data                                      #
#################################################################################

@dataclasses.dataclass(frozen=True)
class DomainData:
    """Where a domain's images and labels live in its Parquet kind (data/parquet_io.py)."""

    kind: str
    image_column: str      # (C, H, W) or (H, W) per row
    label_column: str      # integer class index (-1: unlabelled, skipped)
    generator: str         # "module:function" (n, seed, ...) -> pyarrow.Table
    size_kwargs: tuple[str, ...]  # the generator's image-size arguments (set to the same square size)


DOMAIN_DATA: dict[str, DomainData] = {
    "overlay": DomainData("overlay", "overlay", "equipment_id", "data.overlay:generate_overlay",
                          ("height", "width")),
    "wafer": DomainData("wafer", "wafer_map", "label", "data.wafer:generate_wafer", ("size",)),
    "sem": DomainData("sem", "image", "defect", "data.sem:generate_sem", ("size",)),
}


def _generator(domain: str) -> Callable[..., Any]:
    import importlib

    module, fn = DOMAIN_DATA[domain].generator.split(":")
    return getattr(importlib.import_module(module), fn)


def class_names(domain: str, num_classes: int) -> list[str]:
    """Human-readable class names stored in the weights file."""
    if domain == "wafer":
        from data.wafer import WAFER_CLASSES
        return list(WAFER_CLASSES)[:num_classes]
    if domain == "sem":
        from data.sem import SEM_DEFECTS
        return list(SEM_DEFECTS)[:num_classes]
    return [f"equipment_{i}" for i in range(num_classes)]


def min_num_classes(domain: str) -> int:
    """Classes the label column can take (wafer: 9, SEM: 4); 0 for overlay, where the data decide."""
    return len(class_names(domain, 10**6)) if domain != "overlay" else 0


def _image_array(values: Any, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column as numpy: (n, L) floats, or an object array of n flat arrays → (n, *shape)."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr]) if n else np.zeros((0, *shape))
    return arr.reshape((n, *shape))


def decode_batch(batch: dict[str, Any], domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch of a domain's Parquet rows → (images (B, C, H, W) float32 native units, labels (B,) int64).

    Rows with a negative (unknown) label are dropped.
    """
    spec = DOMAIN_DATA[domain]
    for col in (spec.image_column, spec.label_column, "height", "width"):
        if col not in batch:
            raise KeyError(f"{domain} batch lacks column '{col}' (has {sorted(batch)})")
    labels = np.asarray(batch[spec.label_column]).astype(np.int64).reshape(-1)
    n = labels.shape[0]
    if n == 0:
        return torch.zeros(0, ENCODINGS[domain].in_channels, 1, 1), torch.zeros(0, dtype=torch.long)
    h, w = int(np.asarray(batch["height"]).reshape(-1)[0]), int(np.asarray(batch["width"]).reshape(-1)[0])
    x = _image_array(batch[spec.image_column], n, (ENCODINGS[domain].in_channels, h, w))
    keep = labels >= 0
    x = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
    return x, torch.from_numpy(labels[keep])


def table_to_tensors(table: Any, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole pyarrow Table of the domain's kind → (images, labels) as in :func:`decode_batch`."""
    spec = DOMAIN_DATA[domain]
    cols = [spec.image_column, spec.label_column, "height", "width"]
    batch = {c: (table[c].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                 if c == spec.image_column else table[c].to_numpy()) for c in cols}
    return decode_batch(batch, domain)


def generate_tables(domain: str, n: int, seed: int, size: int) -> Any:
    """`n` samples of a domain's synthetic data at `size`×`size`, deterministic from `seed`."""
    return _generator(domain)(n=n, seed=seed, **{k: size for k in DOMAIN_DATA[domain].size_kwargs})


#################################################################################
#                         Loss, schedule, one step                              #
#################################################################################

def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # L = −log softmax(z)_y  (mean over the batch)
    return F.cross_entropy(logits, labels)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up over the first `warmup_frac` of training, then cosine decay to 0."""
    warm = max(1, int(round(warmup_frac * total_steps)))
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x_enc: torch.Tensor, y: torch.Tensor,
               lr: float) -> tuple[float, int]:
    """One optimiser step on an encoded batch; returns (loss, number correct)."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    if y.numel() == 0:
        # every row of this batch was unlabelled: still run forward/backward (zero gradient) so that DDP's
        # gradient all-reduce stays in step with the other ranks
        logits = model(x_enc.new_zeros((1, *x_enc.shape[1:])))                 # (1, K)
        loss = logits.sum() * 0.0
    else:
        logits = model(x_enc)                                                   # (B, K)
        loss = classification_loss(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == y).sum()) if y.numel() else 0


@torch.no_grad()
def accuracy(net: DomainFeatureNet, x: torch.Tensor, y: torch.Tensor, domain: str, batch_size: int = 512) -> float:
    """Top-1 accuracy of `net` on native-unit images x (N, C, H, W) with labels y (N,)."""
    if x.shape[0] == 0:
        return float("nan")
    net.eval()
    device = next(net.parameters()).device
    enc = ENCODINGS[domain]
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = net(enc.encode(x[i:i + batch_size].to(device)))               # (B, K)
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / x.shape[0]


#################################################################################
#                           Config and Ray Train loop                           #
#################################################################################

@dataclasses.dataclass
class TrainerSection:
    domain: str = knob("overlay", choices=DOMAINS, help="overlay | wafer | sem: which data and label")
    size: str = knob("S", choices=tuple(FEATURE_NET_SIZES), help="network size (models/feature_extractor.py)")
    epochs: int = knob(5, ge=1, le=10_000, help="passes over the training data")
    batch_size: int = knob(128, ge=2, le=65_536, help="per-worker batch size")
    lr: float = knob(3e-3, gt=0, le=1, help="AdamW peak learning rate (warm-up 5 %, cosine decay)")
    weight_decay: float = knob(1e-4, ge=0, le=1, help="AdamW weight decay")
    checkpoint_every: int = knob(50, ge=1, help="optimizer steps between checkpoints (also at every epoch end)")
    shuffle_buffer: int = knob(1024, ge=0, help="rows in each worker's local shuffle buffer (0: no shuffle)")


@dataclasses.dataclass
class DataSection:
    uri: Optional[str] = knob(None, help="Parquet dataset of the domain's kind; None: generate one in the run folder")
    val_uri: Optional[str] = knob(None, help="held-out Parquet dataset; None: generated when `uri` is generated")
    n: int = knob(4096, ge=16, help="training samples to generate (when uri is None)")
    n_val: int = knob(1024, ge=0, help="held-out samples to generate (when uri is None)")
    seed: int = knob(0, ge=0, help="generator seed; the held-out set uses seed + 1")
    size: int = knob(32, ge=16, le=512, help="image height = width of generated data (SEM: 64 is typical)")


@dataclasses.dataclass
class Config:
    trainer: TrainerSection = section(TrainerSection)
    data: DataSection = section(DataSection)
    run: RunSection = section(RunSection)


def _with_last(it: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of look-ahead, so the epoch's last step is known when it runs."""
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _reduce_sum(values: list[float], sess: TrainSession) -> list[float]:
    if sess.world_size == 1 or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=sess.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def loop(config: dict) -> None:
    """Per-worker loop (run by trainers.launch.launch): DDP, Ray Data shard, checkpoints, resume."""
    sess = TrainSession.current()
    domain = config["domain"]
    enc = ENCODINGS[domain]
    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    net = build_feature_net(config["size"], enc.in_channels, config["num_classes"])
    model = sess.prepare(net)
    net = getattr(model, "module", model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])

    step, start_epoch, skip = 0, 0, 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, start_epoch, skip = int(meta["step"]), int(meta["epoch"]), int(meta["batch_in_epoch"])
        if meta["epoch_done"]:
            start_epoch, skip = start_epoch + 1, 0

    val_x, val_y = None, None
    if config["has_val"]:
        parts = [decode_batch(b, domain) for b in
                 sess.dataset("val").iter_batches(batch_size=1024, batch_format="numpy")]
        val_x = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, enc.in_channels, 1, 1)
        val_y = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)

    total_steps = config["epochs"] * config["steps_per_epoch"]
    shard = sess.dataset("train")
    for epoch in range(start_epoch, config["epochs"]):
        loss_sum, correct, seen = 0.0, 0, 0
        batches = shard.iter_batches(
            batch_size=config["batch_size"], batch_format="numpy", drop_last=True,  # equal steps on every rank
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] * 10_007 + epoch * 101 + sess.rank if config["shuffle_buffer"] else None,
        )
        for b, (batch, is_last) in enumerate(_with_last(batches)):
            if b < skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                continue
            x, y = decode_batch(batch, domain)
            loss, ok = train_step(model, opt, enc.encode(x.to(sess.device)), y.to(sess.device),
                                  lr_at(step, total_steps, config["lr"]))
            step += 1
            loss_sum, correct, seen = loss_sum + loss * y.shape[0], correct + ok, seen + y.shape[0]
            if not is_last and step % config["checkpoint_every"] != 0:
                continue
            state = {"model": net.state_dict(), "opt": opt.state_dict()} if sess.is_main else None
            meta = {"epoch": epoch, "batch_in_epoch": b + 1, "epoch_done": is_last, "domain": domain}
            metrics: dict[str, Any] = {"epoch": epoch, "loss": loss}
            if is_last:
                tot_loss, tot_ok, tot_seen = _reduce_sum([loss_sum, float(correct), float(seen)], sess)
                metrics.update(train_loss=tot_loss / max(tot_seen, 1), train_acc=tot_ok / max(tot_seen, 1))
                if val_x is not None:  # Ray splits every dataset by default: each rank holds a part of val
                    local = accuracy(net, val_x, val_y, domain) * val_y.shape[0] if val_y.shape[0] else 0.0
                    val_ok, val_n = _reduce_sum([local, float(val_y.shape[0])], sess)
                    metrics["val_acc"] = val_ok / max(val_n, 1.0)
            sess.report(metrics, step=step, state=state, meta=meta)
        skip = 0


def _dataset_rows_and_classes(uri: str, domain: str) -> tuple[int, int]:
    from data.parquet_io import read_dataset

    labels = read_dataset(uri, columns=[DOMAIN_DATA[domain].label_column]).column(0).to_numpy()
    labels = labels[labels >= 0]
    if labels.size == 0:
        raise ValueError(f"{uri}: no labelled rows in column '{DOMAIN_DATA[domain].label_column}'")
    return int(labels.size), max(min_num_classes(domain), int(labels.max()) + 1)


CALIBRATION_ROWS = 4096  # training rows used to standardise the metric features after a Ray run


def train(cfg: Config) -> TrainOutcome:
    """Generate (or take) the Parquet data, run `loop` on Ray Train, and write `feature_extractor.pt` next to the
    exported checkpoint (loadable by metrics.fid.compute_fid_kid(domain_weights_path=...))."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from trainers.launch import run_dir

    t, d = cfg.trainer, cfg.data
    spec = DOMAIN_DATA[t.domain]
    out = run_dir(cfg.run)
    uri, val_uri = d.uri, d.val_uri
    if uri is None:
        uri = storage.join(out, "data", "train")
        if not storage.exists(uri):
            write_dataset(generate_tables(t.domain, d.n, d.seed, d.size), uri, spec.kind)
        if val_uri is None and d.n_val > 0:
            val_uri = storage.join(out, "data", "val")
            if not storage.exists(val_uri):
                write_dataset(generate_tables(t.domain, d.n_val, d.seed + 1, d.size), val_uri, spec.kind)
    rows, num_classes = _dataset_rows_and_classes(uri, t.domain)
    workers = max(1, cfg.run.num_workers)
    steps_per_epoch = rows // (t.batch_size * workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"{uri}: {rows} labelled rows are fewer than batch_size × workers = "
                          f"{t.batch_size} × {workers}; lower trainer.batch_size or give more data")
    loop_config = {
        "domain": t.domain, "size": t.size, "num_classes": num_classes, "epochs": t.epochs,
        "batch_size": t.batch_size, "lr": t.lr, "weight_decay": t.weight_decay,
        "checkpoint_every": t.checkpoint_every, "shuffle_buffer": t.shuffle_buffer,
        "steps_per_epoch": steps_per_epoch, "seed": cfg.run.seed, "has_val": val_uri is not None,
    }
    datasets = {"train": uri, **({"val": val_uri} if val_uri is not None else {})}
    outcome = launch(loop, loop_config, cfg.run, datasets=datasets, full_config=cfg)
    if outcome.checkpoint_dir is not None:
        from data.parquet_io import read_dataset

        state, meta = load_state(outcome.checkpoint_dir)
        net = build_feature_net(t.size, ENCODINGS[t.domain].in_channels, num_classes)
        net.load_state_dict(state["model"])
        x, _ = table_to_tensors(read_dataset(uri).slice(0, CALIBRATION_ROWS), t.domain)
        net.calibrate(ENCODINGS[t.domain].encode(x))
        extra = {k: v for k, v in (outcome.metrics or {}).items() if isinstance(v, (int, float, str))}
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "feature_extractor.pt")
            save_feature_net(local, net, t.domain, class_names(t.domain, num_classes), extra)
            with open(local, "rb") as f:
                storage.write_bytes(storage.join(out, "feature_extractor.pt"), f.read())
    return outcome


#################################################################################
#                  In-process, deterministic fit (committed weights)            #
#################################################################################

# Recipes for the committed weights: ~1-2 minutes on 2 CPU cores each.
EXPORT_RECIPES: dict[str, dict[str, Any]] = {
    "overlay": {"n": 4096, "epochs": 5, "size": "S", "batch_size": 128, "lr": 3e-3},
    "wafer": {"n": 4096, "epochs": 6, "size": "S", "batch_size": 128, "lr": 3e-3},
    "sem": {"n": 2048, "epochs": 5, "size": "S", "batch_size": 128, "lr": 3e-3, "image_size": 64},
}


def _fit(domain: str, n: int, seed: int, epochs: int, size: str = "M", batch_size: int = 128, lr: float = 2e-3,
         weight_decay: float = 1e-4, n_val: int = 1024, image_size: int = 32,
         log: Optional[Callable[[str], None]] = print) -> tuple[DomainFeatureNet, dict[str, Any]]:
    if domain not in DOMAIN_DATA:
        raise ValueError(f"unknown domain '{domain}' (known: {', '.join(DOMAIN_DATA)})")
    t0 = time.time()
    x, y = table_to_tensors(generate_tables(domain, n, seed, image_size), domain)
    vx, vy = table_to_tensors(generate_tables(domain, n_val, seed + 1, image_size), domain) if n_val else \
        (x[:0], y[:0])
    if x.shape[0] < batch_size:
        raise ValueError(f"{x.shape[0]} labelled training samples are fewer than batch_size={batch_size}")
    num_classes = max(min_num_classes(domain), int(max(int(y.max()), int(vy.max()) if vy.numel() else 0)) + 1)
    enc = ENCODINGS[domain]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_feature_net(size, enc.in_channels, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = x.shape[0] // batch_size
    total, step = epochs * steps_per_epoch, 0
    if log:
        log(f"[{domain}] data {tuple(x.shape)} + held-out {tuple(vx.shape)}, {num_classes} classes, "
            f"generated in {time.time() - t0:.1f}s")
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        correct = 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            _, ok = train_step(net, opt, enc.encode(x[idx]), y[idx], lr_at(step, total, lr))
            correct += ok
            step += 1
        if log:
            log(f"[{domain}] epoch {epoch + 1}/{epochs} running train acc {correct / (steps_per_epoch * batch_size):.3f}"
                f" ({time.time() - t0:.0f}s)")
    net.calibrate(enc.encode(x))
    result = {"train_accuracy": accuracy(net, x, y, domain), "heldout_accuracy": accuracy(net, vx, vy, domain),
              "num_classes": num_classes, "n": int(x.shape[0]), "n_val": int(vx.shape[0]), "seed": seed,
              "epochs": epochs, "size": size, "image_size": image_size,
              "seconds": round(time.time() - t0, 1)}
    net.eval()
    return net, result


def fit_feature_extractor(domain: str, n: int, seed: int, epochs: int, size: str = "M", batch_size: int = 128,
                          lr: float = 2e-3, n_val: int = 1024, image_size: int = 32,
                          log: Optional[Callable[[str], None]] = None) -> tuple[DomainFeatureNet, float]:
    """Train in this process (no Ray) on freshly generated data; deterministic from `seed`.

    Returns (model in eval mode, held-out accuracy on `n_val` samples generated with seed + 1; NaN if n_val = 0).
    """
    net, result = _fit(domain, n, seed, epochs, size, batch_size, lr, n_val=n_val, image_size=image_size, log=log)
    return net, result["heldout_accuracy"]


def export_feature_extractor(domain: str, path: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Fit with the domain's recipe (plus overrides) and write a weights file; returns the fit summary."""
    recipe = {**EXPORT_RECIPES[domain], **overrides}
    net, result = _fit(domain, seed=seed, **recipe)
    cmd = f"python -m trainers.feature_extractor --domain {domain} --export {path} --seed {seed}"
    save_feature_net(path, net, domain, class_names(domain, net.num_classes),
                     extra={**result, "command": cmd, "torch": str(torch.__version__)})
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.feature_extractor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", choices=DOMAINS, help="overlay | wafer | sem (export default: overlay)")
    p.add_argument("--export", metavar="PATH", help="fit in-process (no Ray) and write a weights file here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, help="training samples (default: the domain's recipe)")
    p.add_argument("--epochs", type=int, help="epochs (default: the domain's recipe)")
    p.add_argument("--size", choices=tuple(FEATURE_NET_SIZES), help="network size (default: the recipe's)")
    p.add_argument("--config", help="with no --export: YAML config for a Ray Train run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    if args.export:
        overrides = {k: v for k, v in (("n", args.n), ("epochs", args.epochs), ("size", args.size)) if v is not None}
        args.domain = args.domain or "overlay"
        result = export_feature_extractor(args.domain, args.export, seed=args.seed, log=print, **overrides)
        size_mb = os.path.getsize(args.export) / 2**20
        print(f"[{args.domain}] train accuracy {result['train_accuracy']:.4f}, held-out accuracy "
              f"{result['heldout_accuracy']:.4f} ({result['num_classes']} classes, chance "
              f"{1 / result['num_classes']:.3f}); wrote {args.export} ({size_mb:.2f} MB) in {result['seconds']}s")
        return 0
    from fabdistill.config import load_config

    domain = [f"trainer.domain={args.domain}"] if args.domain else []
    cfg = load_config(Config, args.config, [*domain, *args.set])
    outcome = train(cfg)
    print(f"run folder: {outcome.run_dir}; metrics: {outcome.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
