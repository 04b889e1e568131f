"""`python -m apps.demo` (what `make demo` runs): the IKDDiT pipeline end to end on an embedded local Ray.

The console shows milestones, one progress bar per training phase, the evaluation table and the commands that
serve the trained student; `--verbose` adds Ray's own logs. All of it goes to <run folder>/console.log
(runs/demo/console.log by default), the training curves to TensorBoard (`tensorboard --logdir runs`).
"""

from __future__ import annotations

import argparse

from apps.common import add_verbose_arg, apply_verbose, run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m apps.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ikddit_demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n-eval", type=int, default=1000, help="held-out maps for FID-N")
    parser.add_argument("--eval-steps", type=int, default=50)
    add_verbose_arg(parser)
    args = parser.parse_args(argv)
    apply_verbose(args)
    from trainers.demo import run_demo

    run_cli(lambda: run_demo(args.config, tuple(args.overrides), n_eval=args.n_eval, eval_steps=args.eval_steps))


if __name__ == "__main__":
    main()
