"""The shared Ray glue: every method's per-worker loop runs through `launch()` on a Ray Train `TorchTrainer`.

A method provides `loop(config: dict)`; inside it, a :class:`TrainSession` gives the rank, the device, the
dataset shard, the checkpoint to resume from, and `report()` which checkpoints (weights only) and writes
metrics as JSONL. Everything about storage, failures and resumption lives here so that methods stay small.

Run folder layout (``<storage_path>/<name>/``, local or ``s3://``)::

    config.yaml               the resolved config of the run
    metrics.jsonl             one JSON object per report (rank 0)
    checkpoint_step_000100/   Ray Train checkpoints: state.pt (state dicts, loaded with weights_only=True) + meta.json
    model/                    a copy of the final checkpoint, what apps/sample and serve/ load
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fabdistill import storage
from fabdistill.config import knob
from fabdistill.seeding import derive_seed

from fabdistill.checkpoints import META_FILE, STATE_FILE, load_state, resolve_checkpoint, save_state  # noqa: F401


@dataclasses.dataclass
class RunSection:
    """Where and how a run executes (Ray Train scaling, storage, failures)."""

    name: str = knob("run", help="run name: the folder under storage_path; rerunning the same name resumes")
    storage_path: str = knob("runs", help="local directory or s3://bucket/prefix for checkpoints and artifacts")
    num_workers: int = knob(2, ge=0, le=4096, help="DDP workers; 0 runs the loop in-process (debugging)")
    use_gpu: bool = knob(False, help="one GPU per worker, NCCL backend")
    cpus_per_worker: float = knob(0.5, gt=0, le=256,
                                  help="fractional CPUs leave room for Ray Data on small machines")
    max_failures: int = knob(0, ge=-1, help="worker-group restarts from the latest checkpoint (-1: forever)")
    num_to_keep: int = knob(2, ge=1, le=1000, help="checkpoints kept in storage")
    seed: int = knob(0, ge=0, help="global seed; workers offset it by their rank")
    crash_after_step: int = knob(-1, ge=-1, help="fault injection for testing recovery: every worker exits right "
                                                 "after the checkpoint of this step, once (-1: off)")


# --------------------------------------------------------------------------- driver side

def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`) or start an embedded local Ray."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus)


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
) -> TrainOutcome:
    """Run `loop(loop_config)` on `run.num_workers` DDP workers; resume if `run.name` already has checkpoints.

    `run.num_workers=0` runs the same loop in this process (rank 0 of 1, no Ray), with the same checkpoints,
    metrics, resume and fault injection: what a benchmark or a debugger runs is what trains on the cluster.
    `datasets` maps names to Parquet URIs (local or s3://); workers read them through Ray Data shards
    (`TrainSession.dataset(name)`). `full_config` (a config dataclass) is saved as config.yaml in the run folder.
    """
    out_dir = run_dir(run)
    storage.makedirs(out_dir)
    if full_config is not None:
        from fabdistill.config import save_config
        save_config(full_config, storage.join(out_dir, "config.yaml"))
    worker_config = {"loop_config": loop_config, "run": dataclasses.asdict(run), "run_dir": out_dir,
                     "datasets": dict(datasets or {})}
    if run.num_workers == 0:
        return _launch_in_process(loop, worker_config, run, out_dir, raise_on_error, extra_callbacks)

    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray()
    ray_datasets = None
    if datasets:
        from data.parquet_io import ray_dataset
        ray_datasets = {name: ray_dataset(uri) for name, uri in datasets.items()}

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


def _finish(run: RunSection, out_dir: str, checkpoint_dir: Optional[str], metrics: Optional[dict],
            error: Optional[BaseException], raise_on_error: bool) -> TrainOutcome:
    if error is not None and raise_on_error:
        raise RuntimeError(f"training run '{run.name}' failed; checkpoints kept in {out_dir}; "
                           f"rerun the same command to resume") from error
    return TrainOutcome(out_dir, checkpoint_dir, metrics, error)


def _launch_in_process(loop: Callable[[dict], Any], worker_config: dict, run: RunSection, out_dir: str,
                       raise_on_error: bool, callbacks: Optional[list]) -> TrainOutcome:
    """num_workers=0: the loop in this process, restarted up to run.max_failures times like a worker group."""
    if callbacks:
        raise ValueError("run.num_workers=0 runs without Ray Train, so Ray Train callbacks (a Tune sweep) cannot "
                         "attach; use run.num_workers >= 1")
    failures = 0
    error: Optional[BaseException] = None
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
            print(f"[{run.name}] in-process run failed ({type(exc).__name__}: {exc}); restart {failures} "
                  f"from the latest checkpoint", flush=True)
        finally:
            TrainSession._current = None
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


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}"


def list_checkpoints(out_dir: str) -> list[str]:
    """The run folder's checkpoint_step_* folders, oldest first."""
    if not storage.exists(out_dir):
        return []
    names = sorted(n for n in storage.listdir(out_dir) if n.startswith("checkpoint_step_"))
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
        TrainSession._current = TrainSession(worker_config)
        return loop(worker_config["loop_config"])

    return train_loop_per_worker


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
        self.metrics_uri = storage.join(self.run_dir, "metrics.jsonl")
        self._metric_lines: Optional[list[str]] = None
        self._t0 = time.time()
        self._restored: Optional[tuple[dict, dict]] = None
        self._restored_step: Optional[int] = None
        self._restore_read = False
        torch.manual_seed(derive_seed(self.run.seed, "worker", self.rank))  # loops seed their own streams too
        if self.is_main:
            # Rows written after the checkpoint we resume from (or by a run that never checkpointed) are replayed
            # by this attempt: drop them so that metrics.jsonl holds every step once.
            self._truncate_metrics(self._checkpoint_step())

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
        """Move to the device and wrap in DDP when there is more than one worker."""
        if self.world_size > 1:
            import ray.train.torch

            return ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})
        return model.to(self.device)

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

    def load_shard(self, name: str, kind: str, batch_size: int = 1024) -> dict[str, torch.Tensor]:
        """This worker's whole shard as tensors in memory (shapes as in data/datasets.py).

        Our datasets are small next to a worker's memory, and many short epochs over an in-memory tensor are far
        faster than re-streaming Parquet through Ray Data each epoch.
        """
        from data.datasets import batch_to_tensors

        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.dataset(name).iter_batches(batch_size=batch_size, batch_format="numpy"):
            for key, value in batch_to_tensors(batch, kind).items():
                parts.setdefault(key, []).append(value)
        if not parts:
            raise ValueError(f"dataset '{name}' gave worker {self.rank} no rows (fewer rows than workers?)")
        return {key: torch.cat(values) for key, values in parts.items()}

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
            print(f"[{self.run.name}] resuming from step {self._restored_step}", flush=True)
        return restored

    def report(self, metrics: dict, *, step: int, state: Optional[dict | Callable[[], dict]] = None,
               meta: Optional[dict] = None) -> None:
        """A barrier: every rank calls it at the same steps with the same request.

        `state` (a dict of state dicts, or a function that builds it) asks for a checkpoint at this step; every
        rank passes it, only rank 0's is built and written. Metrics are rank 0's and written by rank 0."""
        metrics = {k: _plain(v) for k, v in metrics.items()}
        metrics["step"] = step
        metrics["elapsed_s"] = round(time.time() - self._t0, 3)
        if self.is_main:
            self._write_metrics(metrics)
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[{self.run.name}] {shown}", flush=True)
        if state is None:
            if not self.local:
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

    def _truncate_metrics(self, max_step: int) -> None:
        if not storage.exists(self.metrics_uri):
            return
        lines = storage.read_bytes(self.metrics_uri).decode().splitlines()
        kept = []
        for line in lines:
            try:
                if line.strip() and json.loads(line).get("step", 0) <= max_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        if len(kept) != len(lines):
            storage.write_bytes(self.metrics_uri, "".join(line + "\n" for line in kept).encode())
        self._metric_lines = kept

    def _write_metrics(self, metrics: dict) -> None:
        if self._metric_lines is None and storage.is_s3(self.metrics_uri):
            self._metric_lines = (storage.read_bytes(self.metrics_uri).decode().splitlines()
                                  if storage.exists(self.metrics_uri) else [])
        append_jsonl(self.metrics_uri, metrics, self._metric_lines)


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
