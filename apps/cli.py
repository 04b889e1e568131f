"""`fabdistill VERB ...`: one command for every entry point (installed as a console script by the project).

    fabdistill make-data overlay --n 20000 --out runs/data/overlay
    fabdistill train ikddit --config configs/ikddit_demo.yaml --set run.name=exp1
    fabdistill sample ikddit --checkpoint runs/exp1-student --n 64 --out runs/samples
    fabdistill evaluate ikddit --student runs/exp1-student --teacher runs/exp1-teacher --n 1000 --out runs/eval
    fabdistill sweep --sweep configs/sweep_ikddit_mask.yaml
    fabdistill serve                      # python -m serve run serve/config.yaml: serve the students
    fabdistill demo                       # what `make demo` runs

`fabdistill VERB --help` gives each verb's options; `python -m apps.<module>` runs the same code.
`fabdistill --verbose VERB ...` (or `--verbose` after the verb, where it has one) shows Ray's own logs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module whose main(argv) runs it, one line for --help)
VERBS: dict[str, tuple[str, str]] = {
    "make-data": ("apps.make_data", "generate synthetic fab data or import real data into Parquet"),
    "train": ("apps.train", "train a method (teacher, student, ...) on Ray Train"),
    "sample": ("apps.sample", "generate samples with a trained checkpoint"),
    "evaluate": ("apps.evaluate", "evaluate checkpoints side by side (FID, accuracy, IoU ... per method)"),
    "sweep": ("apps.sweep", "Ray Tune sweep over a method's knobs"),
    "serve": ("serve.commands", "serve trained students over HTTP (python -m serve run CONFIG)"),
    "demo": ("apps.demo", "the IKDDiT demo end to end: data, teacher, student, evaluation, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabdistill", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="verbs:\n" + "\n".join(f"  {verb:<10} {text}" for verb, (_, text) in VERBS.items())
               + "\n\n" + __doc__.split("\n\n", 1)[1])
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs (sets FABDISTILL_VERBOSE=1)")
    parser.add_argument("verb", choices=list(VERBS), metavar="VERB", help="one of: " + ", ".join(VERBS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the verb's arguments (see fabdistill VERB --help)")
    return parser


def _serve_argv(args: list[str]) -> list[str]:
    """`fabdistill serve [run|check] [CONFIG] [flags]` -> serve.commands' argv; `run` is the default."""
    if args and args[0] in ("-h", "--help"):
        return ["--help"]
    if args and args[0] in ("run", "check"):
        return args
    return ["run", *args]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.verbose:
        from fabdistill.console import set_verbose

        set_verbose(True)
    module, _ = VERBS[args.verb]
    verb_args = _serve_argv(args.args) if args.verb == "serve" else args.args
    code = importlib.import_module(module).main(verb_args)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
