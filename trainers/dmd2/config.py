"""DMD2's typed config (configs/dmd2*.yaml): data, networks, the EDM teacher phase, the distillation phase, run.

Defaults follow the reference (../shared/METHOD_NOTES.md): EDM σ ∈ [0.002, 80], ln σ ~ N(−1.2, 1.2²); DMD2
σ = 80 one step, t ∈ [20, 980] of 1000 Karras levels for the DM loss, AdamW (0.9, 0.999) wd 0.01, clip 10,
generator every 5 fake-score steps (ImageNet-64; the seed's SD setting is 10), GAN weights 3e-3 / 1e-2.
Learning rates are larger than the reference's 2e-6: our networks are small and runs are short.
"""

from __future__ import annotations

import dataclasses

from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.dmd2 import DOMAINS, MAX_GENERATOR_STEPS
from models.edm_unet import EDM_UNET_SIZES
from trainers.dmd2.losses import REFERENCE_GEN_CLS_LOSS_WEIGHT, REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT
from trainers.launch import RunSection


@dataclasses.dataclass
class DataSection:
    domain: str = knob("wafer", choices=DOMAINS, help="wafer: 9 WM-811K classes; sem: 4 defect types")
    train_uri: str = knob("", help="wafer/sem Parquet dataset (local or s3://); empty: generate num_train samples")
    num_train: int = knob(8192, ge=16, le=10_000_000, help="synthetic samples when train_uri is empty")
    seed: int = knob(0, ge=0, help="generator seed of the synthetic training set (never a held-out seed)")
    image_size: int = knob(32, choices=(16, 32, 64), help="H = W of the generated maps / images")


@dataclasses.dataclass
class ModelSection:
    size: str = knob("tiny", choices=tuple(EDM_UNET_SIZES), help="named EDM UNet size (models/edm_unet.py)")
    label_dropout: float = knob(0.0, ge=0, lt=1, help="teacher label dropout (trains the null class)")
    dropout: float = knob(0.0, ge=0, lt=1)


@dataclasses.dataclass
class TeacherSection:
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(64, ge=1, le=8192, help="per worker")
    lr: float = knob(1e-3, gt=0, le=1)
    warmup_steps: int = knob(100, ge=0)
    weight_decay: float = knob(0.0, ge=0, le=1)
    ema_decay: float = knob(0.999, ge=0, lt=1, help="the EMA weights are the teacher that is distilled")
    p_mean: float = knob(-1.2, ge=-10, le=10, help="ln σ ~ N(p_mean, p_std²) (EDM)")
    p_std: float = knob(1.2, gt=0, le=10)
    grad_clip: float = knob(1.0, ge=0, help="0: off")
    checkpoint_every: int = knob(500, ge=1)
    log_every: int = knob(100, ge=1)


@dataclasses.dataclass
class DistillSection:
    steps: int = knob(1000, ge=1, le=10_000_000, help="iterations (every one steps the fake score network)")
    batch_size: int = knob(64, ge=1, le=8192, help="per worker")
    gen_lr: float = knob(5e-5, gt=0, le=1)
    fake_lr: float = knob(5e-5, gt=0, le=1)
    warmup_steps: int = knob(50, ge=0)
    weight_decay: float = knob(0.01, ge=0, le=1, help="AdamW, both networks")
    grad_clip: float = knob(10.0, ge=0, help="max grad norm, both networks; 0: off")
    dfake_gen_update_ratio: int = knob(5, ge=1, le=1000, help="fake-score steps per generator step")
    conditioning_sigma: float = knob(80.0, gt=0, le=1000, help="the one-step generator's input σ")
    min_step_percent: float = knob(0.02, ge=0, le=1, help="DM loss t range, fraction of the 1000 levels")
    max_step_percent: float = knob(0.98, ge=0, le=1)
    gan: bool = knob(False, help="add the GAN term (a head on the fake network's bottleneck)")
    gen_cls_loss_weight: float = knob(REFERENCE_GEN_CLS_LOSS_WEIGHT, ge=0, le=100, help="generator GAN weight")
    guidance_cls_loss_weight: float = knob(REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT, ge=0, le=100,
                                           help="discriminator weight; too large collapses the fake score")
    diffusion_gan_max_timestep: int = knob(0, ge=0, le=1000, help="GAN on x + σn, t < this; 0: on x itself")
    regression_weight: float = knob(0.0, ge=0, le=1000,
                                    help="DMD's regression loss on (noise, teacher ODE sample) pairs (Eq. 9 (DMD)), "
                                         "added to L_G; 0: off, as DMD2 (one-step only)")
    regression_pairs: int = knob(2048, ge=1, le=10_000_000,
                                 help="pairs per worker, made once by the teacher's Heun sampler (35 NFE)")
    num_steps: int = knob(1, ge=1, le=MAX_GENERATOR_STEPS, help="generator chain steps (2-4: few-step)")
    backward_simulation: bool = knob(True, help="few-step: train on the generator's own intermediate samples")
    ema_decay: float = knob(0.99, ge=0, lt=1, help="generator EMA (0: the raw weights are exported)")
    bf16: bool = knob(True, help="bf16 autocast of the forward passes; on GPU only (CPU runs float32); "
                                 "run.precision=bf16 turns it on too (it then also covers the teacher phase)")
    checkpoint_every: int = knob(250, ge=1)
    log_every: int = knob(50, ge=1)


@dataclasses.dataclass
class Config:
    phase: str = knob("both", choices=("teacher", "distill", "both"))
    teacher_checkpoint: str = knob("", help="teacher checkpoint or run folder, for phase=distill")
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    teacher: TeacherSection = section(TeacherSection)
    distill: DistillSection = section(DistillSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        from data.seeds import WAFER_HELD_OUT

        from trainers.dmd2.evaluate import FLOOR_SEEDS, HELD_OUT_SEEDS

        if self.phase == "distill" and not self.teacher_checkpoint:
            raise ConfigError("phase 'distill' needs teacher_checkpoint (a DMD2 teacher checkpoint or run folder)")
        if self.distill.min_step_percent > self.distill.max_step_percent:
            raise ConfigError("distill.min_step_percent must not exceed distill.max_step_percent")
        if self.distill.num_steps > 1 and self.distill.conditioning_sigma != 80.0:
            raise ConfigError("a few-step generator starts from the grid's σ_max = 80: leave "
                              "distill.conditioning_sigma at 80")
        if self.distill.regression_weight > 0 and self.distill.num_steps > 1:
            raise ConfigError("distill.regression_weight applies to the one-step generator: set it to 0 with "
                              f"distill.num_steps={self.distill.num_steps}")
        if self.data.domain == "sem" and self.data.image_size < 16:
            raise ConfigError("SEM images need data.image_size >= 16")
        reserved = {WAFER_HELD_OUT, HELD_OUT_SEEDS[self.data.domain], FLOOR_SEEDS[self.data.domain]}
        if not self.data.train_uri and self.data.seed in reserved:
            raise ConfigError(f"data.seed {self.data.seed} draws a held-out/floor set the evaluation compares "
                              f"against ({sorted(reserved)}); pick another")
