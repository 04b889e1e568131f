"""`python -m serve run serve/config.yaml`: Ray's `serve run` for fabdistill, that stops with the error instead of
waiting forever when a student cannot be served; and :func:`example_commands`, the serve + curl lines that
`make demo` and docs print.

    python -m serve run serve/config.yaml                                   # serve; Ctrl-C stops (exit 0)
    python -m serve run serve/config.yaml --checkpoint ikddit=runs/exp1-student --port 8001
    python -m serve check serve/config.yaml                                 # validate only; starts nothing

Why not Ray's `serve run serve/config.yaml` alone: with a config file it submits the config and then sleeps; an
application that fails to deploy leaves it running (and its exit code is 0 even on errors). `run` here checks
the config and every student's checkpoint in this process first (:func:`serve.framework.build_app`: a missing or
unreadable checkpoint exits 1 with one error naming the path, before Ray starts), then deploys the config as
`serve run` does and watches it: an application that fails to deploy (a replica that cannot load its weights)
prints that error, shuts Serve down and exits 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

BUILDERS = ("serve.app:build_app", "serve.framework:build_app")  # this package's application builder
DEFAULT_CONFIG = "serve/config.yaml"
IKDDIT_LOG_DIM = 128  # the IKDDiT model's default equipment-log width, when the checkpoint does not say


class ConfigError(ValueError):
    """A config or command-line override that cannot be served; the message names the file, key or path."""


# --------------------------------------------------------------------------- the config

def read_config(path: str | Path, checkpoints: dict[str, str] | None = None, port: int | None = None) -> dict:
    """The Serve config at `path` as a dict, with `checkpoints` (student kind -> checkpoint; a kind not in the
    config is added with default settings) and `port` applied to every application built by this package."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the Serve config ({exc})") from None
    if not isinstance(raw, dict) or not raw.get("applications"):
        raise ConfigError(f"{path}: not a Serve config (expected `applications:`)")
    raw = copy.deepcopy(raw)
    ours = [app for app in raw["applications"] if app.get("import_path") in BUILDERS]
    for kind, checkpoint in (checkpoints or {}).items():
        if not ours:
            raise ConfigError(f"{path}: no application imports {BUILDERS[0]}, so --checkpoint {kind}=... has "
                              f"nowhere to go")
        for app in ours:
            args = app["args"] = app.get("args") or {}
            if kind == "ikddit" and "checkpoint" in args:  # the shorthand
                args["checkpoint"] = checkpoint
            else:
                args.setdefault("students", {}).setdefault(kind, {})["checkpoint"] = checkpoint
    if port is not None:
        raw.setdefault("http_options", {})["port"] = port
    return raw


def student_checkpoints(app: dict) -> dict[str, str]:
    """kind -> checkpoint of one application's args (the `checkpoint` shorthand is the IKDDiT student's)."""
    args = app.get("args") or {}
    found = {kind: (student or {}).get("checkpoint") for kind, student in (args.get("students") or {}).items()}
    if args.get("checkpoint"):
        found["ikddit"] = args["checkpoint"]
    return found


def check_config(raw: dict) -> list[str]:
    """Problems of the config (Serve's schema, then build_app on each of this package's applications, which
    checks every student's checkpoint); empty when it can be deployed. Starts no Ray."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve.framework import build_app

    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [f"not a valid Serve config:\n{exc}"]
    problems = []
    for app in raw["applications"]:
        if app.get("import_path") not in BUILDERS:
            continue
        try:
            build_app(app.get("args") or {})
        except (ValueError, TypeError) as exc:  # CheckpointUnavailable, invalid arguments, unknown kinds
            problems.append(f"application {app.get('name', 'default')!r}:\n  " + str(exc).replace("\n", "\n  "))
    return problems


# --------------------------------------------------------------------------- deploy and watch

def failure_text(message: str) -> str:
    """The error at the end of a Serve status message (after its tracebacks), or the whole message."""
    lines = message.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return message.strip()
    rest = lines[frames[-1] + 1:]
    start = next((i for i, line in enumerate(rest) if line and not line.startswith(" ")), None)
    return "\n".join(rest[start:]).strip() if start is not None else message.strip()


def deploy_failure(app_status: Any) -> str:
    """Why an application is DEPLOY_FAILED: its own message (a builder error) or its failed deployments'."""
    parts = [failure_text(app_status.message)] if (app_status.message or "").strip() else []
    for name, dep in app_status.deployments.items():
        if _status_name(dep.status) in ("DEPLOY_FAILED", "UNHEALTHY") and (dep.message or "").strip():
            parts.append(f"deployment {name}: {failure_text(dep.message)}")
    return "\n".join(dict.fromkeys(parts)) or "deploy failed (no message; see `serve status`)"


def _status_name(status: Any) -> str:
    return getattr(status, "value", str(status))


def watch(app_names: list[str], urls: dict[str, str], poll_s: float = 1.0) -> int:
    """Poll `serve.status()` until an application fails (print why, return 1); runs until interrupted otherwise.
    Prints when each application starts serving and when its status changes afterwards."""
    from ray import serve

    last: dict[str, str] = {}
    while True:
        applications = serve.status().applications
        for name in app_names:
            app = applications.get(name)
            if app is None:
                continue
            status = _status_name(app.status)
            if status == "DEPLOY_FAILED":
                print(f"error: application {name!r} failed to deploy:\n{deploy_failure(app)}", file=sys.stderr,
                      flush=True)
                return 1
            if status != last.get(name):
                if status == "RUNNING":
                    print(f"[serve] {name}: serving at {urls[name]}  (Ctrl-C stops)", flush=True)
                elif name in last:
                    print(f"[serve] {name}: {status}", flush=True)
                last[name] = status
        time.sleep(poll_s)


def run(raw: dict, address: str | None) -> int:
    """Deploy `raw` as `serve run <config>` does (same Serve start options), then :func:`watch` it; Serve is
    shut down on the way out. Returns the exit code."""
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api  # what `serve run` itself deploys a config with
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    host = config.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    urls = {app.name: f"http://{host}:{config.http_options.port}{app.route_prefix or ''}"
            for app in config.applications}
    ray.init(address=address, namespace=SERVE_NAMESPACE)
    try:
        client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                       proxy_location=config.proxy_location,
                                       grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                       controller_options=config.controller_options)
        client.deploy_apps(config, _blocking=False)
        return watch([app.name for app in config.applications], urls)
    except KeyboardInterrupt:
        print("[serve] interrupted: shutting down", flush=True)
        return 0
    finally:
        serve.shutdown()


# --------------------------------------------------------------------------- example commands

class ExampleCommands(NamedTuple):
    """Two shell lines: start serving, then one request that answers 200."""

    serve: str
    curl: str


def _python() -> str:
    """How to name this interpreter in a printed command: a path relative to the working directory when it lies
    under it (``.venv/bin/python`` after `make demo`), else ``python``."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return "python"


def _log_dim(checkpoint: str) -> int:
    from fabdistill import storage
    from fabdistill.checkpoints import META_FILE, resolve_checkpoint

    try:
        meta = json.loads(storage.read_bytes(storage.join(resolve_checkpoint(checkpoint), META_FILE)))
        return int(meta["model"]["log_dim"])
    except Exception:  # noqa: BLE001  not written yet, another layout: the model's default width
        return IKDDIT_LOG_DIM


def _same_place(a: str | None, b: str) -> bool:
    """Equal checkpoint locations: the same string, or local paths that resolve to the same folder here."""
    if a is None or a == b:
        return a == b
    return "://" not in a + b and os.path.abspath(a) == os.path.abspath(b)


def example_commands(kind: str = "ikddit", checkpoint: str = "runs/demo-student", port: int = 8000,
                     config: str = DEFAULT_CONFIG, python: str | None = None) -> ExampleCommands:
    """The command that serves `checkpoint` as student `kind` with `config` on 127.0.0.1:`port`, and a curl
    request to it. Flags are added only where the config differs (``--checkpoint kind=...``, ``--port``), so
    with the defaults and the checked-in config the line is ``<python> -m serve run serve/config.yaml``
    (`python`: how to call the interpreter; default: this one, relative to the working directory when under it,
    e.g. ``.venv/bin/python``).
    IKDDiT gets a POST /ikddit/generate of one map (mean equipment log, ID 0, seed 0, 50 DDIM steps); other
    kinds a GET /models."""
    raw = read_config(config)
    apps = [app for app in raw["applications"] if app.get("import_path") in BUILDERS]
    if not apps:
        raise ConfigError(f"{config}: no application imports {BUILDERS[0]}")
    parts = [python or _python(), "-m", "serve", "run", config]
    if not _same_place(student_checkpoints(apps[0]).get(kind), checkpoint):
        parts += ["--checkpoint", f"{kind}={checkpoint}"]
    if (raw.get("http_options") or {}).get("port", 8000) != port:
        parts += ["--port", str(port)]
    host = (raw.get("http_options") or {}).get("host", "127.0.0.1")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{apps[0].get('route_prefix') or ''}"
    base = base.rstrip("/")
    if kind == "ikddit":
        body = json.dumps({"equipment_log": [0.0] * _log_dim(checkpoint), "equipment_id": 0, "n": 1, "steps": 50,
                           "seed": 0}, separators=(",", ":"))
        curl = (f"curl -s -X POST {base}/ikddit/generate -H 'Content-Type: application/json' "
                f"-d {shlex.quote(body)}")
    else:
        curl = f"curl -s {base}/models"
    return ExampleCommands(" ".join(shlex.quote(p) for p in parts), curl)


# --------------------------------------------------------------------------- CLI

def _checkpoint_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        kind, sep, path = item.partition("=")
        if not sep or not kind or not path:
            raise ConfigError(f"--checkpoint {item!r}: expected KIND=PATH, e.g. ikddit=runs/demo-student")
        out[kind] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "check, deploy and watch a Serve config; exits 1 when a student cannot be served"),
                       ("check", "check a Serve config and its checkpoints; starts nothing")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"Serve config (default {DEFAULT_CONFIG})")
        cmd.add_argument("--checkpoint", action="append", default=[], metavar="KIND=PATH",
                         help="serve student KIND from PATH (over the config's; repeatable)")
        cmd.add_argument("--port", type=int, help="HTTP port (over the config's http_options.port)")
        if name == "run":
            cmd.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                             help="Ray cluster to use (default: $RAY_ADDRESS, else one started with `ray start` on "
                                  "this machine, else a new local Ray); 'local' always starts a new one")
    args = parser.parse_args(argv)
    try:
        raw = read_config(args.config, _checkpoint_overrides(args.checkpoint), args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    problems = check_config(raw)
    if problems:
        print(f"error: {args.config}: cannot serve\n" + "\n".join(problems), file=sys.stderr)
        return 1
    if args.command == "check":
        served = {app.get("name", "default"): sorted(student_checkpoints(app)) for app in raw["applications"]
                  if app.get("import_path") in BUILDERS}
        print(f"{args.config}: ok; serving {served}")
        return 0
    return run(raw, args.address)


__all__ = ["ConfigError", "ExampleCommands", "check_config", "deploy_failure", "example_commands", "failure_text",
           "main", "read_config", "run", "student_checkpoints", "watch"]

if __name__ == "__main__":
    sys.exit(main())
