"""Train IKDDiT teacher and masked student at a CPU-sized budget, then measure both on the same checkpoints.

    python benchmarks/ikddit_quality.py --config configs/ikddit_deep.yaml --n 1000 --steps 50

Prints the table (FID-N and KID with the project's overlay feature extractor, conditional fidelity, overlay
model-fit statistics, sampling throughput at the same DDIM steps and batch in one process), with the measured real
floor (N real maps of the held-out maps' equipment contexts, independent noise) as a row, then the two targets:
student FID within 10 % of the teacher's (ratio ≤ 1.10) and student sampling throughput ≥ 2× the teacher's (mask
ratio of the student's checkpoint, 0.5 in configs/ikddit_deep.yaml), and how far each model is above the floor.
`--student/--teacher` evaluate existing checkpoints instead of training. Results go to
benchmarks/results/ikddit_quality_<config name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402

FID_RATIO_TARGET = 1.10   # student FID / teacher FID at most this
SPEEDUP_TARGET = 2.0      # student maps/s / teacher maps/s at least this


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ikddit_deep.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256, help="maps per sampler loop, the same for both models")
    p.add_argument("--student", default="")
    p.add_argument("--teacher", default="")
    args = p.parse_args(argv)

    from fabdistill.config import load_config
    from trainers.ikddit import Config, train
    from trainers.ikddit_eval import FLOOR_ROW, EvalSettings, evaluate

    t0 = time.time()
    student, teacher = args.student, args.teacher
    train_s = 0.0
    if not (student and teacher):
        cfg = load_config(Config, args.config, [f"run.name=bench-quality-{Path(args.config).stem}", *args.overrides])
        outcome = train(cfg)
        student, teacher = outcome.phase("student").checkpoint_dir, outcome.phase("teacher").checkpoint_dir
        train_s = time.time() - t0
    table = evaluate({"student": student, "teacher": teacher},
                     EvalSettings(n=args.n, steps=args.steps, batch_size=args.batch_size))
    wall_s = time.time() - t0
    rows = {name: table.row(name) for name in ("student", "teacher", FLOOR_ROW)}
    fid = {name: row["fid"] for name, row in rows.items()}
    ratio, speedup = fid["student"] / max(fid["teacher"], 1e-9), table.extras["speedup"]
    floor = max(fid[FLOOR_ROW], 1e-9)
    met = {"fid_ratio": ratio <= FID_RATIO_TARGET, "speedup": speedup >= SPEEDUP_TARGET}
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    md = "\n".join([
        f"IKDDiT quality, config `{args.config}` {' '.join(args.overrides)}; FID-{args.n}, DDIM {args.steps} steps, "
        f"sampling batch {args.batch_size}, student mask ratio {rows['student']['mask_ratio']}",
        "", table.markdown(), "",
        f"- **student / teacher sampling throughput: {speedup:.2f}×** (target ≥ {SPEEDUP_TARGET:.1f}×: "
        f"{verdict(met['speedup'])}); {rows['student']['maps_per_s']:.1f} vs {rows['teacher']['maps_per_s']:.1f} "
        "maps/s, same steps and batch, one process",
        f"- **student FID / teacher FID: {ratio:.3f}** (target ≤ {FID_RATIO_TARGET:.2f}: {verdict(met['fid_ratio'])}); "
        f"FID student {fid['student']:.2f}, teacher {fid['teacher']:.2f}",
        f"- real floor (context-matched) FID {fid[FLOOR_ROW]:.2f}: teacher {fid['teacher'] / floor:.0f}× and student "
        f"{fid['student'] / floor:.0f}× the floor",
        f"- conditional fidelity: student {rows['student']['cond_fidelity']:.3f}, teacher "
        f"{rows['teacher']['cond_fidelity']:.3f}, floor {rows[FLOOR_ROW]['cond_fidelity']:.3f} (chance ≈ 1/16)",
        f"- wall time {wall_s / 60:.1f} min ({train_s / 60:.1f} training teacher and student, the rest sampling "
        "and scoring)"])
    print(md)
    write_results(f"ikddit_quality_{Path(args.config).stem}",
                  {"args": vars(args), "rows": table.rows, "fid_ratio": ratio, "floor_fid": fid[FLOOR_ROW],
                   "speedup": speedup, "targets": {"fid_ratio_max": FID_RATIO_TARGET, "speedup_min": SPEEDUP_TARGET},
                   "met": met, "wall_s": round(wall_s, 1), "train_s": round(train_s, 1),
                   "checkpoints": {"student": student, "teacher": teacher}}, md)
    return {"fid_ratio": ratio, "speedup": speedup, "rows": table.rows, "floor_fid": fid[FLOOR_ROW], "met": met}


if __name__ == "__main__":
    main()
