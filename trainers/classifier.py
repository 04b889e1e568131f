"""Supervised classifier (CIFAR-style ResNet, models/resnet_cifar.py) on labelled images, on Ray Train DDP.

Fast-AD's teacher: a ResNet trained with cross-entropy on labelled synthetic wafer maps (the nine WM-811K classes),
or on CIFAR-100 when a user has it as a Parquet "image" dataset. The same trainer gives the "student trained on real
data" reference (a smaller arch on the same data).

    L = −log softmax(f(x))_y  (+ label smoothing), SGD with momentum, linear warm-up then cosine decay.

Input encodings (one place; Fast-AD, serve/ and the benchmarks use the same functions):
  * wafer maps ("wafer" kind, values 0 off-wafer / 1 pass / 2 fail) → one channel x = value − 1 ∈ {−1, 0, +1};
  * images ("image" kind, uint8 CHW) → x = value / 127.5 − 1 ∈ [−1, 1].
Both ranges are [−1, 1], the range the DDPM (trainers/ddpm.py) generates in.

Wafer-map augmentation: the 8 symmetries of the square (flips, 90° rotations) keep every WM-811K class.

Two ways to run it:
  * `python -m apps.train classifier --config configs/classifier_wafer.yaml` → `train(cfg)` on Ray Train
    (data generated into the run folder unless `data.uri` is given; checkpoints and resume via trainers/launch.py);
  * in-process helpers (`fit_classifier`, `evaluate_top1`) for benchmarks and tests.

The exported checkpoint (`<run>/model/`) holds `state["model"]` and meta
{"kind": "classifier", "arch", "num_classes", "in_channels", "encoding", "classes"}: `load_classifier(path)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.classifier import (ENCODINGS, classifier_meta, decode_wafer, encode_images,  # noqa: F401
                                             encode_wafer, evaluate_top1, load_classifier, predict_logits)
from models.resnet_cifar import RESNET_ARCHS, ResNet, build_resnet, resnet_from_meta  # noqa: F401
from trainers.launch import RunSection, TrainOutcome, TrainSession, launch, load_state, resolve_checkpoint, \
    save_state



####################################################################################################################
# Encodings and data
####################################################################################################################


def _column_array(values: Any, n: int, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object:  # Ray Data may hand fixed-size lists as an object array of flat arrays
        arr = np.stack([np.asarray(v) for v in arr]) if n else np.zeros((0, *shape))
    return arr.reshape((n, *shape))


def batch_to_tensors(batch: dict[str, Any]) -> tuple[Tensor, Tensor, str]:
    """A numpy batch of Parquet rows ("wafer" or "image" kind) → (x (B, C, H, W) in [−1, 1], labels (B,), encoding).

    Rows with a negative (unknown) label are kept with label −1; callers that need labels drop them.
    """
    if "wafer_map" in batch:
        labels = np.asarray(batch["label"]).astype(np.int64).reshape(-1)
        n = labels.shape[0]
        h, w = (int(np.asarray(batch[k]).reshape(-1)[0]) for k in ("height", "width")) if n else (1, 1)
        x = encode_wafer(_column_array(batch["wafer_map"], n, (h, w)).astype(np.uint8))
        return x, torch.from_numpy(labels), "wafer_pm1"
    if "image" in batch:
        labels = np.asarray(batch["label"]).astype(np.int64).reshape(-1)
        n = labels.shape[0]
        c, h, w = (int(np.asarray(batch[k]).reshape(-1)[0]) for k in ("channels", "height", "width")) \
            if n else (1, 1, 1)
        x = encode_images(_column_array(batch["image"], n, (c, h, w)).astype(np.uint8))
        return x, torch.from_numpy(labels), "image_pm1"
    raise KeyError(f"batch has neither a 'wafer_map' nor an 'image' column (has {sorted(batch)})")


def table_to_tensors(table: Any) -> tuple[Tensor, Tensor, str]:
    """A whole pyarrow Table ("wafer" or "image" kind) → (x, labels, encoding) as in batch_to_tensors."""
    img = "wafer_map" if "wafer_map" in table.column_names else "image"
    cols = [c for c in (img, "label", "channels", "height", "width") if c in table.column_names]
    batch = {c: (table[c].combine_chunks().flatten().to_numpy(zero_copy_only=False) if c == img
                 else table[c].to_numpy()) for c in cols}
    return batch_to_tensors(batch)


def select_split(table: Any, split: Optional[str]) -> Any:
    """Rows of `table` whose "split" column equals `split` (CIFAR imports hold train and test in one table).

    A table without a split column, or whose split column is empty everywhere (generated data), is returned whole.
    """
    import pyarrow.compute as pc

    if not split or "split" not in table.column_names:
        return table
    values = set(table["split"].unique().to_pylist()) - {""}
    if not values:
        return table
    if split not in values:
        raise ValueError(f"no rows with split == {split!r} (the dataset has splits {sorted(values)})")
    return table.filter(pc.equal(table["split"], split))


def wafer_tensors(n: int, seed: int, size: int = 32,
                  class_weights: Optional[list[float]] = None) -> tuple[Tensor, Tensor]:
    """n generated wafer maps as (x (n, 1, size, size) in {−1, 0, 1}, labels (n,) long)."""
    from data.wafer import generate_wafer

    table = generate_wafer(n, seed=seed, size=size, class_weights=class_weights or None)
    x, y, _ = table_to_tensors(table)
    return x, y


def random_dihedral(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Apply one of the 8 square symmetries (rot90^k, optional flip) per sample: (N, C, H, W) → (N, C, H, W)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"random_dihedral needs square images, got {tuple(x.shape)}")
    choice = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = x.clone()
    for g in range(1, 8):
        idx = (choice == g).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        xi = torch.rot90(x[idx], k=g % 4, dims=(-2, -1))
        out[idx] = torch.flip(xi, dims=(-1,)) if g >= 4 else xi
    return out


####################################################################################################################
# Loss, schedule, one step, evaluation
####################################################################################################################


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    # L = −Σ_c q_c log softmax(z)_c with q = (1−ε)·onehot(y) + ε/C (mean over the batch)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (sgd or adamw)")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, lr: float,
               label_smoothing: float = 0.0) -> tuple[float, int]:
    """One SGD step; returns (loss, number of correct predictions in the batch)."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    logits = model(x)  # (B, K)
    loss = classification_loss(logits, y, label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())


def fit_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 10, batch_size: int = 128,
                   lr: float = 0.05, weight_decay: float = 5e-4, optimizer: str = "sgd", augment: bool = True,
                   label_smoothing: float = 0.0, seed: int = 0, log_every: int = 0) -> list[dict[str, float]]:
    """In-process supervised training on tensors (benchmarks, tests). Returns one dict per epoch."""
    if x.shape[0] < batch_size:
        raise ValueError(f"{x.shape[0]} samples are fewer than batch_size {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    steps_per_epoch = x.shape[0] // batch_size
    total, step, history = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        loss_sum, correct = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb = random_dihedral(x[idx], gen) if augment else x[idx]
            loss, ok = train_step(model, opt, xb, y[idx], lr_at(step, total, lr, steps_per_epoch // 2),
                                  label_smoothing)
            loss_sum, correct, step = loss_sum + loss, correct + ok, step + 1
        history.append({"epoch": epoch, "loss": loss_sum / steps_per_epoch,
                        "train_acc": correct / (steps_per_epoch * batch_size)})
        if log_every and (epoch + 1) % log_every == 0:
            print(f"[classifier] epoch {epoch + 1}/{epochs} loss={history[-1]['loss']:.4f} "
                  f"train_acc={history[-1]['train_acc']:.3f}", flush=True)
    model.eval()
    return history


####################################################################################################################
# Checkpoints
####################################################################################################################


def save_classifier(directory: str, model: ResNet, encoding: str, classes: Optional[list[str]] = None,
                    extra_meta: Optional[dict[str, Any]] = None) -> None:
    """A fabdistill checkpoint folder (state.pt with state["model"], meta.json) that load_classifier reads."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_state(directory, state, {**classifier_meta(model, encoding, classes), **(extra_meta or {})})


####################################################################################################################
# Config
####################################################################################################################


@dataclasses.dataclass
class DataSection:
    """Labelled data: generated wafer maps (default) or a Parquet dataset ("wafer" or "image" kind)."""

    uri: Optional[str] = knob(None, help="Parquet dataset (local or s3://) with labels; None generates wafer maps")
    eval_uri: Optional[str] = knob(None, help="held-out Parquet dataset; None: `uri`'s eval_split rows if it has "
                                              "a split column, else generated held-out wafer maps")
    train_split: str = knob("train", help="rows of `uri` used for training when it has a split column (CIFAR)")
    eval_split: str = knob("test", help="rows used for evaluation when the dataset has a split column")
    n_train: int = knob(6000, ge=1, help="generated training maps (when uri is None)")
    n_eval: int = knob(1000, ge=0, help="generated held-out maps (when eval_uri is None); 0 skips evaluation")
    seed: int = knob(1, ge=0, help="generator seed of the training maps")
    eval_seed: int = knob(9001, ge=0, help="generator seed of the held-out maps (Fast-AD evaluates on the same)")
    size: int = knob(32, ge=8, le=256, help="wafer map size (pixels per side)")
    class_weights: list[float] = knob([], help="class mix of generated maps (9 weights, WAFER_CLASSES order); "
                                               "[] is uniform")


@dataclasses.dataclass
class ModelSection:
    arch: str = knob("resnet20", choices=tuple(RESNET_ARCHS), help="ResNet size (models/resnet_cifar.py)")
    num_classes: int = knob(9, ge=2, help="classes (9 WM-811K wafer classes, 100 for CIFAR-100)")
    in_channels: int = knob(1, ge=1, le=4, help="1 for wafer maps, 3 for CIFAR")


@dataclasses.dataclass
class OptimSection:
    epochs: int = knob(15, ge=1, help="passes over the training data")
    batch_size: int = knob(128, ge=1, help="per-worker batch size")
    optimizer: str = knob("sgd", choices=("sgd", "adamw"))
    lr: float = knob(0.05, gt=0, le=10, help="peak learning rate (linear warm-up, cosine decay)")
    weight_decay: float = knob(5e-4, ge=0, le=1)
    warmup_steps: int = knob(50, ge=0)
    label_smoothing: float = knob(0.0, ge=0, lt=1)
    augment: bool = knob(True, help="random flips / 90° rotations (label-preserving for wafer maps)")
    checkpoint_every_epochs: int = knob(1, ge=1)


@dataclasses.dataclass
class Config:
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    optim: OptimSection = section(OptimSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        if self.data.class_weights and len(self.data.class_weights) != 9:
            raise ConfigError(f"data.class_weights needs 9 weights (WAFER_CLASSES order), "
                              f"got {len(self.data.class_weights)}")


####################################################################################################################
# Ray Train loop
####################################################################################################################


def loop(config: dict) -> None:
    """Per-worker loop run by trainers.launch.launch: DDP, Ray Data shard, checkpoint per epoch, resume."""
    sess = TrainSession.current()
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    net = build_resnet(config["arch"], config["num_classes"], config["in_channels"])
    model = sess.prepare(net)
    net = getattr(model, "module", model)
    opt = make_optimizer(model, config["optimizer"], config["lr"], config["weight_decay"])
    start_epoch, step = 0, 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(meta["epoch"]) + 1, int(meta["step"])

    eval_x = eval_y = None
    if sess.is_main and config["eval"] is not None:
        eval_x, eval_y = _eval_tensors(config["eval"])

    gen = torch.Generator().manual_seed(config["seed"] * 7919 + sess.rank)
    total = config["epochs"] * config["steps_per_epoch"]
    shard = sess.dataset("train")
    encoding = "wafer_pm1"
    for epoch in range(start_epoch, config["epochs"]):
        loss_sum, correct, seen = 0.0, 0, 0
        batches = shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=4 * config["batch_size"],
                                     local_shuffle_seed=config["seed"] * 10_007 + epoch * 101 + sess.rank)
        for batch in batches:
            x, y, encoding = batch_to_tensors(batch)
            keep = y >= 0
            x, y = x[keep], y[keep]
            if config["augment"]:
                x = random_dihedral(x, gen)
            loss, ok = train_step(model, opt, x.to(sess.device), y.to(sess.device),
                                  lr_at(step, total, config["lr"], config["warmup_steps"]), config["label_smoothing"])
            step += 1
            loss_sum, correct, seen = loss_sum + loss * y.shape[0], correct + ok, seen + y.shape[0]
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                                   "train_acc": correct / max(seen, 1)}
        if eval_x is not None:
            metrics["heldout_top1"] = evaluate_top1(net, eval_x, eval_y)
        checkpoint = epoch == config["epochs"] - 1 or (epoch + 1) % config["checkpoint_every_epochs"] == 0
        state = None
        if checkpoint:  # every rank takes the checkpoint branch of report(); only rank 0's state is written
            state = {"model": net.state_dict(), "optimizer": opt.state_dict()} if sess.is_main else {}
        meta = {**classifier_meta(net, encoding, config["classes"]), "epoch": epoch}
        sess.report(metrics, step=step, state=state, meta=meta)


def heldout_tensors(uri: Optional[str], split: Optional[str], n: int, seed: int, size: int) -> tuple[Tensor, Tensor]:
    """Labelled held-out data as (x (N, C, H, W), y (N,)): the `split` rows of a Parquet dataset (unlabelled rows
    dropped), or n generated wafer maps when uri is None. The teacher and Fast-AD's student evaluate on the same."""
    if uri:
        from data.parquet_io import read_dataset

        x, y, _ = table_to_tensors(select_split(read_dataset(uri), split))
        keep = y >= 0
        return x[keep], y[keep]
    return wafer_tensors(n, seed, size)


def _eval_tensors(spec: dict) -> tuple[Tensor, Tensor]:
    return heldout_tensors(spec.get("uri"), spec.get("split"), spec.get("n", 0), spec.get("seed", 0),
                           spec.get("size", 32))


def _count_rows(uri: str) -> int:
    from data.parquet_io import read_dataset

    labels = read_dataset(uri, columns=["label"]).column(0).to_numpy()
    n = int((labels >= 0).sum())
    if n == 0:
        raise ValueError(f"{uri}: no labelled rows")
    return n


def _split_dataset(uri: str, train_split: str, eval_split: str, folder: str) -> tuple[str, Optional[str]]:
    """A dataset with a split column (a CIFAR import) → (train-rows dataset, eval-rows dataset or None), written
    once into `folder`; a dataset without one is used as it is: (uri, None)."""
    from data.parquet_io import read_dataset, table_kind, write_dataset
    from fabdistill import storage

    table = read_dataset(uri)
    values = set(table["split"].unique().to_pylist()) - {""} if "split" in table.column_names else set()
    if not values:
        return uri, None
    kind = table_kind(table) or ("wafer" if "wafer_map" in table.column_names else "image")
    train_uri, eval_uri = storage.join(folder, "train"), storage.join(folder, "eval")
    if not storage.exists(train_uri):
        write_dataset(select_split(table, train_split), train_uri, kind)
    if eval_split in values and not storage.exists(eval_uri):
        write_dataset(select_split(table, eval_split), eval_uri, kind)
    return train_uri, (eval_uri if eval_split in values else None)


def train(cfg: Config) -> TrainOutcome:
    """Generate (or take) the labelled Parquet data and run `loop` on Ray Train; the final checkpoint is exported
    to `<storage_path>/<name>/model/` (load it with load_classifier)."""
    from data.parquet_io import write_dataset
    from data.wafer import WAFER_CLASSES, generate_wafer
    from fabdistill import storage
    from trainers.launch import run_dir

    d, m, o = cfg.data, cfg.model, cfg.optim
    out = run_dir(cfg.run)
    uri = d.uri
    classes: Optional[list[str]] = None
    if uri is None:
        if m.num_classes != len(WAFER_CLASSES) or m.in_channels != 1:
            raise ConfigError(f"generated wafer maps need model.num_classes={len(WAFER_CLASSES)} and "
                              f"model.in_channels=1 (got {m.num_classes}, {m.in_channels}); set data.uri for "
                              f"other data")
        uri = storage.join(out, "data", "train")
        if not storage.exists(uri):  # deterministic by seed, so a resumed run sees the same data
            write_dataset(generate_wafer(d.n_train, seed=d.seed, size=d.size, class_weights=d.class_weights or None),
                          uri, "wafer")
        classes = list(WAFER_CLASSES)
    else:
        uri, split_eval = _split_dataset(uri, d.train_split, d.eval_split, storage.join(out, "data"))
        if d.eval_uri is None and split_eval is not None:
            d = dataclasses.replace(d, eval_uri=split_eval)
    rows = _count_rows(uri)
    workers = max(1, cfg.run.num_workers)
    steps_per_epoch = rows // (o.batch_size * workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"{uri}: {rows} labelled rows are fewer than batch_size × workers = "
                          f"{o.batch_size} × {workers}")
    eval_spec = None
    if d.eval_uri is not None:
        eval_spec = {"uri": d.eval_uri, "split": d.eval_split}
    elif d.n_eval > 0 and d.uri is None:
        eval_spec = {"n": d.n_eval, "seed": d.eval_seed, "size": d.size}
    loop_config = {
        "arch": m.arch, "num_classes": m.num_classes, "in_channels": m.in_channels, "epochs": o.epochs,
        "batch_size": o.batch_size, "optimizer": o.optimizer, "lr": o.lr, "weight_decay": o.weight_decay,
        "warmup_steps": o.warmup_steps, "label_smoothing": o.label_smoothing, "augment": o.augment,
        "checkpoint_every_epochs": o.checkpoint_every_epochs, "steps_per_epoch": steps_per_epoch,
        "seed": cfg.run.seed, "eval": eval_spec, "classes": classes,
    }
    return launch(loop, loop_config, cfg.run, datasets={"train": uri}, full_config=cfg)
