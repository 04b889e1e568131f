"""KDCDDM losses, one pure function each, returning per-sample terms (N,) in a dict; the trainer reduces (mean).

The KDCDDM paper (IEEE TSM 2024, DOI 10.1109/TSM.2024.3472611) was not readable to us and its public code is stubs,
so each comment cites the equation of the source the term follows; the student / discriminator pair is the
authors' code (METHOD_NOTES): G: BCE(D(G(z)), 1) + λ_L1·L1(G(z), teacher(z)); D: ½[BCE(D(teacher), 1) + BCE(D(G), 0)],
teacher outputs "real", λ_L1 = 10, BCE on logits (non-saturating GAN, not hinge or LSGAN).

Notation: x image (N, C, H, W); μ, log σ² the VAE's posterior moments (N, L, h, w); z_d defect latent,
z_T = teacher(z_d) the CDLDM teacher's clean latent, G(z_d) the student's; D(·) patch logits (N, 1, h', w').
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.diffusion import GaussianDiffusion

__all__ = ["kl_to_standard_normal", "vae_loss", "conditional_diffusion_loss", "student_loss", "discriminator_loss"]

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (x_t, t, cond) -> ε̂, e.g. models.gan.ConditionalUNet


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)  # (N,)


def _same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"{name_a} needs a non-empty batch dimension, got shape {tuple(a.shape)}")


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) of a diagonal Gaussian, summed over latent elements: (N, ...) → (N,)."""
    _same_shape(mean, logvar, "mean", "logvar")
    # Eq. 10 (Kingma & Welling 2014, analytic KL of App. B): KL = ½ Σ (μ² + σ² − 1 − log σ²)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def vae_loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float = 1e-6) -> dict[str, Tensor]:
    """VAE objective per sample: {"rec": mean |x − x̂|, "kl": KL sum, "loss": rec + kl_weight·kl}, each (N,).

    kl_weight 1e-6 as LDM's KL-f8 (the KL only keeps the latent bounded; it does not make a generative VAE).
    The reconstruction is a per-pixel mean, the KL a per-sample sum, as LDM weighs them.
    """
    _same_shape(x, recon, "x", "recon")
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    rec = _per_sample_mean((x - recon).abs())
    kl = kl_to_standard_normal(mean, logvar)
    if kl.shape != rec.shape:
        raise ValueError(f"latent batch {tuple(mean.shape)} does not match image batch {tuple(x.shape)}")
    # LDM (Rombach et al. 2022) App. G autoencoder loss, L1 reconstruction + KL regulariser (no perceptual/GAN term)
    return {"rec": rec, "kl": kl, "loss": rec + kl_weight * kl}


def conditional_diffusion_loss(diffusion: GaussianDiffusion, denoiser: Denoiser, clean: Tensor, cond: Tensor | None,
                               t: Tensor | None = None, noise: Tensor | None = None,
                               generator: torch.Generator | None = None) -> Tensor:
    """ε-prediction MSE of the clean image (or latent) given the defect condition: (N,).

    clean x0 (N, C, H, W), cond y (N, C_y, H, W) the defect twin (pixels for ICDDM, latents for CDLDM), or None for
    an unconditional denoiser (ICDDM-unpaired's clean prior; CDLDM's per-domain denoisers). t, noise drawn with
    `generator` when None.
    """
    if cond is not None and (cond.shape[0] != clean.shape[0] or cond.shape[2:] != clean.shape[2:]):
        raise ValueError(f"cond {tuple(cond.shape)} must match clean {tuple(clean.shape)} in batch and spatial size")
    # Eq. 14 (DDPM) with the condition: L = E ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, y)‖²
    return diffusion.training_loss(lambda x_t, tt: denoiser(x_t, tt, cond), clean, t, noise, generator)


def student_loss(fake_logits: Tensor, student: Tensor, teacher: Tensor, l1_weight: float = 10.0) -> dict[str, Tensor]:
    """Student generator: {"adv": BCE(D(G(z)), 1), "l1": |G(z) − z_T| mean, "loss": adv + λ_L1·l1}, each (N,).

    fake_logits = D(G(z_d)) (N, 1, h', w') with gradients to G; teacher z_T (N, L, h, w) is detached here, so a
    caller cannot train the teacher by accident.
    """
    _same_shape(student, teacher, "student", "teacher")
    if fake_logits.shape[0] != student.shape[0]:
        raise ValueError(f"fake_logits batch {fake_logits.shape[0]} != student batch {student.shape[0]}")
    if l1_weight < 0:
        raise ValueError(f"l1_weight must be >= 0, got {l1_weight}")
    adv = _per_sample_mean(F.softplus(-fake_logits))  # BCE(σ(l), 1) = −log σ(l) = softplus(−l)
    l1 = _per_sample_mean((student - teacher.detach()).abs())
    # Eq. 4 (pix2pix, Isola et al. 2017): G* = arg min_G L_GAN(G, D) + λ L_L1(G), non-saturating form, λ = 10
    return {"adv": adv, "l1": l1, "loss": adv + l1_weight * l1}


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> dict[str, Tensor]:
    """Discriminator: {"real": BCE(D(z_T), 1), "fake": BCE(D(G(z)), 0), "loss": ½(real + fake)}, each (N,).

    real_logits = D(teacher latent), fake_logits = D(G(z_d).detach()), each (N, 1, h', w').
    """
    _same_shape(real_logits, fake_logits, "real_logits", "fake_logits")
    real = _per_sample_mean(F.softplus(-real_logits))  # −log σ(l_real)
    fake = _per_sample_mean(F.softplus(fake_logits))  # −log(1 − σ(l_fake))
    # Eq. 1 (Goodfellow et al. 2014) as a BCE, halved as pix2pix does so D learns at half G's rate
    return {"real": real, "fake": fake, "loss": 0.5 * (real + fake)}
