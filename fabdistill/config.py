"""Typed, validated configuration: YAML in configs/ → dataclasses.

Every knob has a default and (where numbers are involved) a range. Unknown keys, wrong types and
out-of-range values fail with a :class:`ConfigError` naming the key and the file it came from, because a
typo that silently falls back to a default is how a week of cluster time gets wasted.

    @dataclass
    class TrainerSection:
        lr: float = knob(1e-4, gt=0, le=1, help="AdamW learning rate")

    cfg = load_config(MyConfig, "configs/x.yaml", overrides=["trainer.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def knob(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with validation metadata: bounds (ge/gt/le/lt), allowed choices, help text."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help,
            "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested dataclass section with its own defaults."""
    return dataclasses.field(default_factory=cls)


def describe_range(meta: dict) -> str:
    parts = []
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("lt") is not None:
        parts.append(f"< {meta['lt']}")
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
    return " and ".join(parts)


# --------------------------------------------------------------------------- conversion

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert where it is lossless (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, where.item(i)) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, where.item(i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{where}: NaN is not a valid value")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}")


def _check_range(value: Any, meta: dict, where: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v not in choices:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(repr, choices))}")
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        ok = ((meta.get("ge") is None or v >= meta["ge"]) and (meta.get("gt") is None or v > meta["gt"])
              and (meta.get("le") is None or v <= meta["le"]) and (meta.get("lt") is None or v < meta["lt"]))
        if not ok:
            raise ConfigError(f"{where}: {v!r} is out of range (must be {describe_range(meta)})")


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where.source}: unknown key '{where.child(unknown[0]).key}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        key_where = where.child(name)
        coerced = _coerce(value, hints[name], key_where)
        _check_range(coerced, fields[name].metadata, key_where)
        kwargs[name] = coerced
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a field without default that was not given
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj


class _Where(str):
    """A location in a config: the file it came from and the dotted key path; prints as `file: a.b`."""

    def __new__(cls, source: str, key: str = ""):
        obj = super().__new__(cls, f"{source}: {key}" if key else source)
        obj.source, obj.key = source, key
        return obj

    def child(self, name: str) -> "_Where":
        return _Where(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> "_Where":
        return _Where(self.source, f"{self.key}[{index}]")


# --------------------------------------------------------------------------- public API

def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.lr=3e-4` → (["trainer", "lr"], 3e-4). The value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. trainer.lr=3e-4")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    # YAML 1.1 reads "3e-4" as a string; accept it as a number, as a person typing it means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from a local path or s3:// URI; errors name the file and line."""
    path = str(path)
    try:
        if path.startswith("s3://"):
            from fabdistill import storage
            text = storage.read_bytes(path).decode("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict, *, source: str = "<config>") -> T:
    """Validate a plain mapping into `cls`; errors read `<source>: <key path>: <problem>`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    return _from_dict(cls, data, _Where(source))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load `cls` from a YAML file (or its defaults when `path` is None) with `KEY=VALUE` overrides applied."""
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " (with --set overrides)"
    return from_dict(cls, data, source=source)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, uri: str) -> None:
    """Write the resolved config as YAML (local path or s3:// URI)."""
    from fabdistill import storage
    storage.write_bytes(uri, dump_yaml(cfg).encode("utf-8"))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per knob: `trainer.lr: float = 0.0001 (> 0 and <= 1) — AdamW learning rate`. Used by --help-config."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rng = describe_range(f.metadata)
        help_text = f.metadata.get("help", "")
        lines.append(f"{name}: {_type_name(tp)} = {default!r}" + (f" ({rng})" if rng else "")
                     + (f" — {help_text}" if help_text else ""))
    return lines
