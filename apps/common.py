"""Argument helpers shared by the thin entry points in apps/: config loading, method dispatch, clean errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional

from fabdistill.config import ConfigError, apply_overrides, describe, dump_yaml, from_dict, load_config
from fabdistill.methods import MethodError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (local path or s3://); defaults apply to what it omits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob, e.g. --set trainer.lr=3e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every knob with its default and range")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs (INFO lines, worker output, Ray Data progress) on the console; "
                             "they always go to <run folder>/console.log. Sets FABDISTILL_VERBOSE=1")


def apply_verbose(args: argparse.Namespace) -> None:
    """--verbose: set FABDISTILL_VERBOSE before Ray starts, so that Ray's processes see it too."""
    if getattr(args, "verbose", False):
        from fabdistill.console import set_verbose

        set_verbose(True)


def method_parser(prog: str, doc: str, capability: str) -> argparse.ArgumentParser:
    """A parser whose first argument is a registered method; --help lists the methods that can `capability`."""
    from fabdistill.methods import describe_methods, method_names

    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"methods that can {capability}:\n{describe_methods(capability)}")
    parser.add_argument("method", metavar="METHOD", help=f"one of: {', '.join(method_names())}")
    return parser


def get_capability(method_name: str, capability: str) -> tuple[Any, Any]:
    """(Method, its resolved callable/space for `capability`); one clear line and exit 2 if it has none."""
    from fabdistill.methods import get_method

    try:
        method = get_method(method_name)
        return method, method.get(capability)
    except MethodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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


def settings_from_args(settings_cls: Optional[type], overrides: list[str], shorthands: dict[str, Any],
                       what: str) -> Any:
    """A method's settings dataclass (EvalSettings, SampleSettings) from --set KEY=VALUE and shorthand flags
    (--n, --steps, ... given on the command line: None means not given). Unknown keys fail naming the key."""
    if settings_cls is None:
        return None
    data: dict[str, Any] = {}
    known = set(getattr(settings_cls, "__dataclass_fields__", {}))
    for key, value in shorthands.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"--{key.replace('_', '-')}: this method's {what} have no '{key}' "
                              f"(known: {', '.join(sorted(known))})")
        data[key] = value
    try:
        data = apply_overrides(data, overrides)
        return from_dict(settings_cls, data, source=f"{what} (command line)")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(fn: Callable[[], Any]) -> Any:
    """Turn expected user errors into one clear line and a non-zero exit instead of a traceback."""
    try:
        return fn()
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # MethodError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
