"""What a sweep may vary for each method, and how one trial of it is trained and scored.

A method registers a :class:`MethodSpace`: knob aliases → dotted config paths (``mask_ratio`` →
``student.mask_ratio``), the score a sweep ranks by (name and mode, e.g. FID minimised), the training metric
that ASHA may stop weak trials on, and hooks (all but `score` optional):

    prepare(cfg, sweep_dir) -> cfg      shared work done ONCE before any trial (IKDDiT: the teacher), returning
                                        the base config every trial starts from (default: the user's config)
    run_trial(cfg, callbacks) -> outcome   default: the method's own `train(cfg, callbacks)`
    trained(outcome) -> TrainOutcome    the run a trial trains (default: the outcome, i.e. its final phase)
    score(outcome, cfg, settings) -> {score_name: ..., ...}

A method declares its space in its own module and names it in its Method declaration (fabdistill/methods.py);
this module holds only the machinery.

Axes of a space (`--space KEY=SPEC`):

    mask_ratio=0,0.25,0.5,0.7     a list: grid axis (every value runs), or a uniform choice under --trials N
    lr=loguniform:1e-5:1e-3       a distribution (uniform / loguniform / randint), sampled under --trials N

Inside our package Ray's Tune is always `ray_tune`, so a reader never wonders which `tune` a line means.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Optional, Sequence

from fabdistill.config import ConfigError, parse_override

DISTRIBUTIONS = ("uniform", "loguniform", "randint")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """How a finished trial is scored (FID-N needs N generated and N held-out real samples)."""

    n: int = 500          # samples per side for FID-N / KID
    steps: int = 50       # sampler steps (DDIM)
    seed: int = 0         # sampling seed, the same for every trial so trials differ only by their knobs
    batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class MethodSpace:
    method: str
    knobs: dict[str, str]                 # alias -> dotted config path
    labels: dict[str, str]                # alias -> heading in tables and plots (the paper's wording)
    score_name: str                       # key of the score in score()'s dict and in results
    score_mode: str                       # "min" | "max"
    score_label: str                      # table heading, "{n}" filled with ScoreSettings.n
    early_stop_metric: str                # training metric ASHA compares trials on
    steps_path: str                       # config path of the trial's training steps (ASHA's max_t)
    score: Callable[[Any, Any, ScoreSettings], dict]
    prepare: Optional[Callable[[Any, str], Any]] = None     # None: every trial starts from the user's config
    run_trial: Optional[Callable[[Any, Optional[list]], Any]] = None  # None: the method's own train(cfg, callbacks)
    trained: Optional[Callable[[Any], Any]] = None          # None: the TrainOutcome itself (its final phase)
    reference: dict[str, dict[float, float]] = dataclasses.field(default_factory=dict)
    reference_label: str = ""             # where the reference numbers come from
    time_attr: str = "step"               # ASHA's progress measure: "step", or "training_iteration" (reports)
    extra_scores: tuple[str, ...] = ()    # more of score()'s numbers kept in the results (e.g. kid_mean, maps_per_s)
    table_scores: tuple[str, ...] = ()    # extra scores shown in the all-trials table (default: the first one)
    floor_score: str = ""                 # an extra score holding the real-data floor of the score at the same N
                                          # (the same in every trial): shown as a row under the trials' scores
    floor_label: str = "real floor"       # that row's name
    trial_cpus: Optional[Callable[[dict], float]] = None  # CPUs one trial's training takes, from the trial base
                                                          # config (default: run.num_workers × cpus_per_worker)

    def prepare_base(self, cfg: Any, sweep_dir: str) -> Any:
        return self.prepare(cfg, sweep_dir) if self.prepare is not None else cfg

    def train_trial(self, cfg: Any, callbacks: Optional[list]) -> Any:
        if self.run_trial is not None:
            return self.run_trial(cfg, callbacks)
        from fabdistill.methods import get_method

        return get_method(self.method).get("train")(cfg, callbacks=callbacks)

    def trained_run(self, outcome: Any) -> Any:
        return self.trained(outcome) if self.trained is not None else outcome

    def path_of(self, name: str) -> str:
        """Alias or dotted config path -> dotted config path (checked against the method's Config)."""
        path = self.knobs.get(name, name)
        if "." not in path:
            raise ConfigError(f"--space {name}: unknown knob for {self.method} (aliases: "
                              f"{', '.join(sorted(self.knobs))}; or give a dotted config path such as student.lr)")
        check_path(config_class(self.method), path, name)
        return path

    def label(self, name: str) -> str:
        return self.labels.get(name, name)


def config_class(method: str) -> type:
    from fabdistill.methods import get_method

    return get_method(method).Config


def check_path(cls: type, path: str, name: str) -> None:
    """Fail now, naming the knob, if `path` is not a leaf of the config dataclass `cls`."""
    node = cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"--space {name}: '{path}' is not a config knob ('{part}' not in {where}; known: "
                              f"{', '.join(sorted(fields))})")
        node = typing.get_type_hints(node)[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"--space {name}: '{path}' is a section, not a knob")


# --------------------------------------------------------------------------- axes

@dataclasses.dataclass(frozen=True)
class Axis:
    """One dimension of a search space: explicit values, or a distribution (kind, low, high)."""

    values: tuple = ()
    kind: str = "values"                  # "values" | one of DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0

    @property
    def is_distribution(self) -> bool:
        return self.kind != "values"

    def to_ray(self, random: bool) -> Any:
        from ray import tune as ray_tune

        if self.kind == "values":
            return ray_tune.choice(list(self.values)) if random else ray_tune.grid_search(list(self.values))
        return {"uniform": ray_tune.uniform, "loguniform": ray_tune.loguniform,
                "randint": ray_tune.randint}[self.kind](self.low, self.high)

    def spec(self) -> Any:
        """Plain form for YAML/JSON (what parse_axis reads back)."""
        return list(self.values) if self.kind == "values" else f"{self.kind}:{self.low:g}:{self.high:g}"


def parse_axis(name: str, spec: Any) -> Axis:
    """`[0, 0.5]`, `"0,0.25,0.5"`, `0.5` or `"loguniform:1e-5:1e-3"` -> Axis, with errors naming the knob."""
    if isinstance(spec, (list, tuple)):
        values = tuple(spec)
    elif isinstance(spec, str) and spec.split(":", 1)[0] in DISTRIBUTIONS:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ConfigError(f"--space {name}={spec}: expected {parts[0]}:LOW:HIGH")
        low, high = (_number(name, p) for p in parts[1:])
        if not low < high:
            raise ConfigError(f"--space {name}={spec}: LOW must be below HIGH")
        if parts[0] == "loguniform" and low <= 0:
            raise ConfigError(f"--space {name}={spec}: loguniform needs LOW > 0")
        return Axis(kind=parts[0], low=low, high=high)
    elif isinstance(spec, str):
        values = tuple(parse_override(f"{name}={v.strip()}")[1] for v in spec.split(",") if v.strip())
    else:
        values = (spec,)
    if not values:
        raise ConfigError(f"--space {name}: no values given")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"--space {name}: repeated values {list(values)}")
    return Axis(values=values)


def parse_space_arg(text: str) -> tuple[str, Axis]:
    """`mask_ratio=0,0.25,0.5` -> ("mask_ratio", Axis)."""
    if "=" not in text:
        raise ConfigError(f"--space {text!r}: expected KNOB=V1,V2,... or KNOB=loguniform:LOW:HIGH")
    name, spec = text.split("=", 1)
    return name.strip(), parse_axis(name.strip(), spec.strip())


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--space {name}: {text!r} is not a number") from None


def set_path(data: dict, path: str, value: Any) -> None:
    node = data
    for part in path.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[path.split(".")[-1]] = value


def get_path(data: dict, path: str) -> Any:
    node = data
    for part in path.split("."):
        node = node[part]
    return node


# --------------------------------------------------------------------------- the methods' spaces

def get_space(method: str) -> MethodSpace:
    """The method's space, from its Method declaration (fabdistill/methods.py); a clear error if it has none."""
    from fabdistill.methods import MethodError, get_method, methods_with

    try:
        space = get_method(method).get("sweep")
    except MethodError as exc:
        raise ConfigError(f"{exc}; methods with a sweep space: {', '.join(methods_with('sweep'))}") from None
    if not isinstance(space, MethodSpace):
        raise ConfigError(f"method '{method}' declares a space that is not a tune.spaces.MethodSpace")
    return space


def trial_config(space: MethodSpace, base: dict, point: dict[str, Any], *, source: str = "<trial>") -> Any:
    """The trial's validated Config: `base` (a plain dict) with each knob of `point` set at its path."""
    import json

    from fabdistill.config import from_dict

    data = json.loads(json.dumps(base))
    for name, value in point.items():
        set_path(data, space.path_of(name), value)
    return from_dict(config_class(space.method), data, source=source)


def grid_points(axes: dict[str, Axis]) -> list[dict[str, Any]]:
    """Every point of the grid formed by the value axes (distributions excluded), in Tune's order."""
    import itertools

    names = [n for n, a in axes.items() if not a.is_distribution]
    combos = itertools.product(*(axes[n].values for n in names))
    return [dict(zip(names, c)) for c in combos]


def validate_space(space: MethodSpace, base: dict, axes: dict[str, Axis]) -> None:
    """Build every grid point's config (and each distribution's ends) now, so a bad value fails before compute."""
    for name, axis in axes.items():
        space.path_of(name)
        if axis.is_distribution:
            for end in (axis.low, axis.high if axis.kind != "randint" else axis.high - 1):
                trial_config(space, base, {name: int(end) if axis.kind == "randint" else end},
                             source=f"--space {name}")
        else:
            for value in axis.values:
                trial_config(space, base, {name: value}, source=f"--space {name}={value!r}")


def varying(axes: dict[str, Axis]) -> list[str]:
    return [n for n, a in axes.items() if a.is_distribution or len(a.values) > 1]


def describe_axes(axes: dict[str, Axis]) -> Sequence[str]:
    """Each axis as its command-line form: `mask_ratio=0,0.25,0.5`, `lr=loguniform:1e-05:0.001`."""
    return [f"{n}=" + (",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in a.values)
                       if not a.is_distribution else a.spec()) for n, a in axes.items()]
