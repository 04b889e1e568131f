"""The shared Ray glue: every method's per-worker loop runs through `launch()` on a Ray Train `TorchTrainer`.

A method provides `loop(config: dict)`; inside it, a :class:`TrainSession` gives the rank, the device, the
dataset shard, the checkpoint to resume from, and `report()` which checkpoints (weights only) and writes
metrics as JSONL. Everything about storage, failures and resumption lives here so that methods stay small.

Run folder layout (``<storage_path>/<name>/``, local or ``s3://``)::

    config.yaml               the resolved config of the run
    metrics.jsonl             one JSON object per report (rank 0)
    events.out.tfevents.*     the same metrics for TensorBoard (rank 0; run.tensorboard, local storage)
    console.log               everything the phase printed, Ray's workers' output included (fabdistill/console.py)
    checkpoint_step_000100/   Ray Train checkpoints: state.pt (state dicts, loaded with weights_only=True) + meta.json
    model/                    a copy of the final checkpoint, what apps/sample and serve/ load

GPU knobs (run.*, applied here once for every method; docs/operations.md "GPU"): `use_gpu` gives each worker one
GPU, and Ray Train then sets up the process group with NCCL (gloo on CPU workers); `tf32` is set when a worker's
session starts on CUDA; `compile` is applied by `TrainSession.prepare`; `precision=bf16` by the loops' forward passes
inside `TrainSession.autocast()`; `pin_memory` by `TrainSession.to_device`. On CPU only `compile` changes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fabdistill import console, storage
from fabdistill.config import knob
from fabdistill.seeding import derive_seed

from fabdistill.checkpoints import META_FILE, STATE_FILE, load_state, resolve_checkpoint, save_state  # noqa: F401


PRECISIONS = ("fp32", "bf16")  # run.precision


@dataclasses.dataclass
class RunSection:
    """Where and how a run executes (Ray Train scaling, storage, failures)."""

    name: str = knob("run", help="run name: the folder under storage_path; rerunning the same name resumes")
    storage_path: str = knob("runs", help="local directory or s3://bucket/prefix for checkpoints and artifacts")
    num_workers: int = knob(2, ge=0, le=4096, help="DDP workers; 0 runs the loop in-process (debugging)")
    use_gpu: bool = knob(False, help="one GPU per worker; Ray Train then connects the workers with NCCL (gloo on CPU)")
    cpus_per_worker: float = knob(0.5, gt=0, le=256,
                                  help="fractional CPUs leave room for Ray Data on small machines")
    max_failures: int = knob(0, ge=-1, help="worker-group restarts from the latest checkpoint (-1: forever)")
    num_to_keep: int = knob(2, ge=1, le=1000, help="checkpoints kept in storage")
    seed: int = knob(0, ge=0, help="global seed; workers offset it by their rank")
    crash_after_step: int = knob(-1, ge=-1, help="fault injection for testing recovery: every worker exits right "
                                                 "after the checkpoint of this step, once (-1: off)")
    tensorboard: bool = knob(True, help="also write the metrics as TensorBoard event files in the run folder "
                                        "(rank 0; local storage only: skipped with a note on s3://)")
    precision: str = knob("fp32", choices=PRECISIONS,
                          help="bf16: the loops' forward passes and losses run under bfloat16 autocast on CUDA "
                               "(TrainSession.autocast; weights, optimiser and gradients stay float32); a no-op on "
                               "CPU, which always runs float32")
    tf32: bool = knob(True, help="on CUDA, float32 matmuls and convolutions may use TF32 tensor cores (set when a "
                                 "worker starts); no effect on CPU")
    compile: bool = knob(False, help="torch.compile the models TrainSession.prepare returns, in place (state-dict "
                                     "keys unchanged); the first steps pay the compilation")
    pin_memory: bool = knob(True, help="on CUDA, batches are pinned in host memory and copied to the GPU "
                                       "asynchronously (TrainSession.to_device); no effect on CPU")
    torch_threads: int = knob(0, ge=0, le=1024,
                              help="torch intra-op threads per worker (torch.set_num_threads when its session "
                                   "starts); 0: as the process has them (Ray sets OMP_NUM_THREADS to a worker's "
                                   "whole CPUs, at least 1)")
    profile: bool = knob(False, help="time each step's sections (data, forward, backward, optimizer) and DDP's "
                                     "all-reduce; reports add their per-step means as prof_*_ms "
                                     "(trainers/profiling.py)")


# --------------------------------------------------------------------------- driver side

def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`) or start an embedded local Ray.

    Quiet unless verbose (fabdistill/console.py): Ray's INFO lines and its workers' output go to the log files
    only. A Ray someone else initialised is left as it is."""
    import ray

    console.ray_env_defaults()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    context = ray.init(**console.ray_init_kwargs()) if address else ray.init(num_cpus=num_cpus,
                                                                            **console.ray_init_kwargs())
    console.route_worker_logs()
    if not console.verbose():
        cpus = ray.cluster_resources().get("CPU", 0)
        dashboard = getattr(context, "dashboard_url", None)
        console.say(f"[ray] {'connected to ' + address if address else 'started a local Ray'} ({cpus:g} CPUs"
                    + (f", dashboard http://{dashboard}" if dashboard else "") + "; --verbose shows its logs)")


def run_dir(run: RunSection) -> str:
    base = run.storage_path if storage.is_s3(run.storage_path) else str(Path(run.storage_path).resolve())
    return storage.join(base, run.name)


def _storage_args(run: RunSection) -> dict:
    """RunConfig storage arguments; a custom S3 endpoint (a local S3 server) needs an explicit filesystem."""
    if storage.is_s3(run.storage_path):
        fs, path = storage.pyarrow_fs(run.storage_path)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(run.storage_path).resolve())}


from fabdistill.methods import TrainOutcome  # noqa: E402  (one outcome type for every method)


class InjectedFault(RuntimeError):
    """Raised by fault injection in an in-process run (a Ray worker exits instead)."""


def launch(
    loop: Callable[[dict], Any],
    loop_config: dict,
    run: RunSection,
    *,
    datasets: Optional[dict[str, str]] = None,
    full_config: Any = None,
    raise_on_error: bool = True,
    extra_callbacks: Optional[list] = None,
    total_steps: Optional[int] = None,
    samples_per_step: Optional[int] = None,
    loader: Any = None,
) -> TrainOutcome:
    """Run `loop(loop_config)` on `run.num_workers` DDP workers; resume if `run.name` already has checkpoints.

    `run.num_workers=0` runs the same loop in this process (rank 0 of 1, no Ray), with the same checkpoints,
    metrics, resume and fault injection: what a benchmark or a debugger runs is what trains on the cluster.
    `datasets` maps names to Parquet URIs (local or s3://); workers read them through Ray Data shards
    (`TrainSession.dataset(name)`). `full_config` (a config dataclass) is saved as config.yaml in the run folder.
    The console shows a progress bar and milestone lines (fabdistill/console.py); `total_steps` (the last step)
    and `samples_per_step` (the global batch) size the bar, read from `loop_config` when not given
    (:func:`progress_plan`). Everything printed meanwhile also goes to <run folder>/console.log.
    `loader` (a method's data section with data/streaming.LoaderKnobs: `data.loader` memory|stream|auto) decides
    once here, per dataset, how `TrainSession.batches` feeds the loop; None keeps every dataset in memory.
    """
    out_dir = run_dir(run)
    storage.makedirs(out_dir)
    with console.log_to(storage.join(out_dir, "console.log")):
        return _launch_phase(loop, loop_config, run, out_dir, datasets, full_config, raise_on_error,
                             extra_callbacks, total_steps, samples_per_step, loader)


def resolve_loaders(datasets: Optional[dict[str, str]], loader: Any, run: RunSection) -> dict[str, dict]:
    """{dataset name: {"mode": "memory"|"stream", "shuffle_buffer": rows}}, decided on the driver so that every
    worker agrees (data/streaming.py)."""
    from data.streaming import resolve_loader

    shuffle = int(getattr(loader, "shuffle_buffer", 0))
    return {name: {"mode": resolve_loader(loader, uri, run.num_workers) if loader is not None else "memory",
                   "shuffle_buffer": shuffle} for name, uri in (datasets or {}).items()}


def _launch_phase(loop: Callable[[dict], Any], loop_config: dict, run: RunSection, out_dir: str,
                  datasets: Optional[dict[str, str]], full_config: Any, raise_on_error: bool,
                  extra_callbacks: Optional[list], total_steps: Optional[int],
                  samples_per_step: Optional[int], loader: Any = None) -> TrainOutcome:
    if full_config is not None:
        from fabdistill.config import save_config
        save_config(full_config, storage.join(out_dir, "config.yaml"))
    loaders = resolve_loaders(datasets, loader, run)
    worker_config = {"loop_config": loop_config, "run": dataclasses.asdict(run), "run_dir": out_dir,
                     "datasets": dict(datasets or {}), "loaders": loaders, "verbose": console.verbose(),
                     "forward_metrics": bool(extra_callbacks)}
    latest = latest_checkpoint(out_dir)
    start = checkpoint_step(latest) if latest is not None else 0
    # What rank 0 does when it starts (drop rows after the checkpoint it resumes from), done here first so that
    # the progress monitor starts from the file the run continues.
    truncate_metrics(storage.join(out_dir, "metrics.jsonl"), start)
    plan_total, plan_batch = progress_plan(loop_config, run)
    total, per_step = total_steps or plan_total, samples_per_step or plan_batch
    where = (f"{run.num_workers} Ray Train worker{'s' if run.num_workers > 1 else ''}" if run.num_workers
             else "in-process (no Ray)")
    data = ", ".join(f"{k} {v}" + (" (streamed)" if loaders[k]["mode"] == "stream" else "")
                     for k, v in (datasets or {}).items())
    console.say(f"[{run.name}] {where}" + (f", {total} steps" if total else "") + (f"; data: {data}" if data else "")
                + f"; run folder {out_dir}")
    if latest is not None:
        console.say(f"[{run.name}] resuming from step {start} ({latest})")
    monitor = _PhaseMonitor(run.name, out_dir, total, start, per_step)
    try:
        if run.num_workers == 0:
            outcome = _launch_in_process(loop, worker_config, run, out_dir, raise_on_error, extra_callbacks,
                                         monitor)
        else:
            outcome = _launch_ray(loop, worker_config, run, out_dir, datasets, raise_on_error, extra_callbacks,
                                  monitor)
    finally:
        monitor.stop()
    if outcome.error is None:
        last = f"step {monitor.progress.step}" + (f"/{total}" if total else "")
        console.say(f"[{run.name}] done at {last}; model: {outcome.checkpoint_dir or '(no checkpoint)'}")
    return outcome


def _launch_ray(loop: Callable[[dict], Any], worker_config: dict, run: RunSection, out_dir: str,
                datasets: Optional[dict[str, str]], raise_on_error: bool, extra_callbacks: Optional[list],
                monitor: "_PhaseMonitor") -> TrainOutcome:
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray()
    ray_datasets = None
    if datasets:
        from data.parquet_io import ray_dataset

        if not console.verbose():
            # The datasets carry this context to Train's split coordinator, on whichever node it runs.
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
        ray_datasets = {name: ray_dataset(uri) for name, uri in datasets.items()}
        _check_room_for_data(run)

    trainer = TorchTrainer(
        train_loop_per_worker=_worker_entry(loop),
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers, use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.num_to_keep),
            callbacks=extra_callbacks,
            **_storage_args(run),
        ),
        datasets=ray_datasets,
    )
    error: Optional[BaseException] = None
    result = None
    monitor.start()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # TrainingFailedError and friends: keep what was saved, report clearly
        error = exc
    checkpoint_dir = None
    metrics = None
    if result is not None and result.checkpoint is not None:
        metrics = result.metrics
        checkpoint_dir = storage.join(out_dir, "model")
        with result.checkpoint.as_directory() as src:
            export_checkpoint(src, checkpoint_dir)
    return _finish(run, out_dir, checkpoint_dir, metrics, error, raise_on_error)


def _check_room_for_data(run: RunSection) -> None:
    """Ray Data's read tasks need a whole free CPU beside the workers (docs/data.md, "Streaming": 2 workers x 1 CPU
    on 2 CPUs leave the read waiting forever). On an embedded local Ray, which cannot grow, such
    a run fails here instead of hanging; on a cluster, which may scale up, it is a warning."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    reserved = run.num_workers * run.cpus_per_worker
    if total - reserved >= 1.0:
        return
    message = (f"{run.num_workers} workers x run.cpus_per_worker={run.cpus_per_worker:g} leave "
               f"{max(total - reserved, 0):g} of {total:g} CPUs, and Ray Data needs 1 free CPU to read the "
               f"datasets: lower run.cpus_per_worker (fractional CPUs are fine) or run.num_workers")
    if os.environ.get("RAY_ADDRESS"):
        console.say(f"[{run.name}] warning: {message} (unless the cluster scales up)")
    else:
        raise ValueError(message)


def _finish(run: RunSection, out_dir: str, checkpoint_dir: Optional[str], metrics: Optional[dict],
            error: Optional[BaseException], raise_on_error: bool) -> TrainOutcome:
    if error is not None and raise_on_error:
        raise RuntimeError(f"training run '{run.name}' failed; checkpoints kept in {out_dir}; "
                           f"rerun the same command to resume") from error
    return TrainOutcome(out_dir, checkpoint_dir, metrics, error)


def _launch_in_process(loop: Callable[[dict], Any], worker_config: dict, run: RunSection, out_dir: str,
                       raise_on_error: bool, callbacks: Optional[list], monitor: "_PhaseMonitor") -> TrainOutcome:
    """num_workers=0: the loop in this process, restarted up to run.max_failures times like a worker group."""
    if callbacks:
        raise ValueError("run.num_workers=0 runs without Ray Train, so Ray Train callbacks (a Tune sweep) cannot "
                         "attach; use run.num_workers >= 1")
    failures = 0
    error: Optional[BaseException] = None
    monitor.start()
    while True:
        session = TrainSession(worker_config, local=True)
        TrainSession._current = session
        try:
            loop(worker_config["loop_config"])
            error = None
            break
        except Exception as exc:
            error = exc
            if run.max_failures != -1 and failures >= run.max_failures:
                break
            failures += 1
            console.say(f"[{run.name}] in-process run failed ({type(exc).__name__}: {exc}); restart {failures} "
                        f"from the latest checkpoint")
        finally:
            TrainSession._current = None
            session.close()
    latest = latest_checkpoint(out_dir)
    checkpoint_dir = metrics = None
    if latest is not None:
        checkpoint_dir = storage.join(out_dir, "model")
        _, meta = load_state(latest)
        metrics = meta.get("metrics")
        if storage.is_s3(latest):
            with tempfile.TemporaryDirectory() as tmp:
                storage.download_dir(latest, tmp)
                export_checkpoint(tmp, checkpoint_dir)
        else:
            export_checkpoint(latest, checkpoint_dir)
    return _finish(run, out_dir, checkpoint_dir, metrics, error, raise_on_error)


# --------------------------------------------------------------------------- driver side: progress

_PHASE_SECTIONS = ("section", "trainer", "train", "optim")  # where methods keep a phase's steps, besides its name


def progress_plan(loop_config: dict, run: RunSection) -> tuple[Optional[int], Optional[int]]:
    """(last step, global samples per step) of a phase, read where our methods keep them: `steps`, or `epochs`
    × `steps_per_epoch`, and `batch_size` (per worker), in the section named like the run's suffix
    (run ikddit-tiny-teacher: loop_config["teacher"]), a conventional section (`section`, `trainer` ...), the top
    level, or the one nested section with steps. (None, None) where none says; the bar then shows no ETA."""
    def count(value: Any) -> Optional[int]:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    names = (run.name.rsplit("-", 1)[-1], *_PHASE_SECTIONS)
    sections = [loop_config[n] for n in names if isinstance(loop_config.get(n), dict)] + [loop_config]
    nested = [v for v in loop_config.values() if isinstance(v, dict) and ("steps" in v or "epochs" in v)]
    if len(nested) == 1:
        sections.append(nested[0])
    total = batch = None
    for section in sections:
        if total is None:
            epochs, per_epoch = count(section.get("epochs")), count(section.get("steps_per_epoch",
                                                                                 loop_config.get("steps_per_epoch")))
            total = count(section.get("steps")) or (epochs * per_epoch if epochs and per_epoch else None)
        if batch is None:
            batch = count(section.get("batch_size"))
    return total, batch * max(1, run.num_workers) if batch else None


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step in a checkpoint_step_N folder's name."""
    return int(checkpoint_dir.rstrip("/").rsplit("_", 1)[-1])


class _MetricsTail:
    """New rows of a metrics.jsonl since the last read: locally from a byte offset, on S3 by re-reading the
    (small) object. `cut` tells that the file shrank in between (rank 0 truncated it on a restart)."""

    def __init__(self, uri: str):
        self.uri, self.local = uri, not storage.is_s3(uri)
        self.offset = self.count = 0
        self.read()  # what is there already is the past

    def read(self) -> tuple[list[dict], bool]:
        if self.local:
            try:
                size = os.path.getsize(self.uri)
            except FileNotFoundError:
                size = 0
            cut = size < self.offset
            if cut:
                self.offset = 0
            if size == self.offset:
                return [], cut
            with open(self.uri, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            data = data[:data.rfind(b"\n") + 1]  # a line being written waits for the next read
            self.offset += len(data)
            return _parse_rows(data), cut
        rows = _parse_rows(storage.read_bytes(self.uri)) if storage.exists(self.uri) else []
        cut = len(rows) < self.count
        new = rows if cut else rows[self.count:]
        self.count = len(rows)
        return new, cut


def _parse_rows(data: bytes) -> list[dict]:
    rows = []
    for line in data.decode(errors="replace").splitlines():
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return rows


class _PhaseMonitor:
    """The progress bar and milestone lines of one phase, fed by a driver thread while trainer.fit() (or the
    in-process loop) blocks. Under Ray Train rank 0 runs in another process, maybe on another node: what the
    driver can see is what it writes to the run folder (metrics.jsonl, checkpoint folders), local or S3."""

    def __init__(self, name: str, out_dir: str, total: Optional[int], start: int, samples_per_step: Optional[int]):
        self.name, self.out_dir = name, out_dir
        self.progress = console.PhaseProgress(name, total, initial=start, samples_per_step=samples_per_step)
        self._tail = _MetricsTail(storage.join(out_dir, "metrics.jsonl"))
        self._checkpoints = set(list_checkpoints(out_dir))
        self._last_elapsed = -math.inf  # rank 0's clock of the latest row: it starts again on a restart
        self._interval = 5.0 if storage.is_s3(out_dir) else 0.5
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def poll(self) -> None:
        try:
            rows, cut = self._tail.read()
            checkpoints = list_checkpoints(self.out_dir)
        except (OSError, ValueError):  # a transient storage error: the next poll reads again
            return
        steps = sorted(checkpoint_step(c) for c in checkpoints)
        first_elapsed = rows[0].get("elapsed_s") if rows else None
        if cut or (isinstance(first_elapsed, (int, float)) and first_elapsed < self._last_elapsed):
            # A restarted worker group (or in-process attempt) resumes from the latest checkpoint before its rows.
            first = int(rows[0]["step"]) if rows else math.inf
            resumed = max((s for s in steps if s < first), default=0)
            console.say(f"[{self.name}] restarted: resuming from step {resumed}")
            rows = [r for r in rows if int(r.get("step", 0)) > resumed]
        saved = [c for c in checkpoints if c not in self._checkpoints]  # oldest first
        self._checkpoints = set(checkpoints)
        for row in rows:
            self.progress.update(row)
            while saved and checkpoint_step(saved[0]) <= self.progress.step:
                self._saved(saved.pop(0))
        for path in saved:
            self._saved(path)
        if rows and isinstance(rows[-1].get("elapsed_s"), (int, float)):
            self._last_elapsed = rows[-1]["elapsed_s"]

    def _saved(self, path: str) -> None:
        console.say(f"[{self.name}] checkpoint saved: step {checkpoint_step(path)} -> {path}")

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.poll()
        self.progress.close()


def export_checkpoint(src: str, dest: str) -> None:
    """Copy a local checkpoint folder to `dest` (local or s3://), replacing what was there atomically on disk."""
    if storage.is_s3(dest):
        storage.remove_tree(dest)
        storage.upload_dir(src, dest)
    else:
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


_CHECKPOINT_NAME = re.compile(r"checkpoint_step_\d+")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}"


def list_checkpoints(out_dir: str) -> list[str]:
    """The run folder's checkpoint_step_* folders, oldest first."""
    if not storage.exists(out_dir):
        return []
    # exact names only: export_checkpoint's checkpoint_step_N.tmp is a folder being written
    names = sorted(n for n in storage.listdir(out_dir) if _CHECKPOINT_NAME.fullmatch(n))
    return [storage.join(out_dir, n) for n in names if storage.exists(storage.join(out_dir, n, STATE_FILE))]


def latest_checkpoint(out_dir: str) -> Optional[str]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def write_checkpoint(out_dir: str, step: int, state: dict, meta: dict, num_to_keep: int) -> str:
    """Write run_dir/checkpoint_step_N (local or s3://) and prune the oldest beyond `num_to_keep`."""
    dest = storage.join(out_dir, checkpoint_name(step))
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, state, meta)
        export_checkpoint(tmp, dest)
    for old in list_checkpoints(out_dir)[:-num_to_keep]:
        storage.remove_tree(old)
    return dest


def _worker_entry(loop: Callable[[dict], Any]) -> Callable[[dict], Any]:
    def train_loop_per_worker(worker_config: dict) -> Any:
        session = TrainSession._current = TrainSession(worker_config)
        try:
            return loop(worker_config["loop_config"])
        finally:
            session.close()

    return train_loop_per_worker


# --------------------------------------------------------------------------- worker side: devices and precision

def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs float32, bit-identical to no context at all).

    bf16 rather than fp16: no loss scaling needed (DMD2's reference saw FP16 diverge and BF16 not)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_tf32(enabled: bool) -> tuple[str, bool]:
    """Let CUDA float32 matmuls ("high" matmul precision) and cuDNN convolutions use TF32, or not; returns the
    previous settings for :func:`restore_tf32`. The legacy API on purpose: torch.compile reads it, and mixing it with
    the per-backend `fp32_precision` settings makes torch raise."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return before


def restore_tf32(before: tuple[str, bool]) -> None:
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def to_device(value: Any, device: torch.device, pin_memory: bool = False) -> Any:
    """A tensor, or a dict / list / tuple of tensors, on `device`. With `pin_memory` and a CUDA device, host
    tensors are pinned first and copied asynchronously (non_blocking: the copy overlaps the work already queued on
    the GPU). Anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        if pin_memory and device.type == "cuda" and value.device.type == "cpu":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device, pin_memory) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, pin_memory) for v in value)
    return value


# --------------------------------------------------------------------------- worker side

class TrainSession:
    """What a per-worker loop needs from Ray Train, in one object. Get it with `TrainSession.current()`.

    Contract of a loop: every rank calls `report()` at the same steps (it is a barrier), passing the same
    arguments' kinds; `state=` asks for a checkpoint at that step, and the session decides that only rank 0
    writes it and the metrics line. The same loop runs in-process when `run.num_workers=0` (`local=True`).
    """

    _current: Optional["TrainSession"] = None

    def __init__(self, worker_config: dict, local: bool = False):
        self.local = local
        self.run = RunSection(**worker_config["run"])
        self.run_dir: str = worker_config["run_dir"]
        self._datasets: dict[str, str] = worker_config.get("datasets", {})
        self._loaders: dict[str, dict] = worker_config.get("loaders", {})
        if local:
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if self.run.use_gpu and torch.cuda.is_available() else "cpu")
        else:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank = ctx.get_world_rank()
            self.world_size = ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        self.verbose = bool(worker_config.get("verbose", False))
        # Metrics-only reports go to Ray Train only when a callback (a Tune sweep) listens for them; see report().
        self._forward_metrics = bool(worker_config.get("forward_metrics", True))
        self.metrics_uri = storage.join(self.run_dir, "metrics.jsonl")
        self._metric_lines: Optional[list[str]] = None
        self._tensorboard: Any = None  # SummaryWriter, made at the first report; False: not written
        self._t0 = time.time()
        self._restored: Optional[tuple[dict, dict]] = None
        self._restored_step: Optional[int] = None
        self._restore_read = False
        # TF32 is a process-wide setting: set for this session, put back by close() (an in-process run shares the
        # driver's process).
        self._tf32_before = set_tf32(self.run.tf32) if self.device.type == "cuda" else None
        # Threads are process-wide too: put back by close() for an in-process run.
        self._threads_before: Optional[int] = None
        if self.run.torch_threads > 0:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.run.torch_threads)
        from trainers.profiling import StepProfile

        self.profile: Optional[StepProfile] = StepProfile(self.device) if self.run.profile else None
        self._profiled_since: Optional[int] = None  # the step of the last report (profile means per step)
        torch.manual_seed(derive_seed(self.run.seed, "worker", self.rank))  # loops seed their own streams too
        if self.is_main:
            # Rows written after the checkpoint we resume from (or by a run that never checkpointed) are replayed
            # by this attempt: drop them so that metrics.jsonl holds every step once.
            self._metric_lines = truncate_metrics(self.metrics_uri, self._checkpoint_step())

    @classmethod
    def current(cls) -> "TrainSession":
        if cls._current is None:
            raise RuntimeError("TrainSession.current() called outside a loop started by trainers.launch.launch()")
        return cls._current

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- models and data
    def prepare(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """Move to the device and wrap in DDP when there is more than one worker; with run.compile, compile what
        is returned in place (`nn.Module.compile`: the same object, so `.module` and state-dict keys are unchanged;
        the DDP wrapper is compiled, so that DDP's buckets split the graph), for static shapes (a new input shape
        recompiles)."""
        if self.world_size > 1:
            import ray.train.torch

            prepared = ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})
        else:
            prepared = model.to(self.device)
        if self.profile is not None and self.world_size > 1:
            self.profile.attach(prepared)  # times DDP's all-reduce (the default one, wrapped)
        if self.run.compile:
            # Static shapes: our batches have a fixed size; symbolic ones (what torch guesses on the second shape it
            # sees, e.g. the same UNet code on pixels, then on latents) broke inductor on KDCDDM's CDLDM phase.
            prepared.compile(dynamic=False)
        return prepared

    def autocast(self, enabled: Optional[bool] = None) -> contextlib.AbstractContextManager:
        """The context a loop runs its forward passes and losses in (not backward, not the optimiser step): bf16
        autocast on CUDA when run.precision is bf16 (`enabled` overrides it: DMD2's distill.bf16); a no-op on CPU
        and at the default fp32, so CPU runs are bit-identical with or without it."""
        return autocast(self.run.precision == "bf16" if enabled is None else enabled, self.device)

    def timed(self, name: str) -> contextlib.AbstractContextManager:
        """A context timing one section of a step (run.profile; trainers/profiling.py); a no-op otherwise."""
        from trainers.profiling import maybe_section

        return maybe_section(self.profile, name)

    def to_device(self, batch: Any) -> Any:
        """A batch (a tensor, or a dict / tuple / list of them) on this worker's device: on CUDA with
        run.pin_memory pinned and copied asynchronously; on CPU `.to(device)`, the same tensors."""
        return to_device(batch, self.device, self.run.pin_memory)

    def dataset(self, name: str = "train"):
        """This worker's shard of a dataset given to `launch(datasets=...)`: a Ray DataIterator, or in-process
        an object with the same `iter_batches(batch_size=..., batch_format="numpy")`."""
        if self.local:
            if name not in self._datasets:
                raise KeyError(f"dataset '{name}' was not passed to launch(datasets=...)")
            return _LocalShard(self._datasets[name])
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        if shard is None:
            raise KeyError(f"dataset '{name}' was not passed to launch(datasets=...)")
        return shard

    def load_shard(self, name: str, kind: str, batch_size: int = 1024,
                   label_column: Optional[str] = None) -> dict[str, torch.Tensor]:
        """This worker's whole shard as tensors in memory (shapes as in data/datasets.py; `label_column` read as
        the label, data/datasets.numpy_batch).

        Our datasets are small next to a worker's memory, and many short epochs over an in-memory tensor are far
        faster than re-streaming Parquet through Ray Data each epoch.
        """
        from data.datasets import batch_to_tensors

        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.dataset(name).iter_batches(batch_size=batch_size, batch_format="numpy"):
            for key, value in batch_to_tensors(batch, kind, label_column).items():
                parts.setdefault(key, []).append(value)
        if not parts:
            raise ValueError(f"dataset '{name}' gave worker {self.rank} no rows (fewer rows than workers?)")
        return {key: torch.cat(values) for key, values in parts.items()}

    def loader(self, name: str = "train") -> str:
        """How `batches(name, ...)` feeds the loop: "memory" or "stream" (decided by launch(loader=...))."""
        return self._loaders.get(name, {}).get("mode", "memory")

    def stream(self, name: str, batch_size: int, *, epoch: int = 0, collate: Optional[Callable] = None,
               shuffle_buffer: Optional[int] = None, seed: Optional[int] = None, drop_last: bool = True,
               prefetch_batches: int = 1):
        """One epoch of this worker's shard, streamed: Ray Data's `iter_torch_batches` with a local shuffle buffer
        (in-process: data/streaming.stream_parquet), `collate(numpy batch)` applied to each batch (default: the
        numpy batch as it is). Every worker holds the same number of rows (the split is equal), so with drop_last
        every worker yields the same number of batches per epoch. `shuffle_buffer` defaults to the dataset's
        `data.shuffle_buffer`; the shuffle seed is derived from run.seed, the rank and `epoch`."""
        from data.streaming import shuffle_buffer_rows

        if shuffle_buffer is None:
            shuffle_buffer = int(self._loaders.get(name, {}).get("shuffle_buffer", 0))
        seed = derive_seed(self.run.seed, "stream", name, self.rank, epoch) if seed is None else seed
        collate = collate or (lambda batch: batch)
        if self.local:
            from data.streaming import stream_parquet

            if name not in self._datasets:
                raise KeyError(f"dataset '{name}' was not passed to launch(datasets=...)")
            return (collate(b) for b in stream_parquet(self._datasets[name], batch_size, shuffle_buffer=shuffle_buffer,
                                                       seed=seed, drop_last=drop_last))
        from data.streaming import numpy_collate

        return self.dataset(name).iter_torch_batches(
            batch_size=batch_size, collate_fn=numpy_collate(collate), device="cpu", drop_last=drop_last,
            local_shuffle_buffer_size=shuffle_buffer_rows(shuffle_buffer, batch_size),
            local_shuffle_seed=seed % 2**32, prefetch_batches=prefetch_batches)

    def batches(self, name: str, kind: str, batch_size: int, gen: torch.Generator, *,
                label_column: Optional[str] = None, transform: Optional[Callable] = None):
        """Shuffled mini-batches of tensors (data/datasets.py shapes) of this worker's shard, forever, fed as
        launch(loader=...) decided for this dataset (data/streaming.py):

        memory  the whole shard decoded once (load_shard), then trainers/common.infinite_batches with `gen`;
        stream  epoch after epoch of `stream()`, batch_to_tensors applied in Ray Data's prefetch thread.

        `transform(tensors) -> tensors` runs on the whole shard once in memory, on each batch when streaming (for
        a per-row encoding; a filter changes the batch size when streaming)."""
        from functools import partial

        from data.datasets import batch_to_tensors
        from data.streaming import epochs
        from trainers.common import infinite_batches

        if self.loader(name) == "stream":
            decode = partial(batch_to_tensors, kind=kind, label_column=label_column)
            collate = decode if transform is None else (lambda batch: transform(decode(batch)))
            return epochs(lambda epoch: self.stream(name, batch_size, epoch=epoch, collate=collate),
                          what=f"dataset '{name}' on worker {self.rank}")
        data = self.load_shard(name, kind, label_column=label_column)
        return infinite_batches(transform(data) if transform is not None else data, batch_size, gen)

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """Mean of each value over the workers (identity on one worker)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    # --- checkpoints
    def _read_checkpoint(self) -> Optional[tuple[dict, dict]]:
        if self._restore_read:
            return self._restored
        self._restore_read = True
        if self.local:
            latest = latest_checkpoint(self.run_dir)
            self._restored = load_state(latest) if latest is not None else None
        else:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                with checkpoint.as_directory() as d:
                    self._restored = load_state(d, map_location="cpu")
        if self._restored is not None:
            self._restored_step = self._restored[1].get("step")
        return self._restored

    def _checkpoint_step(self) -> int:
        restored = self._read_checkpoint()
        return int(self._restored_step or 0) if restored is not None else 0

    def restore(self) -> Optional[tuple[dict, dict]]:
        """(state, meta) of the latest checkpoint of this run, or None on a fresh start."""
        restored = self._read_checkpoint()
        if restored is not None and self.is_main:
            self._say(f"[{self.run.name}] rank 0 restored the checkpoint of step {self._restored_step}")
        return restored

    def _say(self, line: str) -> None:
        """A worker's line: a Ray worker prints it (its output reaches the driver's log, and its console when
        verbose); in-process it goes to the log only unless verbose (the driver's bar shows the progress)."""
        if self.local and not self.verbose:
            console.log_only(line)
        else:
            print(line, flush=True)

    def report(self, metrics: dict, *, step: int, state: Optional[dict | Callable[[], dict]] = None,
               meta: Optional[dict] = None) -> None:
        """A barrier: every rank calls it at the same steps with the same request.

        `state` (a dict of state dicts, or a function that builds it) asks for a checkpoint at this step; every
        rank passes it, only rank 0's is built and written. Metrics are rank 0's and written by rank 0.

        A report without `state` reaches Ray Train (`ray.train.report`) only when launch() was given callbacks
        (Tune's TuneReportCallback reads them): Ray Train keeps no metrics-only result (Result.metrics comes from checkpointed reports), and its controller
        collects a worker's reports from a one-result queue on its health-check poll (every 2 s), so each report
        issued sooner than 2 s after the previous one blocked the loop until that poll (measured: ~1.2 s a report
        at log_every=10 on the tiny DiT teacher, three quarters of its step time; docs/performance.md).
        With run.profile the report's own time is a section too ("report", counted in the next report's means)."""
        if self.profile is None:
            return self._report(metrics, step, state, meta)
        with self.profile.section("report"):
            self._report(metrics, step, state, meta)

    def _report(self, metrics: dict, step: int, state: Optional[dict | Callable[[], dict]],
                meta: Optional[dict]) -> None:
        metrics = {k: _plain(v) for k, v in metrics.items()}
        if self.profile is not None:
            since = self._profiled_since if self._profiled_since is not None else self._checkpoint_step()
            metrics.update({k: round(v, 3) for k, v in self.profile.pop(step - since).items()})
            self._profiled_since = step
        metrics["step"] = step
        metrics["elapsed_s"] = round(time.time() - self._t0, 3)
        if self.is_main:
            self._write_metrics(metrics)
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            self._say(f"[{self.run.name}] {shown}")
        if state is None:
            if not self.local and self._forward_metrics:
                import ray.train

                ray.train.report(metrics)
            return
        full_meta = None
        if self.is_main:
            built = state() if callable(state) else state
            full_meta = {"step": step, "metrics": metrics, **(meta or {})}
        if self.local:
            write_checkpoint(self.run_dir, step, built, full_meta, self.run.num_to_keep)
        else:
            import ray.train

            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if self.is_main:
                    save_state(tmp, built, full_meta)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))
        if step == self.run.crash_after_step and self._restored_step != step:
            self._inject_fault(step)

    def _inject_fault(self, step: int) -> None:
        """Every worker exits right after the checkpoint of `step` (the failure `run.crash_after_step` simulates)."""
        if self.local:
            raise InjectedFault(f"fault injection after the checkpoint of step {step}")
        # The controller registers reported checkpoints on its poll (every ~2 s): wait past two polls so the
        # crash happens "after a checkpoint", as in the failure this knob simulates.
        time.sleep(5.0)
        print(f"[{self.run.name}] fault injection: worker {self.rank} exits after the checkpoint of step {step}",
              flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _write_metrics(self, metrics: dict) -> None:
        if self._metric_lines is None and storage.is_s3(self.metrics_uri):
            self._metric_lines = (storage.read_bytes(self.metrics_uri).decode().splitlines()
                                  if storage.exists(self.metrics_uri) else [])
        append_jsonl(self.metrics_uri, metrics, self._metric_lines)
        writer = self._tensorboard_writer()
        if writer is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):  # bool is an int: 0/1
                    writer.add_scalar(key, float(value), global_step=step)
            writer.flush()  # a worker may exit abruptly (failures, fault injection): keep what was reported

    def _tensorboard_writer(self) -> Any:
        """Rank 0's SummaryWriter on the run folder, made once; None where TensorBoard is off or unavailable.

        A resumed run purges the steps after its checkpoint (purge_step): like metrics.jsonl, TensorBoard then
        shows each step once, as this attempt reports it."""
        if self._tensorboard is None:
            self._tensorboard = False
            if not self.run.tensorboard:
                return None
            if storage.is_s3(self.run_dir):
                self._say(f"[{self.run.name}] TensorBoard: not written for s3:// run folders (metrics.jsonl has "
                          f"every value); use a local storage_path to get event files")
                return None
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                self._say(f"[{self.run.name}] TensorBoard: not written ({exc}); pip install 'tensorboard>=2.16'")
                return None
            earlier = any("tfevents" in name for name in os.listdir(self.run_dir))
            purge = self._checkpoint_step() + 1 if earlier else None
            self._tensorboard = SummaryWriter(log_dir=self.run_dir, purge_step=purge)
        return self._tensorboard or None

    def close(self) -> None:
        """Flush and close what the session holds open (the TensorBoard writer); put TF32 back as it was."""
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = False
        if self._tf32_before is not None:
            restore_tf32(self._tf32_before)
            self._tf32_before = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def truncate_metrics(uri: str, max_step: int) -> list[str]:
    """Drop the rows of a metrics.jsonl after `max_step` (and lines cut by a crash); returns the rows kept.

    Rows written after the checkpoint a run resumes from (or by a run that never checkpointed) are replayed by
    the next attempt: without them metrics.jsonl holds every step once."""
    if not storage.exists(uri):
        return []
    lines = storage.read_bytes(uri).decode().splitlines()
    kept = []
    for line in lines:
        try:
            if line.strip() and json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    if len(kept) != len(lines):
        storage.write_bytes(uri, "".join(line + "\n" for line in kept).encode())
    return kept


def append_jsonl(uri: str, row: dict, lines: Optional[list[str]] = None) -> None:
    """Append one JSON row to a JSONL file, local or s3://. S3 objects cannot be appended to: pass the list of
    lines written so far (kept by the caller) and the small file is rewritten."""
    line = json.dumps(row, default=str)
    if storage.is_s3(uri):
        if lines is None:
            lines = storage.read_bytes(uri).decode().splitlines() if storage.exists(uri) else []
        lines.append(line)
        storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with open(uri, "a") as f:
            f.write(line + "\n")


class _LocalShard:
    """In-process stand-in for a Ray DataIterator over a Parquet dataset (num_workers=0)."""

    def __init__(self, uri: str):
        self.uri = uri

    def iter_batches(self, batch_size: int = 1024, batch_format: str = "numpy", **_: Any):
        from data.parquet_io import read_dataset

        table = read_dataset(self.uri)
        for start in range(0, table.num_rows, batch_size):
            part = table.slice(start, batch_size)
            # fixed-size-list columns come out as object arrays of rows, as Ray Data hands them over
            yield {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names}


def read_metrics(run_directory: str) -> list[dict]:
    uri = storage.join(run_directory, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, TypeError):
            return v
    return v
