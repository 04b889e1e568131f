"""Every logit distiller for the same teacher, student and budget, over several seeds: held-out top-1 mean ± std,
side by side with the teacher and the student trained alone (distiller `none`).

Pairs (the seed's CIFAR-100 table, scaled to a CPU):
  homogeneous    ResNet32 → ResNet8: the seed's ResNet32x4 → ResNet8x4 at ¼ width (same depths), every distiller
  heterogeneous  ResNet32 → ShuffleNetV1-tiny (shufflev1_tiny): none, KD, DKD, SDD-DKD, SDD-LSKD

One teacher is trained once (trainers/classifier.py through sdd_lskd.train phase=teacher); every student run is
`sdd_lskd.train(phase=student)` with its own run.seed (student init and batches), in-process (run.num_workers=0),
all on the same 38-class mixed-type wafer maps (data/mixed_wafer.py) and the same held-out maps (seed 9001).
Results: benchmarks/results/sdd_lskd.{json,md}.

    python -m benchmarks.sdd_lskd                      # the CPU preset: ~45-55 min on 2 idle cores (see docs/sdd_lskd.md)
    python -m benchmarks.sdd_lskd --smoke              # a few minutes: tiny sizes, 2 seeds, to check the plumbing
    python -m benchmarks.sdd_lskd --config configs/sdd_lskd_cifar100.yaml --seeds 3 \\
        --work-dir runs/bench_sdd_lskd_c100                # the cluster run: ResNet32x4 → ResNet8x4 / ShuffleV1

Without --config the CPU preset below is applied on top of configs/sdd_lskd.yaml; with --config the config is used
as it is (only explicit flags and --set override it). Rerunning with the same --work-dir resumes finished runs
from their checkpoints (nothing is retrained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

ALL = ("none", "kd", "dkd", "lskd_kd", "lskd_dkd", "sdd_kd", "sdd_dkd", "sdd_lskd")
HETERO = ("none", "kd", "dkd", "sdd_dkd", "sdd_lskd")
LABELS = {"none": "student alone (CE)", "kd": "KD", "dkd": "DKD", "lskd_kd": "KD+LS", "lskd_dkd": "DKD+LS",
          "sdd_kd": "SDD-KD", "sdd_dkd": "SDD-DKD", "sdd_lskd": "SDD-LSKD"}
# The CPU preset (applied when no --config is given): 32×32 maps, ResNet32 → ResNet8 / ShuffleNetV1-tiny.
CPU_PRESET = [
    "data.size=32", "data.n_train=2500", "data.n_eval=1000",
    "teacher.arch=resnet32", "teacher.epochs=15", "teacher.batch_size=64", "teacher.warmup_steps=50",
    "student.epochs=10", "student.batch_size=64", "student.warmup=5", "student.scales=[1,2,4]",
    "run.num_workers=0",
]
SMOKE = ["data.size=16", "data.n_train=256", "data.n_eval=128", "teacher.epochs=2",
         "teacher.batch_size=32", "teacher.warmup_steps=4", "student.epochs=2", "student.batch_size=32",
         "student.warmup=1", "run.num_workers=0"]


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sdd_lskd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a configs/sdd_lskd*.yaml (default: the CPU preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per distiller (>= 3 for the table)")
    p.add_argument("--homo", default=None, help="teacher:student of the homogeneous pair (default: resnet32:resnet8 "
                                                "for the CPU preset, the config's teacher:student with --config)")
    p.add_argument("--hetero", default=None, help="teacher:student of the heterogeneous pair, same teacher (default: "
                                                  "<teacher>:shufflev1_tiny for the CPU preset, <teacher>:shufflev1 "
                                                  "with --config); '' skips it")
    p.add_argument("--distillers", default=",".join(ALL), help="distillers of the homogeneous pair")
    p.add_argument("--hetero-distillers", default=",".join(HETERO))
    p.add_argument("--work-dir", default="runs/bench_sdd_lskd", help="run folders (rerun resumes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (in-process runs)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 2 seeds: checks the plumbing only")
    p.add_argument("--out", default="sdd_lskd", help="results name under benchmarks/results/")
    return p.parse_args(argv)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import torch

    from benchmarks._common import write_results
    from fabdistill.config import load_config
    from trainers import sdd_lskd

    a = _args(argv)
    torch.set_num_threads(a.threads)
    overrides = (SMOKE if a.smoke else [] if a.config else CPU_PRESET) + list(a.set)
    seeds = 2 if a.smoke and a.seeds == 3 else a.seeds
    work = str(Path(a.work_dir).resolve())
    base = load_config(sdd_lskd.Config, a.config or "configs/sdd_lskd.yaml", overrides + [f"run.storage_path={work}"])
    homo = a.homo or (f"{base.teacher.arch}:{base.student.arch}" if a.config else
                      "resnet8:tiny" if a.smoke else "resnet32:resnet8")
    homo_t, homo_s = homo.split(":")
    if a.hetero is None:
        a.hetero = f"{homo_t}:{'shufflev1' if a.config else 'shufflev1_tiny'}"
    base = dataclasses.replace(base, teacher=dataclasses.replace(base.teacher, arch=homo_t))
    pairs = [("homogeneous", homo_t, homo_s, [d for d in a.distillers.split(",") if d])]
    if a.hetero:
        het_t, het_s = a.hetero.split(":")
        if het_t != homo_t:
            raise SystemExit(f"--hetero teacher {het_t} must be the homogeneous pair's teacher {homo_t}: one teacher")
        pairs.append(("heterogeneous", het_t, het_s, [d for d in a.hetero_distillers.split(",") if d]))
    for _, _, _, names in pairs:
        unknown = set(names) - set(ALL)
        if unknown:
            raise SystemExit(f"unknown distillers {sorted(unknown)}; choose from {', '.join(ALL)}")

    t0 = time.time()
    teacher_cfg = dataclasses.replace(base, phase="teacher", run=dataclasses.replace(base.run, name="bench"))
    teacher = sdd_lskd.train(teacher_cfg).phase("teacher")
    teacher_top1 = float(teacher.metrics["heldout_top1"])
    teacher_s = time.time() - t0
    print(f"[bench] teacher {homo_t}: held-out top-1 {teacher_top1:.4f} ({teacher_s:.0f} s)", flush=True)
    data = sdd_lskd.prepare_data(teacher_cfg)  # what the teacher trained on: every student reads the same rows
    student_data = dataclasses.replace(base.data, uri=data.train_uri, eval_uri=data.eval_uri,
                                       label_column=data.label_column)

    results: list[dict[str, Any]] = []
    for pair, t_arch, s_arch, names in pairs:
        for name in names:
            per_seed, spent = [], []
            for seed in range(seeds):
                s0 = time.time()
                cfg = dataclasses.replace(
                    base, phase="student", teacher_checkpoint=teacher.checkpoint_dir,
                    data=student_data,
                    student=dataclasses.replace(base.student, arch=s_arch, distiller=name),
                    run=dataclasses.replace(base.run, name=f"{pair}-{s_arch}-{name}-s{seed}", seed=seed))
                out = sdd_lskd.train(cfg)
                per_seed.append(float(out.metrics["heldout_top1"]))
                spent.append(time.time() - s0)
                print(f"[bench] {pair} {s_arch} {name} seed {seed}: {per_seed[-1]:.4f} ({spent[-1]:.0f} s)",
                      flush=True)
            mean, std = _mean_std(per_seed)
            results.append({"pair": pair, "teacher": t_arch, "student": s_arch, "distiller": name,
                            "label": LABELS[name], "top1_mean": mean, "top1_std": std, "top1_seeds": per_seed,
                            "seconds_per_run": statistics.fmean(spent)})
    verdicts = _verdicts(results)
    payload = {"config": a.config or "configs/sdd_lskd.yaml (CPU preset)", "overrides": overrides,
               "seeds": seeds, "teacher": {"arch": homo_t, "top1": teacher_top1, "seconds": teacher_s},
               "results": results, "verdicts": verdicts, "total_seconds": time.time() - t0, "smoke": a.smoke,
               "resolved": json.loads(json.dumps(dataclasses.asdict(base), default=str))}
    md = _markdown(payload)
    print(md)
    write_results(a.out, payload, md)
    return payload


def _row(results: list[dict], pair: str, name: str) -> Optional[dict]:
    return next((r for r in results if r["pair"] == pair and r["distiller"] == name), None)


def _verdicts(results: list[dict]) -> list[str]:
    """Plain sentences on the issue's two claims, from the means (with their spread)."""
    out = []
    for pair in dict.fromkeys(r["pair"] for r in results):
        alone = _row(results, pair, "none")
        if alone is not None:
            worse = [r["label"] for r in results if r["pair"] == pair and r["distiller"] != "none"
                     and r["top1_mean"] <= alone["top1_mean"]]
            out.append(f"{pair}: every distiller beats the student alone ({alone['top1_mean']:.4f})" if not worse
                       else f"{pair}: NOT every distiller beats the student alone ({alone['top1_mean']:.4f}); "
                            f"not above it: {', '.join(worse)}")
        chain = [_row(results, pair, n) for n in ("dkd", "sdd_dkd", "sdd_lskd")]
        if all(chain):
            fig = " < ".join(f"{r['label']} {r['top1_mean']:.4f} ± {r['top1_std']:.4f}" for r in chain)
            held = chain[0]["top1_mean"] < chain[1]["top1_mean"] < chain[2]["top1_mean"]
            out.append(f"{pair}: the seed's ordering DKD < SDD-DKD < SDD-LSKD is "
                       f"{'reproduced' if held else 'NOT reproduced'} by the means ({fig.replace(' < ', ', ')})")
    return out


def _markdown(p: dict) -> str:
    title = "SDD-LSKD benchmark" + (" (SMOKE: plumbing check, not a result)" if p["smoke"] else "")
    lines = [f"**{title}**: held-out top-1 over {p['seeds']} seeds (mean ± std), {p['config']}", "",
             "| pair | teacher → student | method | top-1 mean | ± std | Δ vs alone | per seed | s/run |",
             "|---|---|---|---:|---:|---:|---|---:|",
             f"| – | {p['teacher']['arch']} | teacher | {p['teacher']['top1']:.4f} | – | – | – | "
             f"{p['teacher']['seconds']:.0f} |"]
    for r in p["results"]:
        alone = _row(p["results"], r["pair"], "none")
        delta = f"{r['top1_mean'] - alone['top1_mean']:+.4f}" if alone and r["distiller"] != "none" else "–"
        seeds = ", ".join(f"{v:.3f}" for v in r["top1_seeds"])
        lines.append(f"| {r['pair']} | {r['teacher']} → {r['student']} | {r['label']} | {r['top1_mean']:.4f} | "
                     f"{r['top1_std']:.4f} | {delta} | {seeds} | {r['seconds_per_run']:.0f} |")
    lines += ["", *[f"- {v}" for v in p["verdicts"]], "",
              f"Total {p['total_seconds'] / 60:.1f} min. Overrides: `{' '.join(p['overrides'])}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    run()
