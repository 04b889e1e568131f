"""Fast-AD's typed config (configs/fast_ad.yaml): models, CADR guidance, synthesis actors, replay buffer, student,
held-out evaluation, the loop's timing and restarts, and the shared run section."""

from __future__ import annotations

import dataclasses
from typing import Optional

from data.seeds import WAFER_HELD_OUT
from fabdistill.config import ConfigError, knob, section
from models.resnet_cifar import RESNET_ARCHS
from trainers.launch import RunSection


@dataclasses.dataclass
class ModelsSection:
    teacher_checkpoint: str = knob("runs/classifier_wafer", help="teacher classifier checkpoint or run folder "
                                                                 "(trainers/classifier.py)")
    diffusion_checkpoint: str = knob("runs/ddpm_wafer", help="DDPM checkpoint or run folder (trainers/ddpm.py)")
    student_arch: str = knob("resnet8", choices=tuple(RESNET_ARCHS), help="student ResNet size")


@dataclasses.dataclass
class CADRSection:
    """Guided synthesis (defaults from the Fast-AD paper, Sec. 4.1)."""

    gate: str = knob("entropy", choices=("entropy", "constant", "off"),
                     help="entropy: CADR's λ(H); constant: λ = λ_max; off: unguided DDIM (baseline)")
    lambda_max: float = knob(1.5, ge=0, help="maximum rectification strength λ_max")
    eta: float = knob(0.1, ge=0, help="gradient scale η")
    tau_ent: float = knob(0.4, ge=0, help="entropy threshold τ_ent in nats (CIFAR-100 0.4, ImageNet 0.6)")
    k: float = knob(10.0, gt=0, help="sigmoid sharpness k of the gate")
    xi: float = knob(1e-6, gt=0, help="ξ in the gradient normalisation")
    gamma: float = knob(1.0, ge=0, help="γ, weight of CE(teacher(x̂0), y) in the guidance loss")
    bn_weight: float = knob(1.0, ge=0, help="weight of L_BN in the guidance loss")
    ddim_steps: int = knob(50, ge=1, le=1000, help="DDIM steps per synthesised batch")
    ddim_eta: float = knob(0.0, ge=0, le=1, help="DDIM stochasticity (0: deterministic)")
    clip_x0: float = knob(1.0, gt=0, help="x̂0 is clamped to [−clip_x0, clip_x0] in the DDIM update")
    quantize: bool = knob(False, help="round synthesised images to the wafer levels {−1, 0, 1} before labelling")


@dataclasses.dataclass
class SynthesisSection:
    num_workers: int = knob(1, ge=1, le=1024, help="K synthesis actors")
    batch_size: int = knob(64, ge=1, help="images per synthesised batch")
    num_cpus: float = knob(1.0, ge=0, help="CPUs each synthesis actor reserves")
    num_gpus: float = knob(0.0, ge=0, help="GPUs each synthesis actor reserves (fractional on a cluster, e.g. 0.25)")
    torch_threads: int = knob(1, ge=1, le=256, help="torch intra-op threads inside each actor")
    check_stop_every: int = knob(5, ge=1, help="DDIM steps between checks of the stop flag")


@dataclasses.dataclass
class BufferSection:
    size: int = knob(4096, ge=1, help="replay buffer capacity (images)")
    min_uses: int = knob(1, ge=0, help="the oldest image is evicted only after the student sampled it this many "
                                       "times; until then `put` waits (back-pressure). 0: plain ring buffer")
    min_fill: int = knob(0, ge=0, help="images in the buffer before the student starts (0: one synthesis batch; "
                                        "smaller than a student batch, it samples with replacement)")


@dataclasses.dataclass
class StudentSection:
    steps: int = knob(20000, ge=1, help="student optimisation steps")
    batch_size: int = knob(64, ge=1)
    optimizer: str = knob("sgd", choices=("sgd", "adamw"))
    lr: float = knob(0.05, gt=0, le=10, help="peak learning rate (linear warm-up, cosine decay over `steps`)")
    weight_decay: float = knob(5e-4, ge=0, le=1)
    warmup_steps: int = knob(100, ge=0)
    kd_temperature: float = knob(4.0, gt=0, help="KD temperature T")
    augment: bool = knob(False, help="random flips/90° rotations of sampled images; the learner's teacher copy "
                                     "relabels them (one extra teacher forward per step)")
    num_cpus: float = knob(1.0, ge=0)
    num_gpus: float = knob(0.0, ge=0)
    torch_threads: int = knob(1, ge=1, le=256)
    checkpoint_every: int = knob(500, ge=0, help="steps between checkpoints (0: only at the end)")
    num_to_keep: int = knob(2, ge=1, help="student checkpoints kept in the run folder")


@dataclasses.dataclass
class EvalSection:
    """Held-out REAL data the student never trains on."""

    uri: Optional[str] = knob(None, help="Parquet dataset (wafer or image kind); None generates wafer maps")
    split: str = knob("test", help="rows of `uri` used when it has a split column (a CIFAR import)")
    n_heldout: int = knob(1000, ge=1, help="generated held-out wafer maps")
    seed: int = knob(WAFER_HELD_OUT, ge=0, help="generator seed of the held-out maps (the teacher's held-out set)")
    size: int = knob(32, ge=8, le=256)
    every: int = knob(500, ge=0, help="student steps between evaluations (0: only at start and end)")


@dataclasses.dataclass
class LoopSection:
    time_limit_s: float = knob(0.0, ge=0, help="stop the learner after this many seconds (0: run all steps)")
    log_every_s: float = knob(10.0, gt=0, help="seconds between progress lines / metrics.jsonl rows")
    max_restarts: int = knob(3, ge=-1, help="restarts of a dead synthesis or learner actor (-1: forever)")
    max_task_retries: int = knob(-1, ge=-1, help="retries of an actor's running loop after a restart")
    shutdown_grace_s: float = knob(30.0, ge=0, help="seconds synthesis actors get to finish before ray.kill")
    record_timeline: bool = knob(False, help="return every push and learner step as (start, end) in the summary")


@dataclasses.dataclass
class Config:
    models: ModelsSection = section(ModelsSection)
    cadr: CADRSection = section(CADRSection)
    synthesis: SynthesisSection = section(SynthesisSection)
    buffer: BufferSection = section(BufferSection)
    student: StudentSection = section(StudentSection)
    eval: EvalSection = section(EvalSection)
    loop: LoopSection = section(LoopSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        if self.synthesis.batch_size > self.buffer.size:
            raise ConfigError(f"synthesis.batch_size {self.synthesis.batch_size} exceeds buffer.size "
                              f"{self.buffer.size}: a batch could never be put")
        if self.buffer.min_fill > self.buffer.size:
            raise ConfigError(f"buffer.min_fill {self.buffer.min_fill} exceeds buffer.size {self.buffer.size}")


def synthesis_spec(cfg: Config) -> dict:
    """What a SynthesisWorker needs, as plain data (actors get dicts: a restarted actor rebuilds from them)."""
    return {"teacher_checkpoint": cfg.models.teacher_checkpoint,
            "diffusion_checkpoint": cfg.models.diffusion_checkpoint, "seed": cfg.run.seed,
            "cadr": dataclasses.asdict(cfg.cadr), "batch_size": cfg.synthesis.batch_size,
            "num_gpus": cfg.synthesis.num_gpus, "torch_threads": cfg.synthesis.torch_threads,
            "check_stop_every": cfg.synthesis.check_stop_every}


def learner_spec(cfg: Config, run_directory: Optional[str]) -> dict:
    """What a LearnerCore needs, as plain data; `run_directory` None keeps it off disk (the sequential baseline)."""
    s = cfg.student
    return {"teacher_checkpoint": cfg.models.teacher_checkpoint,
            "diffusion_checkpoint": cfg.models.diffusion_checkpoint, "seed": cfg.run.seed,
            "student_arch": cfg.models.student_arch, "steps": s.steps, "batch_size": s.batch_size,
            "optimizer": s.optimizer, "lr": s.lr, "weight_decay": s.weight_decay, "warmup_steps": s.warmup_steps,
            "kd_temperature": s.kd_temperature, "augment": s.augment, "num_gpus": s.num_gpus,
            "torch_threads": s.torch_threads, "checkpoint_every": s.checkpoint_every,
            "num_to_keep": s.num_to_keep, "eval": dataclasses.asdict(cfg.eval), "eval_every": cfg.eval.every,
            "min_fill": cfg.buffer.min_fill or cfg.synthesis.batch_size, "time_limit_s": cfg.loop.time_limit_s,
            "record_timeline": cfg.loop.record_timeline, "run_dir": run_directory}
