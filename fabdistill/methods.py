"""The method interface and the one registry that knows the methods.

apps/, tune/ and serve/ never name a method: they ask this registry. A method declares, in its own module, a
:class:`Method`:

    METHOD = Method(
        name="ikddit", summary="masked teacher/student DiT for overlay maps",
        Config=Config,                        # typed dataclass, configs/<name>*.yaml
        train=train,                          # train(cfg, callbacks=None) -> TrainOutcome
        load="fabdistill.inference.ikddit:load",         # checkpoint -> inference object (networks it runs only)
        sample="fabdistill.inference.ikddit:sample_to_files", SampleSettings=...,   # optional
        evaluate="trainers.ikddit_eval:evaluate", EvalSettings=...,  eval_roles=("student", "teacher"),
        space="trainers.ikddit_tune:SPACE",   # a tune.spaces.MethodSpace, or None
        students=("ikddit",),                 # Serve student kinds (serve/students/<kind>.py)
    )

and adds one line to :data:`METHODS` below. Callables may be given as "module:attribute" strings so that
declaring a method imports none of its heavy modules; :func:`resolve` imports them when used.
Plug-ins (a method outside this repository, or a test's toy method) are added with :func:`register`, or listed
in the environment variable FABDISTILL_METHODS="pkg.module:METHOD,...".
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from typing import Any, Callable, Optional

# One line per method: name -> "module:attribute" of its Method declaration.
METHODS: dict[str, str] = {
    "ikddit": "trainers.ikddit:METHOD",
    "feature_extractor": "trainers.feature_extractor:METHOD",
    "classifier": "trainers.classifier:METHOD",
    "ddpm": "trainers.ddpm:METHOD",
    "fast_ad": "trainers.fast_ad:METHOD",
    "dmd2": "trainers.dmd2:METHOD",
    "kdcddm": "trainers.kdcddm:METHOD",
    "sdd_lskd": "trainers.sdd_lskd:METHOD",
}

CAPABILITIES = ("train", "sample", "evaluate", "sweep", "serve")


class MethodError(ValueError):
    """A method is unknown, or was asked for something it does not provide (printed as one line)."""


# --------------------------------------------------------------------------- what every method returns

@dataclasses.dataclass
class TrainOutcome:
    """What `train()` returns, for every method.

    Multi-phase methods (a teacher, then a student) put each phase's own outcome in `phases`; the top-level
    fields are then those of the final phase, the one a sweep scores and serve loads."""

    run_dir: str
    checkpoint_dir: Optional[str]  # the exported final checkpoint (run_dir/model) or None
    metrics: Optional[dict]        # metrics of the last checkpoint
    error: Optional[BaseException] = None
    phases: dict[str, "TrainOutcome"] = dataclasses.field(default_factory=dict)

    def phase(self, name: str) -> "TrainOutcome":
        if name in self.phases:
            return self.phases[name]
        raise MethodError(f"this run has no '{name}' phase (phases: {', '.join(self.phases) or 'none'})")


@dataclasses.dataclass
class EvalTable:
    """Rows of one evaluation, the same type for every method: one row per model (or floor/baseline).

    `columns` maps a row key to (heading, format spec); `notes` are lines printed under the table (ratios,
    what the floor means)."""

    title: str
    columns: dict[str, tuple[str, str]]
    rows: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    report_path: Optional[str] = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def row(self, model: str) -> dict[str, Any]:
        for r in self.rows:
            if r.get("model") == model:
                return r
        raise KeyError(f"no row '{model}' in table '{self.title}' (rows: {[r.get('model') for r in self.rows]})")

    def markdown(self) -> str:
        keys = list(self.columns)
        head = "| " + " | ".join(self.columns[k][0] for k in keys) + " |"
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(keys))) + "|"
        lines = [f"**{self.title}**", "", head, rule]
        for r in self.rows:
            lines.append("| " + " | ".join(_cell(r.get(k), self.columns[k][1]) for k in keys) + " |")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"title": self.title, "columns": {k: list(v) for k, v in self.columns.items()},
                           "rows": self.rows, "notes": self.notes, "extras": self.extras}, indent=2, default=str)


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
        return format(value, spec)
    return str(value)


# --------------------------------------------------------------------------- the declaration

@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str
    Config: type
    train: Callable[..., TrainOutcome] | str
    load: Callable[[str], Any] | str | None = None
    sample: Callable[..., str] | str | None = None        # sample(checkpoint, out_dir, settings) -> message
    SampleSettings: type | None = None
    evaluate: Callable[..., EvalTable] | str | None = None  # evaluate(checkpoints, settings, out_dir) -> EvalTable
    EvalSettings: type | None = None
    eval_roles: tuple[str, ...] = ()                        # checkpoint roles evaluate takes, e.g. student, teacher
    space: Any = None                                       # tune.spaces.MethodSpace or "module:attribute"
    students: tuple[str, ...] = ()                          # Serve student kinds
    default_config: str = ""                                # configs/<name>.yaml shown in --help

    def capabilities(self) -> list[str]:
        have = {"train": True, "sample": self.sample is not None, "evaluate": self.evaluate is not None,
                "sweep": self.space is not None, "serve": bool(self.students)}
        return [c for c in CAPABILITIES if have[c]]

    def get(self, capability: str) -> Any:
        """The resolved callable/object for a capability, or a MethodError naming what the method can do."""
        attr = {"train": "train", "sample": "sample", "evaluate": "evaluate", "sweep": "space", "load": "load"}
        value = getattr(self, attr.get(capability, capability), None)
        if value is None:
            raise MethodError(f"method '{self.name}' cannot {capability} (it can: {', '.join(self.capabilities())})")
        return resolve(value)


def resolve(ref: Any) -> Any:
    """'package.module:attr.sub' -> the object; anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    if not attr:
        raise MethodError(f"{ref!r}: expected 'module:attribute'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- the registry

_loaded: dict[str, Method] = {}
_plugins: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method that lives outside METHODS (a plug-in, a test's toy method). Returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, got {type(method).__name__}")
    _plugins[method.name] = method
    return method


def unregister(name: str) -> None:
    _plugins.pop(name, None)


def _env_plugins() -> None:
    for ref in filter(None, (r.strip() for r in os.environ.get("FABDISTILL_METHODS", "").split(","))):
        method = resolve(ref)
        if method.name not in _plugins:
            register(method)


def method_names() -> list[str]:
    _env_plugins()
    return sorted(set(METHODS) | set(_plugins))


def get_method(name: str) -> Method:
    _env_plugins()
    if name in _plugins:
        return _plugins[name]
    if name not in METHODS:
        raise MethodError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    if name not in _loaded:
        method = resolve(METHODS[name])
        if not isinstance(method, Method) or method.name != name:
            raise MethodError(f"{METHODS[name]} is not the Method declaration of '{name}'")
        _loaded[name] = method
    return _loaded[name]


def methods_with(capability: str) -> list[str]:
    return [n for n in method_names() if capability in get_method(n).capabilities()]


def describe_methods(capability: Optional[str] = None) -> str:
    """For --help: one line per method, with what it can do."""
    lines = []
    for name in method_names():
        m = get_method(name)
        if capability is None or capability in m.capabilities():
            lines.append(f"  {name:<18} {m.summary}  [{', '.join(m.capabilities())}]")
    return "\n".join(lines)
