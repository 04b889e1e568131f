"""`python -m apps.evaluate <method> --checkpoint ROLE=RUN_OR_CKPT [...] [--n 1000] [--set key=value ...] --out DIR`

Evaluates trained checkpoints side by side and prints one table (FID/KID with a measured real-data floor for the
generators; top-1 for classifiers; speed), writing report.md, the table as JSON and pictures into --out.
Roles name what each checkpoint is (IKDDiT: student, teacher); --student/--teacher are shorthands. Example:

    python -m apps.evaluate ikddit --student runs/demo-student --teacher runs/demo-teacher --n 1000 --out runs/eval
"""

from __future__ import annotations

import argparse

from apps.common import get_capability, method_parser, run_cli, settings_from_args


def parse_roles(items: list[str], shorthands: dict[str, str | None]) -> dict[str, str]:
    checkpoints: dict[str, str] = {}
    for item in items:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise argparse.ArgumentTypeError(f"--checkpoint {item!r}: expected ROLE=PATH, e.g. student=runs/x")
        checkpoints[role] = path
    checkpoints.update({role: path for role, path in shorthands.items() if path})
    return checkpoints


def main(argv: list[str] | None = None) -> None:
    parser = method_parser("python -m apps.evaluate", __doc__, "evaluate")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ROLE=PATH",
                        help="a checkpoint or run folder and its role (repeatable)")
    parser.add_argument("--student", help="shorthand for --checkpoint student=PATH")
    parser.add_argument("--teacher", help="shorthand for --checkpoint teacher=PATH")
    parser.add_argument("--n", type=int, default=None, help="held-out samples (FID-N / top-1 on N)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any evaluation setting of the method (see --help-settings)")
    parser.add_argument("--help-settings", action="store_true", help="list the method's evaluation settings")
    parser.add_argument("--out", default="", help="folder for report.md, table.json and pictures")
    args = parser.parse_args(argv)
    method, evaluate = get_capability(args.method, "evaluate")
    if args.help_settings:
        from fabdistill.config import describe

        print("\n".join(describe(method.EvalSettings)) if method.EvalSettings else "(no settings)")
        return
    try:
        checkpoints = parse_roles(args.checkpoint, {"student": args.student, "teacher": args.teacher})
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not checkpoints:
        parser.error(f"give at least one checkpoint (roles of {method.name}: "
                     f"{', '.join(method.eval_roles) or 'any'}), e.g. --checkpoint ROLE=PATH")
    unknown = [r for r in checkpoints if method.eval_roles and r not in method.eval_roles]
    if unknown:
        parser.error(f"{method.name} has no checkpoint role {unknown[0]!r} (roles: {', '.join(method.eval_roles)})")
    settings = settings_from_args(method.EvalSettings, args.overrides,
                                  {"n": args.n, "steps": args.steps, "seed": args.seed}, "evaluation settings")

    def go() -> None:
        table = evaluate(checkpoints, settings, args.out or None)
        print(table.markdown())
        if args.out:
            from fabdistill import storage

            storage.write_bytes(storage.join(args.out, "table.json"), table.to_json().encode())
        if table.report_path:
            print(f"report: {table.report_path}")

    run_cli(go)


if __name__ == "__main__":
    main()
