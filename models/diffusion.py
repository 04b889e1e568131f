"""Diffusion schedules and samplers, apart from any network (DDPM/DDIM ε-prediction; EDM/Karras σ-space).

Everything here is a pure function or an immutable schedule object. No method keeps per-call state (no step
index, no stored timesteps), so one `GaussianDiffusion` can be shared by every request a Serve replica handles
at once — the diffusers `self._step_index` failure mode cannot happen. Networks are plain callables:
`model_fn(x_t, t) -> ε` for DDPM/DDIM and `denoiser(x, σ, **kw) -> D(x; σ)` for EDM; callers bind conditioning
with a closure or `functools.partial`.

Notation key (paper symbols → code; comments cite equations as `# Eq. 12 (DDIM)`)
  DDPM   Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  iDDPM  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (cosine schedule)
  DDIM   Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM writes α_t for our ᾱ_t)
  EDM    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
         Models"

  T           num_timesteps; integer timesteps t ∈ {0, …, T−1} are 0-indexed (code t = paper t − 1)
  β_t         betas[t]                    α_t = 1 − β_t: alphas[t]
  ᾱ_t         alphas_cumprod[t] = ∏_{s≤t} α_s;  ᾱ_{−1} = 1, so t_prev = −1 means "clean data"
  β̃_t         posterior_variance[t] = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
  x0, x_t     clean sample, noised sample;  ε ~ N(0, I) true noise;  eps = ε_θ(x_t, t) predicted noise
  η           DDIM stochasticity: 0 deterministic DDIM, 1 DDPM-like ancestral sampling
  σ           EDM noise level, x = y + σ·n with n ~ N(0, I);  σ_d = sigma_data (0.5);  ρ Karras step exponent
  D(x; σ)     EDM denoiser (predicts y = x0);  F the raw backbone;  c_skip, c_out, c_in, c_noise its scalings

Shapes: x is (N, ...) with a leading batch dimension; t and σ are per-sample (N,) (scalars broadcast).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SCHEDULES",
    "GaussianDiffusion",
    "linear_betas",
    "cosine_betas",
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
]

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (N, ...), t (N,) long) -> eps (N, ...)
EpsTransform = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, eps) -> eps
Denoiser = Callable[..., Tensor]  # (x (N, ...), sigma (N,), **kw) -> D(x; sigma) (N, ...)

SCHEDULES = ("linear", "cosine")


##############################################################################################################
# Small helpers (validation, broadcasting, device-safe random draws)
##############################################################################################################


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_batched(x: Any, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty leading batch dimension, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"{name_b} must be a torch.Tensor, got {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}"
        )


def _check_shape_arg(shape: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"shape must be a sequence of ints like (N, C, H, W), got {shape!r}") from exc
    if len(out) < 1 or any(s < 1 for s in out):
        raise ValueError(f"shape must be non-empty with positive sizes, got {out}")
    return out


def _broadcast(v: Tensor, x: Tensor) -> Tensor:
    """(N,) → (N, 1, …, 1) so that it multiplies x of shape (N, ...)."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Coefficients in at least float32: ᾱ_0 = 0.9999 is 1.0 in bfloat16.
    return torch.promote_types(dtype, torch.float32)


def _table_dtype(device: torch.device) -> torch.dtype:
    # Schedules are kept in float64; MPS has no float64, so look them up in float32 there.
    return torch.float32 if device.type == "mps" else torch.float64


def _resolve_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    # Draw on the generator's own device (torch requires it) and move, so a CPU generator seeds GPU runs too.
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def _maybe_progress(it: Iterable[Any], progress: bool, desc: str, total: int) -> Iterable[Any]:
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total)


def _call_checked(fn: Callable[..., Tensor], name: str, x: Tensor, *args: Any, **kw: Any) -> Tensor:
    out = fn(x, *args, **kw)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
    return out


def _check_clip(clip_x0: float | None) -> None:
    if clip_x0 is not None and (not isinstance(clip_x0, numbers.Real) or not clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive float (x0 clamped to [-c, c]), got {clip_x0!r}")


##############################################################################################################
# β schedules
##############################################################################################################


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear β schedule (Sec. 4 (DDPM)), float64 of shape (T,)."""
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                         f"beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """iDDPM cosine schedule, float64 of shape (T,): β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # Eq. 17 (iDDPM): ᾱ_t = f(t) / f(0)
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)  # clipped at 0.999 to avoid a singularity at t = T (Sec. 3.2 (iDDPM))


##############################################################################################################
# DDPM / DDIM with ε-prediction
##############################################################################################################


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion (DDPM forward process) with DDPM and DDIM samplers.

    Immutable after construction: all tables are float64 CPU tensors, moved to the input's device on each
    call, so one instance is safe to share between threads and concurrent requests.

    Args:
        num_timesteps: T, number of diffusion steps (timesteps are 0 … T−1).
        schedule:      "linear" (DDPM) or "cosine" (iDDPM, s = 0.008, β ≤ 0.999).
        beta_start:    β_0 of the linear schedule (ignored by "cosine").
        beta_end:      β_{T−1} of the linear schedule (ignored by "cosine"). The DDPM values assume T = 1000;
                       with a much smaller T, ᾱ_{T−1} stays far from 0 and pure-noise sampling is biased.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        if not _is_int(num_timesteps) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        T = int(num_timesteps)
        betas = linear_betas(T, beta_start, beta_end) if schedule == "linear" else cosine_betas(T)

        self.num_timesteps = T
        self.schedule = schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)

        one = torch.ones(1, dtype=torch.float64)
        self.betas = betas  # (T,)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])  # ᾱ_{t−1}, ᾱ_{−1} = 1
        # ᾱ indexed by t + 1 so that t = −1 (DDIM's final "clean" target) reads ᾱ = 1.
        self._alphas_cumprod_ext = torch.cat([one, self.alphas_cumprod])  # (T + 1,)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # Eq. 7 (DDPM): q(x_{t−1} | x_t, x0) = N(μ̃_t, β̃_t I)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0; its log is replaced by β̃_1's (never used: no noise is added at t = 0).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if T > 1 else betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    def __repr__(self) -> str:
        extra = ""
        if self.schedule == "linear":
            extra = f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, schedule={self.schedule!r}{extra})"

    # ------------------------------------------------------------------------------------------ lookups

    def _timesteps(
        self, t: Any, n: int, device: torch.device, name: str = "t", allow_clean: bool = False
    ) -> Tensor:
        """Validate t (int, 0-d or (N,) integer tensor) and return it as a (N,) long tensor on `device`."""
        lo = -1 if allow_clean else 0
        hi = self.num_timesteps - 1
        if _is_int(t):
            if not lo <= int(t) <= hi:
                raise ValueError(f"{name}={int(t)} out of range [{lo}, {hi}] for T={self.num_timesteps}")
            return torch.full((n,), int(t), dtype=torch.long, device=device)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(n)
        elif t.shape != (n,):
            raise ValueError(
                f"{name} must be a scalar or have shape ({n},) to match the batch, got {tuple(t.shape)}"
            )
        t_min, t_max = int(t.min()), int(t.max())
        if t_min < lo or t_max > hi:
            raise ValueError(f"{name} values must lie in [{lo}, {hi}] for T={self.num_timesteps}, "
                             f"got min {t_min}, max {t_max}")
        return t.to(device=device, dtype=torch.long)

    def _extract(self, table: Tensor, idx: Tensor, x: Tensor) -> Tensor:
        """table[idx] as (N, 1, …, 1) in x's compute dtype, on x's device."""
        vals = table.to(device=x.device, dtype=_table_dtype(x.device))[idx]
        return _broadcast(vals.to(_compute_dtype(x.dtype)), x)

    def alpha_bar(self, t: int | Tensor, like: Tensor) -> Tensor:
        """ᾱ_t shaped (N, 1, …, 1) to broadcast against `like` (N, ...); t = −1 gives 1 (clean data).

        For guidance hooks (e.g. CADR's x̂0 and √(1−ᾱ)·g) that need the schedule at the current step.
        """
        _check_batched(like, "like")
        idx = self._timesteps(t, like.shape[0], like.device, allow_clean=True)
        return self._extract(self._alphas_cumprod_ext, idx + 1, like)

    # ------------------------------------------------------------------------------------ forward process

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0). x0, noise: (N, ...); t: int or (N,). Returns (N, ...) in x0's dtype."""
        _check_batched(x0, "x0")
        _check_same_shape(x0, noise, "x0", "noise")
        idx = self._timesteps(t, x0.shape[0], x0.device)
        a = self._extract(self.sqrt_alphas_cumprod, idx, x0)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, idx, x0)
        return (a * x0 + s * noise).to(x0.dtype)  # Eq. 4 (DDPM): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε

    def predict_x0(self, x_t: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        """x̂0 from x_t and ε. Shapes (N, ...); t: int or (N,)."""
        _check_batched(x_t, "x_t")
        _check_same_shape(x_t, eps, "x_t", "eps")
        idx = self._timesteps(t, x_t.shape[0], x_t.device)
        a = self._extract(self.sqrt_alphas_cumprod, idx, x_t)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, idx, x_t)
        return ((x_t - s * eps) / a).to(x_t.dtype)  # Eq. 15 (DDPM) / Eq. 9 (DDIM): x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ

    def predict_eps(self, x_t: Tensor, t: int | Tensor, x0: Tensor) -> Tensor:
        """ε implied by x_t and x0 (inverse of predict_x0). Shapes (N, ...); t: int or (N,)."""
        _check_batched(x_t, "x_t")
        _check_same_shape(x_t, x0, "x_t", "x0")
        idx = self._timesteps(t, x_t.shape[0], x_t.device)
        a = self._extract(self.sqrt_alphas_cumprod, idx, x_t)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, idx, x_t)
        return ((x_t - a * x0) / s).to(x_t.dtype)  # Eq. 4 (DDPM) solved for ε

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """t ~ U{0, …, T−1}, shape (n,) long (Alg. 1 line 3 (DDPM))."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        device = _resolve_device(device, generator)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (int(n),), generator=generator, device=gen_device)
        return t.to(device)

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: int | Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """ε-prediction MSE per sample, unreduced: (N,). The trainer reduces (and weights, if it wants).

        model_fn(x_t (N, ...), t (N,) long) -> eps (N, ...). t and noise are drawn with `generator` when None.
        """
        _check_batched(x0, "x0")
        n = x0.shape[0]
        if t is None:
            idx = self.sample_timesteps(n, generator, x0.device)
        else:
            idx = self._timesteps(t, n, x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, idx, noise)  # (N, ...)
        eps = _call_checked(model_fn, "model_fn", x_t, idx)  # (N, ...)
        err = (eps.to(_compute_dtype(eps.dtype)) - noise.to(_compute_dtype(eps.dtype))) ** 2
        return err.reshape(n, -1).mean(dim=1)  # Eq. 14 (DDPM): L_simple = ‖ε − ε_θ(x_t, t)‖², mean over dims

    # ------------------------------------------------------------------------------------------ DDPM sampler

    def ddpm_step(
        self,
        x_t: Tensor,
        t: int | Tensor,
        eps: Tensor,
        noise: Tensor | None,
        clip_x0: float | None = None,
    ) -> Tensor:
        """One ancestral step x_t → x_{t−1} with variance β̃_t (Alg. 2 (DDPM)).

        x_t, eps, noise: (N, ...); t: int or (N,). Samples whose t is 0 get no noise (they return the
        posterior mean, i.e. x̂0). noise=None returns the mean for every sample. clip_x0 clamps x̂0 to
        [−c, c].
        """
        _check_clip(clip_x0)
        _check_batched(x_t, "x_t")
        _check_same_shape(x_t, eps, "x_t", "eps")
        if noise is not None:
            _check_same_shape(x_t, noise, "x_t", "noise")
        idx = self._timesteps(t, x_t.shape[0], x_t.device)
        a = self._extract(self.sqrt_alphas_cumprod, idx, x_t)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, idx, x_t)
        x0 = (x_t - s * eps) / a  # Eq. 15 (DDPM): x̂0
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        c1 = self._extract(self.posterior_mean_coef1, idx, x_t)
        c2 = self._extract(self.posterior_mean_coef2, idx, x_t)
        mean = c1 * x0 + c2 * x_t  # Eq. 7 (DDPM): μ̃_t(x_t, x̂0); equals Eq. 11 (DDPM) if x̂0 is not clipped
        if noise is None:
            return mean.to(x_t.dtype)
        std = (0.5 * self._extract(self.posterior_log_variance_clipped, idx, x_t)).exp()
        if _is_int(t):
            keep = 1.0 if int(t) > 0 else 0.0
        else:
            keep = _broadcast((idx > 0).to(mean.dtype), x_t)
        # Alg. 2 line 4 (DDPM) with σ_t² = β̃_t; z = 0 at t = 0
        return (mean + keep * std * noise).to(x_t.dtype)

    def ddpm_sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        clip_x0: float | None = None,
        progress: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Full T-step ancestral sampling from x_T ~ N(0, I) (Alg. 2 (DDPM)). Returns (N, ...) = shape."""
        shape = _check_shape_arg(shape)
        _check_clip(clip_x0)
        device = _resolve_device(device, generator)
        n = shape[0]
        x = _randn(shape, generator, device, dtype)  # x_T ~ N(0, I)
        steps = range(self.num_timesteps - 1, -1, -1)
        with torch.no_grad():
            for t in _maybe_progress(steps, progress, "DDPM", self.num_timesteps):
                t_vec = torch.full((n,), t, dtype=torch.long, device=device)
                eps = _call_checked(model_fn, "model_fn", x, t_vec)  # (N, ...)
                noise = _randn(shape, generator, device, dtype) if t > 0 else None
                x = self.ddpm_step(x, t, eps, noise, clip_x0)
        return x

    # ------------------------------------------------------------------------------------------ DDIM sampler

    def ddim_timesteps(self, steps: int, t_start: int | None = None) -> Tensor:
        """`steps` evenly spaced timesteps from t_start (default T−1) down to 0, descending, (steps,) long.

        Any count 1 … t_start+1 works: steps=1 is [t_start] (one jump to x̂0), steps=T is every timestep.
        Each sampler step goes from ts[i] to ts[i+1], and the last one to t_prev = −1 (ᾱ = 1).
        """
        top = self.num_timesteps - 1 if t_start is None else t_start
        if not _is_int(top) or not 0 <= top <= self.num_timesteps - 1:
            raise ValueError(f"t_start must be an int in [0, {self.num_timesteps - 1}], got {t_start!r}")
        if not _is_int(steps) or not 1 <= steps <= top + 1:
            raise ValueError(f"steps must be an int in [1, {top + 1}] (t_start={top}, "
                             f"T={self.num_timesteps}), "
                             f"got {steps!r}")
        # Spacing (top / (steps−1)) ≥ 1, so rounding keeps the timesteps distinct.
        return torch.linspace(float(top), 0.0, int(steps), dtype=torch.float64).round().long()

    def ddim_step(
        self,
        x_t: Tensor,
        t: int | Tensor,
        t_prev: int | Tensor,
        eps: Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        clip_x0: float | None = None,
    ) -> Tensor:
        """One generalised DDIM step x_t → x_{t_prev} (t_prev < t; t_prev = −1 means ᾱ_prev = 1).

        x_t, eps, noise: (N, ...); t, t_prev: int or (N,). eta ∈ [0, 1]; noise is required when eta > 0 and
        t_prev ≥ 0. With clip_x0, x̂0 is clamped and ε re-derived from it so the step stays self-consistent.
        """
        _check_clip(clip_x0)
        if not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
        _check_batched(x_t, "x_t")
        _check_same_shape(x_t, eps, "x_t", "eps")
        n = x_t.shape[0]
        idx = self._timesteps(t, n, x_t.device)
        idx_prev = self._timesteps(t_prev, n, x_t.device, name="t_prev", allow_clean=True)
        if _is_int(t) and _is_int(t_prev):
            if not t_prev < t:
                raise ValueError(f"t_prev must be smaller than t, got t={t}, t_prev={t_prev}")
        elif not bool((idx_prev < idx).all()):
            raise ValueError("t_prev must be smaller than t for every sample")
        eta = float(eta)
        deterministic = eta == 0.0 or (_is_int(t_prev) and t_prev == -1)
        if noise is None and not deterministic:
            raise ValueError("ddim_step with eta > 0 needs `noise` (a tensor shaped like x_t)")
        if noise is not None:
            _check_same_shape(x_t, noise, "x_t", "noise")

        a_t = self._extract(self._alphas_cumprod_ext, idx + 1, x_t)  # ᾱ_t
        a_prev = self._extract(self._alphas_cumprod_ext, idx_prev + 1, x_t)  # ᾱ_{t_prev}
        xt = x_t.to(a_t.dtype)
        e = eps.to(a_t.dtype)
        x0 = (xt - (1.0 - a_t).sqrt() * e) / a_t.sqrt()  # Eq. 9 (DDIM): predicted x0
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            e = (xt - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()  # ε consistent with the clipped x̂0
        # Eq. 16 (DDIM): σ_t(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).clamp(min=0.0).sqrt()
        direction = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * e  # "direction pointing to x_t"
        x_prev = a_prev.sqrt() * x0 + direction  # Eq. 12 (DDIM), without the random term
        if noise is not None and eta > 0.0:
            x_prev = x_prev + sigma * noise.to(a_t.dtype)  # Eq. 12 (DDIM): + σ_t ε_t
        return x_prev.to(x_t.dtype)

    def _ddim_loop(
        self,
        model_fn: ModelFn,
        x: Tensor,
        timesteps: list[int],
        eta: float,
        generator: torch.Generator | None,
        clip_x0: float | None,
        eps_transform: EpsTransform | None,
        progress: bool,
        desc: str,
    ) -> Tensor:
        n = x.shape[0]
        for i in _maybe_progress(range(len(timesteps)), progress, desc, len(timesteps)):
            t = timesteps[i]
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_vec = torch.full((n,), t, dtype=torch.long, device=x.device)
            with torch.no_grad():
                eps = _call_checked(model_fn, "model_fn", x, t_vec)  # (N, ...)
            if eps_transform is not None:
                # Guidance needs ∇_{x_t}: the hook runs with grad enabled on a detached x_t, returns a new ε.
                with torch.enable_grad():
                    eps = _call_checked(lambda xx: eps_transform(xx, t_vec, eps), "eps_transform", x.detach())
                eps = eps.detach()
            noise = _randn(x.shape, generator, x.device, x.dtype) if eta > 0.0 and t_prev >= 0 else None
            with torch.no_grad():
                x = self.ddim_step(x, t, t_prev, eps, eta=eta, noise=noise, clip_x0=clip_x0)
        return x

    def ddim_sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int] | None,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        x_T: Tensor | None = None,
        clip_x0: float | None = None,
        eps_transform: EpsTransform | None = None,
        progress: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """DDIM sampling with `steps` model calls from x_T (given, or drawn ~ N(0, I) with `generator`).

        shape may be None when x_T is given. eps_transform(x_t, t, eps) -> eps is applied after every model
        call (classifier guidance, CADR); it gets a detached x_t under torch.enable_grad(), so it may do
        `x = x_t.requires_grad_()` and take gradients. model_fn and the update run under no_grad.
        Returns (N, ...) in x_T's dtype (or `dtype`).
        """
        _check_clip(clip_x0)
        if not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
        if x_T is None:
            if shape is None:
                raise ValueError("ddim_sample needs `shape` or `x_T`")
            shape_t = _check_shape_arg(shape)
            device = _resolve_device(device, generator)
            x = _randn(shape_t, generator, device, dtype)  # x_T ~ N(0, I)
        else:
            _check_batched(x_T, "x_T")
            if shape is not None and _check_shape_arg(shape) != tuple(x_T.shape):
                raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
            x = x_T if device is None else x_T.to(device)
        timesteps = self.ddim_timesteps(steps).tolist()
        return self._ddim_loop(
            model_fn, x, timesteps, float(eta), generator, clip_x0, eps_transform, progress, "DDIM"
        )

    def ddim_sample_from(
        self,
        x_start: Tensor,
        t_start: int,
        model_fn: ModelFn,
        steps: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        clip_x0: float | None = None,
        eps_transform: EpsTransform | None = None,
        progress: bool = False,
    ) -> Tensor:
        """SDEdit-style translation: noise x_start to level t_start (Eq. 4 (DDPM)), then DDIM back to t = −1.

        x_start: (N, ...), e.g. a defect image; model_fn a denoiser of the target (clean) domain. steps ∈
        [1, t_start+1]; smaller t_start keeps more of the input. noise (N, ...) is drawn when None.
        Returns the translation (N, ...).
        """
        _check_batched(x_start, "x_start")
        _check_clip(clip_x0)
        timesteps = self.ddim_timesteps(steps, t_start=t_start).tolist()
        if not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
        if noise is None:
            noise = _randn(x_start.shape, generator, x_start.device, x_start.dtype)
        with torch.no_grad():
            x = self.q_sample(x_start, int(t_start), noise)  # (N, ...) at noise level t_start
        return self._ddim_loop(
            model_fn, x, timesteps, float(eta), generator, clip_x0, eps_transform, progress, "DDIM from x0"
        )


##############################################################################################################
# EDM / Karras (σ-space)
##############################################################################################################


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
