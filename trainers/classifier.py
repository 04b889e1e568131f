"""Supervised classifier (any family of models/classifiers.py) on labelled wafer maps or images, on Ray Train DDP.

Write-up: cross-entropy classifier (any family of models/classifiers.py: CIFAR ResNets, ShuffleNetV1, MobileNetV2)
on labelled wafer maps (nine WM-811K classes, or the 38 MixedWM38 mixed-type classes with data.generator=mixed_wafer)
or a Parquet "image" set; Fast-AD's teacher, SDD-LSKD's teacher, and the "student trained on real data" reference.

    L = −Σ_c q_c log softmax(f(x))_c,  q = (1−ε)·onehot(y) + ε/C   (label smoothing ε), SGD + Nesterov momentum
    (or AdamW), linear warm-up then cosine decay (trainers/common.py lr_at).

Data: each worker holds its Ray Data shard in memory (TrainSession.load_shard, decoded by data/datasets.py,
encoded by data/encoding.py: wafer 0/1/2 → {−1, 0, +1}, uint8 images → [−1, 1]) and draws shuffled batches per
epoch from a generator derived from (seed, rank, epoch), so a resumed or in-process run sees the same batches.
Wafer-map augmentation: the 8 symmetries of the square (flips, 90° rotations) keep every WM-811K class.

    python -m apps.train classifier --config configs/classifier_wafer.yaml            # Ray Train DDP
    python -m apps.train classifier --config ... --set run.num_workers=0               # the same loop in-process
    python -m apps.evaluate classifier --checkpoint model=runs/classifier_wafer --n 1000
    python -m apps.sweep classifier --space lr=0.02,0.05,0.1 ...                        # trainers/classifier_tune.py

The exported checkpoint (`<run>/model/`) holds `state["model"]` and meta
{"kind": "classifier", "arch", "num_classes", "in_channels", "encoding", "classes"}: load it with
fabdistill.inference.classifier.load_classifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.schema import NUM_WAFER_CLASSES, WAFER_CLASSES
from data.seeds import WAFER_HELD_OUT, check_not_held_out
from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.classifier import (classifier_meta, decode_wafer, encode_images,  # noqa: F401
                                             encode_wafer, evaluate_top1, load_classifier, predict_logits)
from fabdistill.methods import EvalTable, Method, TrainOutcome
from models.classifiers import CLASSIFIER_ARCHS, build_classifier
from trainers.common import Cadence, derive_seed, epoch_batches, generator, lr_at, set_lr
from trainers.launch import RunSection, TrainSession, launch, save_state

# The kinds a classifier trains on, and the label key of their tensors (data/datasets.py).
LABEL_KEY = "label"
CLASSIFIER_KINDS = ("wafer", "image")
# Generated wafer data: the nine WM-811K classes (data/wafer.py) or the 38 MixedWM38 classes (data/mixed_wafer.py).
GENERATORS = ("wafer", "mixed_wafer")
MIXED_LABEL = "mixed_label"  # the 38-class column of mixed tables
NUM_MIXED_CLASSES = 38


####################################################################################################################
# Data
####################################################################################################################


def labelled_inputs(tensors: dict[str, Tensor], kind: str) -> tuple[Tensor, Tensor]:
    """data/datasets.py tensors of a "wafer" or "image" batch → (x (N, C, H, W) in [−1, 1], labels (N,) long),
    unlabelled rows (label −1) dropped."""
    from data.datasets import keep_labelled
    from data.encoding import encode_tensors

    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"a classifier trains on {CLASSIFIER_KINDS} data, not {kind!r}")
    tensors = keep_labelled(tensors, LABEL_KEY)
    return encode_tensors(tensors, kind), tensors[LABEL_KEY]


def dataset_kind(table: Any) -> str:
    """The kind of a labelled table (or its pyarrow Schema): from its metadata, else from its columns."""
    from data.schema import META_KIND

    schema = getattr(table, "schema", table)
    names = schema.names
    kind = ((schema.metadata or {}).get(META_KIND, b"").decode() or
            ("wafer" if "wafer_map" in names else "image" if "image" in names else None))
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"a classifier needs a 'wafer' or 'image' dataset, got kind {kind!r}")
    return kind


def table_inputs(table: Any, label_column: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """A whole labelled pyarrow Table → (x, labels) as labelled_inputs; `label_column` (e.g. "mixed_label") is the
    column read as the label (None: "label")."""
    from data.datasets import table_to_tensors

    kind = dataset_kind(table)
    return labelled_inputs(table_to_tensors(table, kind, label_column), kind)


def class_names(kind: str, label_column: Optional[str]) -> Optional[list[str]]:
    """Class names of wafer data read through `label_column`; None (numbered classes) for images."""
    from data.mixed_wafer import MIXED_CLASSES

    if label_column == MIXED_LABEL:
        return list(MIXED_CLASSES)
    return list(WAFER_CLASSES) if kind == "wafer" else None


def generate_table(generator_name: str, n: int, seed: int, size: int,
                   class_weights: Optional[list[float]] = None) -> Any:
    """n generated labelled maps as a "wafer" table: nine-class (data/wafer.py) or 38-class mixed-type
    (data/mixed_wafer.py; its per-pattern masks dropped, a classifier never reads them)."""
    if generator_name == "wafer":
        from data.wafer import generate_wafer

        return generate_wafer(n, seed=seed, size=size, class_weights=class_weights or None)
    if generator_name == "mixed_wafer":
        from data.mixed_wafer import generate_mixed_wafer

        table = generate_mixed_wafer(n, seed=seed, size=size, class_weights=class_weights or None)
        return table.drop_columns(["pattern_masks"])
    raise ValueError(f"unknown wafer generator {generator_name!r}; one of {GENERATORS}")


def default_label_column(generator_name: str) -> str:
    return MIXED_LABEL if generator_name == "mixed_wafer" else LABEL_KEY


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


def wafer_tensors(n: int, seed: int, size: int = 32, class_weights: Optional[list[float]] = None,
                  generator: str = "wafer") -> tuple[Tensor, Tensor]:
    """n generated wafer maps as (x (n, 1, size, size) in {−1, 0, 1}, labels (n,) long): the nine WM-811K
    classes, or the 38 mixed-type classes with generator="mixed_wafer"."""
    return table_inputs(generate_table(generator, n, seed, size, class_weights), default_label_column(generator))


def heldout_tensors(uri: Optional[str], split: Optional[str], n: int, seed: int, size: int,
                    generator: str = "wafer", label_column: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Labelled held-out data as (x (N, C, H, W), y (N,)): the `split` rows of a Parquet dataset (unlabelled rows
    dropped; labels from `label_column`, default "label"), or n maps of `generator` when uri is None. The teacher,
    SDD-LSKD's students and Fast-AD's student evaluate on the same."""
    if uri:
        from data.parquet_io import read_dataset

        return table_inputs(select_split(read_dataset(uri), split), label_column or None)
    return wafer_tensors(n, seed, size, generator=generator)


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
# Loss, one step
####################################################################################################################


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    # L = −Σ_c q_c log softmax(z)_c with q = (1−ε)·onehot(y) + ε/C (mean over the batch)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (sgd or adamw)")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
               label_smoothing: float = 0.0, amp: Optional[contextlib.AbstractContextManager] = None
               ) -> tuple[float, int]:
    """One optimiser step of cross-entropy on (x (B, C, H, W), y (B,)) at the optimiser's current lr;
    returns (loss, number of correct predictions in the batch). Shared by every classification trainer.
    `amp`: the context of the forward pass and loss (a loop passes `TrainSession.autocast()`); None: float32."""
    model.train()
    with amp if amp is not None else contextlib.nullcontext():
        logits = model(x)  # (B, K)
        loss = classification_loss(logits, y, label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())


####################################################################################################################
# Checkpoints
####################################################################################################################


def save_classifier(directory: str, model: nn.Module, encoding: str, classes: Optional[list[str]] = None,
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
    generator: str = knob("wafer", choices=GENERATORS,
                          help="generated maps (uri None): nine WM-811K classes, or the 38 MixedWM38 classes")
    label_column: str = knob("", choices=("", LABEL_KEY, MIXED_LABEL),
                             help="column read as the label: '' = mixed_label for generated mixed maps, else "
                                  "label; mixed_label for an imported MixedWM38 set")
    eval_uri: Optional[str] = knob(None, help="held-out Parquet dataset; None: `uri`'s eval_split rows if it has "
                                              "a split column, else generated held-out wafer maps")
    train_split: str = knob("train", help="rows of `uri` used for training when it has a split column (CIFAR)")
    eval_split: str = knob("test", help="rows used for evaluation when the dataset has a split column")
    n_train: int = knob(6000, ge=1, help="generated training maps (when uri is None)")
    n_eval: int = knob(1000, ge=0, help="generated held-out maps (when eval_uri is None); 0 skips evaluation")
    seed: int = knob(1, ge=0, help="generator seed of the training maps")
    eval_seed: int = knob(WAFER_HELD_OUT, ge=0, help="generator seed of the held-out maps (data/seeds.py "
                                                     "WAFER_HELD_OUT; Fast-AD evaluates on the same)")
    size: int = knob(32, ge=8, le=256, help="wafer map size (pixels per side)")
    class_weights: list[float] = knob([], help=f"class mix of generated maps ({NUM_WAFER_CLASSES} weights in "
                                               f"WAFER_CLASSES order, {NUM_MIXED_CLASSES} in MIXED_CLASSES order "
                                               f"for mixed maps); [] is uniform")

    def labels_from(self) -> str:
        """The label column this section reads."""
        return self.label_column or (default_label_column(self.generator) if self.uri is None else LABEL_KEY)

    def num_generated_classes(self) -> int:
        return NUM_MIXED_CLASSES if self.generator == "mixed_wafer" else NUM_WAFER_CLASSES


@dataclasses.dataclass
class ModelSection:
    arch: str = knob("resnet20", choices=tuple(CLASSIFIER_ARCHS),
                     help="classifier size (models/classifiers.py: ResNets, ShuffleNetV1, MobileNetV2)")
    num_classes: int = knob(NUM_WAFER_CLASSES, ge=2,
                            help=f"classes ({NUM_WAFER_CLASSES} WM-811K wafer classes, {NUM_MIXED_CLASSES} "
                                 f"mixed-type, 100 for CIFAR-100)")
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
        k = self.data.num_generated_classes()
        if self.data.class_weights and len(self.data.class_weights) != k:
            raise ConfigError(f"data.class_weights needs {k} weights for data.generator={self.data.generator} "
                              f"(class order of its generator), got {len(self.data.class_weights)}")
        if self.data.uri is None and self.data.eval_uri is None and self.data.n_eval > 0:
            try:
                check_not_held_out(self.data.seed, "data.seed", self.data.eval_seed)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def eval_source(d: DataSection, n: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Where the held-out set of a config comes from, as heldout_tensors' arguments; None if it has none.

    An explicit eval_uri; else the eval_split rows of `uri` when it has a split column; else (generated training
    data) `n` (default n_eval) maps generated with eval_seed."""
    labels = {"generator": d.generator, "label_column": d.labels_from()}
    if d.eval_uri is not None:
        return {"uri": d.eval_uri, "split": d.eval_split, "n": 0, "seed": 0, "size": d.size, **labels}
    if d.uri is not None:
        from data.parquet_io import read_dataset

        table = read_dataset(d.uri, columns=["split"]) if "split" in dataset_schema(d.uri).names else None
        if table is not None and d.eval_split in set(table["split"].unique().to_pylist()):
            return {"uri": d.uri, "split": d.eval_split, "n": 0, "seed": 0, "size": d.size, **labels}
        return None
    n = d.n_eval if n is None else n
    return ({"uri": None, "split": None, "n": n, "seed": d.eval_seed, "size": d.size, **labels} if n > 0
            else None)


def dataset_schema(uri: str) -> Any:
    """The pyarrow Schema (with fabdistill metadata) of a Parquet dataset's first part, without reading rows."""
    import pyarrow.parquet as pq

    from data.parquet_io import parquet_files

    fs, files = parquet_files(uri)
    return pq.read_schema(files[0], filesystem=fs)


####################################################################################################################
# The training loop (Ray Train workers, or in-process with run.num_workers=0)
####################################################################################################################


def epoch_plan(rows: int, batch_size: int, steps: int, seed: int, rank: int,
               epoch: int) -> tuple[torch.Generator, list[Tensor]]:
    """(generator, `steps` batches of row indices) of one epoch over a worker's in-memory shard of `rows` rows.

    Drawn from (seed, rank, epoch) only, so a resumed run replays the very batches it would have drawn; the
    generator goes on to draw the epoch's augmentations. Every rank must take the same number of DDP steps."""
    gen = generator(seed, "batches", rank, epoch)
    batches = epoch_batches(rows, batch_size, gen)[:steps]
    if len(batches) < steps:
        raise ValueError(f"worker {rank} holds {rows} labelled rows, fewer than {steps} batches of {batch_size}")
    return gen, batches


def loop(config: dict) -> None:
    """Per-worker loop run by trainers.launch.launch: DDP, in-memory shard, checkpoint per epoch, resume."""
    sess = TrainSession.current()
    seed = config["seed"]
    torch.manual_seed(derive_seed(seed, "init"))  # identical initial weights on every rank
    net = build_classifier(config["arch"], config["num_classes"], config["in_channels"])
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

    kind, steps_per_epoch, bs = config["kind"], config["steps_per_epoch"], config["batch_size"]
    x_all, y_all = labelled_inputs(load_shard(sess, "train", kind, config.get("label_column")), kind)
    eval_x = eval_y = None
    if sess.is_main and config["eval"] is not None:
        eval_x, eval_y = heldout_tensors(**config["eval"])

    total = config["epochs"] * steps_per_epoch
    cadence = Cadence(1, config["checkpoint_every_epochs"], config["epochs"])  # counted in epochs
    for epoch in range(start_epoch, config["epochs"]):
        gen, batches = epoch_plan(x_all.shape[0], bs, steps_per_epoch, seed, sess.rank, epoch)
        sums = [0.0, 0.0, 0.0]  # loss × rows, correct, rows
        for idx in batches:
            x, y = x_all[idx], y_all[idx]
            if config["augment"]:
                x = random_dihedral(x, gen)
            step += 1
            set_lr(opt, lr_at(step, total, config["lr"], warmup_steps=config["warmup_steps"]))
            loss, ok = train_step(model, opt, *sess.to_device((x, y)), config["label_smoothing"], sess.autocast())
            sums = [sums[0] + loss * y.shape[0], sums[1] + ok, sums[2] + y.shape[0]]
        loss_sum, correct, seen = sess.all_reduce_mean(sums)  # means of sums: their ratios are global
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1e-12),
                                   "train_acc": correct / max(seen, 1e-12), "lr": opt.param_groups[0]["lr"]}
        if eval_x is not None:
            metrics["heldout_top1"] = evaluate_top1(net, eval_x, eval_y)
        checkpoint = cadence.checkpoint(epoch + 1)
        sess.report(metrics, step=step,
                    state=(lambda: {"model": net.state_dict(), "optimizer": opt.state_dict()}) if checkpoint else None,
                    meta={**classifier_meta(net, config["encoding"], config["classes"]), "epoch": epoch})


def load_shard(sess: TrainSession, name: str, kind: str, label_column: Optional[str] = None,
               batch_size: int = 1024) -> dict[str, Tensor]:
    """This worker's whole shard as tensors (TrainSession.load_shard, reading `label_column` as the label)."""
    from data.datasets import batch_to_tensors

    if not label_column or label_column == LABEL_KEY:
        return sess.load_shard(name, kind, batch_size)
    parts: dict[str, list[Tensor]] = {}
    for batch in sess.dataset(name).iter_batches(batch_size=batch_size, batch_format="numpy"):
        for key, value in batch_to_tensors(batch, kind, label_column).items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError(f"dataset '{name}' gave worker {sess.rank} no rows (fewer rows than workers?)")
    return {key: torch.cat(values) for key, values in parts.items()}


def _labelled_rows(uri: str, label_column: str = LABEL_KEY) -> int:
    from data.parquet_io import read_dataset

    if label_column not in dataset_schema(uri).names:
        raise ValueError(f"{uri}: no label column {label_column!r} (data.label_column); "
                         f"columns: {dataset_schema(uri).names}")
    labels = read_dataset(uri, columns=[label_column]).column(0).to_numpy()
    n = int((labels >= 0).sum())
    if n == 0:
        raise ValueError(f"{uri}: no labelled rows")
    return n


def split_dataset(uri: str, train_split: str, eval_split: str, folder: str) -> tuple[str, Optional[str]]:
    """A dataset with a split column (a CIFAR import) → (train-rows dataset, eval-rows dataset or None), written
    once into `folder`; a dataset without one is used as it is: (uri, None)."""
    from data.parquet_io import read_dataset, write_dataset
    from fabdistill import storage

    table = read_dataset(uri)
    values = set(table["split"].unique().to_pylist()) - {""} if "split" in table.column_names else set()
    if not values:
        return uri, None
    kind = dataset_kind(table)
    train_uri, eval_uri = storage.join(folder, "train"), storage.join(folder, "eval")
    if not storage.exists(train_uri):
        write_dataset(select_split(table, train_split), train_uri, kind)
    if eval_split in values and not storage.exists(eval_uri):
        write_dataset(select_split(table, eval_split), eval_uri, kind)
    return train_uri, (eval_uri if eval_split in values else None)


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Generate (or take) the labelled Parquet data and run `loop` through trainers.launch (Ray Train workers, or
    in-process with run.num_workers=0); the final checkpoint is exported to `<storage_path>/<name>/model/`.
    `callbacks` are Ray Train callbacks (a Tune sweep's TuneReportCallback)."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from trainers.launch import run_dir

    d, m, o = cfg.data, cfg.model, cfg.optim
    out = run_dir(cfg.run)
    uri = d.uri
    label_column = d.labels_from()
    if uri is None:
        k = d.num_generated_classes()
        if m.num_classes != k or m.in_channels != 1:
            raise ConfigError(f"generated {d.generator} maps need model.num_classes={k} and model.in_channels=1 "
                              f"(got {m.num_classes}, {m.in_channels}); set data.uri for other data")
        if d.generator == "wafer" and label_column != LABEL_KEY:
            raise ConfigError(f"generated nine-class wafer maps have no {label_column!r} column; "
                              f"use data.generator=mixed_wafer")
        uri = storage.join(out, "data", "train")
        if not storage.exists(uri):  # deterministic by seed, so a resumed run sees the same data
            write_dataset(generate_table(d.generator, d.n_train, d.seed, d.size, d.class_weights), uri, "wafer")
        kind = "wafer"
    else:
        uri, split_eval = split_dataset(uri, d.train_split, d.eval_split, storage.join(out, "data"))
        if d.eval_uri is None and split_eval is not None:
            d = dataclasses.replace(d, eval_uri=split_eval)
        kind = dataset_kind(dataset_schema(uri))
    classes = class_names(kind, label_column)
    if classes is not None and len(classes) != m.num_classes:
        raise ConfigError(f"{label_column!r} labels have {len(classes)} classes but model.num_classes="
                          f"{m.num_classes}")
    rows = _labelled_rows(uri, label_column)
    workers = max(1, cfg.run.num_workers)
    steps_per_epoch = rows // (o.batch_size * workers)
    if steps_per_epoch < 1:
        raise ConfigError(f"{uri}: {rows} labelled rows are fewer than batch_size × workers = "
                          f"{o.batch_size} × {workers}")
    loop_config = {
        "arch": m.arch, "num_classes": m.num_classes, "in_channels": m.in_channels, "epochs": o.epochs,
        "batch_size": o.batch_size, "optimizer": o.optimizer, "lr": o.lr, "weight_decay": o.weight_decay,
        "warmup_steps": o.warmup_steps, "label_smoothing": o.label_smoothing, "augment": o.augment,
        "checkpoint_every_epochs": o.checkpoint_every_epochs, "steps_per_epoch": steps_per_epoch,
        "seed": cfg.run.seed, "eval": eval_source(d), "classes": classes, "kind": kind,
        "encoding": "wafer_pm1" if kind == "wafer" else "image_pm1", "label_column": label_column,
    }
    return launch(loop, loop_config, cfg.run, datasets={"train": uri}, full_config=cfg, extra_callbacks=callbacks)


####################################################################################################################
# Evaluation
####################################################################################################################


@dataclasses.dataclass
class EvalSettings:
    """Held-out data for `apps.evaluate classifier`: generated wafer maps, or the split rows of a Parquet set."""

    n: int = knob(1000, ge=1, le=10_000_000, help="generated held-out wafer maps (when uri is empty)")
    seed: int = knob(WAFER_HELD_OUT, ge=0, help="generator seed of the held-out maps (data/seeds.py WAFER_HELD_OUT)")
    size: int = knob(32, ge=8, le=256, help="generated wafer map size")
    generator: str = knob("wafer", choices=GENERATORS, help="generated held-out maps: nine or 38 classes")
    label_column: str = knob("", choices=("", LABEL_KEY, MIXED_LABEL),
                             help="label column of `uri` ('' = label)")
    uri: str = knob("", help="labelled Parquet dataset (real data, local or s3://); empty: generated maps")
    split: str = knob("test", help="rows of `uri` used when it has a split column")
    batch_size: int = knob(512, ge=1, le=65_536, help="inference batch size")


@dataclasses.dataclass
class HeldOutPredictions:
    """What a classifier report draws: the held-out inputs x (N, C, H, W) in [−1, 1] (`encoding`: wafer_pm1 or
    image_pm1), labels y (N,), each role's predicted labels (N,) and the class names."""

    x: Tensor
    y: Tensor
    predictions: dict[str, Tensor]
    class_names: list[str]
    encoding: str


def score_checkpoints(checkpoints: dict[str, str], settings: EvalSettings) -> tuple[EvalTable, HeldOutPredictions]:
    """Held-out top-1 and inference speed of each checkpoint ({role: checkpoint or run folder}), one row each, and
    the predictions the report draws."""
    if not checkpoints:
        raise ValueError("evaluate needs at least one checkpoint ({role: path})")
    x, y = heldout_tensors(settings.uri or None, settings.split, settings.n, settings.seed, settings.size,
                           settings.generator, settings.label_column or None)
    what = "mixed-type wafer maps" if settings.generator == "mixed_wafer" else "wafer maps"
    source = settings.uri or f"{x.shape[0]} generated {what}, seed {settings.seed}"
    rows, predictions, metas = [], {}, []
    for role, path in checkpoints.items():
        model, meta = load_classifier(path)
        if meta["in_channels"] != x.shape[1]:
            raise ValueError(f"{role} ({path}) takes {meta['in_channels']}-channel inputs; the held-out data "
                             f"have {x.shape[1]}")
        predict_logits(model, x[:8], settings.batch_size)  # warm-up, not timed
        t0 = time.perf_counter()
        logits = predict_logits(model, x, settings.batch_size)
        spent = time.perf_counter() - t0
        predictions[role] = logits.argmax(1)
        metas.append(meta)
        rows.append({"model": role, "arch": meta["arch"], "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "top1": float((predictions[role] == y).float().mean()),
                     "images_per_s": x.shape[0] / max(spent, 1e-9), "checkpoint": path})
    table = EvalTable(
        title=f"Held-out top-1 ({source})",
        columns={"model": ("model", ""), "arch": ("arch", ""), "params_m": ("params (M)", ".2f"),
                 "top1": ("top-1", ".4f"), "images_per_s": ("images/s", ".0f")},
        rows=rows, extras={"n": int(x.shape[0]), "seed": settings.seed, "uri": settings.uri})
    return table, heldout_predictions(x, y, predictions, metas)


def heldout_predictions(x: Tensor, y: Tensor, predictions: dict[str, Tensor], metas: list[dict]) -> HeldOutPredictions:
    """HeldOutPredictions with the class names of the first checkpoint that names enough classes (else numbers)."""
    k = int(max([int(y.max())] + [int(p.max()) for p in predictions.values()])) + 1 if y.numel() else 1
    names = next((list(m["classes"]) for m in metas if len(m.get("classes") or []) >= k), [str(i) for i in range(k)])
    return HeldOutPredictions(x, y, predictions, names, metas[0].get("encoding", "wafer_pm1") if metas else "wafer_pm1")


def report_figures(held: HeldOutPredictions, checkpoints: dict[str, str], examples: int = 16) -> dict[str, Any]:
    """Figures of a classifier report: per role a confusion matrix and `examples` held-out inputs titled true →
    predicted class (wrong ones first, in red); loss and accuracy curves from the checkpoints' metrics.jsonl."""
    from data.encoding import decode_images
    from fabdistill.reports import run_curves
    from fabdistill.viz import confusion_matrix, images_grid, wafer_maps

    figures: dict[str, Any] = {}
    names = held.class_names
    y = held.y.numpy()
    for role, pred in held.predictions.items():
        p = pred.numpy()
        figures[f"confusion {role}"] = confusion_matrix(y, p, names, title=role)
        order = np.concatenate([np.flatnonzero(p != y), np.flatnonzero(p == y)])[:examples]
        titles = [f"{names[y[i]]}\n→ {names[p[i]]}" for i in order]
        colours = ["#c0392b" if p[i] != y[i] else "black" for i in order]
        heading = f"{role}: held-out inputs, true → predicted class (wrong ones first, red)"
        if held.encoding == "wafer_pm1":
            shown = decode_wafer(held.x[order]).numpy()
            figures[f"examples {role}"] = wafer_maps(shown, titles, heading=heading, title_colours=colours)
        else:
            images = decode_images(held.x[order]).numpy() / 255.0  # (k, C, H, W) in [0, 1]
            images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
            figures[f"examples {role}"] = images_grid(images, titles, heading=heading, title_colours=colours)
    figures["training curves"] = run_curves(checkpoints)
    figures["accuracy curves"] = run_curves(checkpoints, match=("top1", "acc", "agreement"), ylabel="accuracy",
                                            title="accuracy during training (rank 0)", log_y=False)
    return figures


def write_report(out_dir: str, title: str, table: EvalTable, held: HeldOutPredictions,
                 checkpoints: dict[str, str], notes: tuple[str, ...] = ()) -> str:
    """report.md with the table and report_figures, and metrics.json, into out_dir."""
    from fabdistill.reports import write_report as write

    return write(out_dir, title, table, report_figures(held, checkpoints), notes=notes)


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Held-out top-1 and inference speed of each checkpoint ({role: checkpoint or run folder}), one row each;
    report.md with confusion matrices, held-out examples and training curves in `out_dir` when given."""
    table, held = score_checkpoints(checkpoints, settings or EvalSettings())
    if out_dir:
        table.report_path = write_report(out_dir, "Classifier evaluation", table, held, checkpoints)
    return table


METHOD = Method(
    name="classifier",
    summary="classifier (ResNet / ShuffleNetV1 / MobileNetV2) on labelled wafer maps or images",
    Config=Config,
    train=train,
    load="fabdistill.inference.classifier:load_classifier",
    evaluate=evaluate, EvalSettings=EvalSettings, eval_roles=("model", "teacher", "student", "baseline"),
    space="trainers.classifier_tune:SPACE",
    students=("classifier",),
    default_config="configs/classifier_wafer.yaml",
)
