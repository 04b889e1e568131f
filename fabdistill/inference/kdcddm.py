"""KDCDDM inference: defect segmentation by translation, one pipeline for every model of the method.

A checkpoint (written by trainers/kdcddm) holds one or more models under ``meta["models"]`` (the baselines phase
holds two): ``{model: {net_name: net.meta()}}`` with weights in ``state["models"][model][net_name]``, and the
threshold chosen for each model on the validation split in ``meta["thresholds"]``. Models:

    icddm           ε_θ(x_t, t, y) in pixels, y = defect image; DDIM from noise (or from y noised to cond_t_start)
    icddm_unpaired  ε_θ(x_t, t) clean-domain prior; AnoDDPM partial diffusion: noise y to t₀, DDIM back to t = −1
    cdldm           the conditional denoiser on VAE latents z = s·μ(y); x̂ = D(ẑ / s); plus a defect-domain prior
                    denoiser for paired generation from noise
    kdcddm          one-step student: x̂ = D(G(s·μ(y)) / s)
    ae              reconstruction baseline: x̂ = AE(y) (KL autoencoder trained on clean images only)
    supervised      upper bound: a UNet (t = 0) with one logit channel; score = sigmoid(logit)

Detection: score = |y − x̂| (pixels in [0, 1]), optionally Gaussian-smoothed (σ = smooth_sigma px); mask =
score ≥ threshold. Images are (N, 1, H, W) in [0, 1]; networks see 2·x − 1.

Randomness is per call: every call draws from its own seeded ``torch.Generator``; the pipeline keeps no per-call
state, so one instance serves concurrent requests. Nothing here imports trainers.*.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Held-out generator seeds (evaluation) and validation seeds (thresholds), named in data/seeds.py; training seeds
# must differ from them.
from data.seeds import SEM_HELD_OUT, SEM_VALIDATION, WAFER_VALIDATION  # noqa: F401
from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob
from models.diffusion import GaussianDiffusion
from models.gan import conditional_unet_from_meta, generator_from_meta
from models.unet import unet_from_meta
from models.vae import vae_from_meta

MODELS = ("icddm", "icddm_unpaired", "cdldm", "kdcddm", "ae", "supervised")
DOMAINS = ("sem", "wafer")
LATENT_CLIP = 5.0  # latents are scaled to unit variance: clamp DDIM's x̂0 there, as pixels are clamped to [-1, 1]
BUILDERS = {"vae": vae_from_meta, "ae": vae_from_meta, "net": conditional_unet_from_meta,
            "prior": conditional_unet_from_meta, "generator": generator_from_meta, "seg": unet_from_meta}


# --------------------------------------------------------------------------- data of both domains

def domain_kind(domain: str) -> str:
    """Parquet kind of a domain's training data."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return domain


def pairs_from_tensors(t: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A decoded "sem" or "wafer" batch -> {"defect", "clean", "mask"}, each (N, 1, H, W) float32, images in [0, 1].

    Wafer maps: the map (0 off-wafer, 1 pass, 2 fail) / 2 is the defect image; its clean twin is the same map with
    the pattern's failing dies (pattern_mask) set to pass; the mask is pattern_mask (exactly where the twins differ).
    """
    if kind == "sem":
        return {"defect": t["image"].float(), "clean": t["clean"].float(), "mask": t["mask"].float()}
    if kind == "wafer":
        wmap, pattern = t["wafer_map"].float(), t["pattern_mask"].float()
        clean = torch.where(pattern > 0, torch.ones_like(wmap), wmap)  # pattern fails -> pass
        return {"defect": wmap / 2.0, "clean": clean / 2.0, "mask": (pattern > 0).float()}
    raise ValueError(f"KDCDDM trains on 'sem' or 'wafer' data, got kind {kind!r}")


def generate_pairs_table(domain: str, n: int, seed: int, size: int):
    """A synthetic table of the domain (its own Parquet kind): SEM triples or wafer maps with pattern masks."""
    if domain_kind(domain) == "sem":
        from data.sem import generate_sem
        return generate_sem(n, seed=seed, size=size)
    from data.wafer import generate_wafer
    return generate_wafer(n, seed=seed, size=size)


def held_out_pairs(domain: str, n: int, size: int, split: str = "test") -> dict[str, torch.Tensor]:
    """n held-out (defect, clean, mask) triples of a domain: split "test" or "validation" (seeds above)."""
    from data.datasets import table_to_tensors
    from data.seeds import WAFER_HELD_OUT

    seeds = {("sem", "test"): SEM_HELD_OUT, ("sem", "validation"): SEM_VALIDATION,
             ("wafer", "test"): WAFER_HELD_OUT, ("wafer", "validation"): WAFER_VALIDATION}
    if (domain, split) not in seeds:
        raise ValueError(f"no held-out split {split!r} of domain {domain!r}")
    return pairs_from_tensors(table_to_tensors(generate_pairs_table(domain, n, seeds[domain, split], size), domain),
                              domain)


def held_out_seeds(domain: str) -> tuple[int, ...]:
    from data.seeds import WAFER_HELD_OUT

    return (SEM_HELD_OUT, SEM_VALIDATION) if domain == "sem" else (WAFER_HELD_OUT, WAFER_VALIDATION)


# --------------------------------------------------------------------------- building blocks

def make_diffusion(diffusion: dict) -> GaussianDiffusion:
    return GaussianDiffusion(num_timesteps=int(diffusion["num_timesteps"]), schedule=diffusion["schedule"])


def gaussian_smooth(score: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) -> the same, blurred by a normalised Gaussian of std `sigma` px (reflect padding); 0: as is."""
    if sigma <= 0:
        return score
    radius = max(1, int(math.ceil(2.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=score.dtype, device=score.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    pad = min(radius, score.shape[-1] - 1, score.shape[-2] - 1)
    if pad < radius:  # images smaller than the kernel: crop it
        k = k[radius - pad: radius + pad + 1] / k[radius - pad: radius + pad + 1].sum()
    s = F.pad(score, (pad, pad, pad, pad), mode="reflect")
    s = F.conv2d(s, k.view(1, 1, 1, -1))  # along W
    return F.conv2d(s, k.view(1, 1, -1, 1))  # along H


@torch.no_grad()
def translate_latent(denoiser: nn.Module, diffusion: GaussianDiffusion, cond: Optional[torch.Tensor],
                     start: torch.Tensor, steps: int, t_start: int, gen: torch.Generator,
                     clip_x0: Optional[float] = None) -> torch.Tensor:
    """DDIM (η = 0) translation with a (conditional) denoiser: from pure noise when t_start = T − 1, else from
    `start` noised to t_start (SDEdit / AnoDDPM partial diffusion). start, cond: (N, C, H, W) -> (N, C, H, W)."""
    model_fn = (lambda x_t, t: denoiser(x_t, t, cond))
    steps = min(int(steps), int(t_start) + 1)
    noise = torch.randn(start.shape, generator=gen).to(start.device)
    if t_start >= diffusion.num_timesteps - 1:
        return diffusion.ddim_sample(model_fn, None, steps=steps, x_T=noise, clip_x0=clip_x0)
    return diffusion.ddim_sample_from(start, int(t_start), model_fn, steps, noise=noise, clip_x0=clip_x0)


@dataclasses.dataclass
class InferenceSettings:
    """How a pipeline translates (saved in checkpoint meta by training; overridable per call)."""

    steps: int = knob(25, ge=1, le=1000, help="DDIM steps of the diffusion models (teacher speed is at these)")
    t0: int = knob(250, ge=1, le=999, help="ICDDM-unpaired: noise level the defect image is diffused to (AnoDDPM)")
    unpaired_steps: int = knob(10, ge=1, le=1000, help="ICDDM-unpaired: DDIM steps from t0 back to a clean image")
    cond_t_start: int = knob(999, ge=1, le=999,
                             help="conditional models (ICDDM, CDLDM): 999 starts from pure noise; lower starts "
                                  "from the defect image noised to this level")
    smooth_sigma: float = knob(1.0, ge=0, le=16, help="Gaussian smoothing of the score map in px (0: off)")
    threshold: float = knob(-1.0, le=1.0, help="training: a fixed score threshold for every model; < 0: chosen "
                                               "on the validation split (the meta's thresholds are what serves)")
    latent_residual: bool = knob(True, help="CDLDM/KDCDDM: score against the VAE reconstruction of the input, "
                                           "D(s·μ(y)), instead of y, so the VAE's own error is not scored")


# --------------------------------------------------------------------------- the pipeline

class Segmenter:
    """One loaded model of a KDCDDM checkpoint: translate, score, segment, augment, generate pairs."""

    def __init__(self, model: str, nets: dict[str, nn.Module], meta: dict, device: torch.device | str = "cpu"):
        if model not in MODELS:
            raise ValueError(f"unknown KDCDDM model {model!r}; expected one of {MODELS}")
        self.model, self.meta, self.device = model, meta, torch.device(device)
        self.nets = {k: v.eval().requires_grad_(False).to(self.device) for k, v in nets.items()}
        self.diffusion = make_diffusion(meta["diffusion"])
        self.image_size = int(meta["image_size"])
        self.domain = meta.get("domain", "sem")
        self.settings = InferenceSettings(**{k: v for k, v in (meta.get("inference") or {}).items()
                                             if k in {f.name for f in dataclasses.fields(InferenceSettings)}})
        self.threshold: Optional[float] = (meta.get("thresholds") or {}).get(model)

    @classmethod
    def from_checkpoint(cls, path: str, model: Optional[str] = None, device: torch.device | str = "cpu") -> "Segmenter":
        """Load `model` of a checkpoint (or run folder); `model` may be omitted when the checkpoint holds one."""
        state, meta = load_state(resolve_checkpoint(path), map_location="cpu")
        if meta.get("method") != "kdcddm" or "models" not in meta:
            raise ValueError(f"{path}: not a KDCDDM checkpoint (meta method {meta.get('method')!r})")
        held = list(meta["models"])
        if model is None:
            if len(held) != 1:
                raise ValueError(f"{path} holds models {held}; name one")
            model = held[0]
        if model not in meta["models"]:
            raise ValueError(f"{path} holds models {held}, not {model!r}")
        nets = {}
        for name, net_meta in meta["models"][model].items():
            net = BUILDERS[name](net_meta)
            net.load_state_dict(state["models"][model][name])
            nets[name] = net
        return cls(model, nets, meta, device)

    @property
    def translates(self) -> bool:
        return self.model != "supervised"

    @property
    def has_latent(self) -> bool:
        return "vae" in self.nets

    def _settings(self, **over: Any) -> InferenceSettings:
        return dataclasses.replace(self.settings, **{k: v for k, v in over.items() if v is not None})

    def check_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"expected images (N, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        return x.to(self.device, torch.float32)

    def encode(self, p: torch.Tensor) -> torch.Tensor:
        vae = self.nets["vae"]
        return vae.scale_latent(vae.encode(p)[0])  # (N, L, h, w), unit-variance latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.nets["vae"]
        return vae.decode(vae.unscale_latent(z))  # (N, 1, H, W) in ~[-1, 1]

    @torch.no_grad()
    def translate(self, x: torch.Tensor, *, seed: int = 0, steps: Optional[int] = None, t0: Optional[int] = None,
                  cond_t_start: Optional[int] = None, unpaired_steps: Optional[int] = None) -> torch.Tensor:
        """Defect images (N, 1, H, W) in [0, 1] -> their clean translations, the same shape, clipped to [0, 1]."""
        return self._translate(x, seed=seed, steps=steps, t0=t0, cond_t_start=cond_t_start,
                               unpaired_steps=unpaired_steps)[0]

    def _translate(self, x: torch.Tensor, *, seed: int = 0, **over: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(translation, reference the residual is taken against: the input, or its VAE reconstruction)."""
        if not self.translates:
            raise ValueError("the supervised baseline predicts masks; it does not translate")
        s = self._settings(**over)
        p = self.check_images(x) * 2.0 - 1.0
        gen = torch.Generator().manual_seed(int(seed))
        if self.model == "icddm":
            out = translate_latent(self.nets["net"], self.diffusion, p, p, s.steps, s.cond_t_start, gen, clip_x0=1.0)
        elif self.model == "icddm_unpaired":
            out = translate_latent(self.nets["net"], self.diffusion, None, p, s.unpaired_steps, s.t0, gen, clip_x0=1.0)
        elif self.model in ("cdldm", "kdcddm"):
            z = self.encode(p)
            if self.model == "cdldm":
                zc = translate_latent(self.nets["net"], self.diffusion, z, z, s.steps, s.cond_t_start, gen,
                                      clip_x0=LATENT_CLIP)
            else:
                zc = self.nets["generator"](z)
            if s.latent_residual:  # one decoder pass for both (GroupNorm is per sample: same result, less overhead)
                out, p = self.decode(torch.cat([zc, z])).chunk(2)
            else:
                out = self.decode(zc)
        else:  # ae
            out = self.nets["ae"](p, sample=False)[0]
        to01 = lambda v: ((v.clamp(-1.0, 1.0) + 1.0) / 2.0).float()  # noqa: E731
        return to01(out), to01(p)

    @torch.no_grad()
    def score(self, x: torch.Tensor, *, seed: int = 0, smooth_sigma: Optional[float] = None,
              **translate_args: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(score maps (N, H, W), translations (N, 1, H, W) or None for the supervised model)."""
        s = self._settings(smooth_sigma=smooth_sigma)
        x = self.check_images(x)
        if self.model == "supervised":
            t = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
            return torch.sigmoid(self.nets["seg"](x * 2.0 - 1.0, t))[:, 0], None
        clean, ref = self._translate(x, seed=seed, **{k: v for k, v in translate_args.items() if v is not None})
        return gaussian_smooth((ref - clean).abs(), s.smooth_sigma)[:, 0], clean

    def segment(self, x: torch.Tensor, threshold: Optional[float] = None, **score_args: Any) -> dict[str, torch.Tensor]:
        """{"mask" (N, H, W) bool, "score" (N, H, W), "translation" (N, 1, H, W) or absent}."""
        thr = self.threshold if threshold is None else threshold
        if thr is None:
            raise ValueError(f"model {self.model!r} has no threshold: calibrate it on a validation split first")
        score, clean = self.score(x, **score_args)
        out = {"mask": score >= thr, "score": score}
        if clean is not None:
            out["translation"] = clean
        return out

    def score_many(self, images: torch.Tensor, batch_size: int = 64, seed: int = 0,
                   **score_args: Any) -> tuple[np.ndarray, Optional[np.ndarray], float]:
        """Score (N, 1, H, W) in batches -> (scores (N, H, W), translations or None, seconds spent)."""
        scores, cleans = [], []
        t0 = time.perf_counter()
        for i in range(0, images.shape[0], batch_size):
            s, c = self.score(images[i:i + batch_size], seed=seed + i, **score_args)
            scores.append(s.cpu().numpy())
            if c is not None:
                cleans.append(c.cpu().numpy())
        spent = time.perf_counter() - t0
        return np.concatenate(scores), (np.concatenate(cleans) if cleans else None), spent

    # --- new data
    @torch.no_grad()
    def augment(self, x: torch.Tensor, sigma: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """New defect images from latent perturbations of real ones, z' = s·μ(y) + σ·ε, and their clean twins
        (translated in latent space). Returns (defects, cleans), each (N, 1, H, W) in [0, 1]."""
        if self.model not in ("cdldm", "kdcddm"):
            raise ValueError(f"augmentation perturbs VAE latents: use a cdldm or kdcddm checkpoint, not {self.model}")
        gen = torch.Generator().manual_seed(int(seed))
        z = self.encode(self.check_images(x) * 2.0 - 1.0)
        z = z + sigma * torch.randn(z.shape, generator=gen).to(z.device)
        return self._pair_from_latent(z, gen)

    @torch.no_grad()
    def generate_pairs(self, n: int, seed: int = 0, steps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n new (defect, clean) pairs from noise: the defect-domain prior samples a defect latent (DDIM), which is
        translated and both are decoded. Returns (defects, cleans), each (n, 1, H, W) in [0, 1]."""
        if "prior" not in self.nets:
            raise ValueError(f"paired generation needs the defect-domain prior of a cdldm or kdcddm checkpoint; "
                             f"{self.model} has none")
        gen = torch.Generator().manual_seed(int(seed))
        vae = self.nets["vae"]
        shape = (n, *vae.latent_shape(self.image_size, self.image_size))
        x_T = torch.randn(shape, generator=gen).to(self.device)
        z = self.diffusion.ddim_sample(lambda x_t, t: self.nets["prior"](x_t, t, None), None,
                                       steps=steps or self.settings.steps, x_T=x_T, clip_x0=LATENT_CLIP)
        return self._pair_from_latent(z, gen)

    def _pair_from_latent(self, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        if self.model == "kdcddm":
            zc = self.nets["generator"](z)
        else:
            zc = translate_latent(self.nets["net"], self.diffusion, z, z, s.steps, s.cond_t_start, gen,
                                  clip_x0=LATENT_CLIP)
        to01 = lambda p: ((p.clamp(-1.0, 1.0) + 1.0) / 2.0).float()  # noqa: E731
        return to01(self.decode(z)), to01(self.decode(zc))


def load(checkpoint: str, model: Optional[str] = None) -> Segmenter:
    """The Method's `load`: a checkpoint (or run folder) -> its Segmenter."""
    return Segmenter.from_checkpoint(checkpoint, model)


def choose_model_threshold(seg: Segmenter, val: dict[str, torch.Tensor], batch_size: int = 64, seed: int = 0,
                           **score_args: Any) -> float:
    """The F1-optimal threshold of `seg` on a validation split (metrics.segmentation.choose_threshold)."""
    from metrics.segmentation import choose_threshold

    scores, _, _ = seg.score_many(val["defect"], batch_size=batch_size, seed=seed, **score_args)
    return choose_threshold(scores, val["mask"][:, 0].numpy() > 0.5)


# --------------------------------------------------------------------------- pictures and files

def display_images(images: np.ndarray, domain: str) -> tuple[np.ndarray, str]:
    """Images (N, H, W) in [0, 1] as drawn (viz.sem_images): SEM grey as they are; wafer maps (map / 2, see
    pairs_from_tensors) back to {0 off, 1 pass, 2 fail} in the wafer palette. Returns (images, palette)."""
    x = np.asarray(images, dtype=np.float64)
    if domain_kind(domain) == "wafer":
        return np.clip(np.rint(2.0 * x), 0, 2), "wafer"
    return x, "grey"


def columns_grid(columns: list[tuple[str, np.ndarray]], domain: str, true: np.ndarray | None = None,
                 pred: np.ndarray | None = None, outlined: tuple[str, ...] = (), heading: str = "") -> Any:
    """Rows = examples, one column per (title, images (N, H, W) in [0, 1]) as a viz.sem_images Figure; the columns
    named in `outlined` carry the true (N, H, W) and predicted masks as outlines."""
    from fabdistill.viz import sem_images

    n, c = columns[0][1].shape[0], len(columns)
    h, w = columns[0][1].shape[1:]
    images = np.empty((n * c, h, w))
    true_m = np.zeros((n * c, h, w), bool)
    pred_m = np.zeros((n * c, h, w), bool)
    titles = []
    palette = "grey"
    for j, (title, arr) in enumerate(columns):
        shown, palette = display_images(arr, domain)
        images[j::c] = shown
        if title in outlined:
            if true is not None:
                true_m[j::c] = true
            if pred is not None:
                pred_m[j::c] = pred
        titles += [title]
    return sem_images(images, true_m if true is not None else None, pred_m if pred is not None else None,
                      titles=[titles[k % c] if k < c else "" for k in range(n * c)], columns=c, heading=heading,
                      palette=palette)


@dataclasses.dataclass
class SampleSettings:
    """`python -m apps.sample kdcddm` settings (`--set key=value`)."""

    mode: str = knob("segment", choices=("segment", "augment", "pairs"),
                     help="segment held-out images | augment them by latent perturbation | new pairs from noise")
    model: str = knob("", help="which model of a checkpoint holding several (the baselines checkpoint)")
    n: int = knob(16, ge=1, le=100_000, help="images")
    steps: Optional[int] = knob(None, ge=1, le=1000, help="DDIM steps; unset: the checkpoint's")
    seed: int = knob(0, ge=0)
    sigma: float = knob(0.5, ge=0, le=10, help="augment: std of the latent perturbation (unit-variance latents)")
    batch_size: int = knob(64, ge=1, le=4096)


def sample_to_files(checkpoint: str, out_dir: str, settings: Optional[SampleSettings] = None) -> str:
    """apps.sample: samples.parquet (plain Parquet: one row per image, arrays as lists) and grid.png in out_dir
    (rows = images; segment mode outlines the true and predicted masks on the input and adds scores.png)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fabdistill import storage

    settings = settings or SampleSettings()
    seg = Segmenter.from_checkpoint(checkpoint, settings.model or None)
    columns: dict[str, np.ndarray] = {}
    if settings.mode == "segment":
        data = held_out_pairs(seg.domain, settings.n, seg.image_size, "test")
        if seg.threshold is None:
            raise ValueError(f"{checkpoint}: model {seg.model} has no threshold; it was not calibrated")
        scores, cleans, _ = seg.score_many(data["defect"], settings.batch_size, settings.seed, steps=settings.steps)
        columns = {"input": data["defect"][:, 0].numpy()}
        if cleans is not None:
            columns["translation"] = cleans[:, 0]
        columns.update({"score": scores, "predicted_mask": scores >= seg.threshold,
                        "true_mask": data["mask"][:, 0].numpy() > 0.5})
    elif settings.mode == "augment":
        real = held_out_pairs(seg.domain, settings.n, seg.image_size, "test")["defect"]
        defect, clean = seg.augment(real, settings.sigma, settings.seed)
        columns = {"source": real[:, 0].numpy(), "defect": defect[:, 0].numpy(), "clean": clean[:, 0].numpy()}
    else:
        defect, clean = seg.generate_pairs(settings.n, settings.seed, settings.steps)
        columns = {"defect": defect[:, 0].numpy(), "clean": clean[:, 0].numpy()}
    table = pa.table({k: pa.array([np.asarray(v[i], np.float32).ravel() for i in range(v.shape[0])])
                      for k, v in columns.items()}
                     | {"height": pa.array([seg.image_size] * settings.n, pa.int32()),
                        "width": pa.array([seg.image_size] * settings.n, pa.int32())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.makedirs(out_dir)
    storage.write_bytes(storage.join(out_dir, "samples.parquet"), buf.getvalue())
    from fabdistill.viz import save_figure, score_maps

    k = min(settings.n, 8)
    heading = f"KDCDDM {seg.model} | {settings.mode}"
    shown = [(name, v[:k]) for name, v in columns.items() if name not in ("predicted_mask", "true_mask", "score")]
    pictures = ["grid.png"]
    if settings.mode == "segment":
        save_figure(columns_grid(shown, seg.domain, columns["true_mask"][:k], columns["predicted_mask"][:k],
                                 outlined=("input",), heading=heading), storage.join(out_dir, "grid.png"))
        save_figure(score_maps(columns["score"][:k], columns=min(k, 4),
                               heading=f"{heading} | score (threshold {seg.threshold:.3g})"),
                    storage.join(out_dir, "scores.png"))
        pictures.append("scores.png")
    else:
        save_figure(columns_grid(shown, seg.domain, heading=heading), storage.join(out_dir, "grid.png"))
    return (f"{settings.n} {settings.mode} rows of {seg.model} -> {storage.join(out_dir, 'samples.parquet')} "
            f"and {' + '.join(pictures)}")
