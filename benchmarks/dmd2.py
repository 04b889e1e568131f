"""Train the EDM teacher and DMD2 generators at a CPU budget, then score them side by side in one run.

    nice -n 5 python benchmarks/dmd2.py                       # configs/dmd2_wafer.yaml, N = 1000, ≤ 30 min on 2 cores
    python benchmarks/dmd2.py --teacher T --generator G       # score existing checkpoints only

Rows: the class-matched real floor, the teacher (Heun 35 NFE; Euler 1/2/4 NFE), the one-step generator and,
unless --few-step-iters 0, a 4-step generator trained with backward simulation. Each with FID-N and KID (the
wafer domain feature extractor), class fidelity (the wafer domain classifier) and images/s (sampling only, one
process, the same batch for every model). Targets (issue 12): one-step FID ≤ 1.5× the teacher's 35-NFE FID and far
below its 1-NFE FID, ≥ 25× its images/s, class fidelity within 5 points. Writes benchmarks/results/dmd2.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dmd2_wafer.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides key=value")
    p.add_argument("--n", type=int, default=1000, help="FID-N")
    p.add_argument("--few-step-iters", type=int, default=1500,
                   help="iterations of the 4-step generator (lowered to fit --budget-min); 0: skip it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box, two threads contend and run slower)")
    p.add_argument("--storage", default="runs/bench-dmd2")
    p.add_argument("--budget-min", type=float, default=25.0,
                   help="minutes for the three training runs on this (shared) machine: short probe runs measure the "
                        "seconds per step, and the config's step counts are lowered to fit (0: the config as is)")
    p.add_argument("--judge", default="", help="class-fidelity classifier checkpoint; empty: the committed wafer "
                   "domain classifier at 32×32, else one trained here (trainers.classifier, resnet8) at the map size")
    p.add_argument("--teacher", default="")
    p.add_argument("--generator", default="")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from fabdistill.config import load_config
    from trainers.dmd2 import Config, train
    from trainers.dmd2.evaluate import EvalSettings, evaluate

    t0 = time.time()
    timings: dict[str, float] = {}
    teacher, generators = args.teacher, [args.generator] if args.generator else []
    cfg = load_config(Config, args.config, [f"run.storage_path={args.storage}", "run.name=wafer", *args.overrides])
    if not (teacher and generators):
        if args.budget_min > 0:
            cfg = fit_budget(cfg, args, timings)
        outcome = train(cfg)
        teacher, generators = outcome.phase("teacher").checkpoint_dir, [outcome.phase("distill").checkpoint_dir]
        timings["teacher_and_one_step_s"] = time.time() - t0
        if args.few_step_iters > 0:
            t1 = time.time()
            few_iters = min(args.few_step_iters, timings.get("few_step_iters", args.few_step_iters))
            timings["few_step_iters"] = few_iters  # the header reports what ran, not the budget's cap
            few = dataclasses.replace(cfg, phase="distill", teacher_checkpoint=teacher,
                                      distill=dataclasses.replace(cfg.distill, num_steps=4, steps=few_iters,
                                                                  checkpoint_every=few_iters,
                                                                  regression_weight=0.0),  # one-step only
                                      run=dataclasses.replace(cfg.run, name="wafer-4step"))
            generators.append(train(few).phase("distill").checkpoint_dir)
            timings["four_step_s"] = time.time() - t1
    judge = args.judge
    if not judge and cfg.data.image_size != 32:  # the committed domain classifier was trained on 32×32 maps
        t1 = time.time()
        judge = train_judge(cfg.data.image_size, args.storage)
        timings["judge_s"] = time.time() - t1
    t2 = time.time()
    table = evaluate({"teacher": teacher, "generator": generators[0]}, EvalSettings(n=args.n, classifier=judge),
                     out_dir=str(Path(args.storage) / "eval"))
    rows = list(table.rows)
    if len(generators) > 1:  # the 4-step generator's row (same real set, seeds and classifier)
        extra = evaluate({"generator": generators[1]}, EvalSettings(n=args.n, generator_steps=(4,),
                                                                   auto_teacher=False, classifier=judge))
        rows += [dict(r, model="DMD2 4-step (backsim)") for r in extra.rows if r.get("role") == "generator"
                 and r["model"] == "DMD2 4-step"]
    timings["evaluation_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    from fabdistill.methods import EvalTable
    from trainers.dmd2.evaluate import targets

    final = EvalTable(title=table.title, columns=table.columns, rows=rows, notes=table.notes, extras=table.extras)
    final.extras["targets"] = targets(rows)
    final.notes = _notes(final) + ([f"- class fidelity judged by {judge} (trained here at this map size; the "
                                    "floor row shows its accuracy on real maps)"] if judge else [])
    md = ["# DMD2 benchmark (CPU)", "",
          f"Config {args.config} ({' '.join(args.overrides) or 'no overrides'}); teacher + one-step generator "
          f"{timings.get('teacher_and_one_step_s', 0) / 60:.1f} min (teacher {timings.get('teacher_steps', '–')} "
          f"steps, one-step {timings.get('distill_steps', '–')} iterations), 4-step generator "
          f"({timings.get('few_step_iters', args.few_step_iters)} iterations) "
          f"{timings.get('four_step_s', 0) / 60:.1f} min, class-fidelity judge {timings.get('judge_s', 0) / 60:.1f} min, "
          f"evaluation {timings['evaluation_s'] / 60:.1f} min, total "
          f"{timings['total_s'] / 60:.1f} min; torch threads {args.threads}.", "", final.markdown(), "",
          f"Pictures (rows = classes): {Path(args.storage) / 'eval'}/samples_*.png; docs/images/dmd2_*.png."]
    text = "\n".join(md)
    print(text)
    _copy_pictures(Path(args.storage) / "eval")
    write_results("dmd2", {"args": vars(args), "config": _config_dict(cfg), "rows": rows, "timings": timings,
                           "targets": final.extras["targets"], "teacher": teacher, "generators": generators}, text)
    return {"rows": rows, "timings": timings}


def fit_budget(cfg, args, timings: dict):
    """Measure seconds per teacher step and per distillation iteration with short probe runs (in-process, the
    benchmark's sizes), then lower the config's step counts so that teacher (40 %), one-step (45 %) and 4-step
    (15 %) generators fit args.budget_min. The steps used are printed and saved with the results."""
    from trainers.dmd2 import train
    from trainers.launch import read_metrics

    probe = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="probe"),
                                teacher=dataclasses.replace(cfg.teacher, steps=30, log_every=10, checkpoint_every=30),
                                distill=dataclasses.replace(cfg.distill, steps=15, log_every=5, checkpoint_every=15,
                                                            regression_pairs=min(cfg.distill.regression_pairs, 64)))
    out = train(probe)

    def per_step(run_dir: str) -> float:  # between the first and the last report: start-up excluded
        rows = read_metrics(run_dir)
        return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / max(rows[-1]["step"] - rows[0]["step"], 1)

    t_teacher, t_distill = per_step(out.phase("teacher").run_dir), per_step(out.phase("distill").run_dir)
    budget = args.budget_min * 60
    teacher_steps = int(min(cfg.teacher.steps, 0.40 * budget / t_teacher))
    distill_steps = int(min(cfg.distill.steps, 0.45 * budget / t_distill))
    timings["few_step_iters"] = int(0.15 * budget / (1.5 * t_distill))  # backsim: up to 3 extra generator calls
    timings.update(probe_s_per_teacher_step=t_teacher, probe_s_per_distill_iter=t_distill,
                   teacher_steps=teacher_steps, distill_steps=distill_steps)
    print(f"[bench] probe: {t_teacher:.3f} s/teacher step, {t_distill:.3f} s/distill iteration -> teacher "
          f"{teacher_steps} steps, one-step {distill_steps} iterations, 4-step {timings['few_step_iters']}", flush=True)
    return dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, steps=teacher_steps,
                                         checkpoint_every=min(cfg.teacher.checkpoint_every, teacher_steps)),
        distill=dataclasses.replace(cfg.distill, steps=distill_steps,
                                    checkpoint_every=min(cfg.distill.checkpoint_every, distill_steps)))


def train_judge(size: int, storage: str) -> str:
    """A small wafer classifier (resnet8) at this map size, in-process, to judge class fidelity."""
    from fabdistill.config import load_config
    from trainers.classifier import Config as ClassifierConfig
    from trainers.classifier import train as train_classifier

    cfg = load_config(ClassifierConfig, "configs/classifier_wafer.yaml", [
        f"data.size={size}", "data.n_train=4000", "data.n_eval=1000", "model.arch=resnet8", "optim.epochs=4",
        "run.num_workers=0", f"run.storage_path={storage}", f"run.name=judge{size}"])
    outcome = train_classifier(cfg)
    print(f"[bench] class-fidelity judge (resnet8, {size}×{size}): {outcome.metrics}", flush=True)
    return outcome.checkpoint_dir


def _notes(table) -> list[str]:
    from trainers.dmd2.evaluate import _notes as notes

    return notes(table.rows, table.extras["n"], table.extras["domain"])


def _config_dict(cfg) -> dict:
    from fabdistill.config import to_dict

    return to_dict(cfg)


def _copy_pictures(folder: Path) -> None:
    """The evaluation's class grids into docs/images/ (docs/dmd2.md shows them)."""
    import shutil

    dest = Path(__file__).resolve().parents[1] / "docs" / "images"
    dest.mkdir(parents=True, exist_ok=True)
    for png in sorted(folder.glob("samples_*.png")):
        stem = png.name[len("samples_"):]
        shutil.copy(png, dest / f"dmd2_{stem[len('dmd2_'):] if stem.startswith('dmd2_') else stem}")


if __name__ == "__main__":
    main()
