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

STATE_FILE = "state.pt"
META_FILE = "meta.json"


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


@dataclasses.dataclass
class TrainOutcome:
    run_dir: str
    checkpoint_dir: Optional[str]  # the exported final checkpoint (run_dir/model) or None
    metrics: Optional[dict]        # metrics attached to the last checkpoint
    error: Optional[BaseException]


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

    `datasets` maps names to Parquet URIs (local or s3://); workers read them through Ray Data shards
    (`TrainSession.dataset(name)`). `full_config` (a config dataclass) is saved as config.yaml in the run folder.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray()
    out_dir = run_dir(run)
    storage.makedirs(out_dir)
    if full_config is not None:
        from fabdistill.config import save_config
        save_config(full_config, storage.join(out_dir, "config.yaml"))

    ray_datasets = None
    if datasets:
        from data.parquet_io import ray_dataset
        ray_datasets = {name: ray_dataset(uri) for name, uri in datasets.items()}

    worker_config = {"loop_config": loop_config, "run": dataclasses.asdict(run), "run_dir": out_dir}
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
        _export_checkpoint(result.checkpoint, checkpoint_dir)
    if error is not None and raise_on_error:
        raise RuntimeError(f"training run '{run.name}' failed; checkpoints kept in {out_dir}; "
                           f"rerun the same command to resume") from error
    return TrainOutcome(out_dir, checkpoint_dir, metrics, error)


def _export_checkpoint(checkpoint: Any, dest: str) -> None:
    with checkpoint.as_directory() as src:
        if storage.is_s3(dest):
            storage.remove_tree(dest)
            storage.upload_dir(src, dest)
        else:
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)


def _worker_entry(loop: Callable[[dict], Any]) -> Callable[[dict], Any]:
    def train_loop_per_worker(worker_config: dict) -> Any:
        TrainSession._current = TrainSession(worker_config)
        return loop(worker_config["loop_config"])

    return train_loop_per_worker


# --------------------------------------------------------------------------- checkpoints (weights only)

def save_state(directory: str | Path, state: dict, meta: dict) -> None:
    """Write a checkpoint folder: `state.pt` holds only tensors/state dicts/numbers, `meta.json` describes it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load (state, meta) from a checkpoint folder, local or s3://, with `weights_only=True` (no code execution)."""
    directory = str(directory)
    if storage.is_s3(directory):
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_dir(directory, tmp)
            return load_state(tmp, map_location)
    path = Path(directory)
    state_path = path / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{path}: not a fabdistill checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{state_path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return state, meta


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint folder, or a run folder (its exported `model/`, else its newest checkpoint_*)."""
    def has_state(p: str) -> bool:
        return storage.exists(storage.join(p, STATE_FILE))

    if has_state(path):
        return path
    model = storage.join(path, "model")
    if has_state(model):
        return model
    if storage.exists(path):
        candidates = sorted(n for n in storage.listdir(path) if n.startswith("checkpoint_"))
        for name in reversed(candidates):
            if has_state(storage.join(path, name)):
                return storage.join(path, name)
    raise FileNotFoundError(f"{path}: no checkpoint found (expected {STATE_FILE}, a model/ folder or checkpoint_* folders)")


# --------------------------------------------------------------------------- worker side

class TrainSession:
    """What a per-worker loop needs from Ray Train, in one object. Get it with `TrainSession.current()`."""

    _current: Optional["TrainSession"] = None

    def __init__(self, worker_config: dict):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world_size: int = ctx.get_world_size()
        self.run = RunSection(**worker_config["run"])
        self.run_dir: str = worker_config["run_dir"]
        self.device: torch.device = ray.train.torch.get_device()
        self.metrics_uri = storage.join(self.run_dir, "metrics.jsonl")
        self._metric_lines: list[str] = []
        self._t0 = time.time()
        self._restored_step: Optional[int] = None
        torch.manual_seed(self.run.seed + self.rank)

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
        import ray.train.torch

        if self.world_size > 1:
            return ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})
        return model.to(self.device)

    def dataset(self, name: str = "train"):
        """This worker's shard of a dataset given to `launch(datasets=...)` (a Ray DataIterator)."""
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

    # --- checkpoints
    def restore(self) -> Optional[tuple[dict, dict]]:
        """(state, meta) of the latest checkpoint of this run, or None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state, meta = load_state(d, map_location="cpu")
        self._restored_step = meta.get("step")
        if self.is_main:
            print(f"[{self.run.name}] resuming from step {self._restored_step}", flush=True)
        return state, meta

    def report(self, metrics: dict, *, step: int, state: Optional[dict] = None, meta: Optional[dict] = None) -> None:
        """A barrier: every worker calls it at the same steps. Rank 0's `state` (if given) becomes a checkpoint."""
        import ray.train

        metrics = {k: _plain(v) for k, v in metrics.items()}
        metrics["step"] = step
        metrics["elapsed_s"] = round(time.time() - self._t0, 3)
        if self.is_main:
            self._write_metrics(metrics)
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[{self.run.name}] {shown}", flush=True)
        if state is not None:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if self.is_main:
                    save_state(tmp, state, {"step": step, "metrics": metrics, **(meta or {})})
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step_{step:07d}")
            if step == self.run.crash_after_step and self._restored_step != step:
                # The controller registers reported checkpoints on its poll (every ~2 s): wait past two polls so the
                # crash happens "after a checkpoint", as in the failure this knob simulates.
                time.sleep(5.0)
                print(f"[{self.run.name}] fault injection: exiting after checkpoint at step {step}", flush=True)
                sys.stdout.flush()
                os._exit(1)
        else:
            ray.train.report(metrics)

    def _write_metrics(self, metrics: dict) -> None:
        line = json.dumps(metrics)
        if storage.is_s3(self.metrics_uri):
            # Objects cannot be appended to: keep the run's lines and rewrite the (small) file.
            if not self._metric_lines and storage.exists(self.metrics_uri):
                self._metric_lines = storage.read_bytes(self.metrics_uri).decode().splitlines()
            self._metric_lines.append(line)
            storage.write_bytes(self.metrics_uri, ("\n".join(self._metric_lines) + "\n").encode())
        else:
            Path(self.metrics_uri).parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_uri, "a") as f:
                f.write(line + "\n")


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
