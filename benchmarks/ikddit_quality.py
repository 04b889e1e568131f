"""Train IKDDiT teacher and masked student at a CPU-sized budget, then FID-N (N ≥ 1000) of both, side by side.

    python benchmarks/ikddit_quality.py --config configs/ikddit_demo.yaml --n 1000 --steps 50

Prints the table (FID-N and KID with the project's overlay feature extractor, conditional fidelity, overlay
model-fit statistics, sampling throughput) and the student/teacher FID ratio (target: student within 20 %).
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
    from trainers.ikddit_eval import evaluate, format_table

    student, teacher = args.student, args.teacher
    if not (student and teacher):
        cfg = load_config(Config, args.config, ["run.name=bench-quality", *args.overrides])
        outcomes = train(cfg)
        student, teacher = outcomes["student"].checkpoint_dir, outcomes["teacher"].checkpoint_dir
    result = evaluate(student, teacher, n=args.n, steps=args.steps)
    ratio = result.rows["student"]["fid"] / max(result.rows["teacher"]["fid"], 1e-9)
    md = "\n".join([f"IKDDiT quality, config `{args.config}` {' '.join(args.overrides)}; DDIM {args.steps} steps",
                    "", format_table(result.rows, args.n), "",
                    f"**student FID / teacher FID: {ratio:.3f}** (target ≤ 1.20); "
                    f"student/teacher sampling throughput {result.speedup:.2f}×"])
    print(md)
    write_results("ikddit_quality", {"args": vars(args), "rows": result.rows, "fid_ratio": ratio,
                                     "speedup": result.speedup}, md)
    return {"fid_ratio": ratio, "rows": result.rows}


if __name__ == "__main__":
    main()
