"""Ray Train scaling of the IKDDiT DiT teacher: 1 worker vs 2 workers at one torch thread each, and 1 worker with
2 threads, at equal per-worker batch, side by side in one run, with where each step's time goes.

    python benchmarks/train_scaling.py                      # tiny DiT teacher, 32x32 maps, 80 steps a case
    python benchmarks/train_scaling.py --size S --batch 16 --steps 40

A fourth case streams the set through Ray Data on 2 workers (data.loader=stream) against the same in memory.
Every case trains the same teacher (trainers/ikddit.py, phase=teacher) through the shared Ray Train path
(trainers/launch.py) with `run.profile=true` (per-step section timers and DDP's all-reduce time,
trainers/profiling.py) and `run.torch_threads`. Steady-state samples/s come from the metrics rows after the first
report (start-up, Ray worker group and first-step allocation excluded): global batch × steps / seconds between the
first and the last report. Target (issue 13): 2 workers ≥ 1.7× one worker, one thread each. Writes
benchmarks/results/train_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, write_results  # noqa: E402

CASES = [  # (label, workers, torch threads per worker, data.loader)
    ("1 worker x 1 thread", 1, 1, "memory"),
    ("2 workers x 1 thread", 2, 1, "memory"),
    ("1 worker x 2 threads", 1, 2, "memory"),
    ("2 workers x 1 thread, streamed", 2, 1, "stream"),
]
SECTIONS = ("data", "forward", "backward", "optimizer", "report", "allreduce")
TIMED = ("data", "forward", "backward", "optimizer", "report")  # disjoint; all-reduce overlaps backward


def steady_rate(rows: list[dict], global_batch: int) -> tuple[float, float]:
    """(samples/s, s/step) between the first and the last metrics row that carry a step and elapsed_s."""
    timed = [r for r in rows if isinstance(r.get("elapsed_s"), (int, float)) and "step" in r]
    if len(timed) < 2:
        raise RuntimeError("fewer than 2 timed reports: raise --steps or lower --log-every")
    first, last = timed[0], timed[-1]
    steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
    return global_batch * steps / seconds, seconds / steps


def profile_means(rows: list[dict]) -> dict[str, float]:
    """Per-step section means (ms) over the reports after the first (the first holds start-up)."""
    later = rows[1:] or rows
    return {name: statistics.fmean(r.get(f"prof_{name}_ms", 0.0) for r in later) for name in SECTIONS}


def run_case(label: str, workers: int, threads: int, loader: str, args: argparse.Namespace, storage: str) -> dict:
    from fabdistill.config import load_config
    from trainers.ikddit import Config, train
    from trainers.launch import read_metrics

    # Ray Data's read tasks need a free CPU beside the workers (docs/data.md): reserve half a CPU a worker and
    # let run.torch_threads say how many threads each really uses.
    overrides = ["phase=teacher", f"model.size={args.size}", f"data.num_train={args.num_train}",
                 f"data.map_size={args.map_size}", f"teacher.steps={args.steps}",
                 f"teacher.batch_size={args.batch}", f"teacher.log_every={args.log_every}",
                 f"teacher.checkpoint_every={args.steps}", f"run.num_workers={workers}",
                 "run.cpus_per_worker=0.5", f"run.torch_threads={threads}", "run.profile=true",
                 "run.tensorboard=false", f"run.storage_path={storage}", f"data.loader={loader}",
                 f"run.name=scale-{workers}w{threads}t-{loader}"]
    cfg = load_config(Config, args.config, overrides)
    outcome = train(cfg)
    rows = [r for r in read_metrics(outcome.phase("teacher").run_dir) if "loss" in r]
    rate, step_s = steady_rate(rows, args.batch * workers)
    profile = profile_means(rows)
    profile["other"] = 1000 * step_s - sum(profile[name] for name in TIMED)
    return {"case": label, "workers": workers, "threads": threads, "loader": loader, "samples_per_s": rate,
            "step_ms": 1000 * step_s, "profile_ms": profile}


def markdown(results: list[dict], args: argparse.Namespace, ratios: dict[str, float]) -> str:
    base = results[0]["samples_per_s"]
    lines = [f"**Ray Train scaling, IKDDiT DiT teacher** (size {args.size}, {args.map_size}x{args.map_size} maps, "
             f"{args.batch} maps per worker per step, {args.steps} steps a case, steady state after the first "
             f"report; {machine()['cpu_count']} CPUs)", "",
             "| case | samples/s | vs 1x1 | step ms | data | forward | backward | (all-reduce in flight) | "
             "optimizer | report | other |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r["profile_ms"]
        lines.append(f"| {r['case']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | "
                     f"{r['step_ms']:.1f} | {p['data']:.1f} | {p['forward']:.1f} | {p['backward']:.1f} | "
                     f"{p['allreduce']:.1f} | {p['optimizer']:.1f} | {p['report']:.1f} | {p['other']:.1f} |")
    lines += ["", f"- 2 workers x 1 thread / 1 worker x 1 thread: **{ratios['two_workers']:.2f}x** (target >= 1.7x: "
                  f"{'met' if ratios['two_workers'] >= 1.7 else 'NOT met'})",
              f"- 1 worker x 2 threads / 1 worker x 1 thread: {ratios['two_threads']:.2f}x",
              f"- 2 workers streamed (data.loader=stream) / 2 workers in memory: {ratios['stream_vs_memory']:.2f}x",
              "- section columns: per-step means (ms) on rank 0 (run.profile); all-reduce overlaps backward (it is "
              "part of the backward column); report: the metrics report every --log-every steps, per step; other: "
              "step ms minus the disjoint sections (loop bookkeeping between them)",
              "", "Reproduce: `python benchmarks/train_scaling.py` (see --help)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ikddit_tiny.yaml")
    p.add_argument("--size", default="tiny", help="models/dit.py DIT_SIZES")
    p.add_argument("--map-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="maps per worker per step (equal in every case)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--storage", default="", help="run storage (default: a temporary folder)")
    args = p.parse_args(argv)
    storage = args.storage or tempfile.mkdtemp(prefix="train-scaling-")
    results = []
    for label, workers, threads, loader in CASES:
        results.append(run_case(label, workers, threads, loader, args, storage))
        print(f"[scaling] {label}: {results[-1]['samples_per_s']:.1f} samples/s", flush=True)
    base = results[0]["samples_per_s"]
    ratios = {"two_workers": results[1]["samples_per_s"] / base, "two_threads": results[2]["samples_per_s"] / base,
              "stream_vs_memory": results[3]["samples_per_s"] / results[1]["samples_per_s"]}
    md = markdown(results, args, ratios)
    print(md)
    write_results("train_scaling", {"args": vars(args), "results": results, "ratios": ratios}, md)
    return {"results": results, "ratios": ratios}


if __name__ == "__main__":
    main()
