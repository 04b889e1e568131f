"""`python -m apps.sample ikddit --checkpoint RUN_OR_CKPT --n 64 --steps 50 --mask-ratio 0.5 --out DIR`

Samples overlay maps conditioned on equipment contexts (held-out synthetic ones, or those of a Parquet dataset
given with --conditions), and writes them as Parquet (overlay schema) plus a PNG of dx/dy heat maps.
"""

from __future__ import annotations

import argparse

from apps.common import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m apps.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["ikddit"])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (local or s3://)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mask-ratio", type=float, default=None, help="student only; default: its training ratio")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", default="", help="overlay Parquet whose logs/IDs condition the samples")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    args = parser.parse_args(argv)
    from trainers.ikddit_sample import sample_to_files

    run_cli(lambda: print(sample_to_files(args.checkpoint, n=args.n, steps=args.steps, mask_ratio=args.mask_ratio,
                                          sampler=args.sampler, seed=args.seed, conditions=args.conditions,
                                          out_dir=args.out)))


if __name__ == "__main__":
    main()
