"""EDM / Karras diffusion in σ-space, apart from any network: noise levels, preconditioning, loss, samplers.

Moved out of models/diffusion.py (which keeps DDPM/DDIM ε-prediction) so that σ-space methods (DMD2's
one-step generator and its score networks) build on one module. Pure functions and a stateless wrapper, as
in diffusion.py: no per-call state, so one object can serve concurrent requests.

Notation key (paper symbols → code; comments cite equations as `# Eq. 5 (EDM)`)
  EDM    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
         Models"

  σ           noise level, x = y + σ·n with n ~ N(0, I);  σ_d = sigma_data (0.5);  ρ Karras step exponent
  D(x; σ)     denoiser (predicts y = x0);  F the raw backbone;  c_skip, c_out, c_in, c_noise its scalings

Shapes: x is (N, ...) with a leading batch dimension; σ is per-sample (N,) (scalars and EDM's (N, 1, 1, 1)
broadcast).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

# Input checks and device-safe draws shared with the DDPM/DDIM module (one behaviour for both).
from models.diffusion import (_broadcast, _call_checked, _check_batched, _check_same_shape, _compute_dtype,
                              _is_int, _randn, _resolve_device, _table_dtype)

__all__ = [
    "karras_sigmas",
    "karras_sigma_grid",
    "EDMCoeffs",
    "edm_precond_coeffs",
    "EDMPrecond",
    "edm_sample_sigma",
    "edm_loss_weight",
    "edm_training_loss",
    "edm_heun_sample",
    "edm_euler_sample",
    "generator_sigmas",
    "edm_generator_sample",
]

Denoiser = Callable[..., Tensor]  # (x (N, ...), sigma (N,), **kw) -> D(x; sigma) (N, ...)


def _check_karras(num: int, sigma_min: float, sigma_max: float, rho: float, what: str) -> None:
    if not _is_int(num) or num < 1:
        raise ValueError(f"{what} must be a positive int, got {num!r}")
    if not (0.0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")


def _karras_ramp(num: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    # Eq. 5 (EDM): σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0 … N−1 (descending)
    if num == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.arange(num, dtype=torch.float64) / (num - 1)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def karras_sigmas(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM sampling noise levels, (num_steps + 1,) float64: σ_max … σ_min descending, then a trailing 0."""
    _check_karras(num_steps, sigma_min, sigma_max, rho, "num_steps")
    sigmas = _karras_ramp(int(num_steps), float(sigma_min), float(sigma_max), float(rho))
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])  # Eq. 5 (EDM): σ_N = 0
    return sigmas if device is None else sigmas.to(device=device, dtype=_table_dtype(torch.device(device)))


def karras_sigma_grid(
    num: int = 1000,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The discrete Karras grid DMD2 indexes its timesteps into: (num,) float64, ASCENDING, no trailing 0.

    grid[0] = σ_min, grid[num−1] = σ_max (Eq. 5 (EDM) with N = num, flipped), so a larger index t means more
    noise, as with DDPM timesteps: DMD2's t ~ U[20, 980] draws σ = grid[t].
    """
    _check_karras(num, sigma_min, sigma_max, rho, "num")
    grid = torch.flip(_karras_ramp(int(num), float(sigma_min), float(sigma_max), float(rho)), dims=[0])
    return grid if device is None else grid.to(device=device, dtype=_table_dtype(torch.device(device)))


def _sigma_vector(sigma: float | Tensor, x: Tensor) -> Tensor:
    """σ as a float, a 0-d tensor, (N,) or EDM's (N, 1, 1, 1) → (N,) in x's compute dtype and device."""
    dtype = _compute_dtype(x.dtype)
    n = x.shape[0]
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        return torch.full((n,), float(sigma), dtype=dtype, device=x.device)
    if not isinstance(sigma, Tensor):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if sigma.numel() == 1:
        return sigma.reshape(1).to(device=x.device, dtype=dtype).expand(n)
    if sigma.numel() != n or (sigma.ndim > 1 and any(s != 1 for s in sigma.shape[1:])):
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample ({n}), got shape {tuple(sigma.shape)}"
        )
    return sigma.reshape(n).to(device=x.device, dtype=dtype)


class EDMCoeffs(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_precond_coeffs(sigma: Tensor, sigma_data: float = 0.5) -> EDMCoeffs:
    """EDM preconditioning (Table 1 (EDM), "Network and preconditioning"); elementwise in σ > 0, any shape."""
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)  # c_skip(σ) = σ_d² / (σ² + σ_d²)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()  # c_out(σ) = σ σ_d / √(σ² + σ_d²)
    c_in = 1.0 / (s2 + sd2).sqrt()  # c_in(σ) = 1 / √(σ² + σ_d²)
    c_noise = sigma.log() / 4.0  # c_noise(σ) = ¼ ln σ
    return EDMCoeffs(c_skip, c_out, c_in, c_noise)


class EDMPrecond(nn.Module):
    """Wrap any backbone F(x_in, c_noise, **kw) into the EDM denoiser D(x; σ) (Eq. 7 (EDM)).

    forward(x (N, ...), sigma (float, (N,) or (N, 1, …, 1)), **kw) -> D (N, ...), the predicted clean sample.
    The backbone sees c_in·x (unit variance) and c_noise (N,); it must return a tensor shaped like x.
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[..., Tensor],  # F_θ(x_in (N, ...), c_noise (N,), **kw) -> (N, ...)
        sigma_data: float = 0.5,  # Expected standard deviation of the training data.
    ) -> None:
        super().__init__()
        if not callable(backbone):
            raise TypeError(f"backbone must be callable, got {type(backbone).__name__}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: float | Tensor, **kw: Any) -> Tensor:
        _check_batched(x, "x")
        sig = _sigma_vector(sigma, x)  # (N,)
        c = edm_precond_coeffs(sig, self.sigma_data)
        x_c = x.to(sig.dtype)
        x_in = (_broadcast(c.c_in, x) * x_c).to(x.dtype)  # (N, ...) unit-variance input
        f = _call_checked(self.backbone, "backbone", x_in, c.c_noise, **kw)  # (N, ...) F_θ
        d = _broadcast(c.c_skip, x) * x_c + _broadcast(c.c_out, x) * f.to(sig.dtype)  # Eq. 7 (EDM)
        return d.to(x.dtype)


def edm_sample_sigma(
    n: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training noise levels, (n,): ln σ ~ N(P_mean, P_std²) (Table 1 (EDM), "Noise distribution")."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not p_std > 0:
        raise ValueError(f"p_std must be positive, got {p_std}")
    device = _resolve_device(device, generator)
    return (_randn((int(n),), generator, device, dtype) * p_std + p_mean).exp()


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out(σ)² (Table 1 (EDM), "Loss weighting"); elementwise."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_training_loss(
    denoiser: Denoiser,
    x0: Tensor,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    sigma_data: float | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    **kw: Any,
) -> Tensor:
    """EDM denoising loss per sample, unreduced: (N,) = λ(σ)·mean ‖D(y + σn; σ) − y‖² (Eq. 8 (EDM)).

    x0 (= y): (N, ...); sigma: (N,) (drawn from edm_sample_sigma when None); noise: unit Gaussian n (N, ...),
    scaled by σ here. sigma_data defaults to denoiser.sigma_data (else 0.5). Extra **kw go to the denoiser.
    """
    _check_batched(x0, "x0")
    n = x0.shape[0]
    if sigma_data is None:
        sigma_data = float(getattr(denoiser, "sigma_data", 0.5))
    if sigma is None:
        sig = edm_sample_sigma(n, p_mean, p_std, generator, x0.device, _compute_dtype(x0.dtype))
    else:
        sig = _sigma_vector(sigma, x0)
        if not bool((sig > 0).all()):
            raise ValueError("sigma must be positive for every sample")
    if noise is None:
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
    _check_same_shape(x0, noise, "x0", "noise")
    # y + n with n ~ N(0, σ² I)
    x_noisy = (x0.to(sig.dtype) + _broadcast(sig, x0) * noise.to(sig.dtype)).to(x0.dtype)
    d = _call_checked(denoiser, "denoiser", x_noisy, sig, **kw)  # (N, ...)
    err = (d.to(sig.dtype) - x0.to(sig.dtype)) ** 2
    return edm_loss_weight(sig, sigma_data) * err.reshape(n, -1).mean(dim=1)  # Eq. 8 (EDM)


def _edm_prepare(latents: Tensor, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> tuple[
    Tensor, list[float], torch.dtype
]:
    _check_batched(latents, "latents")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()  # N + 1 values, last 0
    work = _table_dtype(latents.device)  # accumulate the ODE state in float64 as EDM does (float32 on MPS)
    x = latents.to(work) * sigmas[0]  # x_0 = σ_max · n, n ~ N(0, I) (Alg. 1 line 1 (EDM))
    return x, sigmas, work


def _edm_denoise(denoiser: Denoiser, x: Tensor, sigma: float, in_dtype: torch.dtype, work: torch.dtype,
                 **kw: Any) -> Tensor:
    x_in = x.to(in_dtype)
    sig = torch.full((x.shape[0],), sigma, dtype=in_dtype, device=x.device)
    return _call_checked(denoiser, "denoiser", x_in, sig, **kw).to(work)


def edm_heun_sample(
    denoiser: Denoiser,
    latents: Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    **kw: Any,
) -> Tensor:
    """EDM 2nd-order Heun sampler (Alg. 1 (EDM); Alg. 2 when S_churn > 0). 2·num_steps − 1 denoiser calls.

    latents: (N, ...) unit Gaussian noise, scaled by σ_max here. With S_churn = 0 (default) the sampler is
    deterministic; `generator` only feeds the churn noise. **kw go to the denoiser. Returns (N, ...) in
    latents' dtype.
    """
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be non-negative, got S_churn={S_churn}, "
                         f"S_noise={S_noise}")
    x, sigmas, work = _edm_prepare(latents, num_steps, sigma_min, sigma_max, rho)
    in_dtype = latents.dtype
    with torch.no_grad():
        for i in range(num_steps):
            t_cur, t_next = sigmas[i], sigmas[i + 1]
            # Alg. 2 lines 4-6 (EDM): temporarily raise the noise level by γ (γ = 0 gives Alg. 1).
            gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_min <= t_cur <= S_max else 0.0
            t_hat = t_cur + gamma * t_cur
            if gamma > 0:
                eps = _randn(x.shape, generator, x.device, work) * S_noise
                x = x + math.sqrt(t_hat**2 - t_cur**2) * eps
            # dx/dσ = (x − D(x; σ)) / σ (Alg. 1 line 4 (EDM))
            d_cur = (x - _edm_denoise(denoiser, x, t_hat, in_dtype, work, **kw)) / t_hat
            x_next = x + (t_next - t_hat) * d_cur  # Euler step (Alg. 1 line 5)
            if t_next > 0:  # 2nd-order correction (Alg. 1 lines 6-8); skipped on the final step to σ = 0
                d_next = (x_next - _edm_denoise(denoiser, x_next, t_next, in_dtype, work, **kw)) / t_next
                x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
    return x.to(in_dtype)


def edm_euler_sample(
    denoiser: Denoiser,
    latents: Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    **kw: Any,
) -> Tensor:
    """1st-order Euler on the EDM ODE dx/dσ = (x − D(x; σ))/σ over Karras steps: num_steps denoiser calls.

    latents: (N, ...) unit Gaussian noise, scaled by σ_max here. Returns (N, ...) in latents' dtype.
    """
    x, sigmas, work = _edm_prepare(latents, num_steps, sigma_min, sigma_max, rho)
    in_dtype = latents.dtype
    with torch.no_grad():
        for i in range(num_steps):
            t_cur, t_next = sigmas[i], sigmas[i + 1]
            # dx/dσ = (x − D(x; σ)) / σ (Alg. 1 line 4 (EDM))
            d_cur = (x - _edm_denoise(denoiser, x, t_cur, in_dtype, work, **kw)) / t_cur
            x = x + (t_next - t_cur) * d_cur  # Euler step
    return x.to(in_dtype)

def generator_sigmas(num_steps: int, grid: Tensor | None = None) -> Tensor:
    """Input noise levels of a k-step distilled generator (DMD2's denoising_step_list), (k,) descending.

    Indices T−1, T−1 − T//k, … into the ascending grid (default: the 1000-level Karras grid σ ∈ [0.002, 80]):
    k = 4 → t = 999, 749, 499, 249; k = 1 → t = 999 (σ = σ_max = 80, one step).
    """
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    grid = karras_sigma_grid() if grid is None else grid
    t_max = grid.shape[0]
    if num_steps > t_max - 1:
        raise ValueError(f"num_steps {num_steps} too large for a grid of {t_max} levels")
    idx = list(range(t_max - 1, 0, -(t_max // num_steps)))[:num_steps]
    return grid[torch.tensor(idx, device=grid.device)]


def edm_generator_sample(
    generator_net: Denoiser,
    latents: Tensor,
    sigmas: Tensor,
    renoise: Callable[[int], Tensor] | None = None,
    **kw: Any,
) -> Tensor:
    """A distilled generator's k-step chain (DMD2 §4.5), k = len(sigmas) generator calls.

    latents: (N, ...) unit Gaussian n; sigmas: (k,) descending from generator_sigmas. x_0 = σ_0·n; x̂_i =
    G(x_i; σ_i); x_{i+1} = x̂_i + σ_{i+1}·n_{i+1}, where `renoise(i + 1)` returns the fresh unit Gaussian
    n_{i+1} (N, ...) (the caller draws it from each request's own generator, so batching keeps seeds). k = 1 is
    the one-step generator G(σ_max·n; σ_max). Returns x̂_{k−1} (N, ...) in latents' dtype.
    """
    _check_batched(latents, "latents")
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must be a (k,) tensor of noise levels, got {tuple(sigmas.shape)}")
    if sigmas.shape[0] > 1 and renoise is None:
        raise ValueError("a chain of more than one step needs `renoise` for the fresh noise between steps")
    levels = [float(s) for s in sigmas]
    n, in_dtype = latents.shape[0], latents.dtype
    x = latents * levels[0]  # x_0 = σ_max · n
    with torch.no_grad():
        for i, level in enumerate(levels):
            x_hat = _call_checked(generator_net, "generator", x,
                                  torch.full((n,), level, dtype=in_dtype, device=x.device), **kw)
            if i + 1 == len(levels):
                return x_hat.to(in_dtype)
            fresh = renoise(i + 1).to(device=x.device, dtype=in_dtype)  # type: ignore[misc]
            _check_same_shape(latents, fresh, "latents", "renoise noise")
            x = x_hat + levels[i + 1] * fresh  # renoise to σ_{i+1}
    raise AssertionError("unreachable")
