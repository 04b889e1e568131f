"""`python -m apps.train <method> --config configs/<method>.yaml [--set key=value ...]`

Runs on the embedded local Ray, or on a cluster under `ray job submit --working-dir . -- python -m apps.train ...`.
`--set run.num_workers=0` runs the same training loop in this process (debugging, small benchmarks).
The console shows a progress bar per phase and milestone lines; `--verbose` adds Ray's own logs. Everything goes
to <run folder>/console.log; metrics to metrics.jsonl and TensorBoard event files (`tensorboard --logdir runs`).
"""

from __future__ import annotations

from apps.common import (
    add_config_args,
    add_verbose_arg,
    apply_verbose,
    get_capability,
    method_parser,
    resolve_config,
    run_cli,
)


def main(argv: list[str] | None = None) -> None:
    parser = method_parser("python -m apps.train", __doc__, "train")
    add_config_args(parser)
    add_verbose_arg(parser)
    args = parser.parse_args(argv)
    apply_verbose(args)
    method, train = get_capability(args.method, "train")
    if args.config is None and method.default_config and not args.help_config:
        print(f"[{method.name}] no --config given: using the defaults of {method.Config.__module__}.Config "
              f"(e.g. --config {method.default_config})", flush=True)
    cfg = resolve_config(method.Config, args)
    if cfg is None:
        return

    def go() -> None:
        outcome = train(cfg)
        for name, phase in (outcome.phases or {"": outcome}).items():
            label = f"{name}: " if name else ""
            print(f"[{method.name}] {label}run {phase.run_dir}, checkpoint {phase.checkpoint_dir or '(none)'}")

    run_cli(go)


if __name__ == "__main__":
    main()
