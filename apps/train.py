"""`python -m apps.train <method> --config configs/<method>.yaml [--set key=value ...]`

Runs on the embedded local Ray, or on a cluster under `ray job submit --working-dir . -- python -m apps.train ...`.
"""

from __future__ import annotations

import argparse

from apps.common import add_config_args, resolve_config, run_cli
from trainers import METHODS, method_module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m apps.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(METHODS))
    add_config_args(parser)
    args = parser.parse_args(argv)
    module = method_module(args.method)
    cfg = resolve_config(module.Config, args)
    if cfg is not None:
        run_cli(lambda: module.train(cfg))


if __name__ == "__main__":
    main()
