"""KDCDDM configuration: which phases run, the data, one section per phase, the diffusion and inference settings.

Phases (each its own Ray Train run `<run.name>-<phase>`, resumable on its own), in this order:

    vae             KL autoencoder on defect + clean images of the domain (CDLDM's first stage)
    icddm           pixel-space conditional denoiser ε_θ(x_t, t, defect)
    icddm_unpaired  pixel-space clean-domain prior ε_θ(x_t, t) (AnoDDPM-style partial diffusion at inference)
    cdldm           latent conditional denoiser + the defect-domain latent prior, on the frozen VAE
    student         KDCDDM one-step generator against the frozen CDLDM teacher (+ PatchGAN)
    baselines       the autoencoder-reconstruction baseline and the supervised UNet (the only use of masks)
"""

from __future__ import annotations

import dataclasses

from fabdistill.config import ConfigError, knob, section
from fabdistill.inference.kdcddm import DOMAINS, InferenceSettings, held_out_seeds
from models.gan import DISCRIMINATOR_SIZES, GENERATOR_SIZES
from models.unet import UNET_SIZES
from models.vae import VAE_SIZES
from trainers.launch import RunSection

PHASES = ("vae", "icddm", "icddm_unpaired", "cdldm", "student", "baselines")


@dataclasses.dataclass
class DataSection:
    domain: str = knob("sem", choices=DOMAINS, help="sem: SEM line/space triples; wafer: wafer maps (pattern = defect)")
    train_uri: str = knob("", help="a 'sem' or 'wafer' Parquet dataset (local or s3://); empty: generate num_train")
    num_train: int = knob(2048, ge=8, le=10_000_000, help="synthetic training pairs when train_uri is empty")
    seed: int = knob(0, ge=0, help="generator seed of the synthetic training set")
    image_size: int = knob(32, choices=(16, 32, 64, 128), help="H = W")
    num_validation: int = knob(128, ge=8, le=100_000, help="held-out validation images the thresholds are chosen on")


@dataclasses.dataclass
class DiffusionSection:
    num_timesteps: int = knob(1000, ge=10, le=4000, help="T (the authors' config: 1000)")
    schedule: str = knob("cosine", choices=("cosine", "linear"), help="β schedule (the authors': cosine)")


@dataclasses.dataclass
class VAESection:
    size: str = knob("tiny", choices=tuple(VAE_SIZES), help="models/vae.py VAE_SIZES")
    latent_channels: int = knob(4, ge=1, le=64, help="latent width L")
    downsample: int = knob(2, choices=(1, 2, 4, 8), help="spatial factor f: latents are (L, H/f, W/f)")
    base_channels: int = knob(0, ge=0, le=512, help="0: the size's default")
    subpixel: bool = knob(False, help="first level at half resolution (PixelUnshuffle in, sub-pixel conv + "
                                      "PixelShuffle out): ~3x cheaper encode and decode at narrow widths; needs f >= 2")
    decoder_res_blocks: int = knob(-1, ge=-1, le=8, help="residual blocks per decoder level; -1: one more than "
                                                        "the encoder's, as LDM")
    kl_weight: float = knob(1e-6, ge=0, le=1, help="weight of the KL term (LDM KL-f8: 1e-6)")
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(32, ge=1, le=8192, help="per worker")
    lr: float = knob(2e-4, gt=0, le=1)
    log_every: int = knob(100, ge=1)
    checkpoint_every: int = knob(500, ge=1)


@dataclasses.dataclass
class DenoiserSection:
    size: str = knob("small", choices=tuple(UNET_SIZES), help="models/unet.py UNET_SIZES")
    base_channels: int = knob(0, ge=0, le=1024, help="0: the size's default width")
    prior_size: str = knob("tiny", choices=tuple(UNET_SIZES),
                           help="cdldm only: the defect-domain latent prior (paired generation from noise)")
    steps: int = knob(4000, ge=1, le=10_000_000)
    batch_size: int = knob(16, ge=1, le=8192, help="per worker (the authors': 16)")
    lr: float = knob(1e-4, gt=0, le=1, help="the authors': 1e-4")
    ema_decay: float = knob(0.999, ge=0, lt=1, help="the authors': 0.999")
    log_every: int = knob(100, ge=1)
    checkpoint_every: int = knob(500, ge=1)


@dataclasses.dataclass
class StudentSection:
    generator: str = knob("tiny", choices=tuple(GENERATOR_SIZES), help="models/gan.py GENERATOR_SIZES")
    discriminator: str = knob("tiny", choices=tuple(DISCRIMINATOR_SIZES))
    l1_weight: float = knob(10.0, ge=0, le=1000, help="λ_L1 (the authors': 10)")
    teacher_steps: int = knob(25, ge=1, le=1000, help="DDIM steps of the teacher targets (precomputed once)")
    max_targets: int = knob(0, ge=0, help="defect latents per worker the teacher translates (0: the whole shard)")
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(32, ge=1, le=8192, help="per worker")
    lr_g: float = knob(1e-4, gt=0, le=1, help="the authors': 1e-4")
    lr_d: float = knob(1e-4, gt=0, le=1, help="the authors': 1e-4")
    log_every: int = knob(100, ge=1)
    checkpoint_every: int = knob(500, ge=1)


@dataclasses.dataclass
class BaselineSection:
    ae_size: str = knob("tiny", choices=tuple(VAE_SIZES), help="the reconstruction baseline's autoencoder")
    ae_downsample: int = knob(2, choices=(1, 2, 4, 8))
    unet_size: str = knob("small", choices=tuple(UNET_SIZES), help="the supervised UNet")
    base_channels: int = knob(0, ge=0, le=1024, help="width of both baselines' networks; 0: the sizes' defaults")
    steps: int = knob(2000, ge=1, le=10_000_000)
    batch_size: int = knob(32, ge=1, le=8192, help="per worker")
    lr: float = knob(2e-4, gt=0, le=1)
    log_every: int = knob(100, ge=1)
    checkpoint_every: int = knob(500, ge=1)


@dataclasses.dataclass
class Config:
    phases: str = knob(",".join(PHASES), help=f"comma-separated phases to run, of {', '.join(PHASES)}")
    vae_checkpoint: str = knob("", help="a trained VAE (checkpoint or run folder) when 'vae' is not run")
    cdldm_checkpoint: str = knob("", help="a trained CDLDM teacher when 'cdldm' is not run")
    data: DataSection = section(DataSection)
    diffusion: DiffusionSection = section(DiffusionSection)
    inference: InferenceSettings = section(InferenceSettings)
    vae: VAESection = section(VAESection)
    icddm: DenoiserSection = section(DenoiserSection)
    icddm_unpaired: DenoiserSection = section(DenoiserSection)
    cdldm: DenoiserSection = section(DenoiserSection)
    student: StudentSection = section(StudentSection)
    baselines: BaselineSection = section(BaselineSection)
    run: RunSection = section(RunSection)

    def phase_list(self) -> list[str]:
        asked = [p.strip() for p in self.phases.split(",") if p.strip()]
        unknown = [p for p in asked if p not in PHASES]
        if unknown or not asked:
            raise ConfigError(f"phases: unknown {unknown or 'empty list'}; choose from {', '.join(PHASES)}")
        return [p for p in PHASES if p in asked]

    def check(self) -> None:
        phases = self.phase_list()
        if "cdldm" in phases and "vae" not in phases and not self.vae_checkpoint:
            raise ConfigError("phase 'cdldm' needs the VAE: run phase 'vae' too or set vae_checkpoint")
        if "student" in phases and "cdldm" not in phases and not self.cdldm_checkpoint:
            raise ConfigError("phase 'student' needs the CDLDM teacher: run phase 'cdldm' or set cdldm_checkpoint")
        if self.data.image_size % self.vae.downsample or self.data.image_size % self.baselines.ae_downsample:
            raise ConfigError(f"data.image_size {self.data.image_size} must be divisible by the VAE downsampling")
        if self.vae.subpixel and self.vae.downsample < 2:
            raise ConfigError("vae.subpixel needs vae.downsample >= 2 (its first level runs at half resolution)")
        if self.inference.t0 >= self.diffusion.num_timesteps or \
                self.inference.cond_t_start >= self.diffusion.num_timesteps:
            raise ConfigError(f"inference.t0 and inference.cond_t_start must be < diffusion.num_timesteps "
                              f"({self.diffusion.num_timesteps})")
        if not self.data.train_uri and self.data.seed in held_out_seeds(self.data.domain):
            raise ConfigError(f"data.seed {self.data.seed} draws the held-out test/validation images of the "
                              f"{self.data.domain} domain; pick another")
