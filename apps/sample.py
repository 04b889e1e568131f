"""`python -m apps.sample <method> --checkpoint RUN_OR_CKPT --out DIR [--n 64] [--steps 50] [--set key=value ...]`

Generates samples with a trained checkpoint and writes them as Parquet (the data kind's schema) plus a PNG grid.
Each method's sample settings: `--help-settings`. Example (IKDDiT: overlay maps conditioned on equipment contexts):

    python -m apps.sample ikddit --checkpoint runs/demo-student --n 64 --steps 50 --set mask_ratio=0.5 --out runs/s
"""

from __future__ import annotations

from apps.common import get_capability, method_parser, run_cli, settings_from_args


def main(argv: list[str] | None = None) -> None:
    parser = method_parser("python -m apps.sample", __doc__, "sample")
    parser.add_argument("--checkpoint", help="checkpoint folder or run folder (local or s3://)")
    parser.add_argument("--out", help="output folder (local or s3://)")
    parser.add_argument("--n", type=int, default=None, help="samples to generate")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any sample setting of the method (see --help-settings)")
    parser.add_argument("--help-settings", action="store_true", help="list the method's sample settings")
    args = parser.parse_args(argv)
    method, sample = get_capability(args.method, "sample")
    if args.help_settings:
        from fabdistill.config import describe

        print("\n".join(describe(method.SampleSettings)) if method.SampleSettings else "(no settings)")
        return
    if not args.checkpoint or not args.out:
        parser.error("--checkpoint and --out are required")
    settings = settings_from_args(method.SampleSettings, args.overrides,
                                  {"n": args.n, "steps": args.steps, "seed": args.seed}, "sample settings")
    run_cli(lambda: print(sample(args.checkpoint, args.out, settings)))


if __name__ == "__main__":
    main()
