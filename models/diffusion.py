"""Diffusion schedules and samplers, apart from any network: DDPM/DDIM with ε-prediction.

EDM/Karras (σ-space: Karras noise levels, EDM preconditioning, loss, Heun/Euler samplers) lives in
models/edm.py, which DMD2 builds on; it shares this module's input checks.

Everything here is a pure function or an immutable schedule object. No method keeps per-call state (no step
index, no stored timesteps), so one `GaussianDiffusion` can be shared by every request a Serve replica handles
at once — the diffusers `self._step_index` failure mode cannot happen. Networks are plain callables,
`model_fn(x_t, t) -> ε`; callers bind conditioning with a closure or `functools.partial`.

Notation key (paper symbols → code; comments cite equations as `# Eq. 12 (DDIM)`)
  DDPM   Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  iDDPM  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (cosine schedule)
  DDIM   Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM writes α_t for our ᾱ_t)

  T           num_timesteps; integer timesteps t ∈ {0, …, T−1} are 0-indexed (code t = paper t − 1)
  β_t         betas[t]                    α_t = 1 − β_t: alphas[t]
  ᾱ_t         alphas_cumprod[t] = ∏_{s≤t} α_s;  ᾱ_{−1} = 1, so t_prev = −1 means "clean data"
  β̃_t         posterior_variance[t] = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
  x0, x_t     clean sample, noised sample;  ε ~ N(0, I) true noise;  eps = ε_θ(x_t, t) predicted noise
  η           DDIM stochasticity: 0 deterministic DDIM, 1 DDPM-like ancestral sampling

Shapes: x is (N, ...) with a leading batch dimension; t is per-sample (N,) (scalars broadcast).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "GaussianDiffusion",
    "linear_betas",
    "cosine_betas",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (N, ...), t (N,) long) -> eps (N, ...)
EpsTransform = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, eps) -> eps

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
