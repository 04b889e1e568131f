"""Ray Tune sweeps over our trainers (Tune over Train V2), and their resumption.

Each trial is a function trainable (a small driver, `{"cpu": trial_cpus}`) that derives its config from the base
config with the trial's knob values, then calls the method's normal `train(cfg)` (the same code path as
`apps.train`) with `TuneReportCallback()` among the Ray Train callbacks, so every training report reaches Tune.
The inner run is named after the trial id, so a restarted trial resumes its own run. After training, the trial
scores its checkpoint (IKDDiT: FID-N) and reports the score once more.

Sweep folder (``<storage>/<name>/``)::

    sweep.yaml            the resolved sweep (method, base config, space, scheduler, score settings)
    trial_base.yaml       the config every trial starts from (IKDDiT: phase student + the shared teacher)
    shared/, shared-teacher/   work done once for all trials (IKDDiT: training set and teacher)
    trials/<trial_id>-student/ each trial's run folder: config.yaml, metrics.jsonl, checkpoints, model/
    tune/                 Ray Tune's experiment state (what --resume restores)
    results.csv, results.parquet, results.md, <score>_vs_<knob>.png, best_config.yaml
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from fabdistill import console, storage
from fabdistill.config import ConfigError, dump_yaml, from_dict, knob, load_config, read_yaml, section, to_dict
from tune.spaces import (Axis, MethodSpace, ScoreSettings, describe_axes, get_space, parse_axis, trial_config,
                         validate_space)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# CPUs left for Ray Data's read tasks when capping concurrency (see RAY_NOTES: a full cluster starves Data).
DATA_RESERVE_CPU = 1.0


# --------------------------------------------------------------------------- sweep config

@dataclasses.dataclass
class ScoreSection:
    n: int = knob(500, ge=2, le=1_000_000, help="samples per side for FID-N / KID")
    steps: int = knob(50, ge=1, le=4000, help="sampler steps (DDIM)")
    seed: int = knob(0, ge=0, help="sampling seed, shared by every trial")
    batch_size: int = knob(256, ge=1, le=65536)


@dataclasses.dataclass
class AshaSection:
    time_attr: str = knob("", choices=("", "step", "training_iteration"),
                          help="progress measure: the trainer's step, or Tune's count of reports; empty: the "
                               "method's own (its space's time_attr)")
    max_t: int = knob(0, ge=0, help="0: the trial's training steps")
    grace_period: int = knob(0, ge=0, help="progress before a trial can be stopped; 0: max_t // 4")
    reduction_factor: float = knob(2.0, gt=1, le=100, help="keep the best 1/rf at each rung")


@dataclasses.dataclass
class SweepConfig:
    method: str = knob("ikddit", help="a registered method with a sweep space (fabdistill/methods.py)")
    config: str = knob("", help="the method's base config YAML (empty: its defaults)")
    overrides: list[str] = knob([], help="KEY=VALUE overrides of the base config (like apps.train --set)")
    space: dict[str, Any] = knob({}, help="knob -> list of values or 'uniform|loguniform|randint:LOW:HIGH'")
    scheduler: str = knob("grid", choices=("grid", "asha"),
                          help="grid: every trial runs to the end; asha: stop weak trials on the training loss")
    trials: int = knob(0, ge=0, le=100_000, help="0: the grid of list axes; N: N random samples of the space")
    name: str = knob("", help="sweep folder name; empty: <method>-<knobs>")
    storage: str = knob("runs/sweeps", help="local directory or s3://bucket/prefix holding the sweep folder")
    max_concurrent: int = knob(0, ge=0, le=10_000, help="0: as many trials as the cluster's CPUs allow")
    trial_cpus: float = knob(0.25, gt=0, le=64, help="CPU of each trial's driver (zero is refused by Ray)")
    score: ScoreSection = section(ScoreSection)
    asha: AshaSection = section(AshaSection)


def load_sweep(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> SweepConfig:
    """A sweep YAML (configs/sweep_*.yaml) with KEY=VALUE overrides, validated like any config."""
    return load_config(SweepConfig, path, overrides)


def sweep_name(sweep: SweepConfig) -> str:
    return sweep.name or f"{sweep.method}-" + "-".join(sorted(sweep.space))


def sweep_dir(sweep: SweepConfig) -> str:
    base = sweep.storage if storage.is_s3(sweep.storage) else str(Path(sweep.storage).resolve())
    return storage.join(base, sweep_name(sweep))


def _tune_storage(path: str) -> tuple[Optional[Any], str]:
    """(pyarrow filesystem or None, path) for Tune; a custom S3 endpoint needs an explicit filesystem."""
    if storage.is_s3(path):
        return storage.pyarrow_fs(path)
    return None, path


def axes_of(sweep: SweepConfig) -> dict[str, Axis]:
    return {name: parse_axis(name, spec) for name, spec in sweep.space.items()}


# --------------------------------------------------------------------------- the trial

def sweep_trial(config: dict, context: dict) -> None:
    """Tune function trainable: train one point of the space through the method's own train(), then score it."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    space = get_space(context["method"])
    trial_id = ray_tune.get_context().get_trial_id()
    base = json.loads(json.dumps(context["base"]))
    # Named after the trial id: a restarted trial (e.g. after --resume) resumes its own run's checkpoints.
    base["run"]["name"] = trial_id
    base["run"]["storage_path"] = context["trials_dir"]
    cfg = trial_config(space, base, config, source=f"trial {trial_id}")
    outcome = space.train_trial(cfg, [TuneReportCallback()])
    trained = space.trained_run(outcome)
    scores = space.score(outcome, cfg, ScoreSettings(**context["score"]))
    last = trained.metrics or {}
    final = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    final.update({
        "step": last.get("step", 0),
        # Every result must carry the scheduler's metric (Tune checks); this is the last training value.
        space.early_stop_metric: last.get(space.early_stop_metric, math.nan),
        "scored": 1,
        "run_dir": trained.run_dir,
        "checkpoint_dir": trained.checkpoint_dir or "",
    })
    ray_tune.report(final)


def check_sweep(sweep: SweepConfig) -> Any:
    """Validate a sweep without running anything; returns the user's base config of the method."""
    from tune.spaces import config_class

    space = get_space(sweep.method)
    axes = axes_of(sweep)
    if not axes:
        raise ConfigError("the sweep's space is empty: give at least one --space KNOB=V1,V2,...")
    if not sweep.trials and any(a.is_distribution for a in axes.values()):
        raise ConfigError("a distribution axis (uniform/loguniform/randint) needs --trials N random samples")
    user_cfg = load_config(config_class(sweep.method), sweep.config or None, sweep.overrides)
    validate_space(space, to_dict(user_cfg), axes)
    return user_cfg


def _console_callbacks(space: MethodSpace, knobs: list[str]) -> list:
    """Quiet mode's Tune output: one line when a trial starts, finishes (with its score) or fails. Verbose mode
    keeps Tune's own status tables (RunConfig verbose=2) and adds nothing."""
    if console.verbose():
        return []
    from ray.tune import Callback

    score_name = space.score_name  # what the class closes over is pickled into the sweep's state: keep it small

    class TrialLines(Callback):
        def _label(self, trial: Any) -> str:
            point = ", ".join(f"{k}={trial.config.get(k)}" for k in knobs)
            return f"[sweep] trial {trial.trial_id} ({point})"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            console.say(f"{self._label(trial)} started ({sum(t.status == 'RUNNING' for t in trials)} running)")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            score = result.get(score_name)
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            what = (f"{score_name} {score:.4g}" if isinstance(score, (int, float)) and result.get("scored")
                    else f"stopped at step {result.get('step', '?')}")
            console.say(f"{self._label(trial)} finished: {what} ({done}/{len(trials)} done)")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            console.say(f"{self._label(trial)} failed; its error is in results.md and the trial's folder")

    return [TrialLines()]


def _trainable(context: dict, trial_cpus: float) -> Any:
    from ray import tune as ray_tune

    return ray_tune.with_resources(ray_tune.with_parameters(sweep_trial, context=context), {"cpu": trial_cpus})


def max_concurrency(requested: int, trial_cpus: float, run: dict, training_cpus: Optional[float] = None) -> int:
    """Trials the cluster can run at once: driver + training per trial, leaving room for Ray Data's reads.
    `training_cpus` (from the space's `trial_cpus` hook) overrides run.num_workers × cpus_per_worker."""
    import ray

    if training_cpus is None:
        training_cpus = run["num_workers"] * run["cpus_per_worker"]
    per_trial = trial_cpus + training_cpus
    resources = ray.cluster_resources()
    total = float(resources.get("CPU", 1.0))
    fit = max(1, int((total - DATA_RESERVE_CPU) // per_trial))
    if run.get("use_gpu") and run["num_workers"] > 0:
        fit = max(1, min(fit, int(resources.get("GPU", 0) // run["num_workers"])))
    if requested and requested > fit:
        print(f"[sweep] max_concurrent {requested} capped to {fit}: each trial takes {per_trial:g} CPU of "
              f"{total:g}" + (f" and {run['num_workers']} GPU" if run.get("use_gpu") else ""), flush=True)
    return min(requested, fit) if requested else fit


def _scheduler(sweep: SweepConfig, space: MethodSpace, base: dict) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "grid":
        return FIFOScheduler()
    from tune.spaces import get_path

    max_t = sweep.asha.max_t or int(get_path(base, space.steps_path))
    grace = sweep.asha.grace_period or max(1, max_t // 4)
    if grace > max_t:
        raise ConfigError(f"asha.grace_period {grace} exceeds asha.max_t {max_t}")
    # stop_last_trials=False: a trial that reached max_t still has to score its checkpoint.
    return ASHAScheduler(time_attr=sweep.asha.time_attr or space.time_attr, metric=space.early_stop_metric,
                         mode="min",
                         max_t=max_t, grace_period=grace, reduction_factor=sweep.asha.reduction_factor,
                         stop_last_trials=False)


# --------------------------------------------------------------------------- driver

@dataclasses.dataclass
class SweepOutcome:
    sweep_dir: str
    rows: list[dict]                 # one per trial, see tune/report.py
    best: Optional[dict]             # the best finished row, or None
    files: dict[str, str]            # what was written: results_csv, results_md, best_config, plots...
    complete: bool                   # False when interrupted with unfinished trials (--resume continues)


def run_sweep(sweep: SweepConfig, *, resume: bool = False, callbacks: Optional[list] = None) -> SweepOutcome:
    """Run (or with `resume`, continue) a sweep; write the results table, plots and best config.

    `callbacks`: extra `ray.tune.Callback`s for the experiment (progress hooks, notifications); a resumed sweep
    keeps the ones it started with (Tune restores its RunConfig).
    Interrupting the driver (Ctrl-C / SIGINT, SIGUSR1) stops the sweep after saving its state; `resume=True`
    then keeps finished trials and continues unfinished and errored ones, each resuming its own training run.
    """
    from ray import tune as ray_tune

    from trainers.launch import ensure_ray

    ensure_ray()
    folder = sweep_dir(sweep)
    tune_path = storage.join(folder, TUNE_DIR)
    fs, folder_fs_path = _tune_storage(folder)
    tune_fs_path = f"{folder_fs_path.rstrip('/')}/{TUNE_DIR}"
    exists = ray_tune.Tuner.can_restore(tune_fs_path, storage_filesystem=fs)
    if resume:
        if not storage.exists(storage.join(folder, "sweep.yaml")):
            raise FileNotFoundError(f"{folder}: no sweep to resume (no sweep.yaml); run without --resume")
        sweep = load_sweep(storage.join(folder, "sweep.yaml"))  # the saved spec wins over the command line
    elif exists or storage.exists(storage.join(folder, "sweep.yaml")):
        raise ConfigError(f"sweep '{sweep_name(sweep)}' already exists at {folder}: pass --resume to continue it, "
                          f"or choose another --name")

    space = get_space(sweep.method)
    axes = axes_of(sweep)
    random = sweep.trials > 0
    user_cfg = None
    if not resume:
        user_cfg = check_sweep(sweep)  # fail before anything is written or trained
        storage.makedirs(folder)
        storage.write_bytes(storage.join(folder, "sweep.yaml"), dump_yaml(sweep).encode())

    base_file = storage.join(folder, "trial_base.yaml")
    if storage.exists(base_file):
        trial_base = read_yaml(base_file)
    else:
        from tune.spaces import config_class

        user_cfg = user_cfg or check_sweep(sweep)
        print(f"[sweep] {sweep_name(sweep)}: {sweep.method} over {', '.join(describe_axes(axes))} "
              f"({'random x' + str(sweep.trials) if random else 'grid'}, scheduler {sweep.scheduler}) in {folder}",
              flush=True)
        trial_base = to_dict(space.prepare_base(user_cfg, folder))
        storage.write_bytes(base_file, dump_yaml(from_dict(config_class(sweep.method), trial_base)).encode())
        storage.write_bytes(storage.join(folder, "user_run.json"), json.dumps(to_dict(user_cfg.run)).encode())

    context = {"method": sweep.method, "base": trial_base, "trials_dir": storage.join(folder, TRIALS_DIR),
               "score": dataclasses.asdict(ScoreSettings(**dataclasses.asdict(sweep.score)))}
    trainable = _trainable(context, sweep.trial_cpus)
    if resume and exists:
        print(f"[sweep] resuming {tune_path}: finished trials are kept, unfinished and errored ones continue",
              flush=True)
        tuner = ray_tune.Tuner.restore(tune_fs_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
    else:
        param_space = {name: axis.to_ray(random) for name, axis in axes.items()}
        tuner = ray_tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray_tune.TuneConfig(
                scheduler=_scheduler(sweep, space, trial_base),
                num_samples=sweep.trials if random else 1,
                max_concurrent_trials=max_concurrency(
                    sweep.max_concurrent, sweep.trial_cpus, trial_base["run"],
                    space.trial_cpus(trial_base) if space.trial_cpus is not None else None),
                reuse_actors=False,  # a stopped trial's actor (and the Train run it owns) must go away
            ),
            run_config=ray_tune.RunConfig(name=TUNE_DIR, storage_path=folder_fs_path, storage_filesystem=fs,
                                          # quiet: one line per trial event instead of Tune's tables
                                          verbose=2 if console.verbose() else 0,
                                          callbacks=[*(callbacks or []), *_console_callbacks(space, list(axes))],
                                          failure_config=ray_tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()  # trial failures do not raise: they become rows with status "error"
    return finish_sweep(sweep, folder, trial_base)


def finish_sweep(sweep: SweepConfig, folder: str, trial_base: Optional[dict] = None) -> SweepOutcome:
    """Collect the trials of the sweep's Tune experiment (read from storage) into results files and the best
    config. Also rewrites the results of an interrupted sweep, whose unfinished trials show as such."""
    from ray.tune import ExperimentAnalysis

    from tune.report import STATUS_UNFINISHED, best_row, collect_rows, write_results

    space = get_space(sweep.method)
    axes = axes_of(sweep)
    if trial_base is None:
        trial_base = read_yaml(storage.join(folder, "trial_base.yaml"))
    fs, folder_fs_path = _tune_storage(folder)
    analysis = ExperimentAnalysis(f"{folder_fs_path.rstrip('/')}/{TUNE_DIR}", storage_filesystem=fs)
    rows = collect_rows(analysis, space, list(axes))
    best = best_row(rows, space)
    best_cfg = None
    if best is not None:
        best_cfg = best_config(space, trial_base, {k: best[k] for k in axes}, folder)
    files = write_results(folder, rows, space, axes, ScoreSettings(**dataclasses.asdict(sweep.score)),
                          best=best, best_cfg=best_cfg, header=_header(sweep))
    complete = not any(r["status"] == STATUS_UNFINISHED for r in rows)
    if not complete:
        print(f"[sweep] interrupted with unfinished trials; continue with: python -m apps.sweep --name "
              f"{sweep_name(sweep)} --storage {sweep.storage} --resume", flush=True)
    return SweepOutcome(folder, rows, best, files, complete)


def best_config(space: MethodSpace, trial_base: dict, point: dict, folder: str) -> Any:
    """The best trial's full config, with the user's own run section (renamed) so retraining it is one command."""
    from tune.spaces import config_class

    data = json.loads(json.dumps(trial_base))
    user_run_file = storage.join(folder, "user_run.json")
    if storage.exists(user_run_file):
        data["run"] = json.loads(storage.read_bytes(user_run_file).decode())
    data["run"]["name"] = f"{folder.rstrip('/').rsplit('/', 1)[-1]}-best"
    cfg = trial_config(space, data, point, source="best trial")
    return from_dict(config_class(space.method), to_dict(cfg))


def _header(sweep: SweepConfig) -> str:
    cmd = ["python -m apps.sweep", sweep.method]
    if sweep.config:
        cmd += ["--config", sweep.config]
    cmd += [f"--set {o}" for o in sweep.overrides]
    cmd += [f"--space {s}" for s in describe_axes(axes_of(sweep))]
    cmd += [f"--scheduler {sweep.scheduler}"] + ([f"--trials {sweep.trials}"] if sweep.trials else [])
    cmd += [f"--score-n {sweep.score.n}", f"--score-steps {sweep.score.steps}", f"--name {sweep_name(sweep)}"]
    return " ".join(c for c in cmd if c)
