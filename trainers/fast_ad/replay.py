"""The replay buffer between Fast-AD's synthesis actors and its learner: a bounded FIFO of (image, label, teacher
logits) with use counts (`FifoReplay`, plain Python), and the async actor around it (`ReplayBuffer`) whose `put`
waits while the buffer is full of images the student has not used yet (back-pressure) and whose `sample` waits
until enough images are in. The driver wraps `ReplayBuffer` with `ray.remote` (num_cpus=0, a named actor)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from trainers.common import generator


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


class ReplayBuffer:
    """Async actor around FifoReplay: `put` waits (asyncio.Condition) while the buffer is full of unused images,
    `sample` waits until `min_fill` images are there; `stop()` releases every waiter."""

    def __init__(self, capacity: int, min_uses: int = 1, seed: int = 0, record_timeline: bool = False):
        self.core = FifoReplay(capacity, min_uses)
        self.gen = generator(seed, "replay")
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
