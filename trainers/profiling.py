"""Where a worker's step time goes (run.profile): wall-clock timers around a loop's sections, and the time DDP's
gradient all-reduce is in flight, as per-step means in the metrics a loop reports.

    with sess.timed("data"): batch = next(batches)       # a no-op context unless run.profile
    ...
    sess.report(...)                                     # adds prof_data_ms, prof_forward_ms, ..., prof_allreduce_ms

Sections are the loop's own names (the IKDDiT teacher: data, forward, backward, optimizer). On CUDA each section
end synchronises the device, so a section's time is its kernels' time (this slows a GPU run: profile only to look).

`prof_allreduce_ms` is measured by a DDP communication hook (the default all-reduce, wrapped in a timer): the wall
time during which at least one gradient bucket's all-reduce was in flight. DDP overlaps it with the backward pass,
so it is part of `prof_backward_ms`, not added to it: what a step waits for is backward − (backward on one worker).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional

import torch


class StepProfile:
    """Sums of section wall times between two reports; `pop(steps)` gives per-step means in ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sums: dict[str, float] = {}
        self._intervals: list[tuple[float, float]] = []  # all-reduce (start, end), appended by gloo/NCCL threads
        self._lock = threading.Lock()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._sums[name] = self._sums.get(name, 0.0) + time.perf_counter() - t0

    def allreduce_hook(self):  # noqa: ANN201 (DDP rejects a hook whose `bucket` is annotated other than GradBucket)
        """A DDP comm hook: the default all-reduce (same results as no hook), timed from launch to completion."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(process_group, bucket):
            t0 = time.perf_counter()

            def done(fut):
                with self._lock:
                    self._intervals.append((t0, time.perf_counter()))
                return fut.value()

            return allreduce_hook(process_group, bucket).then(done)

        return hook

    def attach(self, ddp_model: torch.nn.Module) -> None:
        if hasattr(ddp_model, "register_comm_hook"):
            ddp_model.register_comm_hook(None, self.allreduce_hook())

    def pop(self, steps: int) -> dict[str, float]:
        """Per-step means (ms) of every section and of the all-reduce time since the last pop."""
        steps = max(int(steps), 1)
        out = {f"prof_{name}_ms": 1000.0 * total / steps for name, total in self._sums.items()}
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
        if intervals:
            out["prof_allreduce_ms"] = 1000.0 * union_length(intervals) / steps
            out["prof_allreduce_calls"] = len(intervals) / steps
        self._sums.clear()
        return out


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals sorted by start (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


NO_PROFILE = contextlib.nullcontext()


def maybe_section(profile: Optional[StepProfile], name: str) -> contextlib.AbstractContextManager:
    return profile.section(name) if profile is not None else NO_PROFILE
