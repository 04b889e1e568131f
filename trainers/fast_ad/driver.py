"""Fast-AD's driver: start the replay buffer, K synthesis actors and the student learner on Ray, watch them
(progress lines, metrics.jsonl, Tune reports inside a sweep), and shut everything down cleanly.

    python -m apps.train fast_ad --config configs/fast_ad.yaml        (teacher and DDPM first: docs/fast_ad.md)

Fast-AD is the one method that is not a Ray Train loop (its work is three kinds of concurrent actors), so it
does not go through trainers.launch.launch(); it shares that module's run folder, checkpoint and JSONL helpers.
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Any, Callable, Optional

from fabdistill import storage
from fabdistill.checkpoints import resolve_checkpoint
from fabdistill.config import save_config
from fabdistill.methods import TrainOutcome
from trainers.fast_ad.actors import StudentLearner, SynthesisWorker
from trainers.fast_ad.config import Config, learner_spec, synthesis_spec
from trainers.fast_ad.learner import MODEL_DIR
from trainers.fast_ad.replay import ReplayBuffer
from trainers.launch import append_jsonl, ensure_ray, run_dir

# the summary keys train() returns as TrainOutcome.metrics (a sweep reads step and kd_loss from them)
SUMMARY_KEYS = ("step", "kd_loss", "heldout_top1", "teacher_agreement", "images", "elapsed_s", "steps_per_s",
                "images_per_s", "loop_s")


def check_checkpoints(cfg: Config) -> None:
    """Fail before any actor starts if the teacher or the prior is missing, saying how to train it."""
    for what, path, cmd in (("teacher", cfg.models.teacher_checkpoint,
                             "classifier --config configs/classifier_wafer.yaml"),
                            ("diffusion", cfg.models.diffusion_checkpoint, "ddpm --config configs/ddpm_wafer.yaml")):
        try:
            resolve_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} checkpoint not found at {path!r}: train it first with "
                                    f"`python -m apps.train {cmd}` (see docs/fast_ad.md) or set "
                                    f"models.{what}_checkpoint") from None


def in_tune_trial() -> bool:
    """Whether this process runs a Ray Tune trial (a sweep), where progress goes to ray.tune.report."""
    from ray import tune as ray_tune

    with warnings.catch_warnings():  # outside Tune, get_trial_id() warns and returns None
        warnings.simplefilter("ignore")
        return ray_tune.get_context().get_trial_id() is not None


def run_fast_ad(cfg: Config, on_tick: Optional[Callable[[float, dict], None]] = None,
                tune_report: bool = False) -> dict[str, Any]:
    """Run the concurrent synthesis → buffer → learner loop on Ray; print progress, write metrics.jsonl.

    on_tick(elapsed_s, {"workers": [...], "learner": handle, "buffer": handle, "buffer_stats": {...},
    "progress": {...}}) is called at every progress interval (fault-injection tests use it). With `tune_report`,
    every interval in which the student trained is also reported to Tune ({"step", "kd_loss", "heldout_top1"}: what
    ASHA compares trials on).
    Returns a summary: student steps and steps/s, images and images/s, buffer stats, held-out accuracy history,
    the student checkpoint folder, and (with loop.record_timeline) every push and learner step as (start, end).
    """
    import ray

    check_checkpoints(cfg)
    ensure_ray()
    out = run_dir(cfg.run)
    storage.makedirs(out)
    save_config(cfg, storage.join(out, "config.yaml"))
    metrics_uri = storage.join(out, "metrics.jsonl")
    L = cfg.loop
    # Outside any placement group: inside a Tune trial, child actors would otherwise be captured by the trial's
    # placement group, which holds only the trial driver's CPU, and could never be scheduled.
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    own = {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    restart_opts = {"max_restarts": L.max_restarts, "max_task_retries": L.max_task_retries, **own}

    buffer_name = f"fast_ad_buffer_{cfg.run.name}_{uuid.uuid4().hex[:8]}"
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0, name=buffer_name, **own).remote(
        cfg.buffer.size, cfg.buffer.min_uses, cfg.run.seed, L.record_timeline)
    ray.get(buffer.is_stopped.remote())  # registered before anyone looks it up by name
    synth = synthesis_spec(cfg)
    workers = [ray.remote(SynthesisWorker).options(num_cpus=cfg.synthesis.num_cpus, num_gpus=cfg.synthesis.num_gpus,
                                                   **restart_opts).remote(i, synth, buffer_name)
               for i in range(cfg.synthesis.num_workers)]
    learner = ray.remote(StudentLearner).options(num_cpus=cfg.student.num_cpus, num_gpus=cfg.student.num_gpus,
                                                 max_concurrency=2, **restart_opts).remote(
        learner_spec(cfg, out), buffer_name)
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
            append_jsonl(metrics_uri, row)
            print("[fast_ad] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items() if v is not None), flush=True)
            if tune_report and row["kd_loss"] is not None:  # ASHA needs its metric in every result
                from ray import tune as ray_tune

                ray_tune.report({"step": row["student_step"], "kd_loss": row["kd_loss"],
                                 "heldout_top1": row["heldout_top1"]})
            last = {"t": now, "images": bstats["total_put"], "steps": prog.get("step") or last["steps"]}
            if on_tick is not None:
                on_tick(now - t0, {"workers": workers, "learner": learner, "buffer": buffer,
                                   "buffer_stats": bstats, "progress": prog})
            if ready:
                break
        summary.update(ray.get(learner_ref))
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
    final = summary["history"][-1] if summary.get("history") else {}
    recent = summary.get("losses", [])[-20:]
    summary.update({
        "loop_s": loop_s,
        "elapsed_s": elapsed, "images": bstats["total_put"], "buffer": bstats, "workers": worker_results,
        "workers_unfinished": len(pending), "puts": timeline, "rows": rows,
        "images_per_s": bstats["total_put"] / elapsed, "steps_per_s": summary.get("step", 0) / elapsed,
        "checkpoint_dir": storage.join(out, MODEL_DIR),
        "kd_loss": sum(recent) / len(recent) if recent else None,
        "heldout_top1": final.get("heldout_top1"), "teacher_agreement": final.get("teacher_agreement"),
    })
    append_jsonl(metrics_uri, {"final": True, "elapsed_s": round(elapsed, 2), "student_step": summary.get("step"),
                               "images": bstats["total_put"], "buffer_max_fill": bstats["max_fill"],
                               "kd_loss": summary["kd_loss"], "heldout_top1": final.get("heldout_top1"),
                               "teacher_agreement": final.get("teacher_agreement")})
    print(f"[fast_ad] done: {summary.get('step')} student steps, {bstats['total_put']} images in {elapsed:.1f}s; "
          f"held-out top-1 {final.get('heldout_top1')}; student checkpoint {summary['checkpoint_dir']}", flush=True)
    return summary


def to_outcome(summary: dict[str, Any]) -> TrainOutcome:
    """run_fast_ad's summary as the TrainOutcome every method returns (metrics: the scalar SUMMARY_KEYS)."""
    return TrainOutcome(run_dir=summary["run_dir"], checkpoint_dir=summary["checkpoint_dir"],
                        metrics={k: summary.get(k) for k in SUMMARY_KEYS})


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Entry point of `python -m apps.train fast_ad` and of a sweep trial: the concurrent loop on (local or
    cluster) Ray. Returns TrainOutcome(run_dir, checkpoint_dir = the exported student, metrics = the summary).

    `callbacks` are what a Tune sweep passes (Ray Train callbacks, which have no Train run to attach to here):
    given inside a Tune trial, progress is reported with ray.tune.report instead, and the trial's score (held-out
    top-1 of the exported student, trainers/fast_ad/tune.py) is computed by the sweep after train returns.
    """
    tune_report = False
    if callbacks:
        if not in_tune_trial():
            raise ValueError("fast_ad runs on Ray actors, not Ray Train: callbacks are only accepted inside a Ray "
                             "Tune trial (apps.sweep), where progress goes to ray.tune.report")
        tune_report = True
    return to_outcome(run_fast_ad(cfg, tune_report=tune_report))
