"""Fast-AD: data-free knowledge distillation with CADR-guided DDIM synthesis, on concurrent Ray actors.

A fab distils its wafer-map classifier (the teacher) into a small student without handing over a single labelled
wafer map: an unconditional DDPM (trained on unlabelled maps, trainers/ddpm.py) proposes images, the teacher steers
them towards chosen classes with Confidence-Aware Dynamic Rectification (CADR), and the student learns from the
teacher's soft labels on those images only. The student is evaluated on held-out REAL maps it never trains on.

CADR at every DDIM step t → t_prev (ᾱ = ᾱ_t; code: `cadr_eps_transform`, one function per line):

    x̂0|t  = clamp((x_t − √(1−ᾱ)·ε) / √ᾱ, −1, 1)                      tweedie_x0            (Eq. 4)
    H     = −Σ_c p_c log p_c,  p = softmax(teacher(x̂0|t))   per sample  prediction_entropy
    λ     = λ_max / (1 + exp(−k (H − τ_ent)))                 per sample  entropy_gate          (Eq. 5)
    g     = ∇_{x_t} [ L_BN(x̂0|t) + γ·CE(teacher(x̂0|t), y) ]               guidance_loss + autograd
    g_rect = λ·η·‖x_t‖·g / (‖g‖ + ξ)                          per sample  rectify_gradient      (Eq. 6)
    ε̃     = ε + √(1−ᾱ)·g_rect                                             rectified_eps         (Eq. 8)
    x_{t_prev} = DDIM(x_t, ε̃)                                             GaussianDiffusion.ddim_step (Eq. 7)

Sign: x̂0 = (x_t − √(1−ᾱ)ε̃)/√ᾱ moves by −((1−ᾱ)/√ᾱ)·g_rect, i.e. DOWN the guidance loss, as in classifier
guidance. The reference implementation subtracts (ε − √(1−ᾱ)·g_rect), which ascends L_BN + γ·CE; the unit tests
check that one step with our sign lowers the loss and one with the reference's raises it. ε is the network's
(detached) prediction, so ∇_{x_t} = ∇_{x̂0}/√ᾱ; the per-sample normalisation removes that factor anyway.

    L_BN = Σ_l ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂   over the teacher's BN layers (eval mode; batch statistics of
           the layer inputs against its running statistics; DeepInversion)                   bn_stat_loss
    L_KD = T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))        log-softmax on both sides, T = 4       kd_loss

Synthesis labels y are balanced over the classes (`balanced_labels`).

The concurrent loop (`run_fast_ad`): K `SynthesisWorker` actors (UNet + teacher, CADR-DDIM) push labelled batches
(images, y, teacher logits) into a `ReplayBuffer` actor (FIFO, bounded, back-pressure: `put` waits while the buffer
is full of samples the student has not used yet); a `StudentLearner` actor samples random batches, trains the
student on L_KD, evaluates on held-out real maps, checkpoints (weights only) every N steps and restores from its
latest checkpoint when restarted. All three run at the same time; synthesis and learner actors are restarted by Ray
(`max_restarts`, `max_task_retries`), and a clean shutdown stops, drains and kills every actor.

    python -m apps.train fast_ad --config configs/fast_ad.yaml        (teacher and DDPM first: docs/fast_ad.md)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fabdistill.config import ConfigError, knob, section
from models.diffusion import GaussianDiffusion
from models.resnet_cifar import RESNET_ARCHS, ResNet, build_resnet
from trainers.launch import RunSection, save_state

####################################################################################################################
# CADR: pure functions, one equation each
####################################################################################################################


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


def rectify_gradient(g: Tensor, x_t: Tensor, lam: Tensor, eta: float, xi: float = 1e-6) -> Tensor:
    """g_rect (N, ...): the guidance gradient normalised per sample and scaled by the signal norm ‖x_t‖."""
    n = g.shape[0]
    g_norm = g.reshape(n, -1).norm(dim=1).reshape(n, *([1] * (g.ndim - 1)))  # ‖g‖ per sample
    x_norm = x_t.reshape(n, -1).norm(dim=1).reshape(n, *([1] * (g.ndim - 1)))  # ‖x_t‖ per sample
    lam = lam.reshape(n, *([1] * (g.ndim - 1))) if isinstance(lam, Tensor) and lam.ndim else lam
    return lam * eta * x_norm * g / (g_norm + xi)  # Eq. 6: g_rect = λ·η·‖x_t‖·g/(‖g‖+ξ)


def rectified_eps(eps: Tensor, g_rect: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε̃ that moves x̂0 down the guidance loss (sign checked in tests/test_fast_ad_units.py)."""
    return eps + (1.0 - alpha_bar).sqrt() * g_rect  # Eq. 8 (sign fixed): ε̃ = ε + √(1−ᾱ)·g_rect


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


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD, mean over the batch."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    # L_KD = T²·KL(p_t ‖ p_s) = T²·Σ p_t (log p_t − log p_s)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2


def balanced_labels(n: int, num_classes: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n labels (n,) long, as balanced as n allows (counts differ by ≤ 1), shuffled."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=generator)]


####################################################################################################################
# Config
####################################################################################################################


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
    seed: int = knob(9001, ge=0, help="generator seed of the held-out maps (the teacher's held-out set)")
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


####################################################################################################################
# Guided synthesis
####################################################################################################################


class SynthesisStopped(Exception):
    """Raised inside a sampling loop when the run is shutting down."""


def cadr_eps_transform(teacher: nn.Module, hooks: BNStatHooks, diffusion: GaussianDiffusion, y: Tensor,
                       cadr: CADRSection, log: Optional[list[dict[str, float]]] = None
                       ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The `eps_transform(x_t, t, eps) -> ε̃` hook for GaussianDiffusion.ddim_sample (x_t detached, grad on)."""

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
            log.append({"t": int(t[0]), "loss": float(loss.detach()), **parts, "entropy": float(entropy.mean()),
                        "lambda": float(lam.mean())})
        return rectified_eps(eps, g_rect.detach(), alpha_bar)  # Eq. 8

    return transform


def synthesize(unet: nn.Module, teacher: nn.Module, diffusion: GaussianDiffusion, n: int, cadr: CADRSection,
               generator: Optional[torch.Generator] = None, hooks: Optional[BNStatHooks] = None,
               labels: Optional[Tensor] = None, should_stop: Optional[Callable[[], bool]] = None,
               check_every: int = 5) -> dict[str, Any]:
    """One labelled batch: CADR-guided (or, with cadr.gate == "off", plain) DDIM from x_T ~ N(0, I).

    Returns {"x" (n, C, H, W) in [−1, 1], "y" (n,) target classes (the teacher's argmax when unguided),
    "logits" (n, K) teacher logits on x, "stats" {mean guidance loss terms, gate, teacher confidence}}.
    """
    device = next(unet.parameters()).device
    in_ch, size = unet.in_channels, unet.image_size
    num_classes = teacher.num_classes
    y = labels if labels is not None else balanced_labels(n, num_classes, generator)
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

    log: list[dict[str, float]] = []
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
    p = logits.softmax(1)
    stats = {"teacher_conf": float(p.max(1).values.mean()),
             "target_hit": float((logits.argmax(1) == y).float().mean())}
    if log:
        for key in ("loss", "bn", "ce", "lambda", "entropy"):
            stats[f"guide_{key}"] = float(np.mean([r[key] for r in log]))
    return {"x": x.detach().cpu(), "y": y.cpu(), "logits": logits.cpu(), "stats": stats}


####################################################################################################################
# Replay buffer: a plain FIFO with use counts (the actor below wraps it with asyncio back-pressure)
####################################################################################################################


class BufferFull(Exception):
    """put() would evict images the student has not used `min_uses` times yet."""


class FifoReplay:
    """Bounded FIFO of (image, label, teacher logits) with per-item use counts.

    `put` appends a batch, evicting the oldest items when the capacity is reached, but only items already sampled
    ≥ `min_uses` times: otherwise it raises BufferFull (the actor turns that into waiting). `sample` draws a
    uniform random batch (with replacement across calls, without within a call when possible).
    """

    def __init__(self, capacity: int, min_uses: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if min_uses < 0:
            raise ValueError(f"min_uses must be ≥ 0, got {min_uses}")
        self.capacity = capacity
        self.min_uses = min_uses
        self._x: Optional[Tensor] = None  # (capacity, C, H, W), allocated on the first put
        self._y = torch.zeros(capacity, dtype=torch.long)
        self._logits: Optional[Tensor] = None  # (capacity, K)
        self._uses = torch.zeros(capacity, dtype=torch.long)
        self._ids = torch.full((capacity,), -1, dtype=torch.long)  # insertion number of each slot
        self._head = 0  # slot of the oldest item
        self._len = 0
        self.total_put = 0
        self.total_sampled = 0
        self.evicted = 0
        self.evicted_unused = 0
        self.max_fill = 0

    def __len__(self) -> int:
        return self._len

    def _slots(self, start: int, count: int) -> Tensor:
        return (start + torch.arange(count)) % self.capacity

    def can_put(self, n: int) -> bool:
        """Whether n items fit now without evicting items used fewer than min_uses times."""
        if n > self.capacity:
            return False
        need = self._len + n - self.capacity
        if need <= 0:
            return True
        return bool((self._uses[self._slots(self._head, need)] >= self.min_uses).all())

    def put(self, x: Tensor, y: Tensor, logits: Tensor, force: bool = False) -> int:
        """Append a batch x (n, C, H, W), y (n,), logits (n, K); returns how many old items were evicted."""
        x, y, logits = torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(logits)
        n = x.shape[0]
        if n == 0 or y.shape != (n,) or logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"put needs x (n, ...), y (n,), logits (n, K) with n > 0; got {tuple(x.shape)}, "
                             f"{tuple(y.shape)}, {tuple(logits.shape)}")
        if n > self.capacity:
            raise ValueError(f"a batch of {n} does not fit a buffer of capacity {self.capacity}")
        if self._x is None:
            self._x = torch.zeros((self.capacity, *x.shape[1:]), dtype=torch.float32)
            self._logits = torch.zeros((self.capacity, logits.shape[1]), dtype=torch.float32)
        elif x.shape[1:] != self._x.shape[1:] or logits.shape[1] != self._logits.shape[1]:
            raise ValueError(f"batch shapes {tuple(x.shape[1:])}/{logits.shape[1]} differ from the buffer's "
                             f"{tuple(self._x.shape[1:])}/{self._logits.shape[1]}")
        if not force and not self.can_put(n):
            raise BufferFull(f"{n} items would evict items used fewer than {self.min_uses} times")
        need = max(0, self._len + n - self.capacity)
        if need:
            old = self._slots(self._head, need)
            self.evicted_unused += int((self._uses[old] == 0).sum())  # thrown away unseen
            self._head = (self._head + need) % self.capacity
            self._len -= need
            self.evicted += need
        slots = self._slots(self._head + self._len, n)
        self._x[slots] = x.float()
        self._y[slots] = y.long()
        self._logits[slots] = logits.float()
        self._uses[slots] = 0
        self._ids[slots] = torch.arange(self.total_put, self.total_put + n)
        self._len += n
        self.total_put += n
        self.max_fill = max(self.max_fill, self._len)
        return need

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """A uniform random batch {"x", "y", "logits", "ids"}; increments the use counts."""
        if self._len == 0:
            raise ValueError("sample from an empty buffer")
        if batch_size <= self._len:
            pick = torch.randperm(self._len, generator=generator)[:batch_size]
        else:
            pick = torch.randint(0, self._len, (batch_size,), generator=generator)
        slots = (self._head + pick) % self.capacity
        self._uses.index_add_(0, slots, torch.ones_like(slots))
        self.total_sampled += batch_size
        return {"x": self._x[slots].clone(), "y": self._y[slots].clone(), "logits": self._logits[slots].clone(),
                "ids": self._ids[slots].clone()}

    def ids_in_order(self) -> list[int]:
        """Insertion numbers of the stored items, oldest first (FIFO order)."""
        return self._ids[self._slots(self._head, self._len)].tolist()

    def stats(self) -> dict[str, int]:
        return {"fill": self._len, "capacity": self.capacity, "total_put": self.total_put,
                "total_sampled": self.total_sampled, "evicted": self.evicted,
                "evicted_unused": self.evicted_unused, "max_fill": self.max_fill}


####################################################################################################################
# Actors (plain classes; run_fast_ad wraps them with ray.remote)
####################################################################################################################


class ReplayBuffer:
    """Async actor around FifoReplay: `put` waits (asyncio.Condition) while the buffer is full of unused images,
    `sample` waits until `min_fill` images are there; `stop()` releases every waiter."""

    def __init__(self, capacity: int, min_uses: int = 1, seed: int = 0, record_timeline: bool = False):
        self.core = FifoReplay(capacity, min_uses)
        self.gen = torch.Generator().manual_seed(seed)
        self.stopped = False
        self.record_timeline = record_timeline
        self.put_log: list[dict[str, Any]] = []
        self.puts_waited = 0
        self.batches_issued = 0
        self.per_worker: dict[int, int] = {}
        self.synth_stats: dict[str, float] = {}
        self.first_synth_start: Optional[float] = None
        self._cond: Optional[asyncio.Condition] = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, x: np.ndarray, y: np.ndarray, logits: np.ndarray, meta: Optional[dict] = None,
                  timeout: Optional[float] = None) -> str:
        """"ok" once stored, "stopped" when the run is shutting down, "timeout" after `timeout` seconds."""
        cond = self._condition()
        n = int(np.asarray(x).shape[0])
        if n > self.core.capacity:
            raise ValueError(f"a batch of {n} does not fit a buffer of capacity {self.core.capacity}")
        async with cond:
            if not (self.stopped or self.core.can_put(n)):
                self.puts_waited += 1
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self.stopped or self.core.can_put(n)), timeout)
                except asyncio.TimeoutError:
                    return "timeout"
            if self.stopped:
                return "stopped"
            self.core.put(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)),
                          torch.from_numpy(np.asarray(logits)))
            meta = dict(meta or {})
            worker = int(meta.get("worker", -1))
            self.per_worker[worker] = self.per_worker.get(worker, 0) + n
            for k, v in (meta.get("stats") or {}).items():
                self.synth_stats[k] = float(v)
            if meta.get("synth_start") is not None:
                self.first_synth_start = min(self.first_synth_start or math.inf, float(meta["synth_start"]))
            if self.record_timeline:
                self.put_log.append({"worker": worker, "n": n, "batch_id": meta.get("batch_id"),
                                     "synth_start": meta.get("synth_start"), "synth_end": meta.get("synth_end"),
                                     "push_start": meta.get("push_start"), "push_end": time.time()})
            cond.notify_all()
            return "ok"

    async def sample(self, batch_size: int, min_fill: int = 1, timeout: Optional[float] = None) -> Any:
        """{"x", "y", "logits"} as numpy, None when stopped, "timeout" after `timeout` seconds."""
        cond = self._condition()
        need = max(1, min_fill)
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.stopped or len(self.core) >= need), timeout)
            except asyncio.TimeoutError:
                return "timeout"
            if self.stopped:
                return None
            batch = self.core.sample(batch_size, self.gen)
            cond.notify_all()  # use counts changed: a waiting producer may fit now
            return {k: v.numpy() for k, v in batch.items() if k != "ids"}

    async def next_batch_id(self) -> int:
        self.batches_issued += 1
        return self.batches_issued - 1

    async def stop(self) -> None:
        self.stopped = True
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def is_stopped(self) -> bool:
        return self.stopped

    async def stats(self) -> dict[str, Any]:
        return {**self.core.stats(), "puts_waited": self.puts_waited, "stopped": self.stopped,
                "per_worker": dict(self.per_worker), "synth": dict(self.synth_stats),
                "first_synth_start": self.first_synth_start}

    async def timeline(self) -> list[dict[str, Any]]:
        return list(self.put_log)


def _device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _load_synthesis_models(spec: dict, device: torch.device) -> tuple[nn.Module, nn.Module, GaussianDiffusion]:
    from trainers.classifier import load_classifier
    from trainers.ddpm import load_ddpm

    teacher, tmeta = load_classifier(spec["teacher_checkpoint"], map_location=device)
    unet, diffusion, dmeta = load_ddpm(spec["diffusion_checkpoint"], map_location=device)
    if tmeta["in_channels"] != dmeta["in_channels"]:
        raise ValueError(f"teacher expects {tmeta['in_channels']} channels but the DDPM makes {dmeta['in_channels']}")
    teacher.requires_grad_(False)
    return teacher, unet, diffusion


class SynthesisWorker:
    """Actor: holds the DDPM UNet and the teacher; makes CADR-DDIM batches and pushes them until stopped."""

    def __init__(self, worker_id: int, spec: dict, buffer_name: str):
        import ray

        torch.set_num_threads(spec["torch_threads"])
        self.worker_id = worker_id
        self.spec = spec
        # by name, not by handle: a restarted actor must not depend on constructor arguments in the object store
        self.buffer = ray.get_actor(buffer_name)
        self.cadr = CADRSection(**spec["cadr"])
        self.device = _device(spec["num_gpus"])
        self.teacher, self.unet, self.diffusion = _load_synthesis_models(spec, self.device)
        self.hooks = BNStatHooks(self.teacher) if self.cadr.gate != "off" else None
        self.restarted = _was_restarted()

    def _stopped(self) -> bool:
        import ray

        return bool(ray.get(self.buffer.is_stopped.remote()))

    def run(self, max_batches: int = 0) -> dict[str, Any]:
        """Produce until the buffer says stop (or max_batches > 0 are pushed); returns a small summary."""
        import ray

        pushed = 0
        while not max_batches or pushed < max_batches:
            if self._stopped():
                break
            batch_id = int(ray.get(self.buffer.next_batch_id.remote()))
            gen = torch.Generator().manual_seed(self.spec["seed"] * 1_000_003 + batch_id)
            t0 = time.time()
            try:
                out = synthesize(self.unet, self.teacher, self.diffusion, self.spec["batch_size"], self.cadr, gen,
                                 self.hooks, should_stop=self._stopped, check_every=self.spec["check_stop_every"])
            except SynthesisStopped:
                break
            t1 = time.time()
            meta = {"worker": self.worker_id, "batch_id": batch_id, "synth_start": t0, "synth_end": t1,
                    "push_start": time.time(), "stats": out["stats"]}
            status = ray.get(self.buffer.put.remote(out["x"].numpy(), out["y"].numpy(), out["logits"].numpy(), meta))
            if status == "stopped":
                break
            pushed += 1
        return {"worker": self.worker_id, "batches": pushed, "restarted": self.restarted}

    def ping(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "restarted": self.restarted, "pid": os.getpid()}


def _was_restarted() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # outside an actor (sequential baseline, tests)
        return False


class LearnerCore:
    """The student's side, without Ray: model, optimiser, KD step, held-out evaluation, checkpoints.

    Used by the StudentLearner actor and by the sequential baseline (`run_sequential`).
    """

    def __init__(self, spec: dict):
        from fabdistill import storage
        from trainers.classifier import load_classifier, make_optimizer, predict_logits

        torch.set_num_threads(spec["torch_threads"])
        self.spec = spec
        self.device = _device(spec["num_gpus"])
        self.teacher, tmeta = load_classifier(spec["teacher_checkpoint"], map_location=self.device)
        self.teacher.requires_grad_(False)
        self.encoding = tmeta.get("encoding", "wafer_pm1")
        self.classes = tmeta.get("classes")
        torch.manual_seed(spec["seed"])
        self.student: ResNet = build_resnet(spec["student_arch"], tmeta["num_classes"], tmeta["in_channels"])
        self.student.to(self.device)
        self.opt = make_optimizer(self.student, spec["optimizer"], spec["lr"], spec["weight_decay"])
        self.gen = torch.Generator().manual_seed(spec["seed"] + 17)
        self.step = 0
        self.restored_step: Optional[int] = None
        self.history: list[dict[str, Any]] = []  # evaluations
        self.run_dir = spec.get("run_dir")
        self.eval_x, self.eval_y = _heldout(spec["eval"])
        self.eval_teacher_logits = predict_logits(self.teacher, self.eval_x)
        if self.run_dir and storage.exists(self.run_dir):
            self.restore()

    # --- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        from trainers.classifier import lr_at, random_dihedral

        x = torch.as_tensor(batch["x"]).to(self.device)
        t_logits = torch.as_tensor(batch["logits"]).to(self.device)
        if self.spec["augment"]:
            x = random_dihedral(x, self.gen)
            with torch.no_grad():
                t_logits = self.teacher(x)
        lr = lr_at(self.step, self.spec["steps"], self.spec["lr"], self.spec["warmup_steps"])
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.student.train()
        s_logits = self.student(x)  # (B, K)
        loss = kd_loss(s_logits, t_logits, self.spec["kd_temperature"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"kd_loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out real top-1, agreement with the teacher's predictions and KD to the teacher."""
        from trainers.classifier import predict_logits

        logits = predict_logits(self.student, self.eval_x)
        t_logits = self.eval_teacher_logits
        result = {"step": self.step,
                  "heldout_top1": float((logits.argmax(1) == self.eval_y).float().mean()),
                  "teacher_agreement": float((logits.argmax(1) == t_logits.argmax(1)).float().mean()),
                  "heldout_kd": float(kd_loss(logits, t_logits, self.spec["kd_temperature"])),
                  "time": time.time()}
        self.history.append(result)
        return result

    # --- checkpoints (weights only, fabdistill layout: state.pt + meta.json)
    def meta(self) -> dict[str, Any]:
        from trainers.classifier import classifier_meta

        return {**classifier_meta(self.student, self.encoding, self.classes), "method": "fast_ad",
                "step": self.step, "teacher_checkpoint": self.spec["teacher_checkpoint"],
                "diffusion_checkpoint": self.spec["diffusion_checkpoint"],
                "last_eval": self.history[-1] if self.history else None}

    def save_checkpoint(self, export: bool = False) -> Optional[str]:
        from fabdistill import storage

        if not self.run_dir:
            return None
        state = {"model": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                 "optimizer": self.opt.state_dict()}
        name = f"checkpoint_step_{self.step:07d}"
        dest = storage.join(self.run_dir, name)
        _write_checkpoint(dest, state, self.meta())
        if export:  # what serve/ and load_classifier read: weights only, no optimiser state
            _write_checkpoint(storage.join(self.run_dir, "model"), {"model": state["model"]}, self.meta())
        kept = sorted(n for n in storage.listdir(self.run_dir) if n.startswith("checkpoint_step_"))
        for old in kept[:-self.spec["num_to_keep"]]:
            storage.remove_tree(storage.join(self.run_dir, old))
        return dest

    def restore(self) -> Optional[int]:
        from fabdistill import storage
        from trainers.launch import load_state

        names = sorted(n for n in storage.listdir(self.run_dir) if n.startswith("checkpoint_step_"))
        for name in reversed(names):
            try:
                state, meta = load_state(storage.join(self.run_dir, name), map_location=self.device)
            except (FileNotFoundError, ValueError):
                continue  # a checkpoint cut short by a crash: fall back to the previous one
            if meta.get("arch") != self.student.arch:
                raise ValueError(f"{self.run_dir}/{name}: holds a {meta.get('arch')} student, config asks for "
                                 f"{self.student.arch}; use another run.name")
            self.student.load_state_dict(state["model"])
            if "optimizer" in state:
                self.opt.load_state_dict(state["optimizer"])
            self.step = self.restored_step = int(meta["step"])
            return self.step
        return None


def _write_checkpoint(dest: str, state: dict, meta: dict) -> None:
    """save_state into a temporary sibling, then swap it in, so a crash never leaves half a checkpoint."""
    from fabdistill import storage

    if storage.is_s3(dest):
        with tempfile.TemporaryDirectory() as tmp:
            save_state(tmp, state, meta)
            storage.remove_tree(dest)
            storage.upload_dir(tmp, dest)
        return
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_state(tmp, state, meta)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _heldout(spec: dict) -> tuple[Tensor, Tensor]:
    from trainers.classifier import heldout_tensors

    return heldout_tensors(spec.get("uri"), spec.get("split"), spec["n_heldout"], spec["seed"], spec["size"])


class StudentLearner:
    """Actor: samples batches from the ReplayBuffer and trains the student until `steps` (or the time limit).

    Created with max_concurrency=2 so that `progress()` answers while `run()` is training.
    """

    def __init__(self, spec: dict, buffer_name: str):
        import ray

        self.core = LearnerCore(spec)
        self.spec = spec
        self.buffer = ray.get_actor(buffer_name)
        self.restarted = _was_restarted()
        self.step_log: list[tuple[float, float]] = []
        self.first_step_start: Optional[float] = None
        self.last_step_end: Optional[float] = None
        self.losses: list[float] = []
        self.last: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        import ray

        core, spec = self.core, self.spec
        if not core.history or core.history[-1]["step"] != core.step:
            core.evaluate()  # the starting point (step 0, or the restored step)
        t_start = time.time()
        min_fill = spec["min_fill"]
        pending = self.buffer.sample.remote(spec["batch_size"], min_fill)
        stopped = False
        while core.step < spec["steps"]:
            if spec["time_limit_s"] and time.time() - t_start > spec["time_limit_s"]:
                break
            batch = ray.get(pending)
            if batch is None:  # the buffer was stopped
                stopped = True
                break
            pending = self.buffer.sample.remote(spec["batch_size"], min_fill)  # prefetch while we train
            t0 = time.time()
            out = core.train_step(batch)
            t1 = time.time()
            if spec["record_timeline"]:
                self.step_log.append((t0, t1))
            self.first_step_start = self.first_step_start or t0
            self.last_step_end = t1
            self.losses.append(out["kd_loss"])
            self.last = {**out, "step": core.step}
            if spec["eval_every"] and core.step % spec["eval_every"] == 0:
                core.evaluate()
            if spec["checkpoint_every"] and core.step % spec["checkpoint_every"] == 0:
                core.save_checkpoint()
        if core.history[-1]["step"] != core.step:
            core.evaluate()
        path = core.save_checkpoint(export=True)
        return {"step": core.step, "stopped_by_buffer": stopped, "restored_step": core.restored_step,
                "restarted": self.restarted, "checkpoint": path, "history": core.history,
                "losses": self.losses, "train_time_s": time.time() - t_start,
                "step_intervals": self.step_log, "first_step_start": self.first_step_start,
                "last_step_end": self.last_step_end}

    def progress(self) -> dict[str, Any]:
        h = self.core.history[-1] if self.core.history else {}
        recent = self.losses[-20:]
        return {"step": self.core.step, "kd_loss": float(np.mean(recent)) if recent else None,
                "heldout_top1": h.get("heldout_top1"), "teacher_agreement": h.get("teacher_agreement"),
                "eval_step": h.get("step"), "restored_step": self.core.restored_step, "restarted": self.restarted}


####################################################################################################################
# Driver
####################################################################################################################


def _specs(cfg: Config, run_directory: str) -> tuple[dict, dict]:
    common = {"teacher_checkpoint": cfg.models.teacher_checkpoint,
              "diffusion_checkpoint": cfg.models.diffusion_checkpoint, "seed": cfg.run.seed}
    synth = {**common, "cadr": dataclasses.asdict(cfg.cadr), "batch_size": cfg.synthesis.batch_size,
             "num_gpus": cfg.synthesis.num_gpus, "torch_threads": cfg.synthesis.torch_threads,
             "check_stop_every": cfg.synthesis.check_stop_every}
    s = cfg.student
    learner = {**common, "student_arch": cfg.models.student_arch, "steps": s.steps, "batch_size": s.batch_size,
               "optimizer": s.optimizer, "lr": s.lr, "weight_decay": s.weight_decay, "warmup_steps": s.warmup_steps,
               "kd_temperature": s.kd_temperature, "augment": s.augment, "num_gpus": s.num_gpus,
               "torch_threads": s.torch_threads, "checkpoint_every": s.checkpoint_every,
               "num_to_keep": s.num_to_keep, "eval": dataclasses.asdict(cfg.eval), "eval_every": cfg.eval.every,
               "min_fill": cfg.buffer.min_fill or cfg.synthesis.batch_size, "time_limit_s": cfg.loop.time_limit_s,
               "record_timeline": cfg.loop.record_timeline, "run_dir": run_directory}
    return synth, learner


def _check_checkpoints(cfg: Config) -> None:
    from trainers.launch import resolve_checkpoint

    for what, path, cmd in (("teacher", cfg.models.teacher_checkpoint, "classifier --config "
                                                                       "configs/classifier_wafer.yaml"),
                            ("diffusion", cfg.models.diffusion_checkpoint, "ddpm --config configs/ddpm_wafer.yaml")):
        try:
            resolve_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} checkpoint not found at {path!r}: train it first with "
                                    f"`python -m apps.train {cmd}` (see docs/fast_ad.md) or set "
                                    f"models.{what}_checkpoint") from None


def run_fast_ad(cfg: Config, on_tick: Optional[Callable[[float, dict], None]] = None) -> dict[str, Any]:
    """Run the concurrent synthesis → buffer → learner loop on Ray; print progress, write metrics.jsonl.

    on_tick(elapsed_s, {"workers": [...], "learner": handle, "buffer": handle, "buffer_stats": {...},
    "progress": {...}}) is called at every progress interval (fault-injection tests use it).
    Returns a summary: student steps and steps/s, images and images/s, buffer stats, held-out accuracy history,
    the student checkpoint folder, and (with loop.record_timeline) every push and learner step as (start, end).
    """
    import ray

    from fabdistill import storage
    from fabdistill.config import save_config
    from trainers.launch import ensure_ray, run_dir

    _check_checkpoints(cfg)
    ensure_ray()
    out = run_dir(cfg.run)
    storage.makedirs(out)
    save_config(cfg, storage.join(out, "config.yaml"))
    metrics_uri = storage.join(out, "metrics.jsonl")
    synth_spec, learner_spec = _specs(cfg, out)
    L = cfg.loop
    restart_opts = {"max_restarts": L.max_restarts, "max_task_retries": L.max_task_retries}

    buffer_name = f"fast_ad_buffer_{cfg.run.name}_{uuid.uuid4().hex[:8]}"
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0, name=buffer_name).remote(
        cfg.buffer.size, cfg.buffer.min_uses, cfg.run.seed, L.record_timeline)
    ray.get(buffer.is_stopped.remote())  # registered before anyone looks it up by name
    workers = [ray.remote(SynthesisWorker).options(num_cpus=cfg.synthesis.num_cpus, num_gpus=cfg.synthesis.num_gpus,
                                                   **restart_opts).remote(i, synth_spec, buffer_name)
               for i in range(cfg.synthesis.num_workers)]
    learner = ray.remote(StudentLearner).options(num_cpus=cfg.student.num_cpus, num_gpus=cfg.student.num_gpus,
                                                 max_concurrency=2, **restart_opts).remote(learner_spec, buffer_name)
    t0 = time.time()
    worker_refs = [w.run.remote() for w in workers]
    learner_ref = learner.run.remote()
    print(f"[fast_ad] {cfg.synthesis.num_workers} synthesis actor(s), buffer {cfg.buffer.size}, student "
          f"{cfg.models.student_arch} for {cfg.student.steps} steps; run folder {out}", flush=True)

    summary: dict[str, Any] = {"run_dir": out}
    last = {"t": t0, "images": 0, "steps": 0}
    rows: list[dict[str, Any]] = []
    try:
        while True:
            ready, _ = ray.wait([learner_ref], timeout=L.log_every_s)
            now = time.time()
            bstats = ray.get(buffer.stats.remote())
            try:
                prog = ray.get(learner.progress.remote(), timeout=5.0)
            except Exception:  # restarting learner: report what we have
                prog = {"step": last["steps"], "restarting": True}
            dt = max(now - last["t"], 1e-9)
            row = {"elapsed_s": round(now - t0, 2), "images": bstats["total_put"],
                   "images_per_s": round((bstats["total_put"] - last["images"]) / dt, 3),
                   "student_step": prog.get("step"),
                   "steps_per_s": round(((prog.get("step") or 0) - last["steps"]) / dt, 3),
                   "buffer_fill": bstats["fill"], "buffer_max_fill": bstats["max_fill"],
                   "puts_waited": bstats["puts_waited"], "kd_loss": prog.get("kd_loss"),
                   "heldout_top1": prog.get("heldout_top1"), "teacher_agreement": prog.get("teacher_agreement"),
                   **{f"synth_{k}": v for k, v in bstats["synth"].items()}}
            rows.append(row)
            _append_jsonl(metrics_uri, row)
            print("[fast_ad] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items() if v is not None), flush=True)
            last = {"t": now, "images": bstats["total_put"], "steps": prog.get("step") or last["steps"]}
            if on_tick is not None:
                on_tick(now - t0, {"workers": workers, "learner": learner, "buffer": buffer,
                                   "buffer_stats": bstats, "progress": prog})
            if ready:
                break
        result = ray.get(learner_ref)
        summary.update(result)
    finally:
        ray.get(buffer.stop.remote())
        done, pending = ray.wait(worker_refs, num_returns=len(worker_refs), timeout=L.shutdown_grace_s)
        worker_results = []
        for ref in done:
            try:
                worker_results.append(ray.get(ref))
            except Exception as exc:  # a worker that died for good: note it, keep shutting down
                worker_results.append({"error": f"{type(exc).__name__}: {exc}"})
        bstats = ray.get(buffer.stats.remote())
        timeline = ray.get(buffer.timeline.remote()) if L.record_timeline else []
        for actor in [*workers, learner, buffer]:
            ray.kill(actor, no_restart=True)
    elapsed = time.time() - t0
    # the loop proper, without actor start-up and model loading: first synthesis → last student step
    loop_s = None
    if bstats.get("first_synth_start") and summary.get("last_step_end"):
        loop_s = summary["last_step_end"] - bstats["first_synth_start"]
    summary.update({
        "loop_s": loop_s,
        "elapsed_s": elapsed, "images": bstats["total_put"], "buffer": bstats, "workers": worker_results,
        "workers_unfinished": len(pending), "puts": timeline, "rows": rows,
        "images_per_s": bstats["total_put"] / elapsed, "steps_per_s": summary.get("step", 0) / elapsed,
        "checkpoint_dir": storage.join(out, "model"),
    })
    final = summary.get("history", [{}])[-1] if summary.get("history") else {}
    _append_jsonl(metrics_uri, {"final": True, "elapsed_s": round(elapsed, 2), "student_step": summary.get("step"),
                                "images": bstats["total_put"], "buffer_max_fill": bstats["max_fill"],
                                "heldout_top1": final.get("heldout_top1"),
                                "teacher_agreement": final.get("teacher_agreement")})
    print(f"[fast_ad] done: {summary.get('step')} student steps, {bstats['total_put']} images in {elapsed:.1f}s; "
          f"held-out top-1 {final.get('heldout_top1')}; student checkpoint {summary['checkpoint_dir']}", flush=True)
    return summary


def _append_jsonl(uri: str, row: dict[str, Any]) -> None:
    from fabdistill import storage

    line = json.dumps(row, default=float) + "\n"
    if storage.is_s3(uri):
        old = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
        storage.write_bytes(uri, (old + line).encode())
    else:
        with open(uri, "a") as f:
            f.write(line)


def run_sequential(cfg: Config, total_steps: int, total_images: int, threads: int = 1) -> dict[str, Any]:
    """The same work as the concurrent loop in one process, one thing at a time (the benchmark's baseline):
    `total_images` CADR images and `total_steps` student steps, synthesis spread evenly between the steps.
    Times from the first synthesis to the last student step (model loading excluded, as for run_fast_ad)."""
    torch.set_num_threads(threads)
    synth_spec, learner_spec = _specs(cfg, "")
    learner_spec = {**learner_spec, "steps": total_steps, "torch_threads": threads, "run_dir": None}
    core = LearnerCore(learner_spec)
    core.evaluate()
    cadr = CADRSection(**synth_spec["cadr"])
    teacher, unet, diffusion = _load_synthesis_models(synth_spec, _device(0))
    hooks = BNStatHooks(teacher) if cadr.gate != "off" else None
    buf = FifoReplay(cfg.buffer.size, cfg.buffer.min_uses)
    gen = torch.Generator().manual_seed(cfg.run.seed + 5)
    bs = cfg.synthesis.batch_size
    min_fill = cfg.buffer.min_fill or cfg.synthesis.batch_size
    made, batch_id = 0, 0
    synth_time = learn_time = 0.0
    t_start = time.time()
    while core.step < total_steps:
        # synthesise until we are on schedule (and until the student has something to sample)
        while made < total_images and (made < total_images * (core.step + 1) / total_steps or len(buf) < min_fill):
            g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + batch_id)
            t0 = time.time()
            out = synthesize(unet, teacher, diffusion, bs, cadr, g, hooks)
            synth_time += time.time() - t0
            buf.put(out["x"], out["y"], out["logits"], force=True)  # one process: nothing to wait for
            made, batch_id = made + bs, batch_id + 1
        t0 = time.time()
        core.train_step(buf.sample(cfg.student.batch_size, gen))
        learn_time += time.time() - t0
    elapsed = time.time() - t_start
    final = core.evaluate()
    return {"steps": core.step, "images": made, "elapsed_s": elapsed, "steps_per_s": core.step / elapsed,
            "images_per_s": made / elapsed, "synthesis_s": synth_time, "learner_s": learn_time,
            "heldout_top1": final["heldout_top1"], "teacher_agreement": final["teacher_agreement"]}


def train(cfg: Config) -> dict[str, Any]:
    """Entry point of `python -m apps.train fast_ad`: the concurrent loop on (local or cluster) Ray."""
    summary = run_fast_ad(cfg)
    return {k: summary[k] for k in ("run_dir", "checkpoint_dir", "step", "images", "elapsed_s", "steps_per_s",
                                    "images_per_s") if k in summary}
