"""DMD2's training signals as pure functions: EDM denoising loss (teacher and fake score), the
distribution-matching gradient and its surrogate loss, the GAN losses on the fake network's bottleneck, and
backward simulation.

Each function returns tensors; the trainer reduces, weights and steps (NVlabs/edm's loss.py split). Formulas
and defaults follow tianweiy/DMD2 main/edm/edm_guidance.py (read, not copied); ../shared/METHOD_NOTES.md lists
them.

Notation key (paper symbols → code; comments cite equations as `# Eq. 1 (DMD2)`)
  EDM   Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  DMD   Yin et al. 2024 (CVPR), "One-step Diffusion with Distribution Matching Distillation"
  DMD2  Yin et al. 2024 (NeurIPS), "Improved Distribution Matching Distillation for Fast Image Synthesis"

  x            generator output G(z) (N, C, H, W): the "clean" sample whose distribution is matched
  σ, t         noise level and its index into the 1000-level ascending Karras grid (σ = grid[t])
  D_real       teacher denoiser (frozen, the "real" score)
  D_fake       fake score denoiser (trained on G's samples)
  p_real       x − D_real(x + σn)  ∝ −σ²·s_real;   p_fake = x − D_fake(x + σn)
  grad         (p_real − p_fake) / mean|p_real|   the normalised DM gradient w.r.t. x (DMD's weighting factor)
  logits       realism logits of the GAN head (N,): large = "real"
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.edm import edm_loss_weight, edm_training_loss, generator_sigmas

__all__ = [
    "REFERENCE_GEN_CLS_LOSS_WEIGHT",
    "REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT",
    "edm_loss_weight",
    "edm_denoising_loss",
    "dmd_timestep_range",
    "sample_grid_sigma",
    "fake_score_loss",
    "DMGrad",
    "dm_gradient",
    "distribution_matching",
    "dm_surrogate_loss",
    "gan_logits",
    "gan_generator_loss",
    "gan_discriminator_loss",
    "generator_objective",
    "fake_objective",
    "regression_loss",
    "teacher_pairs",
    "few_step_sigmas",
    "backward_simulation",
]

# The reference's ImageNet-64 GAN run (experiments/imagenet/*gan_classifier*): generator GAN weight 3e-3,
# discriminator (cls) weight 1e-2, DM weight 1. A larger discriminator weight collapses the fake score
# (tianweiy/DMD2 issue #73).
REFERENCE_GEN_CLS_LOSS_WEIGHT = 3e-3
REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT = 1e-2

Denoiser = Callable[..., Tensor]  # D(x (N, ...), sigma (N,), class_labels) -> (N, ...)


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batched tensor (N, ...) with N >= 1, got {got}")


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))  # (N,) → (N, 1, …, 1)


def _randn_like(x: Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> Tensor:
    # Draw on the generator's device and move, so a CPU generator seeds GPU runs too.
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=dtype or x.dtype).to(x.device)


####################################################################################################################
# EDM denoising losses (teacher, fake score)
####################################################################################################################


def edm_denoising_loss(denoiser: Denoiser, x0: Tensor, class_labels: Tensor | None = None, *,
                       sigma: Tensor | None = None, noise: Tensor | None = None,
                       generator: torch.Generator | None = None, p_mean: float = -1.2,
                       p_std: float = 1.2) -> Tensor:
    """Teacher loss per sample (N,): λ(σ)·mean‖D(x0 + σn; σ, y) − x0‖², ln σ ~ N(P_mean, P_std²) (EDM's
    defaults).

    The core's edm_training_loss with class labels passed through; the trainer takes the mean.
    """
    # Eq. 8 (EDM) with λ(σ) = (σ² + σ_d²)/(σ σ_d)² (Table 1 (EDM))
    return edm_training_loss(denoiser, x0, sigma, noise, generator=generator, p_mean=p_mean, p_std=p_std,
                             class_labels=class_labels)


def dmd_timestep_range(num_train_timesteps: int = 1000, min_step_percent: float = 0.02,
                       max_step_percent: float = 0.98) -> tuple[int, int]:
    """Inclusive index range [lo, hi] of the DM loss's t: (20, 980) by default, as the reference draws it.

    The reference computes int(p·T) and draws randint(lo, min(hi + 1, T)); round() here, so that a percentage
    like 0.29 maps to 290 and not, through float error, to 289 (identical for the defaults).
    """
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if not 0.0 <= min_step_percent <= max_step_percent <= 1.0:
        raise ValueError(f"need 0 <= min_step_percent <= max_step_percent <= 1, got {min_step_percent}, "
                         f"{max_step_percent}")
    lo = int(round(min_step_percent * num_train_timesteps))
    hi = min(int(round(max_step_percent * num_train_timesteps)), num_train_timesteps - 1)
    return lo, hi


def sample_grid_sigma(n: int, grid: Tensor, lo: int, hi: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """t ~ U{lo, …, hi} (inclusive) per sample and σ = grid[t]: ((n,) int64, (n,) float32) on `device`."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if grid.ndim != 1 or not 0 <= lo <= hi < grid.shape[0]:
        size = grid.shape[0] if grid.ndim == 1 else tuple(grid.shape)
        raise ValueError(f"need a 1-d grid and 0 <= lo <= hi < len(grid) = {size}, got lo={lo}, hi={hi}")
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(lo, hi + 1, (n,), generator=generator, device=gen_dev)
    device = torch.device(device) if device is not None else grid.device
    return t.to(device), grid.to(device)[t.to(device)].float()


def fake_score_loss(fake: Denoiser, x_gen: Tensor, class_labels: Tensor | None, sigma: Tensor, *,
                    noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Fake score loss per sample (N,): λ(σ)·mean‖D_fake(sg(x) + σn; σ, y) − sg(x)‖² on the generator's
    samples.

    The reference draws t ~ U{0, …, 999} on the Karras grid (sample_grid_sigma(n, grid, 0, 999)), not EDM's
    log-normal, and weights by σ⁻² + σ_d⁻², which is λ(σ). Its torch.mean over all elements equals the mean of
    this (N,) vector. x_gen is detached: no gradient reaches the generator.
    """
    # Eq. 6 (DMD): the fake diffusion model is trained with the denoising loss on generated samples
    return edm_training_loss(fake, x_gen.detach(), sigma, noise, generator=generator,
                             class_labels=class_labels)


####################################################################################################################
# Distribution matching
####################################################################################################################


class DMGrad(NamedTuple):
    grad: Tensor  # (N, ...) the normalised DM gradient w.r.t. x (no graph)
    x_noisy: Tensor  # (N, ...) x + σn
    pred_real: Tensor  # (N, ...) D_real(x_noisy; σ)
    pred_fake: Tensor  # (N, ...) D_fake(x_noisy; σ)
    sigma: Tensor  # (N,)


def dm_gradient(x: Tensor, pred_real: Tensor, pred_fake: Tensor) -> Tensor:
    """grad = (p_real − p_fake) / mean|p_real|, p_• = x − pred_•, the mean over non-batch dims: (N, ...).

    Non-finite entries become finite (nan → 0, ±inf → ±max float), as the reference's nan_to_num: a sample
    whose teacher prediction equals x exactly (mean|p_real| = 0) must not poison the step.
    """
    _check_batch(x, "x")
    if pred_real.shape != x.shape or pred_fake.shape != x.shape:
        raise ValueError(f"pred_real {tuple(pred_real.shape)} and pred_fake {tuple(pred_fake.shape)} must "
                         f"match x {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, pred_real, pred_fake = x.detach().to(dtype), pred_real.detach().to(dtype), pred_fake.detach().to(dtype)
    p_real = x - pred_real  # ∝ −σ² s_real(x_t)
    p_fake = x - pred_fake  # ∝ −σ² s_fake(x_t)
    dims = tuple(range(1, x.ndim))
    weight = p_real.abs().mean(dim=dims, keepdim=True)  # (N, 1, …, 1) Eq. 8 (DMD): w = CS / ‖μ_real − x‖₁
    # Eq. 7 (DMD) / Eq. 1 (DMD2): ∇_x KL ≈ −(s_real − s_fake) ∝ (p_real − p_fake), per-sample normalised
    return torch.nan_to_num((p_real - p_fake) / weight)


@torch.no_grad()
def distribution_matching(real: Denoiser, fake: Denoiser, x: Tensor, class_labels: Tensor | None,
                          sigma: Tensor, *, noise: Tensor | None = None,
                          generator: torch.Generator | None = None) -> DMGrad:
    """Noise x to σ (N,), query both score networks without gradients, return the DM gradient and its inputs.

    Draw σ with sample_grid_sigma(n, grid, *dmd_timestep_range()) (t ~ U[20, 980] on the 1000-level grid).
    """
    _check_batch(x, "x")
    sig = sigma.reshape(-1).to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if sig.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must hold one value per sample ({x.shape[0]}), got {tuple(sigma.shape)}")
    if noise is None:
        noise = _randn_like(x, generator)
    if noise.shape != x.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match x {tuple(x.shape)}")
    x_noisy = (x.detach().to(sig.dtype) + _bcast(sig, x) * noise.to(sig.dtype)).to(x.dtype)  # x_t = x + σn
    pred_real = real(x_noisy, sig, class_labels)
    pred_fake = fake(x_noisy, sig, class_labels)
    return DMGrad(dm_gradient(x, pred_real, pred_fake), x_noisy, pred_real, pred_fake, sig)


def dm_surrogate_loss(x: Tensor, grad: Tensor, reduction: str = "mean") -> Tensor:
    """0.5·‖x − sg(x − grad)‖², a scalar; its autograd gradient w.r.t. x is grad (sum), grad/x.numel() (mean).

    "mean" is the reference (F.mse_loss's default reduction), and the scale its GAN weights (3e-3, 1e-2) were
    tuned against; "sum" gives exactly grad, for checks.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if grad.shape != x.shape:
        raise ValueError(f"grad {tuple(grad.shape)} must match x {tuple(x.shape)}")
    target = (x - grad.to(x.dtype)).detach()
    # Eq. 1 (DMD2) through autodiff (DreamFusion's trick): d/dx ½(x − sg(x − g))² = g
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction=reduction)


####################################################################################################################
# GAN on the fake network's bottleneck
####################################################################################################################


def gan_logits(fake: torch.nn.Module, head: torch.nn.Module, x: Tensor, class_labels: Tensor | None,
               grid: Tensor, *, max_timestep: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Realism logits (N,) = head(fake.bottleneck(x̃; σ, y)).

    max_timestep = 0: x̃ = x at σ = grid[0] = σ_min (the reference without --diffusion_gan); > 0: x̃ = x + σn
    with σ = grid[t], t ~ U{0, …, max_timestep − 1} (the reference's ImageNet run: --diffusion_gan, 1000).
    `fake` must have `bottleneck(x, sigma, class_labels)` (models.edm_unet.EDMDenoiser).
    """
    _check_batch(x, "x")
    if not 0 <= max_timestep <= grid.shape[0]:
        raise ValueError(f"max_timestep must be in [0, {grid.shape[0]}], got {max_timestep}")
    n = x.shape[0]
    if max_timestep > 0:
        _, sig = sample_grid_sigma(n, grid, 0, max_timestep - 1, generator, x.device)
        x = (x.float() + _bcast(sig, x) * _randn_like(x, generator, torch.float32)).to(x.dtype)
    else:
        sig = grid[:1].to(device=x.device, dtype=torch.float32).expand(n)
    feats = fake.bottleneck(x, sig, class_labels).float()  # (N, C_b, h_b, w_b)
    return head(feats).reshape(n)  # (N,)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss, a scalar: mean softplus(−f) = −mean log sigmoid(f)."""
    # Eq. 2 (DMD2), generator side: E_z[−log D(F(G(z), t))]
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Classifier loss, a scalar: mean(softplus(f) + softplus(−r)) = −E log D(real) − E log(1 − D(fake))."""
    # Eq. 2 (DMD2), discriminator side (the classifier maximises it; we minimise the negated log-likelihood)
    if logits_real.shape != logits_fake.shape:  # the reference adds them elementwise before the mean
        raise ValueError(f"logits_real {tuple(logits_real.shape)} and logits_fake {tuple(logits_fake.shape)} "
                         "must match (same real and fake batch size)")
    return (F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())).mean()


def generator_objective(loss_dm: Tensor, loss_gan: Tensor | None = None,
                        gen_cls_loss_weight: float = REFERENCE_GEN_CLS_LOSS_WEIGHT) -> Tensor:
    """L_G = L_DM + w_G·L_GAN,G (DM weight 1, as the reference; without the GAN term L_G = L_DM)."""
    return loss_dm if loss_gan is None else loss_dm + gen_cls_loss_weight * loss_gan


def fake_objective(loss_fake: Tensor, loss_cls: Tensor | None = None,
                   guidance_cls_loss_weight: float = REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT) -> Tensor:
    """L_fake = L_denoise + w_D·L_GAN,D (the fake network and its head step together, as the reference)."""
    return loss_fake if loss_cls is None else loss_fake + guidance_cls_loss_weight * loss_cls


####################################################################################################################
# DMD's regression loss (off in DMD2; an option for short budgets)
####################################################################################################################


def teacher_pairs(teacher: Denoiser, noise: Tensor, class_labels: Tensor | None, *, num_steps: int = 18,
                  batch_size: int = 256) -> Tensor:
    """The teacher's deterministic ODE sample (Heun, 2·num_steps − 1 NFE, σ_max = 80) from each unit noise
    (N, C, H, W): the targets of DMD's paired dataset, made in batches of batch_size without gradient."""
    from models.edm import edm_heun_sample

    out = []
    for i in range(0, noise.shape[0], batch_size):
        labels = None if class_labels is None else class_labels[i:i + batch_size]
        out.append(edm_heun_sample(teacher, noise[i:i + batch_size], num_steps=num_steps, class_labels=labels))
    return torch.cat(out)


def regression_loss(x_gen: Tensor, x_teacher: Tensor) -> Tensor:
    """Mean squared distance of G(z) to the teacher's ODE sample from the same z.

    DMD uses LPIPS, an ImageNet network with no meaning on wafer maps or SEM images; the squared error is the
    distance without a borrowed network."""
    _check_batch(x_gen, "x_gen")
    if x_gen.shape != x_teacher.shape:
        raise ValueError(f"x_gen {tuple(x_gen.shape)} and x_teacher {tuple(x_teacher.shape)} must match")
    # Eq. 9 (DMD): L_reg = E_(z,y) ℓ(G(z), y), ℓ = squared error here
    return (x_gen.float() - x_teacher.float()).pow(2).mean()


####################################################################################################################
# Few-step generator: σ levels and backward simulation
####################################################################################################################


def few_step_sigmas(num_steps: int, grid: Tensor | None = None) -> Tensor:
    """The generator's input noise levels for a k-step chain, (k,) descending, σ_0 = σ_max.

    Indices T−1, T−1 − T//k, … into the ascending grid (default: the 1000-level Karras grid σ ∈ [0.002, 80])
    as the reference's denoising_step_list: k = 4 → t = 999, 749, 499, 249; k = 1 → t = 999 (σ = 80, one
    step). The EDM core's generator_sigmas (inference samples with the same levels).
    """
    return generator_sigmas(num_steps, grid)


@torch.no_grad()
def backward_simulation(gen: Denoiser, noise: Tensor, sigmas: Tensor, class_labels: Tensor | None, step: int,
                        *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The generator's own input at chain step `step`: run steps 0 … step−1 of its chain without gradients.

    noise: (N, ...) unit Gaussian; sigmas: (k,) from few_step_sigmas. x_0 = σ_0·noise; for i < step: x̂ =
    G(x_i; σ_i, y), x_{i+1} = x̂ + σ_{i+1}·n' (fresh n'). Returns (x_step (N, ...), σ_step (N,)); the trainer
    then runs G on them WITH gradients. step = 0 is the one-step generator's input (σ_max·noise). Draw `step`
    ~ U{0, …, k−1} from a stream shared by all ranks (the reference broadcasts it), so every rank runs as many
    generator calls. DMD2 §4.5: training on the generator's own intermediate samples, not noised real images,
    removes the training/inference mismatch of the few-step variant.
    """
    _check_batch(noise, "noise")
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must be a (k,) tensor of noise levels, got {tuple(sigmas.shape)}")
    if not isinstance(step, int) or not 0 <= step < sigmas.shape[0]:
        raise ValueError(f"step must be an int in [0, {sigmas.shape[0]}), got {step!r}")
    n = noise.shape[0]
    dtype = torch.promote_types(noise.dtype, torch.float32)
    levels = [float(s) for s in sigmas]
    x = noise.to(dtype) * levels[0]  # x_0 = σ_max · n
    for i in range(step):
        sig_i = torch.full((n,), levels[i], device=noise.device, dtype=dtype)
        x_hat = gen(x.to(noise.dtype), sig_i, class_labels)
        x = x_hat.to(dtype) + levels[i + 1] * _randn_like(x, generator, dtype)  # renoise to σ_{i+1}
    return x.to(noise.dtype), torch.full((n,), levels[step], device=noise.device, dtype=dtype)
