"""`python -m apps.sweep <method> --config BASE.yaml --space KNOB=V1,V2,... [--scheduler grid|asha] [--trials N]`

Ray Tune sweeps over a trainer (Tune over Ray Train V2). Examples:

    # the paper's mask-ratio ablation (grid, every trial to the end, FID-N of each student)
    python -m apps.sweep ikddit --config configs/ikddit_tiny.yaml --space mask_ratio=0,0.25,0.5,0.7
    # the same from a sweep file; flags override it (--space per knob)
    python -m apps.sweep --sweep configs/sweep_ikddit_mask.yaml --score-n 200
    # λ1 × λ2 with ASHA stopping weak trials on the training loss
    python -m apps.sweep ikddit --config configs/ikddit_tiny.yaml --space lambda1=0.5,1,2 \\
        --space lambda2=0.05,0.1,0.2 --scheduler asha
    # 8 random draws, lr from a log-uniform range
    python -m apps.sweep ikddit --config configs/ikddit_tiny.yaml --space lr=loguniform:1e-4:3e-3 --trials 8
    # continue an interrupted sweep (Ctrl-C, a lost driver): finished trials are kept
    python -m apps.sweep --name ikddit-mask --resume

Runs on the embedded local Ray, or on a cluster under
`ray job submit --working-dir . -- python -m apps.sweep ...`. Results land in <storage>/<name>/ (docs/tune.md).
The console shows one line per trial event; `--verbose` shows Tune's tables and Ray's logs instead. The sweep's
console.log is in its folder; every trial's run folder has its own, and TensorBoard event files
(`tensorboard --logdir <storage>/<name>/trials`).
"""

from __future__ import annotations

import argparse
import sys

from apps.common import add_verbose_arg, apply_verbose, run_cli
from fabdistill.config import ConfigError, dump_yaml, from_dict, read_yaml


def build_parser() -> argparse.ArgumentParser:
    from fabdistill.methods import describe_methods, methods_with

    parser = argparse.ArgumentParser(prog="python -m apps.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"methods with a sweep space:\n{describe_methods('sweep')}")
    parser.add_argument("method", nargs="?", choices=methods_with("sweep"),
                        help="method (or `method:` in --sweep)")
    parser.add_argument("--sweep", help="sweep YAML (configs/sweep_*.yaml); the flags below override it")
    parser.add_argument("--config", help="the method's base config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob of the base config for every trial (repeatable)")
    parser.add_argument("--space", action="append", default=[], metavar="KNOB=SPEC",
                        help="an axis: KNOB=V1,V2,... or KNOB=uniform|loguniform|randint:LOW:HIGH; KNOB is an alias "
                             "(mask_ratio, lambda1, lambda2, lr ...) or a dotted config path (repeatable)")
    parser.add_argument("--scheduler", choices=("grid", "asha"),
                        help="grid: run every trial to the end; asha: stop weak trials early on the training loss")
    parser.add_argument("--trials", type=int, help="N random samples of the space (0: the grid of list axes)")
    parser.add_argument("--name", help="sweep folder name (default <method>-<knobs>)")
    parser.add_argument("--storage", help="where sweep folders live (local dir or s3://), default runs/sweeps")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep in <storage>/<name>: finished trials are kept, the rest continue")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    parser.add_argument("--score-n", type=int, help="samples per side of FID-N (default 500)")
    parser.add_argument("--score-steps", type=int, help="sampler steps when scoring (default 50)")
    parser.add_argument("--max-t", type=int, help="ASHA: longest trial (default: the trial's training steps)")
    parser.add_argument("--grace-period", type=int, help="ASHA: progress before a trial may be stopped")
    parser.add_argument("--num-cpus", type=int,
                        help="logical CPUs of the embedded local Ray (default: the machine's); ignored on a cluster")
    parser.add_argument("--export", metavar="PREFIX",
                        help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/tune_ikddit_mask)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved sweep and exit (no Ray)")
    add_verbose_arg(parser)
    return parser


def sweep_from_args(args: argparse.Namespace):
    """The SweepConfig: --sweep file (if any) with the command line's flags on top."""
    from tune.launcher import SweepConfig
    from tune.spaces import parse_space_arg

    data = read_yaml(args.sweep) if args.sweep else {}
    if args.method:
        data["method"] = args.method
    if args.config:
        data["config"] = args.config
    data["overrides"] = list(data.get("overrides", [])) + list(args.overrides)
    space = dict(data.get("space") or {})
    for text in args.space:
        name, axis = parse_space_arg(text)
        space[name] = axis.spec()
    data["space"] = space
    for flag, key in (("scheduler", "scheduler"), ("trials", "trials"), ("name", "name"), ("storage", "storage"),
                      ("max_concurrent", "max_concurrent")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    for flag, sec, key in (("score_n", "score", "n"), ("score_steps", "score", "steps"),
                           ("max_t", "asha", "max_t"), ("grace_period", "asha", "grace_period")):
        if getattr(args, flag) is not None:
            data.setdefault(sec, {})[key] = getattr(args, flag)
    if "method" not in data and not args.resume:  # on --resume the sweep folder's saved spec is used
        raise ConfigError("give the method (e.g. `python -m apps.sweep ikddit ...`) or a --sweep file with `method:`")
    sweep = from_dict(SweepConfig, data, source=args.sweep or "<command line>")
    if not sweep.space and not (args.resume and sweep.name):
        raise ConfigError("no --space given (e.g. --space mask_ratio=0,0.25,0.5,0.7); with --resume, --name "
                          "alone finds the sweep")
    return sweep


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    apply_verbose(args)

    def go() -> None:
        from tune.launcher import axes_of, check_sweep, run_sweep, sweep_dir
        from tune.spaces import grid_points

        sweep = sweep_from_args(args)
        if args.dry_run:
            check_sweep(sweep)
            print(dump_yaml(sweep), end="")
            points = grid_points(axes_of(sweep)) if not sweep.trials else []
            print(f"# sweep folder: {sweep_dir(sweep)}")
            print(f"# {len(points)} grid points" if points else f"# {sweep.trials} random samples")
            for p in points:
                print("#   " + ", ".join(f"{k}={v}" for k, v in p.items()))
            return
        import time

        from fabdistill import storage
        from fabdistill.console import log_to
        from trainers.launch import ensure_ray

        ensure_ray(args.num_cpus)
        t0 = time.perf_counter()
        with log_to(storage.join(sweep_dir(sweep), "console.log")):  # the trials' own: in their run folders
            outcome = run_sweep(sweep, resume=args.resume)
        wall_s = time.perf_counter() - t0
        print(storage.read_bytes(outcome.files["results_md"]).decode())
        print(f"results: {outcome.sweep_dir} ({wall_s / 60:.1f} min)")
        if args.export:
            from tune.report import export_results

            command = "python -m apps.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
            for path in export_results(args.export, outcome, sweep, command=command, wall_s=wall_s,
                                       resumed=args.resume):
                print(f"wrote {path}")
        if outcome.best is None:
            print("no trial finished with a score", file=sys.stderr)
            raise SystemExit(1)

    run_cli(go)


if __name__ == "__main__":
    main()
