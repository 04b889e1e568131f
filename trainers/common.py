"""Training plumbing every method shares: EMA, learning-rate schedules, seeds, batching, cadence, running means.

One meaning each, so that two methods never disagree on what "EMA" or "warm-up" means:

    ema_update(ema, model, decay, step)  parameters AND buffers (BatchNorm statistics follow the raw model),
                                         with the usual warm-up: decay_t = min(decay, (1 + t) / (10 + t))
    lr_at(step, total, base_lr, ...)     linear warm-up, then cosine / multistep / constant
    derive_seed(seed, *tags)             one formula for every derived stream (rank, phase, batch id ...)
    infinite_batches(data, n, gen)       shuffled mini-batches over in-memory tensors, epoch after epoch
    Cadence(log_every, checkpoint_every, total)   when to report and when to checkpoint
    RunningMeans                         loss terms averaged between reports
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

SCHEDULES = ("cosine", "multistep", "constant")


# --------------------------------------------------------------------------- EMA

def ema_decay_at(decay: float, step: Optional[int]) -> float:
    """The EMA decay used after optimiser step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    Without the warm-up a short run keeps the random initialisation in its EMA: decay 0.999 over 700 steps leaves
    0.999^700 ≈ 50 % of the init weights in the "trained" model (diffusers' EMAModel and timm's ModelEmaV3 warm
    up the same way). `step=None` uses `decay` as it is."""
    return decay if step is None else min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: Optional[int] = None) -> None:
    """ema ← d·ema + (1 − d)·model for floating parameters and buffers, d = ema_decay_at(decay, step); integer
    buffers (BatchNorm's num_batches_tracked) are copied. `model` may be wrapped in DDP."""
    decay = ema_decay_at(decay, step)
    model = getattr(model, "module", model)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(b.detach(), alpha=1.0 - decay)
        else:
            e.copy_(b)


# --------------------------------------------------------------------------- learning-rate schedules

def lr_at(step: int, total_steps: int, base_lr: float, *, warmup_steps: int = 0, schedule: str = "cosine",
          milestones: Sequence[float] = (), gamma: float = 0.1, final_lr_frac: float = 0.0) -> float:
    """Learning rate at `step` (1-based) of `total_steps`.

    Linear warm-up from base_lr/warmup_steps to base_lr over `warmup_steps`, then
    - cosine: half a cosine from base_lr down to final_lr_frac·base_lr at total_steps;
    - multistep: ×gamma at each milestone (a step number, or a fraction of total_steps when < 1);
    - constant: base_lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "multistep":
        bounds = [m * total_steps if m < 1 else m for m in milestones]
        return base_lr * gamma ** sum(step > b for b in bounds)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = final_lr_frac * base_lr
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- seeds

from fabdistill.seeding import derive_seed, generator  # noqa: E402,F401  (inference code derives seeds too)


# --------------------------------------------------------------------------- batching

def infinite_batches(data: Mapping[str, torch.Tensor], batch_size: int,
                     gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled mini-batches of `batch_size` rows over in-memory tensors, forever (drops each epoch's remainder;
    a set smaller than one batch is returned whole)."""
    n = next(iter(data.values())).shape[0]
    if n == 0:
        raise ValueError("no rows to draw batches from")
    while True:
        order = torch.randperm(n, generator=gen)
        stop = n - batch_size + 1 if n >= batch_size else 1
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in data.items()}


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True) -> list[torch.Tensor]:
    """One epoch's shuffled row indices in batches."""
    order = torch.randperm(n, generator=gen)
    stop = n - batch_size + 1 if (drop_last and n >= batch_size) else n
    return [order[i:i + batch_size] for i in range(0, max(stop, 1), batch_size)]


# --------------------------------------------------------------------------- cadence and running means

class Cadence:
    """When a loop of `total` steps reports (every `log_every`) and checkpoints (every `checkpoint_every`, and
    always at the last step). Every rank asks the same questions at the same steps, so reports stay in step."""

    def __init__(self, log_every: int, checkpoint_every: int, total: int):
        if log_every < 1 or checkpoint_every < 1:
            raise ValueError("log_every and checkpoint_every must be >= 1")
        self.log_every, self.checkpoint_every, self.total = log_every, checkpoint_every, total

    def checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.total

    def report(self, step: int) -> bool:
        return step % self.log_every == 0 or self.checkpoint(step)


class RunningMeans:
    """Means of named scalar terms between two reports: `add({...})` each step, `pop()` at a report."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, terms: Mapping[str, object]) -> None:
        for key, value in terms.items():
            v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self._sums[key] = self._sums.get(key, 0.0) + v
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: s / max(self._counts[k], 1) for k, s in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self._sums)
