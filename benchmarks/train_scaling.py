"""Ray Train scaling of the IKDDiT DiT teacher: 1 worker vs 2 workers at one torch thread each, and 1 worker with
2 threads, at equal per-worker batch, side by side in one run, with where each step's time goes.

    python benchmarks/train_scaling.py --growth             # tiny DiT teacher, 32x32 maps, 128 a worker, 60 steps
    python benchmarks/train_scaling.py --size S --batch 16 --steps 40

A fourth case streams the set through Ray Data on 2 workers (data.loader=stream) against the same in memory.
Two more rows give the machine's own ceiling for two workers: the same training in-process (no Ray, no DDP), once
alone and as two independent processes at once (their summed samples/s over one alone is what two cores give two
processes that never communicate). `--growth` adds how a step's cost grows with map size and per-worker batch
(in-process, one thread: map size 16/32/64 at the batch, batch ×1/×2/×4 at the map size).
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


def _one_process_overrides(args: argparse.Namespace, storage: str, name: str, map_size: int, batch: int) -> list[str]:
    return [f"model.size={args.size}", f"data.map_size={map_size}", f"data.num_train={args.num_train}",
            "phase=teacher", f"teacher.steps={args.steps}", f"teacher.batch_size={batch}",
            f"teacher.log_every={args.log_every}", f"teacher.checkpoint_every={args.steps}", "run.num_workers=0",
            "run.torch_threads=1", "run.tensorboard=false", f"run.storage_path={storage}", f"run.name={name}"]


def run_in_process(args: argparse.Namespace, storage: str, name: str, map_size: int, batch: int) -> dict:
    """The same teacher training in this process (no Ray, no DDP), one torch thread: steady samples/s, ms/step."""
    from fabdistill.config import load_config
    from trainers.ikddit import Config, train
    from trainers.launch import read_metrics

    cfg = load_config(Config, args.config, _one_process_overrides(args, storage, name, map_size, batch))
    rows = [r for r in read_metrics(train(cfg).phase("teacher").run_dir) if "loss" in r]
    rate, step_s = steady_rate(rows, batch)
    return {"name": name, "map_size": map_size, "batch": batch, "samples_per_s": rate, "step_ms": 1000 * step_s}


def machine_ceiling(args: argparse.Namespace, storage: str) -> dict:
    """One in-process training alone, then two at once as separate processes (they share nothing but the
    machine): the summed samples/s of the pair over the one alone."""
    import json
    import subprocess

    def launch(name: str) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--_in-process", name, "--storage", storage, "--config", args.config,
               "--size", args.size, "--map-size", str(args.map_size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--log-every", str(args.log_every), "--num-train", str(args.num_train)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen) -> dict:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"in-process case failed (exit {proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])

    alone = result(launch("ceiling-alone"))
    pair = [launch("ceiling-pair-a"), launch("ceiling-pair-b")]
    both = [result(p) for p in pair]
    summed = sum(r["samples_per_s"] for r in both)
    return {"alone": alone, "pair": both, "pair_samples_per_s": summed, "ratio": summed / alone["samples_per_s"]}


def growth(args: argparse.Namespace, storage: str) -> list[dict]:
    cases = [(m, args.batch) for m in (16, 32, 64)] + [(args.map_size, b) for b in (2 * args.batch, 4 * args.batch)]
    out = []
    for map_size, batch in cases:
        out.append(run_in_process(args, storage, f"growth-m{map_size}-b{batch}", map_size, batch))
        print(f"[scaling] growth map {map_size} batch {batch}: {out[-1]['step_ms']:.1f} ms/step", flush=True)
    return out


def growth_markdown(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = ["", f"**Cost growth** (in-process, one thread, size {args.size}; tokens = (map/4)²)", "",
             "| map size | tokens | batch | ms / step | samples/s |", "|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["map_size"], r["batch"])):
        lines.append(f"| {r['map_size']} | {(r['map_size'] // 4) ** 2} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['samples_per_s']:.1f} |")
    return lines


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
              *([f"- machine ceiling: two independent in-process trainings at once / one alone: "
                 f"**{ratios['ceiling']:.2f}x** ({ratios['ceiling_alone']:.1f} samples/s alone, "
                 f"{ratios['ceiling_pair']:.1f} summed for the pair; no Ray, no DDP): 2 Ray Train workers reach "
                 f"{ratios['two_workers'] / ratios['ceiling']:.0%} of it"] if "ceiling" in ratios else []),
              "- section columns: per-step means (ms) on rank 0 (run.profile); all-reduce overlaps backward (it is "
              "part of the backward column); report: the metrics report every --log-every steps, per step; other: "
              "step ms minus the disjoint sections (loop bookkeeping between them)",
              "", "Reproduce: `python benchmarks/train_scaling.py" + "".join(" " + a for a in args.argv) + "` (see --help)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ikddit_tiny.yaml")
    p.add_argument("--size", default="tiny", help="models/dit.py DIT_SIZES")
    p.add_argument("--map-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128, help="maps per worker per step (equal in every case)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--storage", default="", help="run storage (default: a temporary folder)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the in-process machine-ceiling rows")
    p.add_argument("--growth", action="store_true", help="also measure cost growth with map size and batch")
    p.add_argument("--_in-process", dest="in_process", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--storage" and a != args.storage]
    storage = args.storage or tempfile.mkdtemp(prefix="train-scaling-")
    if args.in_process:  # one machine-ceiling process: its result as the last line of stdout
        import json

        print(json.dumps(run_in_process(args, storage, args.in_process, args.map_size, args.batch)), flush=True)
        return {}
    results = []
    for label, workers, threads, loader in CASES:
        results.append(run_case(label, workers, threads, loader, args, storage))
        print(f"[scaling] {label}: {results[-1]['samples_per_s']:.1f} samples/s", flush=True)
    base = results[0]["samples_per_s"]
    ratios = {"two_workers": results[1]["samples_per_s"] / base, "two_threads": results[2]["samples_per_s"] / base,
              "stream_vs_memory": results[3]["samples_per_s"] / results[1]["samples_per_s"]}
    ceiling = None
    if not args.no_ceiling:
        ceiling = machine_ceiling(args, storage)
        ratios.update(ceiling=ceiling["ratio"], ceiling_alone=ceiling["alone"]["samples_per_s"],
                      ceiling_pair=ceiling["pair_samples_per_s"])
        print(f"[scaling] machine ceiling for two processes: {ceiling['ratio']:.2f}x", flush=True)
    grown = growth(args, storage) if args.growth else []
    md = markdown(results, args, ratios) + ("\n" + "\n".join(growth_markdown(grown, args)) if grown else "")
    print(md)
    write_results("train_scaling", {"args": vars(args), "results": results, "ratios": ratios, "ceiling": ceiling,
                                    "growth": grown}, md)
    return {"results": results, "ratios": ratios, "ceiling": ceiling, "growth": grown}


if __name__ == "__main__":
    main()
