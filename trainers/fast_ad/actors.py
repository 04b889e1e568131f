"""Fast-AD's Ray actors, as plain classes (the driver wraps them with `ray.remote` and restart options):

* `SynthesisWorker` holds the DDPM UNet and the teacher and pushes CADR-DDIM batches into the ReplayBuffer until
  the buffer says stop;
* `StudentLearner` pulls random batches, trains a LearnerCore, evaluates, checkpoints, and answers `progress()`
  while it trains (max_concurrency=2).

Both look the buffer up by name, not by a handle passed in: a restarted actor must not depend on constructor
arguments in the object store. A restarted learner resumes from its latest checkpoint (LearnerCore.restore).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import torch
from torch import nn

from models.diffusion import GaussianDiffusion
from trainers.common import RunningMeans, generator
from trainers.fast_ad.cadr import BNStatHooks, SynthesisStopped, synthesize
from trainers.fast_ad.config import CADRSection
from trainers.fast_ad.learner import LearnerCore, device_for


def load_synthesis_models(spec: dict, device: torch.device) -> tuple[nn.Module, nn.Module, GaussianDiffusion]:
    """(teacher (eval, frozen), EMA UNet, its diffusion) from the spec's checkpoints; channels must agree."""
    from fabdistill.inference.classifier import load_classifier
    from trainers.ddpm import load_ddpm

    teacher, tmeta = load_classifier(spec["teacher_checkpoint"], map_location=device)
    unet, diffusion, dmeta = load_ddpm(spec["diffusion_checkpoint"], map_location=device)
    if tmeta["in_channels"] != dmeta["in_channels"]:
        raise ValueError(f"teacher expects {tmeta['in_channels']} channels but the DDPM makes {dmeta['in_channels']}")
    teacher.requires_grad_(False)
    return teacher, unet, diffusion


def synthesis_generator(seed: int, batch_id: int) -> torch.Generator:
    """The noise and labels of batch `batch_id`: one stream per batch, whichever worker makes it."""
    return generator(seed, "synthesis", batch_id)


def was_restarted() -> bool:
    """Whether this process is a Ray actor that Ray reconstructed after a failure (False outside an actor)."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # outside an actor (sequential baseline, tests)
        return False


class SynthesisWorker:
    """Actor: holds the DDPM UNet and the teacher; makes CADR-DDIM batches and pushes them until stopped."""

    def __init__(self, worker_id: int, spec: dict, buffer_name: str):
        import ray

        torch.set_num_threads(spec["torch_threads"])
        self.worker_id = worker_id
        self.spec = spec
        self.buffer = ray.get_actor(buffer_name)
        self.cadr = CADRSection(**spec["cadr"])
        self.device = device_for(spec["num_gpus"])
        self.teacher, self.unet, self.diffusion = load_synthesis_models(spec, self.device)
        self.hooks = BNStatHooks(self.teacher) if self.cadr.gate != "off" else None
        self.restarted = was_restarted()

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
            t0 = time.time()
            try:
                out = synthesize(self.unet, self.teacher, self.diffusion, self.spec["batch_size"], self.cadr,
                                 synthesis_generator(self.spec["seed"], batch_id), self.hooks,
                                 should_stop=self._stopped, check_every=self.spec["check_stop_every"])
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


class StudentLearner:
    """Actor: samples batches from the ReplayBuffer and trains the student until `steps` (or the time limit).

    Created with max_concurrency=2 so that `progress()` answers while `run()` is training.
    """

    def __init__(self, spec: dict, buffer_name: str):
        import ray

        self.core = LearnerCore(spec)
        self.spec = spec
        self.buffer = ray.get_actor(buffer_name)
        self.restarted = was_restarted()
        self.step_log: list[tuple[float, float]] = []
        self.first_step_start: Optional[float] = None
        self.last_step_end: Optional[float] = None
        self.losses: list[float] = []
        # loss terms averaged between two progress() calls; run() and progress() are on different threads
        self._means = RunningMeans()
        self._means_lock = threading.Lock()

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
            with self._means_lock:
                self._means.add(out)
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
        """Step, mean KD loss since the last call, and the latest held-out evaluation."""
        with self._means_lock:
            means = self._means.pop()
        h = self.core.history[-1] if self.core.history else {}
        return {"step": self.core.step, "kd_loss": means.get("kd_loss"), "lr": means.get("lr"),
                "heldout_top1": h.get("heldout_top1"), "teacher_agreement": h.get("teacher_agreement"),
                "eval_step": h.get("step"), "restored_step": self.core.restored_step, "restarted": self.restarted}
