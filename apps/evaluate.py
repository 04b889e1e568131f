"""`python -m apps.evaluate ikddit --student RUN_OR_CKPT --teacher RUN_OR_CKPT --n 1000 --steps 50 --out DIR`

FID-N/KID (project overlay feature extractor, or Inception with --inception-weights), overlay model-fit
statistics, conditional fidelity and sampling speed of student and teacher against held-out real maps.
"""

from __future__ import annotations

import argparse

from apps.common import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m apps.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["ikddit"])
    parser.add_argument("--student", default="")
    parser.add_argument("--teacher", default="")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mask-ratio", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity InceptionV3 weights file")
    parser.add_argument("--out", default="", help="folder for report.md, samples.png, metrics.json")
    args = parser.parse_args(argv)
    from trainers.ikddit_eval import evaluate, format_table

    def go() -> None:
        result = evaluate(args.student or None, args.teacher or None, n=args.n, steps=args.steps,
                          mask_ratio=args.mask_ratio, batch_size=args.batch_size, seed=args.seed,
                          out_dir=args.out or None, feature_extractor_weights_path=args.inception_weights)
        print(format_table(result.rows, args.n))
        if result.speedup is not None:
            print(f"student/teacher sampling throughput: {result.speedup:.2f}x")
        if result.report_path:
            print(f"report: {result.report_path}")

    run_cli(go)


if __name__ == "__main__":
    main()
