"""SDD-LSKD: a large classifier teaches a small one through multi-scale, standardised logit distillation.

Write-up (docs/sdd_lskd.md; losses in trainers/distillers.py): a teacher (default ResNet32x4) trains as
trainers/classifier.py does; a student (ResNet8x4, ShuffleNetV1, MobileNetV2, any models/classifiers.py arch) trains
on the same labelled maps with one distiller of trainers/distillers.DISTILLERS:

    none | kd | dkd | lskd_kd | lskd_dkd | sdd_kd | sdd_dkd | sdd_lskd
    L = ce_weight·CE(z_s, y) + kd_weight·w(epoch)·D(z_s^ms, z_t^ms)      w: DKD's linear warm-up (DKD-based only)

with SGD (momentum 0.9, weight decay 5e-4) and the standard multistep schedule (×0.1 at 150/180/210 of 240
epochs, as fractions of the run: trainers/common.lr_at schedule="multistep"). The teacher is frozen and pinned to
eval mode (its BatchNorm statistics never move); SDD's multi-scale logits come from models/multiscale.MultiScaleNet,
which at inference adds nothing: the exported student is a plain classifier checkpoint that
fabdistill.inference.classifier.load_classifier and the "classifier" Serve kind read.

Data: the 38-class MixedWM38-style mixed-type wafer maps (data/mixed_wafer.py, 52×52 by default), generated once
into `<run>/data/{train,eval}`; or a Parquet uri (a MixedWM38 import with data.label_column=mixed_label, or a
CIFAR-100 import with its train/test split column), as trainers/classifier.py reads it.

    python -m apps.train sdd_lskd --config configs/sdd_lskd.yaml                      # teacher, then student
    python -m apps.train sdd_lskd --config configs/sdd_lskd.yaml --set phase=student \\
        --set teacher_checkpoint=runs/sdd_lskd-teacher --set student.distiller=dkd --set run.name=dkd
    python -m apps.evaluate sdd_lskd --checkpoint teacher=runs/sdd_lskd-teacher student=runs/sdd_lskd-student

Run folders: `<name>/data`, `<name>-teacher` (a classifier run), `<name>-student` (checkpoints, metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor, nn

from data.seeds import WAFER_HELD_OUT, check_not_held_out
from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.classifier import classifier_meta, evaluate_top1
from fabdistill.methods import EvalTable, Method, TrainOutcome
from models.classifiers import CLASSIFIER_ARCHS, build_classifier, classifier_from_meta
from models.multiscale import MultiScaleNet, check_scales
from trainers import classifier as clf
from trainers.common import derive_seed, lr_at, set_lr
from trainers.distillers import DISTILLERS, MULTI_SCALE_DISTILLERS, DistillSettings, get_distiller, total_loss
from trainers.launch import RunSection, TrainSession, launch

PHASES = ("both", "teacher", "student")


####################################################################################################################
# Config
####################################################################################################################


@dataclasses.dataclass
class DataSection(clf.DataSection):
    """Labelled data, as the classifier's, defaulting to generated 38-class mixed-type maps of 52×52."""

    generator: str = knob("mixed_wafer", choices=clf.GENERATORS,
                          help="generated maps (uri None): 38 MixedWM38 classes, or the nine WM-811K ones")
    n_train: int = knob(6000, ge=1, help="generated training maps (when uri is None)")
    n_eval: int = knob(1000, ge=1, help="generated held-out maps (when eval_uri is None)")
    size: int = knob(52, ge=8, le=256, help="wafer map size (MixedWM38: 52)")


@dataclasses.dataclass
class ModelSection:
    num_classes: int = knob(clf.NUM_MIXED_CLASSES, ge=2, help="38 mixed-type classes, 9 WM-811K, 100 CIFAR-100")
    in_channels: int = knob(1, ge=1, le=4, help="1 for wafer maps, 3 for CIFAR")


@dataclasses.dataclass
class TeacherSection(clf.OptimSection):
    """The teacher's arch and its classifier training (trainers/classifier.py OptimSection)."""

    arch: str = knob("resnet32x4", choices=tuple(CLASSIFIER_ARCHS), help="teacher classifier")
    epochs: int = knob(30, ge=1, help="passes over the training data")


@dataclasses.dataclass
class StudentSection:
    arch: str = knob("resnet8x4", choices=tuple(CLASSIFIER_ARCHS), help="student classifier")
    distiller: str = knob("sdd_lskd", choices=tuple(DISTILLERS), help="trainers/distillers.py DISTILLERS")
    scales: list[int] = knob([1, 2, 4], help="SDD's M: pooling grids, starting with 1 (SDD distillers only)")
    ce_weight: float = knob(1.0, ge=0, le=100, help="weight of the cross-entropy on the global logits")
    kd_weight: float = knob(1.0, ge=0, le=1000, help="weight of the distillation term (LSKD recipes: 9)")
    temperature: float = knob(4.0, gt=0, le=100, help="T of kd, dkd, sdd_kd, sdd_dkd")
    base_temperature: float = knob(2.0, gt=0, le=100, help="τ after Z-scoring (lskd_kd, lskd_dkd, sdd_lskd)")
    alpha: float = knob(1.0, ge=0, le=1000, help="DKD's TCKD weight")
    beta: float = knob(8.0, ge=0, le=1000, help="DKD's NCKD weight")
    warmup: float = knob(20.0, ge=0, le=10_000, help="epochs of DKD's linear warm-up (DKD-based distillers)")
    complementary_weight: float = knob(2.0, ge=0, le=100, help="SDD's weight of complementary regions")
    epochs: int = knob(40, ge=1, help="passes over the training data")
    batch_size: int = knob(64, ge=1, help="per-worker batch size")
    lr: float = knob(0.05, gt=0, le=10, help="SGD learning rate (mdistiller: 0.05)")
    momentum: float = knob(0.9, ge=0, lt=1)
    weight_decay: float = knob(5e-4, ge=0, le=1)
    milestones: list[float] = knob([0.625, 0.75, 0.875], help="×gamma points: fractions of the run (150/180/210 "
                                                              "of 240 epochs) or step numbers")
    gamma: float = knob(0.1, gt=0, le=1)
    warmup_steps: int = knob(0, ge=0, help="linear lr warm-up steps (mdistiller: none)")
    augment: bool = knob(True, help="random flips / 90° rotations (label-preserving for wafer maps)")
    checkpoint_every_epochs: int = knob(1, ge=1)

    def settings(self, epoch: Optional[float] = None) -> DistillSettings:
        return DistillSettings(ce_weight=self.ce_weight, kd_weight=self.kd_weight, temperature=self.temperature,
                               base_temperature=self.base_temperature, alpha=self.alpha, beta=self.beta,
                               warmup=self.warmup, complementary_weight=self.complementary_weight, epoch=epoch)


@dataclasses.dataclass
class Config:
    phase: str = knob("both", choices=PHASES, help="teacher, student (needs teacher_checkpoint), or both")
    teacher_checkpoint: Optional[str] = knob(None, help="a trained teacher (checkpoint or run folder) for "
                                                        "phase=student")
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    teacher: TeacherSection = section(TeacherSection)
    student: StudentSection = section(StudentSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        try:
            check_scales(self.student.scales)
        except ValueError as exc:
            raise ConfigError(f"student.scales: {exc}") from None
        if self.phase == "student" and not self.teacher_checkpoint:
            raise ConfigError("phase=student needs teacher_checkpoint (a trained teacher's checkpoint or run folder)")
        k = self.data.num_generated_classes()
        if self.data.class_weights and len(self.data.class_weights) != k:
            raise ConfigError(f"data.class_weights needs {k} weights for data.generator={self.data.generator}")
        if self.data.uri is None:
            if self.model.num_classes != k or self.model.in_channels != 1:
                raise ConfigError(f"generated {self.data.generator} maps need model.num_classes={k} and "
                                  f"model.in_channels=1 (got {self.model.num_classes}, {self.model.in_channels})")
            try:
                check_not_held_out(self.data.seed, "data.seed", self.data.eval_seed)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


####################################################################################################################
# Data: prepared once, read by the teacher and every student
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class PreparedData:
    train_uri: str
    eval_uri: Optional[str]
    eval_split: str
    kind: str
    label_column: str
    classes: Optional[list[str]]

    @property
    def encoding(self) -> str:
        return "wafer_pm1" if self.kind == "wafer" else "image_pm1"

    def eval_source(self) -> Optional[dict[str, Any]]:
        """heldout_tensors' arguments for the held-out set."""
        if self.eval_uri is None:
            return None
        return {"uri": self.eval_uri, "split": self.eval_split, "n": 0, "seed": 0, "size": 0,
                "label_column": self.label_column}


def prepare_data(cfg: Config) -> PreparedData:
    """Generated maps written once to `<run>/data/{train,eval}` (deterministic by seed), or a Parquet uri split
    into its train / test rows (CIFAR) as the classifier does. Idempotent, so a resumed run reads the same."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from trainers.launch import run_dir

    d = cfg.data
    folder = storage.join(run_dir(cfg.run), "data")
    label_column = d.labels_from()
    if d.uri is None:
        train_uri, eval_uri = storage.join(folder, "train"), storage.join(folder, "eval")
        for uri, n, seed in ((train_uri, d.n_train, d.seed), (eval_uri, d.n_eval, d.eval_seed)):
            if not storage.exists(uri):
                write_dataset(clf.generate_table(d.generator, n, seed, d.size, d.class_weights), uri, "wafer")
        kind = "wafer"
    else:
        train_uri, split_eval = clf.split_dataset(d.uri, d.train_split, d.eval_split, folder)
        eval_uri = d.eval_uri or split_eval
        kind = clf.dataset_kind(clf.dataset_schema(train_uri))
    classes = clf.class_names(kind, label_column)
    if classes is not None and len(classes) != cfg.model.num_classes:
        raise ConfigError(f"{label_column!r} labels have {len(classes)} classes but model.num_classes="
                          f"{cfg.model.num_classes}")
    return PreparedData(train_uri, eval_uri, d.eval_split, kind, label_column, classes)


def teacher_config(cfg: Config, data: PreparedData) -> clf.Config:
    """The classifier config that trains this run's teacher on the prepared data."""
    t = cfg.teacher
    optim = clf.OptimSection(**{f.name: getattr(t, f.name) for f in dataclasses.fields(clf.OptimSection)})
    return clf.Config(
        data=clf.DataSection(uri=data.train_uri, eval_uri=data.eval_uri, eval_split=data.eval_split,
                             label_column=data.label_column, size=cfg.data.size),
        model=clf.ModelSection(arch=t.arch, num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels),
        optim=optim, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-teacher"))


####################################################################################################################
# One distillation step
####################################################################################################################


def frozen_teacher(state: dict, meta: dict, scales: tuple[int, ...]) -> MultiScaleNet:
    """The teacher as a MultiScaleNet in eval mode with no gradients (its BatchNorm statistics never move)."""
    net = classifier_from_meta(meta)
    net.load_state_dict(state["model"])
    net.requires_grad_(False)
    return MultiScaleNet(net, scales).eval()


def distill_step(student: nn.Module, teacher: MultiScaleNet, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                 distiller: str, settings: DistillSettings,
                 amp: Optional[contextlib.AbstractContextManager] = None) -> tuple[dict[str, float], int]:
    """One SGD step of `distiller` on (x (B, C, H, W), y (B,)); `student` is a MultiScaleNet (maybe in DDP).
    `amp`: the context of the forward passes and losses (`TrainSession.autocast()`; None: float32).

    Returns ({loss, loss_ce, loss_kd, ...} as floats, correct predictions of the global logits)."""
    fn = get_distiller(distiller)
    multi = distiller in MULTI_SCALE_DISTILLERS
    teacher.eval()  # pinned: whatever a caller did to it, its BatchNorm uses running statistics
    student.train()
    with amp if amp is not None else contextlib.nullcontext():
        with torch.no_grad():
            if distiller == "none":  # the student alone: the teacher's logits are never read
                t_out = torch.zeros(0)
            else:
                t_out = teacher(x, multi_scale=True)[1] if multi else teacher(x)  # (B, K, R) or (B, K)
        if multi:
            logits, s_out = student(x, multi_scale=True)  # (B, K), (B, K, R)
        else:
            logits = s_out = student(x)  # (B, K)
        terms = fn(s_out.float(), t_out.float(), y, settings)  # the distillers in float32 (a no-op at fp32)
        loss = total_loss(terms)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
    out.setdefault("loss_kd", 0.0)
    return out, int((logits.detach().argmax(1) == y).sum())


####################################################################################################################
# The student loop (Ray Train workers, or in-process with run.num_workers=0)
####################################################################################################################


def student_loop(config: dict) -> None:
    sess = TrainSession.current()
    s, seed = config["student"], config["seed"]
    teacher_state = config.get("teacher_state")
    if teacher_state is None:  # Ray workers fetch the frozen teacher from the object store
        import ray

        teacher_state = ray.get(config["teacher_state_ref"])
    scales = tuple(s["scales"])
    teacher = frozen_teacher(teacher_state, config["teacher_meta"], scales).to(sess.device)
    torch.manual_seed(derive_seed(seed, "student-init"))  # identical initial weights on every rank
    net = build_classifier(s["arch"], config["num_classes"], config["in_channels"])
    model = sess.prepare(MultiScaleNet(net, scales))
    net = getattr(model, "module", model).net
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    start_epoch, step = 0, 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(meta["epoch"]) + 1, int(meta["step"])

    kind, steps_per_epoch, bs = config["kind"], config["steps_per_epoch"], s["batch_size"]
    x_all, y_all = clf.labelled_inputs(clf.load_shard(sess, "train", kind, config["label_column"]), kind)
    eval_x = eval_y = None
    teacher_top1 = None
    if sess.is_main and config["eval"] is not None:
        eval_x, eval_y = clf.heldout_tensors(**config["eval"])
        teacher_top1 = evaluate_top1(teacher.net, eval_x, eval_y)

    base = StudentSection(**s)
    total = s["epochs"] * steps_per_epoch
    meta_base = {**classifier_meta(net, config["encoding"], config["classes"]), "method": "sdd_lskd",
                 "role": "student", "distiller": s["distiller"], "scales": list(scales),
                 "teacher_arch": config["teacher_meta"]["arch"], "teacher_checkpoint": config["teacher_path"]}
    for epoch in range(start_epoch, s["epochs"]):
        settings = base.settings(epoch=epoch + 1)  # DKD's warm-up counts epochs from 1
        gen, batches = clf.epoch_plan(x_all.shape[0], bs, steps_per_epoch, seed, sess.rank, epoch)
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, loss_ce, loss_kd (× rows), correct, rows
        for idx in batches:
            x, y = x_all[idx], y_all[idx]
            if s["augment"]:
                x = clf.random_dihedral(x, gen)
            step += 1
            set_lr(opt, lr_at(step, total, s["lr"], warmup_steps=s["warmup_steps"], schedule="multistep",
                              milestones=s["milestones"], gamma=s["gamma"]))
            terms, ok = distill_step(model, teacher, opt, *sess.to_device((x, y)), s["distiller"], settings,
                                     sess.autocast())
            n = y.shape[0]
            sums = [sums[0] + terms["loss"] * n, sums[1] + terms.get("loss_ce", 0.0) * n,
                    sums[2] + terms["loss_kd"] * n, sums[3] + ok, sums[4] + n]
        loss, loss_ce, loss_kd, correct, seen = sess.all_reduce_mean(sums)  # ratios of means are global
        seen = max(seen, 1e-12)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss / seen, "loss_ce": loss_ce / seen,
                                   "loss_kd": loss_kd / seen, "train_acc": correct / seen,
                                   "lr": opt.param_groups[0]["lr"]}
        if eval_x is not None:
            metrics["heldout_top1"] = evaluate_top1(net, eval_x, eval_y)
            metrics["teacher_heldout_top1"] = teacher_top1
        checkpoint = (epoch + 1) % s["checkpoint_every_epochs"] == 0 or epoch + 1 == s["epochs"]
        sess.report(metrics, step=step,
                    state=(lambda: {"model": net.state_dict(), "optimizer": opt.state_dict()}) if checkpoint else None,
                    meta={**meta_base, "epoch": epoch})


####################################################################################################################
# Driver
####################################################################################################################


def load_teacher(path: str, cfg: Config) -> tuple[dict, dict, str]:
    """(state, meta, resolved path) of a classifier teacher, checked against the config's classes and channels."""
    resolved = resolve_checkpoint(path)
    state, meta = load_state(resolved)
    if meta.get("kind") != "classifier" or "model" not in state:
        raise ValueError(f"{path}: not a classifier checkpoint (meta kind {meta.get('kind')!r}); the teacher must "
                         f"be trained by `apps.train classifier` or phase=teacher")
    want = (cfg.model.num_classes, cfg.model.in_channels)
    if (meta["num_classes"], meta["in_channels"]) != want:
        raise ValueError(f"{path}: teacher has {meta['num_classes']} classes / {meta['in_channels']} channels; the "
                         f"config wants {want[0]} / {want[1]}")
    return {"model": state["model"]}, meta, resolved


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Run the configured phase(s): the teacher as a classifier run, then the distilled student. Returns one
    TrainOutcome whose `phases` hold "teacher" and/or "student" and whose top-level fields are the final phase's."""
    import ray

    if cfg.run.num_workers > 0:
        from trainers.launch import ensure_ray

        ensure_ray()
    data = prepare_data(cfg)
    phases: dict[str, TrainOutcome] = {}
    teacher_path = cfg.teacher_checkpoint
    if cfg.phase in ("teacher", "both"):
        print(f"[sdd_lskd] teacher: {cfg.teacher.arch}, {cfg.teacher.epochs} epochs", flush=True)
        phases["teacher"] = clf.train(teacher_config(cfg, data), callbacks=callbacks)
        teacher_path = phases["teacher"].checkpoint_dir
    if cfg.phase in ("student", "both"):
        t_state, t_meta, teacher_path = load_teacher(teacher_path, cfg)
        s = cfg.student
        rows = clf._labelled_rows(data.train_uri, data.label_column)
        workers = max(1, cfg.run.num_workers)
        steps_per_epoch = rows // (s.batch_size * workers)
        if steps_per_epoch < 1:
            raise ConfigError(f"{data.train_uri}: {rows} labelled rows are fewer than student.batch_size × "
                              f"workers = {s.batch_size} × {workers}")
        loop_config = {
            "student": dataclasses.asdict(s), "num_classes": cfg.model.num_classes,
            "in_channels": cfg.model.in_channels, "kind": data.kind, "label_column": data.label_column,
            "classes": data.classes, "encoding": data.encoding, "eval": data.eval_source(),
            "steps_per_epoch": steps_per_epoch, "seed": cfg.run.seed, "teacher_meta": t_meta,
            "teacher_path": teacher_path,
            # Ray workers fetch the frozen teacher from the object store; an in-process run takes it as it is
            **({"teacher_state_ref": ray.put(t_state)} if cfg.run.num_workers > 0 else {"teacher_state": t_state}),
        }
        print(f"[sdd_lskd] student: {s.arch} with {s.distiller}, {s.epochs} epochs", flush=True)
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-student")
        phases["student"] = launch(student_loop, loop_config, run, datasets={"train": data.train_uri},
                                   full_config=cfg, extra_callbacks=callbacks)
    final = phases["student" if "student" in phases else "teacher"]
    return dataclasses.replace(final, phases=phases)


####################################################################################################################
# Evaluation
####################################################################################################################


@dataclasses.dataclass
class EvalSettings(clf.EvalSettings):
    """Held-out data for `apps.evaluate sdd_lskd`: generated mixed-type maps (the trainer's held-out seed and
    size by default), or the split rows of a Parquet set (CIFAR-100: uri=<import>, split=test)."""

    size: int = knob(52, ge=8, le=256, help="generated wafer map size")
    generator: str = knob("mixed_wafer", choices=clf.GENERATORS, help="generated held-out maps: 38 or nine classes")
    seed: int = knob(WAFER_HELD_OUT, ge=0, help="generator seed of the held-out maps (data/seeds.py WAFER_HELD_OUT)")


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Held-out top-1 of the teacher and students ({role: checkpoint or run folder}), with each student's distiller;
    report.md with confusion matrices, held-out examples and training curves in `out_dir` when given."""
    settings = settings or EvalSettings()
    table, held = clf.score_checkpoints(checkpoints, settings)
    for row in table.rows:
        meta = load_state(resolve_checkpoint(row["checkpoint"]))[1]
        row["distiller"] = meta.get("distiller", "–" if meta.get("method") == "sdd_lskd" else "(teacher/plain)")
    table.columns = {"model": ("model", ""), "arch": ("arch", ""), "distiller": ("distiller", ""),
                     **{k: v for k, v in table.columns.items() if k not in ("model", "arch")}}
    if out_dir:
        table.report_path = clf.write_report(out_dir, "SDD-LSKD evaluation", table, held, checkpoints)
    return table


####################################################################################################################
# Sweep space
####################################################################################################################




def sweep_prepare(cfg: Config, sweep_dir: str) -> Config:
    """Prepare the data and train the teacher ONCE; every trial then distills a student from it (phase=student)."""
    from fabdistill import storage

    shared = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="shared", storage_path=sweep_dir))
    data = prepare_data(shared)
    teacher = cfg.teacher_checkpoint
    if teacher:
        teacher = resolve_checkpoint(storage.absolute(teacher))
    else:
        done = storage.join(sweep_dir, "shared-teacher", "model")
        if storage.exists(storage.join(done, "state.pt")):
            print(f"[sweep] reusing the sweep's teacher {done}", flush=True)
            teacher = done
        else:
            print(f"[sweep] training the shared teacher once ({cfg.teacher.arch}, {cfg.teacher.epochs} epochs)",
                  flush=True)
            teacher = clf.train(teacher_config(shared, data)).checkpoint_dir
    # trials run in Tune's trial folders: they read the shared data by absolute path
    d = dataclasses.replace(cfg.data, uri=storage.absolute(data.train_uri), label_column=data.label_column,
                            eval_uri=storage.absolute(data.eval_uri) if data.eval_uri else None)
    return dataclasses.replace(cfg, data=d, phase="student", teacher_checkpoint=storage.absolute(teacher))




def sweep_score(outcome: TrainOutcome, cfg: Config, settings: Any) -> dict:
    """Held-out top-1 of the trial's student on the config's held-out rows (the trainer's `heldout_top1`)."""
    checkpoint = outcome.checkpoint_dir  # the final (student) phase's
    if checkpoint is None:
        raise ValueError("the trial produced no student checkpoint to score")
    data = prepare_data(cfg)
    if data.eval_uri is None:
        raise ValueError("the trial's config has no held-out rows: set data.eval_uri (or use a dataset with a "
                         f"'{cfg.data.eval_split}' split)")
    eval_settings = EvalSettings(uri=data.eval_uri, split=data.eval_split, label_column=data.label_column,
                                 batch_size=settings.batch_size)
    row = clf.evaluate({"student": checkpoint}, eval_settings).row("student")
    return {"heldout_top1": row["top1"], "images_per_s": row["images_per_s"]}


def _space() -> Any:
    from tune.spaces import MethodSpace

    return MethodSpace(
        method="sdd_lskd",
        knobs={"alpha": "student.alpha", "beta": "student.beta", "T": "student.temperature",
               "base_temperature": "student.base_temperature", "M": "student.scales", "warmup": "student.warmup",
               "distiller": "student.distiller", "kd_weight": "student.kd_weight", "lr": "student.lr",
               "epochs": "student.epochs", "student_arch": "student.arch"},
        labels={"alpha": "α", "beta": "β", "T": "T", "base_temperature": "base temperature τ", "M": "M",
                "warmup": "warm-up (epochs)", "distiller": "distiller", "kd_weight": "KD weight"},
        score_name="heldout_top1", score_mode="max", score_label="student held-out top-1",
        # the total loss mixes distillers' scales; the cross-entropy is the term every trial shares
        early_stop_metric="loss_ce",
        steps_path="student.epochs", time_attr="training_iteration",  # one report per epoch
        prepare=sweep_prepare, score=sweep_score,
        extra_scores=("images_per_s",),
    )


SPACE = _space()


METHOD = Method(
    name="sdd_lskd",
    summary="SDD-LSKD logit distillation of a small wafer-map classifier (KD, DKD, SDD-DKD baselines)",
    Config=Config,
    train=train,
    load="fabdistill.inference.classifier:load_classifier",
    evaluate=evaluate, EvalSettings=EvalSettings, eval_roles=("teacher", "student", "baseline"),
    space="trainers.sdd_lskd:SPACE",
    students=("classifier",),
    default_config="configs/sdd_lskd.yaml",
)
