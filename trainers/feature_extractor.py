"""Train the domain feature extractor (models/feature_extractor.py) that FID/KID use on fab imagery.

Write-up: a small residual CNN classifying a domain label (equipment fingerprint, wafer class, SEM defect) whose
standardised penultimate features are the FID/KID feature space (docs/metrics.md).

The label is the equipment fingerprint (equipment_id = scanner × num_chucks + chuck) of an overlay map, the
WM-811K class of a wafer map, the defect type of an SEM image. Loss: cross-entropy, L = −log softmax(f(x))_y
(trainers/classifier.py train_step), AdamW, linear warm-up over `warmup_frac` of training, then cosine decay
(trainers/common.py lr_at). After training, the features are standardised on training rows (calibrate) and the
weights file `<run>/feature_extractor.pt` is written.

One training path: `train(cfg)` through trainers/launch.py, on Ray Train workers (`run.num_workers >= 1`) or
in-process (`run.num_workers=0`). The committed weights come from that path too:

    python -m apps.train feature_extractor --config configs/feature_extractor.yaml     # Ray Train DDP
    python -m trainers.feature_extractor --domain overlay --export metrics/weights/overlay_fe.pt   # committed
    python -m apps.evaluate feature_extractor --checkpoint model=metrics/weights/overlay_fe.pt --n 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import torch

from data.schema import NUM_SEM_DEFECTS, NUM_WAFER_CLASSES, SEM_DEFECTS, WAFER_CLASSES
from fabdistill.config import ConfigError, knob, section
from fabdistill.methods import EvalTable, Method, TrainOutcome
from models.feature_extractor import ENCODINGS, FEATURE_NET_SIZES, DomainFeatureNet, build_feature_net, \
    load_feature_net, save_feature_net
from trainers.classifier import epoch_plan, train_step
from trainers.common import Cadence, derive_seed, lr_at, set_lr
from trainers.launch import RunSection, TrainSession, launch, load_state

DOMAINS = ("overlay", "wafer", "sem")


#################################################################################
#                              Domain data                                      #
#################################################################################

@dataclasses.dataclass(frozen=True)
class DomainData:
    """Where a domain's labels live in its Parquet kind and how its synthetic data are generated."""

    kind: str
    label_column: str      # integer class index (-1: unlabelled, skipped)
    generator: str         # "module:function" (n, seed, ...) -> pyarrow.Table
    size_kwargs: tuple[str, ...]  # the generator's image-size arguments (set to the same square size)
    num_classes: int       # classes the label can take (0: the data decide, overlay)
    class_names: tuple[str, ...] = ()


DOMAIN_DATA: dict[str, DomainData] = {
    "overlay": DomainData("overlay", "equipment_id", "data.overlay:generate_overlay", ("height", "width"), 0),
    "wafer": DomainData("wafer", "label", "data.wafer:generate_wafer", ("size",), NUM_WAFER_CLASSES, WAFER_CLASSES),
    "sem": DomainData("sem", "defect", "data.sem:generate_sem", ("size",), NUM_SEM_DEFECTS, SEM_DEFECTS),
}


def _domain(domain: str) -> DomainData:
    if domain not in DOMAIN_DATA:
        raise ValueError(f"unknown domain '{domain}' (known: {', '.join(DOMAIN_DATA)})")
    return DOMAIN_DATA[domain]


def class_names(domain: str, num_classes: int) -> list[str]:
    """Human-readable class names stored in the weights file."""
    names = _domain(domain).class_names
    return list(names)[:num_classes] if names else [f"equipment_{i}" for i in range(num_classes)]


def labelled_images(tensors: dict[str, torch.Tensor], domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """data/datasets.py tensors of the domain's kind → (images (N, C, H, W) float32 native units, labels (N,)),
    unlabelled rows dropped. The network input is ENCODINGS[domain].encode(images)."""
    from data.datasets import keep_labelled

    spec = _domain(domain)
    tensors = keep_labelled(tensors, spec.label_column)
    return tensors[ENCODINGS[domain].key], tensors[spec.label_column]


def domain_tensors(table: Any, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole pyarrow Table of the domain's kind → (images, labels) as labelled_images."""
    from data.datasets import table_to_tensors

    return labelled_images(table_to_tensors(table, _domain(domain).kind), domain)


def generate_tables(domain: str, n: int, seed: int, size: int) -> Any:
    """`n` samples of a domain's synthetic data at `size`×`size`, deterministic from `seed`."""
    spec = _domain(domain)
    module, fn = spec.generator.split(":")
    return getattr(importlib.import_module(module), fn)(n=n, seed=seed, **{k: size for k in spec.size_kwargs})


@torch.no_grad()
def predict_labels(net: DomainFeatureNet, x: torch.Tensor, domain: str, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) of `net` on native-unit images x (N, C, H, W); restores the net's train/eval mode."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    enc = ENCODINGS[domain]
    out = [net(enc.encode(x[i:i + batch_size].to(device))).argmax(1).cpu()                # (B,)
           for i in range(0, x.shape[0], batch_size)]
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(net: DomainFeatureNet, x: torch.Tensor, y: torch.Tensor, domain: str, batch_size: int = 512) -> float:
    """Top-1 accuracy of `net` on native-unit images x (N, C, H, W) with labels y (N,); NaN for no rows."""
    if x.shape[0] == 0:
        return float("nan")
    return int((predict_labels(net, x, domain, batch_size) == y).sum()) / x.shape[0]


#################################################################################
#                           Config and the training loop                        #
#################################################################################

@dataclasses.dataclass
class TrainerSection:
    domain: str = knob("overlay", choices=DOMAINS, help="overlay | wafer | sem: which data and label")
    size: str = knob("S", choices=tuple(FEATURE_NET_SIZES), help="network size (models/feature_extractor.py)")
    epochs: int = knob(5, ge=1, le=10_000, help="passes over the training data")
    batch_size: int = knob(128, ge=2, le=65_536, help="per-worker batch size")
    lr: float = knob(3e-3, gt=0, le=1, help="AdamW peak learning rate (warm-up, then cosine decay)")
    warmup_frac: float = knob(0.05, ge=0, lt=1, help="share of the steps spent in linear warm-up")
    weight_decay: float = knob(1e-4, ge=0, le=1, help="AdamW weight decay")
    checkpoint_every: int = knob(50, ge=1, help="optimizer steps between checkpoints (also at every epoch end)")


@dataclasses.dataclass
class DataSection:
    uri: Optional[str] = knob(None, help="Parquet dataset of the domain's kind; None: generate one in the run folder")
    val_uri: Optional[str] = knob(None, help="held-out Parquet dataset; None: generated when `uri` is generated")
    n: int = knob(4096, ge=16, help="training samples to generate (when uri is None)")
    n_val: int = knob(1024, ge=0, help="held-out samples to generate (when uri is None)")
    seed: int = knob(0, ge=0, help="generator seed; the held-out set uses derive_seed(seed, 'val')")
    size: int = knob(32, ge=16, le=512, help="image height = width of generated data (SEM: 64 is typical)")


@dataclasses.dataclass
class Config:
    trainer: TrainerSection = section(TrainerSection)
    data: DataSection = section(DataSection)
    run: RunSection = section(RunSection)


def loop(config: dict) -> None:
    """Per-worker loop (run by trainers.launch.launch): DDP, in-memory shard, mid-epoch checkpoints, resume."""
    sess = TrainSession.current()
    domain, seed = config["domain"], config["seed"]
    kind, enc = DOMAIN_DATA[domain].kind, ENCODINGS[domain]
    torch.manual_seed(derive_seed(seed, "init"))  # the same initial weights on every rank
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

    x_all, y_all = labelled_images(sess.load_shard("train", kind), domain)
    val = labelled_images(sess.load_shard("val", kind), domain) if config["has_val"] else None

    bs, steps_per_epoch = config["batch_size"], config["steps_per_epoch"]
    total = config["epochs"] * steps_per_epoch
    warmup = max(1, round(config["warmup_frac"] * total)) if config["warmup_frac"] > 0 else 0
    cadence = Cadence(config["checkpoint_every"], config["checkpoint_every"], total)
    for epoch in range(start_epoch, config["epochs"]):
        # A run resumed mid-epoch redraws this epoch's order (from seed, rank, epoch) and skips what it did.
        _, batches = epoch_plan(x_all.shape[0], bs, steps_per_epoch, seed, sess.rank, epoch)
        sums = [0.0, 0.0, 0.0]  # loss × rows, correct, rows
        for b, idx in enumerate(batches):
            if b < skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                continue
            x, y = enc.encode(x_all[idx]).to(sess.device), y_all[idx].to(sess.device)
            step += 1
            set_lr(opt, lr_at(step, total, config["lr"], warmup_steps=warmup))
            loss, ok = train_step(model, opt, x, y)
            sums = [sums[0] + loss * y.shape[0], sums[1] + ok, sums[2] + y.shape[0]]
            is_last = b == len(batches) - 1
            if not is_last and not cadence.checkpoint(step):
                continue
            metrics: dict[str, Any] = {"epoch": epoch, "loss": loss}
            if is_last:
                tot_loss, tot_ok, tot_seen = sess.all_reduce_mean(sums)  # ratios of summed terms are global
                metrics.update(train_loss=tot_loss / max(tot_seen, 1e-12), train_acc=tot_ok / max(tot_seen, 1e-12))
                if val is not None:  # each rank may hold a part of val: sum the correct counts over ranks
                    vx, vy = val
                    local = accuracy(net, vx, vy, domain) * vy.shape[0] if vy.shape[0] else 0.0
                    val_ok, val_n = sess.all_reduce_mean([local, float(vy.shape[0])])
                    metrics["val_acc"] = val_ok / max(val_n, 1e-12)
            sess.report(metrics, step=step, state=lambda: {"model": net.state_dict(), "opt": opt.state_dict()},
                        meta={"epoch": epoch, "batch_in_epoch": b + 1, "epoch_done": is_last, "domain": domain})
        skip = 0


def _dataset_rows_and_classes(uri: str, domain: str) -> tuple[int, int]:
    from data.parquet_io import read_dataset

    spec = DOMAIN_DATA[domain]
    labels = read_dataset(uri, columns=[spec.label_column]).column(0).to_numpy()
    labels = labels[labels >= 0]
    if labels.size == 0:
        raise ValueError(f"{uri}: no labelled rows in column '{spec.label_column}'")
    return int(labels.size), max(spec.num_classes, int(labels.max()) + 1)


CALIBRATION_ROWS = 4096  # training rows used to standardise the metric features


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Generate (or take) the Parquet data, run `loop` through trainers.launch (Ray Train workers, or in-process
    with run.num_workers=0), then calibrate the features and write `<run>/feature_extractor.pt` (loadable by
    metrics.fid.compute_fid_kid(domain_weights_path=...)), with train and held-out accuracy in its `extra`."""
    from data.parquet_io import read_dataset, write_dataset
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
                write_dataset(generate_tables(t.domain, d.n_val, derive_seed(d.seed, "val"), d.size), val_uri,
                              spec.kind)
    rows, num_classes = _dataset_rows_and_classes(uri, t.domain)
    workers = max(1, cfg.run.num_workers)
    steps_per_epoch = rows // (t.batch_size * workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"{uri}: {rows} labelled rows are fewer than batch_size × workers = "
                          f"{t.batch_size} × {workers}; lower trainer.batch_size or give more data")
    loop_config = {
        "domain": t.domain, "size": t.size, "num_classes": num_classes, "epochs": t.epochs,
        "batch_size": t.batch_size, "lr": t.lr, "warmup_frac": t.warmup_frac, "weight_decay": t.weight_decay,
        "checkpoint_every": t.checkpoint_every, "steps_per_epoch": steps_per_epoch, "seed": cfg.run.seed,
        "has_val": val_uri is not None,
    }
    datasets = {"train": uri, **({"val": val_uri} if val_uri is not None else {})}
    outcome = launch(loop, loop_config, cfg.run, datasets=datasets, full_config=cfg, extra_callbacks=callbacks)
    if outcome.checkpoint_dir is not None:
        state, _ = load_state(outcome.checkpoint_dir)
        net = build_feature_net(t.size, ENCODINGS[t.domain].in_channels, num_classes)
        net.load_state_dict(state["model"])
        x, y = domain_tensors(read_dataset(uri).slice(0, CALIBRATION_ROWS), t.domain)
        net.calibrate(ENCODINGS[t.domain].encode(x))
        extra = {k: v for k, v in (outcome.metrics or {}).items() if isinstance(v, (int, float, str))}
        extra.update(train_accuracy=accuracy(net, x, y, t.domain), num_classes=num_classes, n=rows,
                     seed=cfg.run.seed, data_seed=d.seed, epochs=t.epochs, size=t.size, image_size=d.size,
                     torch=str(torch.__version__))
        if val_uri is not None:
            vx, vy = domain_tensors(read_dataset(val_uri), t.domain)
            extra.update(heldout_accuracy=accuracy(net, vx, vy, t.domain), n_val=int(vy.shape[0]))
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "feature_extractor.pt")
            save_feature_net(local, net.eval(), t.domain, class_names(t.domain, num_classes), extra)
            with open(local, "rb") as f:
                storage.write_bytes(storage.join(out, "feature_extractor.pt"), f.read())
    return outcome


#################################################################################
#                  The committed weights (through train(), in-process)          #
#################################################################################

# Recipes for the committed weights (config overrides of train()); a minute or two on 2 CPU cores each.
EXPORT_RECIPES: dict[str, dict[str, Any]] = {
    "overlay": {"data.n": 4096, "trainer.epochs": 5, "trainer.size": "S", "trainer.batch_size": 128,
                "trainer.lr": 3e-3, "data.size": 32},
    "wafer": {"data.n": 4096, "trainer.epochs": 6, "trainer.size": "S", "trainer.batch_size": 128,
              "trainer.lr": 3e-3, "data.size": 32},
    "sem": {"data.n": 2048, "trainer.epochs": 5, "trainer.size": "S", "trainer.batch_size": 128,
            "trainer.lr": 3e-3, "data.size": 64},
}


def export_overrides(domain: str, seed: int = 0, **changes: Any) -> list[str]:
    """The `--set` overrides of an export run: the domain's recipe (plus `changes`, dotted keys), in-process."""
    recipe = {"trainer.domain": domain, **EXPORT_RECIPES[domain], "data.n_val": 1024, "data.seed": seed,
              "run.seed": seed, "run.num_workers": 0, "trainer.checkpoint_every": 1_000_000, **changes}
    return [f"{k}={v}" for k, v in recipe.items()]


def export_feature_extractor(domain: str, path: str, seed: int = 0, log: Optional[Callable[[str], None]] = None,
                             **changes: Any) -> dict[str, Any]:
    """Train with the domain's recipe through train() (run.num_workers=0, run folder in a temporary directory)
    and write the weights file to `path`; returns its `extra` summary (accuracies, command)."""
    from fabdistill.config import load_config

    overrides = export_overrides(domain, seed, **changes)
    command = f"python -m trainers.feature_extractor --domain {domain} --export {path} --seed {seed}" + "".join(
        f" --set {k}={v}" for k, v in changes.items())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(Config, None, [*overrides, f"run.storage_path={tmp}", f"run.name=export-{domain}"])
        if log:
            log(f"[{domain}] training through train() in-process: {' '.join(overrides)}")
        outcome = train(cfg)
        net, meta = load_feature_net(os.path.join(outcome.run_dir, "feature_extractor.pt"), domain)
    extra = {**meta["extra"], "command": command}
    save_feature_net(path, net, domain, meta["class_names"], extra)
    return extra


#################################################################################
#                           Evaluation (held-out accuracy)                      #
#################################################################################

@dataclasses.dataclass
class EvalSettings:
    """Held-out data for `apps.evaluate feature_extractor`: freshly generated maps of the weights' domain."""

    n: int = knob(1024, ge=1, le=1_000_000, help="generated held-out samples")
    seed: int = knob(-1, ge=-1, help="generator seed; -1: data/seeds.py's held-out seed of the domain")
    size: int = knob(0, ge=0, le=512, help="image size; 0: the size the weights were trained at")
    uri: str = knob("", help="a labelled Parquet dataset of the domain's kind instead of generated data")


def _held_out_seed(domain: str) -> int:
    from data import seeds

    known = {"overlay": seeds.OVERLAY_HELD_OUT, "wafer": seeds.WAFER_HELD_OUT, "sem": seeds.SEM_HELD_OUT}
    if domain not in known:
        raise ValueError(f"no held-out seed for domain '{domain}' in data/seeds.py: pass --seed")
    return known[domain]


def weights_file(path: str) -> str:
    """A weights file, or a run folder holding feature_extractor.pt."""
    candidate = os.path.join(path, "feature_extractor.pt")
    return candidate if os.path.isdir(path) and os.path.isfile(candidate) else path


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Held-out top-1 accuracy of each weights file (or run folder) on its domain's label, one row each; report.md
    with a confusion matrix and held-out examples per model, and training curves, in `out_dir` when given."""
    from data.parquet_io import read_dataset

    settings = settings or EvalSettings()
    if not checkpoints:
        raise ValueError("evaluate needs at least one weights file ({role: path})")
    rows, figures = [], {}
    for role, path in checkpoints.items():
        net, meta = load_feature_net(weights_file(path))
        domain = meta["domain"]
        if settings.uri:
            table = read_dataset(settings.uri)
        else:
            seed = settings.seed if settings.seed >= 0 else _held_out_seed(domain)
            size = settings.size or int(meta["extra"].get("image_size", 32))
            table = generate_tables(domain, settings.n, seed, size)
        x, y = domain_tensors(table, domain)
        pred = predict_labels(net, x, domain)
        rows.append({"model": role, "domain": domain, "classes": meta["num_classes"],
                     "accuracy": float((pred == y).float().mean()) if y.numel() else float("nan"),
                     "chance": 1.0 / meta["num_classes"], "n": int(y.shape[0]), "weights": path})
        if out_dir and y.numel():
            figures.update(report_figures(role, domain, x, y, pred, meta))
    table = EvalTable(
        title="Feature extractor: held-out accuracy on the domain label",
        columns={"model": ("model", ""), "domain": ("domain", ""), "classes": ("classes", "d"),
                 "accuracy": ("accuracy", ".4f"), "chance": ("chance", ".3f"), "n": ("N", "d")},
        rows=rows)
    if out_dir:
        from fabdistill.reports import run_curves, write_report

        figures["training curves"] = run_curves(checkpoints)
        figures["accuracy curves"] = run_curves(checkpoints, match=("acc",), ylabel="accuracy", log_y=False,
                                                title="accuracy during training (rank 0)")
        table.report_path = write_report(out_dir, "Feature extractor evaluation", table, figures)
    return table


def report_figures(role: str, domain: str, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, meta: dict,
                   examples: int = 12) -> dict[str, Any]:
    """A model's confusion matrix and `examples` held-out inputs (native units x (N, C, H, W)) titled true →
    predicted class, wrong ones first in red: overlay maps as dx | dy heat maps, wafer maps in the wafer palette,
    SEM images grey."""
    import numpy as np

    from fabdistill.viz import confusion_matrix, overlay_heatmaps, sem_images, wafer_maps

    yy, pp = y.numpy(), pred.numpy()
    k = max(int(meta["num_classes"]), int(yy.max()) + 1, int(pp.max()) + 1)
    names = list(meta.get("class_names") or [])
    names = names + [str(i) for i in range(len(names), k)]
    short = [n.replace("equipment_", "eq ") for n in names]
    order = np.concatenate([np.flatnonzero(pp != yy), np.flatnonzero(pp == yy)])[:examples]
    titles = [f"{short[yy[i]]} → {short[pp[i]]}" for i in order]
    heading = f"{role}: held-out {domain} inputs, true → predicted (wrong ones first)"
    shown = x[order].numpy()
    if domain == "overlay":
        from data.overlay import grid_coordinates

        valid = grid_coordinates(shown.shape[-2], shown.shape[-1])["valid"]
        picture = overlay_heatmaps(shown, titles, valid=valid, columns=4, heading=heading)
    elif domain == "wafer":
        picture = wafer_maps(shown[:, 0], titles, columns=6, heading=heading,
                             title_colours=["#c0392b" if pp[i] != yy[i] else "black" for i in order])
    else:
        picture = sem_images(shown[:, 0], titles=titles, columns=6, heading=heading)
    return {f"confusion {role}": confusion_matrix(yy, pp, short, title=f"{role} ({domain})"),
            f"examples {role}": picture}


#################################################################################
#                                    CLI                                        #
#################################################################################

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.feature_extractor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", choices=DOMAINS, help="overlay | wafer | sem (export default: overlay)")
    p.add_argument("--export", metavar="PATH", help="train the domain's recipe in-process and write a weights file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="with no --export: YAML config of a training run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable); with --export, changes to the recipe")
    args = p.parse_args(argv)
    if args.export:
        domain = args.domain or "overlay"
        changes = dict(item.split("=", 1) for item in args.set)
        extra = export_feature_extractor(domain, args.export, seed=args.seed, log=print, **changes)
        size_mb = os.path.getsize(args.export) / 2**20
        print(f"[{domain}] train accuracy {extra['train_accuracy']:.4f}, held-out accuracy "
              f"{extra['heldout_accuracy']:.4f} ({extra['num_classes']} classes, chance "
              f"{1 / extra['num_classes']:.3f}); wrote {args.export} ({size_mb:.2f} MB)")
        return 0
    from fabdistill.config import load_config

    domain = [f"trainer.domain={args.domain}"] if args.domain else []
    cfg = load_config(Config, args.config, [*domain, *args.set])
    outcome = train(cfg)
    print(f"run folder: {outcome.run_dir}; metrics: {outcome.metrics}")
    return 0


METHOD = Method(
    name="feature_extractor",
    summary="domain feature net for FID/KID (overlay / wafer / SEM label classifier)",
    Config=Config,
    train=train,
    load="models.feature_extractor:load_feature_net",
    evaluate=evaluate, EvalSettings=EvalSettings, eval_roles=("model",),
    default_config="configs/feature_extractor.yaml",
)


if __name__ == "__main__":
    sys.exit(main())
