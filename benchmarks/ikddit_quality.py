"""Train IKDDiT teacher and masked student at a CPU-sized budget, then FID-N (N ≥ 1000) of both, side by side.

    python benchmarks/ikddit_quality.py --config configs/ikddit_demo.yaml --n 1000 --steps 50

Prints the table (FID-N and KID with the project's overlay feature extractor, conditional fidelity, overlay
model-fit statistics, sampling throughput), with the measured real floor (N real maps of the held-out maps'
equipment contexts, independent noise) as a row, and the student/teacher FID ratio (target: student within 20 %).
`--student/--teacher` evaluate existing checkpoints instead of training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ikddit_demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--student", default="")
    p.add_argument("--teacher", default="")
    args = p.parse_args(argv)

    from fabdistill.config import load_config
    from trainers.ikddit import Config, train
    from trainers.ikddit_eval import FLOOR_ROW, EvalSettings, evaluate

    student, teacher = args.student, args.teacher
    if not (student and teacher):
        cfg = load_config(Config, args.config, ["run.name=bench-quality", *args.overrides])
        outcome = train(cfg)
        student, teacher = outcome.phase("student").checkpoint_dir, outcome.phase("teacher").checkpoint_dir
    table = evaluate({"student": student, "teacher": teacher}, EvalSettings(n=args.n, steps=args.steps))
    fid = {name: table.row(name)["fid"] for name in ("student", "teacher", FLOOR_ROW)}
    ratio = fid["student"] / max(fid["teacher"], 1e-9)
    md = "\n".join([f"IKDDiT quality, config `{args.config}` {' '.join(args.overrides)}; DDIM {args.steps} steps",
                    "", table.markdown(), "",
                    f"**student FID / teacher FID: {ratio:.3f}** (target ≤ 1.20); real floor FID {fid[FLOOR_ROW]:.2f}; "
                    f"student/teacher sampling throughput {table.extras['speedup']:.2f}×"])
    print(md)
    write_results("ikddit_quality", {"args": vars(args), "rows": table.rows, "fid_ratio": ratio,
                                     "floor_fid": fid[FLOOR_ROW], "speedup": table.extras["speedup"]}, md)
    return {"fid_ratio": ratio, "rows": table.rows, "floor_fid": fid[FLOOR_ROW]}


if __name__ == "__main__":
    main()
