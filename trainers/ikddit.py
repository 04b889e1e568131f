"""IKDDiT: Implicit Knowledge Distillation Diffusion Transformer for photolithography overlay maps.

Teacher DiT sees every patch token; the student encoder sees only the visible tokens (mask ratio 0.5) and a
light decoder restores the grid; an implicit discriminator on tokens aligns student with teacher. Eq. 8:
L = L_DSM + λ1·L_MAE + λ2·L_D, with InfoNCE aligning image and context embeddings while the teacher trains.

Parameterisation. Networks predict x0 (the clean map) rather than ε. A masked student cannot know the noise
on patches it never sees (ε is i.i.d. per pixel), but it can infer their clean values from the visible ones:
overlay maps are smooth, low-order fields plus equipment fingerprints. ε for the sampler is then recovered
from the full x_t, so student-only sampling on the visible tokens of each step is well posed. (DiT #89 also
reports x0 converging on custom data where ε did not.) `model.prediction: eps` keeps the ε variant.

Phases: `teacher` trains teacher + contrastive embedding; `student` freezes them and distills; `both` runs the
two as separate runs (`<name>-teacher`, `<name>-student`), each resumable on its own. `train()` returns one
TrainOutcome: each phase's run in `.phases`, the final phase's at the top level.

Inference (the pipeline, sampling to files) is fabdistill/inference/ikddit.py; evaluation trainers/ikddit_eval.py;
the sweep space trainers/ikddit_tune.py.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.seeds import OVERLAY_FLOOR, OVERLAY_HELD_OUT
from data.streaming import LoaderKnobs
from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob, section
from fabdistill.inference.ikddit import SampleSettings, build_networks, make_diffusion
from fabdistill.methods import Method, TrainOutcome
from models.diffusion import GaussianDiffusion
from models.dit import DIT_SIZES, unpatchify
from trainers.common import Cadence, RunningMeans, ema_update, generator
from trainers.ikddit_eval import EvalSettings
from trainers.launch import RunSection, TrainSession, launch


# --------------------------------------------------------------------------- config

@dataclasses.dataclass
class DataSection(LoaderKnobs):
    """The training set; `loader`, `stream_threshold_mb`, `shuffle_buffer` (data/streaming.py) say whether the
    workers hold their shards in memory or stream them from Parquet through Ray Data."""

    train_uri: str = knob("", help="overlay Parquet dataset (local or s3://); empty: generate num_train maps")
    num_train: int = knob(4096, ge=16, le=10_000_000, help="synthetic maps when train_uri is empty")
    seed: int = knob(0, ge=0, help="generator seed of the synthetic training set")
    map_size: int = knob(32, choices=(16, 32, 64), help="H = W of the rasterised maps")


@dataclasses.dataclass
class ModelSection:
    size: str = knob("tiny", choices=tuple(DIT_SIZES), help="named size (models/dit.py DIT_SIZES)")
    patch_size: int = knob(0, ge=0, le=16, help="0: the size's default")
    decoder_depth: int = knob(0, ge=0, le=16, help="student decoder blocks; 0: the size's default")
    prediction: str = knob("x0", choices=("x0", "eps"), help="what the networks predict (see module docstring)")
    num_timesteps: int = knob(1000, ge=10, le=4000)
    schedule: str = knob("linear", choices=("linear", "cosine"))
    beta_start: float = knob(1e-4, gt=0, lt=1)
    beta_end: float = knob(0.02, gt=0, lt=1)
    log_dim: int = knob(128, ge=8, le=4096, help="equipment-log vector width")
    num_ids: int = knob(1000, ge=1, le=1_000_000, help="equipment IDs")


@dataclasses.dataclass
class TeacherSection:
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(64, ge=1, le=8192, help="per worker")
    lr: float = knob(3e-4, gt=0, le=1)
    weight_decay: float = knob(0.0, ge=0, le=1)
    ema_decay: float = knob(0.999, ge=0, lt=1)
    infonce_weight: float = knob(0.1, ge=0, le=100, help="weight of InfoNCE (image vs equipment context)")
    infonce_temperature: float = knob(0.07, gt=0, le=10)
    grad_clip: float = knob(1.0, ge=0, help="0: off")
    checkpoint_every: int = knob(500, ge=1)
    log_every: int = knob(100, ge=1)


@dataclasses.dataclass
class StudentSection:
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(64, ge=1, le=8192, help="per worker")
    lr: float = knob(3e-4, gt=0, le=1)
    disc_lr: float = knob(1e-4, gt=0, le=1)
    mask_ratio: float = knob(0.5, ge=0, lt=1, help="fraction of patch tokens hidden from the student encoder")
    lambda1: float = knob(1.0, ge=0, le=1000, help="weight of L_MAE (Eq. 8)")
    lambda2: float = knob(0.1, ge=0, le=1000, help="weight of the implicit discriminator term L_D (Eq. 8)")
    ema_decay: float = knob(0.999, ge=0, lt=1)
    init_from_teacher: bool = knob(True, help="copy the teacher's weights into the student's encoder")
    grad_clip: float = knob(1.0, ge=0)
    checkpoint_every: int = knob(500, ge=1)
    log_every: int = knob(100, ge=1)


@dataclasses.dataclass
class Config:
    phase: str = knob("both", choices=("teacher", "student", "both"))
    teacher_checkpoint: str = knob("", help="teacher checkpoint or run folder, for phase=student")
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    teacher: TeacherSection = section(TeacherSection)
    student: StudentSection = section(StudentSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        from fabdistill.config import ConfigError

        if self.phase == "student" and not self.teacher_checkpoint:
            raise ConfigError("phase 'student' needs teacher_checkpoint (a teacher checkpoint or run folder)")
        if self.model.beta_end <= self.model.beta_start:
            raise ConfigError("model.beta_end must be larger than model.beta_start")
        if not self.data.train_uri and self.data.seed in (OVERLAY_HELD_OUT, OVERLAY_FLOOR):
            raise ConfigError(f"data.seed {self.data.seed} draws the held-out/floor maps evaluation compares "
                              "against (data/seeds.py); pick another")


# --------------------------------------------------------------------------- losses (Eq. numbers of the IKDDiT paper)

def dsm_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_DSM, Eq. 8 first term: mean squared error of the denoiser output, over pixels where weight = 1."""
    err = (pred - target) ** 2
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def mae_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """L_MAE, Eq. 8 second term: L1 between student and (frozen) teacher outputs on the masked pixels."""
    masked = masked.expand_as(student_out)
    return ((student_out - teacher_out).abs() * masked).sum() / masked.sum().clamp_min(1.0)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Implicit discriminator objective: teacher tokens are real (1), student tokens fake (0)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D, Eq. 8 third term (non-saturating): the student wants its tokens judged teacher-like."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def infonce_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE on L2-normalised embeddings, symmetric: row i of z_a matches row i of z_b (the diagonal)."""
    a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    logits = a @ b.t() / temperature  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def token_mask_to_pixels(mask: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(N, L) bool token mask -> (N, 1, H, W) float pixel mask (1 on masked patches)."""
    tokens = mask.float().unsqueeze(-1).expand(-1, -1, patch_size * patch_size * channels)
    return unpatchify(tokens, patch_size, channels, height, width)[:, :1]


# --------------------------------------------------------------------------- shared pieces

def target_of(diffusion: GaussianDiffusion, prediction: str, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x0 if prediction == "x0" else noise


class TeacherObjective(nn.Module):
    """Teacher + contrastive embedding as one module, so DDP syncs both; forward returns the loss terms."""

    def __init__(self, teacher: nn.Module, embedding: nn.Module):
        super().__init__()
        self.teacher, self.embedding = teacher, embedding

    def forward(self, x0: torch.Tensor, log: torch.Tensor, equipment_id: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, diffusion: GaussianDiffusion, prediction: str, valid: torch.Tensor,
                temperature: float) -> dict[str, torch.Tensor]:
        cond = self.embedding(log, equipment_id, image=x0)
        x_t = diffusion.q_sample(x0, t, noise)  # (N, 2, H, W)
        out = self.teacher(x_t, t, cond["cond_tokens"], cond["cond_vec"])  # (N, 2, H, W)
        return {"loss_dsm": dsm_loss(out, target_of(diffusion, prediction, x0, noise), valid),
                "loss_infonce": infonce_loss(cond["z_image"], cond["z_context"], temperature)}


# --------------------------------------------------------------------------- per-worker loops

def _prepare_batch(batch: dict, scale_nm: float, sess: TrainSession) -> tuple[torch.Tensor, ...]:
    """(x0, log, equipment_id, valid) on the worker's device (pinned, asynchronous copies on CUDA)."""
    return sess.to_device((batch["overlay"] / scale_nm, batch["log"], batch["equipment_id"], batch["valid"]))


def teacher_loop(config: dict) -> None:
    sess = TrainSession.current()
    tc, model_cfg = config["teacher"], config["model"]
    torch.manual_seed(sess.run.seed)  # identical init on every worker (DDP also broadcasts)
    nets = build_networks(model_cfg, config["map_size"])
    objective = TeacherObjective(nets["teacher"], nets["embedding"])
    ema = copy.deepcopy(objective).requires_grad_(False)
    opt = torch.optim.AdamW(objective.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        objective.load_state_dict(state["objective"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = meta["step"]
    model = sess.prepare(objective, find_unused_parameters=True)  # null tokens serve only CFG dropout
    ema.to(sess.device)
    diffusion = make_diffusion(model_cfg)
    gen = generator(sess.run.seed, "ikddit", "teacher", sess.rank, start)  # a resumed run draws anew
    batches = sess.batches("train", "overlay", tc["batch_size"], gen)  # in memory or streamed: data.loader
    cadence = Cadence(tc["log_every"], tc["checkpoint_every"], tc["steps"])
    running = RunningMeans()
    for step in range(start + 1, tc["steps"] + 1):
        with sess.timed("data"):  # run.profile: per-section step times in the metrics; else no-ops
            x0, log, eid, valid = _prepare_batch(next(batches), config["scale_nm"], sess)
            t = diffusion.sample_timesteps(x0.shape[0], generator=gen).to(sess.device)
            noise = torch.randn(x0.shape, generator=gen).to(sess.device)
        with sess.timed("forward"), sess.autocast():  # run.precision: bf16 on CUDA, else a no-op
            terms = model(x0, log, eid, t, noise, diffusion, model_cfg["prediction"], valid,
                          tc["infonce_temperature"])
            loss = terms["loss_dsm"] + tc["infonce_weight"] * terms["loss_infonce"]
        with sess.timed("backward"):  # DDP's gradient all-reduce overlaps it
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with sess.timed("optimizer"):
            if tc["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            opt.step()
            ema_update(ema, objective, tc["ema_decay"], step)
        running.add({"loss": loss, **terms})
        if cadence.report(step):
            checkpoint = cadence.checkpoint(step)
            state = (lambda: {"objective": objective.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                              "teacher": ema.teacher.state_dict(), "embedding": ema.embedding.state_dict()})
            sess.report(running.pop(), step=step, state=state if checkpoint else None,
                        meta=_meta(config, "teacher") if checkpoint else None)


def student_loop(config: dict) -> None:
    import ray

    sess = TrainSession.current()
    sc, model_cfg = config["student"], config["model"]
    torch.manual_seed(sess.run.seed)
    nets = build_networks(model_cfg, config["map_size"])
    teacher_state = ray.get(config["teacher_state_ref"]) if "teacher_state_ref" in config else config["teacher_state"]
    teacher, embedding = nets["teacher"], nets["embedding"]
    teacher.load_state_dict(teacher_state["teacher"])
    embedding.load_state_dict(teacher_state["embedding"])
    teacher.eval().requires_grad_(False).to(sess.device)
    embedding.eval().requires_grad_(False).to(sess.device)
    student, disc = nets["student"], nets["discriminator"]
    if sc["init_from_teacher"]:
        student.init_from_teacher(teacher)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=sc["lr"], weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=sc["disc_lr"], betas=(0.5, 0.999), weight_decay=0.0)
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        student.load_state_dict(state["student_raw"])
        ema.load_state_dict(state["student"])
        disc.load_state_dict(state["discriminator"])
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_d"])
        start = meta["step"]
    student_ddp = sess.prepare(student, find_unused_parameters=True)
    disc_ddp = sess.prepare(disc)
    ema.to(sess.device)
    diffusion = make_diffusion(model_cfg)
    prediction, p = model_cfg["prediction"], student.patch_size
    gen = generator(sess.run.seed, "ikddit", "student", sess.rank, start)
    batches = sess.batches("train", "overlay", sc["batch_size"], gen)  # in memory or streamed: data.loader
    cadence = Cadence(sc["log_every"], sc["checkpoint_every"], sc["steps"])
    running = RunningMeans()
    for step in range(start + 1, sc["steps"] + 1):
        x0, log, eid, valid = _prepare_batch(next(batches), config["scale_nm"], sess)
        t = diffusion.sample_timesteps(x0.shape[0], generator=gen).to(sess.device)
        noise = torch.randn(x0.shape, generator=gen).to(sess.device)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.no_grad(), sess.autocast():  # run.precision: bf16 on CUDA, else a no-op (every forward below)
            cond = embedding(log, eid)
            teacher_out, teacher_tokens = teacher.forward_tokens(x_t, t, cond["cond_tokens"], cond["cond_vec"])
        with sess.autocast():
            out = student_ddp(x_t, t, cond["cond_tokens"], cond["cond_vec"], mask_ratio=sc["mask_ratio"],
                              generator=gen)
        masked = token_mask_to_pixels(out["mask"], p, 2, x0.shape[2], x0.shape[3]) * valid
        visible = (1.0 - masked) * valid

        # Discriminator step: teacher tokens are real, student tokens fake (one forward for DDP's sake).
        with sess.autocast():
            logits = disc_ddp(torch.cat([teacher_tokens, out["tokens"].detach()]), torch.cat([t, t]))
            loss_disc = discriminator_loss(logits[: x0.shape[0]], logits[x0.shape[0]:])
        opt_d.zero_grad(set_to_none=True)
        loss_disc.backward()
        opt_d.step()

        # Student step, Eq. 8: L = L_DSM + λ1·L_MAE + λ2·L_D.
        with sess.autocast():
            student_out = out["out"].float()  # the losses in float32 (a no-op at fp32)
            loss_dsm = dsm_loss(student_out, target_of(diffusion, prediction, x0, noise), visible)
            loss_mae = (mae_loss(student_out, teacher_out.float(), masked) if sc["mask_ratio"] > 0
                        else student_out.sum() * 0)
            loss_adv = adversarial_loss(disc(out["tokens"], t))  # raw module: its grads are cleared before its step
            loss = loss_dsm + sc["lambda1"] * loss_mae + sc["lambda2"] * loss_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(student_ddp.parameters(), sc["grad_clip"])
        opt.step()
        ema_update(ema, student, sc["ema_decay"], step)
        running.add({"loss": loss, "loss_dsm": loss_dsm, "loss_mae": loss_mae, "loss_adv": loss_adv,
                     "loss_disc": loss_disc})
        if cadence.report(step):
            checkpoint = cadence.checkpoint(step)
            state = (lambda: {"student": ema.state_dict(), "student_raw": student.state_dict(),
                              "embedding": embedding.state_dict(), "discriminator": disc.state_dict(),
                              "opt": opt.state_dict(), "opt_d": opt_d.state_dict()})
            sess.report(running.pop(), step=step, state=state if checkpoint else None,
                        meta=_meta(config, "student") if checkpoint else None)


def _meta(config: dict, role: str) -> dict:
    return {"method": "ikddit", "role": role, "model": config["model"], "map_size": config["map_size"],
            "scale_nm": config["scale_nm"], "mask_ratio": config["student"]["mask_ratio"]}


# --------------------------------------------------------------------------- driver

def prepare_training_data(cfg: Config) -> tuple[str, float]:
    """The training set's URI (generated into the run storage when not given) and its scale in nm (computed
    batch by batch when the set streams, data.loader)."""
    from data.overlay import generate_overlay
    from data.parquet_io import read_dataset, write_dataset
    from data.streaming import resolve_loader
    from fabdistill import storage
    from trainers.launch import run_dir

    uri = cfg.data.train_uri
    if not uri:
        uri = storage.join(run_dir(cfg.run), "data", "overlay_train")
        if not storage.exists(uri):
            print(f"[ikddit] generating {cfg.data.num_train} synthetic overlay maps -> {uri}", flush=True)
            table = generate_overlay(cfg.data.num_train, seed=cfg.data.seed, height=cfg.data.map_size,
                                     width=cfg.data.map_size, log_dim=cfg.model.log_dim)
            write_dataset(table, uri, "overlay")
    if resolve_loader(cfg.data, uri, cfg.run.num_workers) == "stream":
        return uri, overlay_scale_nm_streamed(uri)
    table = read_dataset(uri, columns=["overlay", "valid", "height", "width"])
    return uri, overlay_scale_nm(table)


def overlay_scale_nm(table) -> float:
    """Standard deviation of on-wafer overlay values (nm): maps are divided by it so the networks see ~unit scale."""
    from data.parquet_io import from_fixed_list

    h, w = int(table.column("height")[0].as_py()), int(table.column("width")[0].as_py())
    maps = from_fixed_list(table.column("overlay"), (2, h, w))
    valid = from_fixed_list(table.column("valid"), (h, w)) > 0
    values = maps[np.broadcast_to(valid[:, None], maps.shape)]
    return float(max(values.std(), 1e-3))


def overlay_scale_nm_streamed(uri: str) -> float:
    """overlay_scale_nm of a dataset too large to load: one pass over its files in record batches (float64 sums)."""
    from data.streaming import stream_parquet

    count, total, squares = 0, 0.0, 0.0
    for batch in stream_parquet(uri, 4096, drop_last=False, columns=["overlay", "valid", "height", "width"]):
        h, w = int(batch["height"][0]), int(batch["width"][0])
        maps = np.stack(batch["overlay"]).reshape(-1, 2, h, w).astype(np.float64)
        valid = np.stack(batch["valid"]).reshape(-1, 1, h, w) > 0
        values = maps[np.broadcast_to(valid, maps.shape)]
        count, total, squares = count + values.size, total + values.sum(), squares + (values ** 2).sum()
    mean = total / max(count, 1)
    return float(max(np.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0)), 1e-3))


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Run the configured phase(s): one TrainOutcome whose `phases` hold each phase run ("teacher", "student")
    and whose top-level fields are the final phase's. `callbacks`: extra Ray Train callbacks for every launched
    run (e.g. Tune's TuneReportCallback when a sweep trial calls this)."""
    import ray

    if cfg.run.num_workers > 0:
        from trainers.launch import ensure_ray

        ensure_ray()
    uri, scale_nm = prepare_training_data(cfg)
    base = {"model": dataclasses.asdict(cfg.model), "teacher": dataclasses.asdict(cfg.teacher),
            "student": dataclasses.asdict(cfg.student), "map_size": cfg.data.map_size, "scale_nm": scale_nm}
    phases: dict[str, TrainOutcome] = {}
    teacher_path = cfg.teacher_checkpoint
    if cfg.phase in ("teacher", "both"):
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-teacher")
        print(f"[ikddit] teacher: {cfg.model.size}, {cfg.teacher.steps} steps on {cfg.run.num_workers} workers",
              flush=True)
        phases["teacher"] = launch(teacher_loop, base, run, datasets={"train": uri}, full_config=cfg,
                                   extra_callbacks=callbacks, loader=cfg.data)
        teacher_path = phases["teacher"].checkpoint_dir
    if cfg.phase in ("student", "both"):
        state, meta = load_state(resolve_checkpoint(teacher_path))
        if meta.get("method") != "ikddit" or meta.get("role") != "teacher":
            raise ValueError(f"{teacher_path}: not an IKDDiT teacher checkpoint (meta: {meta.get('method')}, "
                             f"{meta.get('role')})")
        if meta["model"] != base["model"]:
            print("[ikddit] note: using the teacher checkpoint's model section", flush=True)
            base["model"] = meta["model"]
        base["scale_nm"] = meta.get("scale_nm", scale_nm)
        teacher_state = {"teacher": state["teacher"], "embedding": state["embedding"]}
        # Ray workers fetch the frozen teacher from the object store; an in-process run takes it as it is.
        student_config = ({**base, "teacher_state_ref": ray.put(teacher_state)} if cfg.run.num_workers > 0
                          else {**base, "teacher_state": teacher_state})
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-student")
        print(f"[ikddit] student: mask ratio {cfg.student.mask_ratio}, λ1 {cfg.student.lambda1}, "
              f"λ2 {cfg.student.lambda2}, {cfg.student.steps} steps", flush=True)
        phases["student"] = launch(student_loop, student_config, run, datasets={"train": uri}, full_config=cfg,
                                   extra_callbacks=callbacks, loader=cfg.data)
    final = phases["student" if "student" in phases else "teacher"]
    return dataclasses.replace(final, phases=phases)


# --------------------------------------------------------------------------- the method declaration

METHOD = Method(
    name="ikddit",
    summary="masked teacher/student DiT for overlay maps (IKDDiT)",
    Config=Config,
    train=train,
    load="fabdistill.inference.ikddit:IKDDiTPipeline.from_checkpoint",
    sample="fabdistill.inference.ikddit:sample_to_files",
    SampleSettings=SampleSettings,
    evaluate="trainers.ikddit_eval:evaluate",
    EvalSettings=EvalSettings,
    eval_roles=("student", "teacher"),
    space="trainers.ikddit_tune:SPACE",
    students=("ikddit",),
    default_config="configs/ikddit_tiny.yaml",
)
