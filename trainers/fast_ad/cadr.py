"""CADR (Confidence-Aware Dynamic Rectification): the guidance equations, one function per line of the method, the
teacher's BN-statistics hooks, the guidance loss, and the guided DDIM synthesis of one labelled batch.

At every DDIM step t → t_prev (ᾱ = ᾱ_t):

    x̂0|t  = clamp((x_t − √(1−ᾱ)·ε) / √ᾱ, −1, 1)                      tweedie_x0            (Eq. 4)
    H     = −Σ_c p_c log p_c,  p = softmax(teacher(x̂0|t))   per sample  prediction_entropy
    λ     = λ_max / (1 + exp(−k (H − τ_ent)))                 per sample  entropy_gate          (Eq. 5)
    g     = ∇_{x_t} [ w_BN·L_BN(x̂0|t) + γ·CE(teacher(x̂0|t), y) ]          guidance_loss + autograd
    g_rect = λ·η·‖x_t‖·g / (‖g‖ + ξ)                          per sample  rectify_gradient      (Eq. 6)
    ε̃     = ε + √(1−ᾱ)·g_rect                                             rectified_eps         (Eq. 8)
    x_{t_prev} = DDIM(x_t, ε̃)                                             GaussianDiffusion.ddim_step (Eq. 7)

    L_BN = Σ_l ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂   over the teacher's BN layers             bn_stat_loss (Eq. 1)

Sign: x̂0 = (x_t − √(1−ᾱ)ε̃)/√ᾱ moves by −((1−ᾱ)/√ᾱ)·g_rect, i.e. DOWN the guidance loss, as in classifier
guidance. The reference implementation subtracts (ε − √(1−ᾱ)·g_rect), which ascends it; the unit tests check that
one step with our sign lowers the loss and one with the reference's raises it. ε is the network's (detached)
prediction, so ∇_{x_t} = ∇_{x̂0}/√ᾱ; the per-sample normalisation removes that factor anyway.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.diffusion import GaussianDiffusion
from trainers.common import RunningMeans
from trainers.fast_ad.config import CADRSection

# --------------------------------------------------------------------------- the equations (pure functions)


def tweedie_x0(x_t: Tensor, eps: Tensor, alpha_bar: Tensor, clip: Optional[float] = 1.0) -> Tensor:
    """Clean preview x̂0|t (N, C, H, W); alpha_bar (N, 1, 1, 1) or a scalar tensor."""
    x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # Eq. 4: x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ
    return x0.clamp(-clip, clip) if clip is not None else x0


def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (N,) in nats of softmax(logits (N, K))."""
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1)  # H = −Σ p log p


def entropy_gate(entropy: Tensor, lambda_max: float, tau_ent: float, k: float) -> Tensor:
    """Guidance strength λ (N,): weak where the teacher is already confident, up to λ_max where it is not."""
    return lambda_max * torch.sigmoid(k * (entropy - tau_ent))  # Eq. 5: λ = λ_max / (1 + e^(−k(H−τ)))


def rectify_gradient(g: Tensor, x_t: Tensor, lam: Tensor | float, eta: float, xi: float = 1e-6) -> Tensor:
    """g_rect (N, ...): the guidance gradient normalised per sample and scaled by the signal norm ‖x_t‖."""
    n = g.shape[0]
    per_sample = (n, *([1] * (g.ndim - 1)))
    g_norm = g.reshape(n, -1).norm(dim=1).reshape(per_sample)  # ‖g‖ per sample
    x_norm = x_t.reshape(n, -1).norm(dim=1).reshape(per_sample)  # ‖x_t‖ per sample
    lam = lam.reshape(per_sample) if isinstance(lam, Tensor) and lam.ndim else lam
    return lam * eta * x_norm * g / (g_norm + xi)  # Eq. 6: g_rect = λ·η·‖x_t‖·g/(‖g‖+ξ)


def rectified_eps(eps: Tensor, g_rect: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε̃ that moves x̂0 down the guidance loss (sign checked in tests/test_fast_ad_units.py)."""
    return eps + (1.0 - alpha_bar).sqrt() * g_rect  # Eq. 8 (sign fixed): ε̃ = ε + √(1−ᾱ)·g_rect


def balanced_labels(n: int, num_classes: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n labels (n,) long, as balanced as n allows (counts differ by ≤ 1), shuffled."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=generator)]


# --------------------------------------------------------------------------- BN statistics and the guidance loss


class BNStatHooks:
    """Forward hooks on every BatchNorm2d of a network: the batch mean/var of each layer's input on the last
    forward pass, next to the layer's running statistics. Remove with `remove()`."""

    def __init__(self, model: nn.Module):
        self.stats: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, nn.BatchNorm2d)]
        if not self._handles:
            raise ValueError("BNStatHooks: the network has no BatchNorm2d layer (L_BN needs running statistics)")

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]  # (N, C, H, W)
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        var = x.var(dim=(0, 2, 3), unbiased=False)  # (C,)
        self.stats.append((mean, var, module.running_mean, module.running_var))

    def clear(self) -> None:
        self.stats = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def bn_stat_loss(stats: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Tensor:
    """DeepInversion's feature-statistics loss from (batch mean, batch var, running mean, running var) per layer."""
    if not stats:
        raise ValueError("bn_stat_loss: no BN statistics recorded (run the teacher forward with BNStatHooks)")
    # Eq. 1: L_BN = Σ_l ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂
    return sum((m - rm).norm(2) + (v - rv).norm(2) for m, v, rm, rv in stats)


def guidance_loss(teacher: nn.Module, hooks: BNStatHooks, x0: Tensor, y: Tensor, gamma: float = 1.0,
                  bn_weight: float = 1.0) -> tuple[Tensor, dict[str, float], Tensor]:
    """(L_guide, {"bn", "ce"}, teacher logits (N, K)) for previews x0 (N, C, H, W) and target classes y (N,)."""
    hooks.clear()
    logits = teacher(x0)  # (N, K); teacher in eval mode
    bn = bn_stat_loss(hooks.stats) if bn_weight > 0 else logits.new_zeros(())
    ce = F.cross_entropy(logits, y)
    hooks.clear()
    return bn_weight * bn + gamma * ce, {"bn": float(bn.detach()), "ce": float(ce.detach())}, logits  # L_BN + γ·CE


# --------------------------------------------------------------------------- guided synthesis


class SynthesisStopped(Exception):
    """Raised inside a sampling loop when the run is shutting down."""


def cadr_eps_transform(teacher: nn.Module, hooks: BNStatHooks, diffusion: GaussianDiffusion, y: Tensor,
                       cadr: CADRSection, log: Optional[RunningMeans] = None
                       ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The `eps_transform(x_t, t, eps) -> ε̃` hook for GaussianDiffusion.ddim_sample (x_t detached, grad on).
    `log` (optional) collects the mean guidance terms over the steps."""

    def transform(x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        alpha_bar = diffusion.alpha_bar(t, x_t)  # (N, 1, 1, 1)
        x = x_t.detach().requires_grad_(True)
        x0 = tweedie_x0(x, eps.detach(), alpha_bar, cadr.clip_x0)  # Eq. 4
        loss, parts, logits = guidance_loss(teacher, hooks, x0, y, cadr.gamma, cadr.bn_weight)
        entropy = prediction_entropy(logits.detach())  # (N,)
        if cadr.gate == "entropy":
            lam = entropy_gate(entropy, cadr.lambda_max, cadr.tau_ent, cadr.k)  # Eq. 5
        else:
            lam = torch.full_like(entropy, cadr.lambda_max)
        (g,) = torch.autograd.grad(loss, x)  # ∇_{x_t} L_guide
        g_rect = rectify_gradient(g, x, lam, cadr.eta, cadr.xi)  # Eq. 6
        if log is not None:
            log.add({"loss": loss, **parts, "entropy": entropy.mean(), "lambda": lam.mean()})
        return rectified_eps(eps, g_rect.detach(), alpha_bar)  # Eq. 8

    return transform


def synthesize(unet: nn.Module, teacher: nn.Module, diffusion: GaussianDiffusion, n: int, cadr: CADRSection,
               generator: Optional[torch.Generator] = None, hooks: Optional[BNStatHooks] = None,
               labels: Optional[Tensor] = None, should_stop: Optional[Callable[[], bool]] = None,
               check_every: int = 5) -> dict[str, Any]:
    """One labelled batch: CADR-guided (or, with cadr.gate == "off", plain) DDIM from x_T ~ N(0, I).

    Returns {"x" (n, C, H, W) in [−1, 1], "y" (n,) target classes (the teacher's argmax when unguided),
    "logits" (n, K) teacher logits on x, "stats" {mean guidance loss terms, gate, teacher confidence}}.
    Raises SynthesisStopped when `should_stop()` (asked every `check_every` network calls) says so.
    """
    device = next(unet.parameters()).device
    in_ch, size = unet.in_channels, unet.image_size
    y = labels if labels is not None else balanced_labels(n, teacher.num_classes, generator)
    y = y.to(device)
    own_hooks = hooks is None and cadr.gate != "off"
    if own_hooks:
        hooks = BNStatHooks(teacher)
    calls = [0]

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        if should_stop is not None and calls[0] % check_every == 0 and should_stop():
            raise SynthesisStopped()
        return unet(x, t)  # (n, C, H, W) ε̂

    log = RunningMeans()
    transform = None if cadr.gate == "off" else cadr_eps_transform(teacher, hooks, diffusion, y, cadr, log)
    try:
        x = diffusion.ddim_sample(model_fn, (n, in_ch, size, size), steps=cadr.ddim_steps, eta=cadr.ddim_eta,
                                  generator=generator, device=device, clip_x0=cadr.clip_x0, eps_transform=transform)
    finally:
        if own_hooks:
            hooks.remove()
    x = x.clamp(-1.0, 1.0)
    if cadr.quantize:
        x = x.round()
    with torch.no_grad():
        if hooks is not None:
            hooks.clear()
        logits = teacher(x).float()  # (n, K)
        if hooks is not None:
            hooks.clear()
    if cadr.gate == "off":
        y = logits.argmax(1)
    stats = {"teacher_conf": float(logits.softmax(1).max(1).values.mean()),
             "target_hit": float((logits.argmax(1) == y).float().mean()),
             **{f"guide_{k}": v for k, v in log.pop().items()}}
    return {"x": x.detach().cpu(), "y": y.cpu(), "logits": logits.cpu(), "stats": stats}
