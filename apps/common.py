"""Argument helpers shared by the thin entry points in apps/."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from fabdistill.config import ConfigError, describe, dump_yaml, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (local path or s3://); defaults apply to what it omits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob, e.g. --set trainer.lr=3e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every knob with its default and range")


def resolve_config(config_cls: type, args: argparse.Namespace) -> Any | None:
    """Load and validate; on --dry-run/--help-config print and return None. Config errors exit with status 2."""
    if args.help_config:
        print("\n".join(describe(config_cls)))
        return None
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return None
    return cfg


def run_cli(fn: Callable[[], Any]) -> Any:
    """Turn expected user errors into one clear line and a non-zero exit instead of a traceback."""
    try:
        return fn()
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
