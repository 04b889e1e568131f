"""A toy method defined entirely inside tests/: it fits y = slope·x with one weight.

It shows what a new method provides (config, per-worker loop, inference object, evaluation, Tune space, a Serve
student kind) and is registered by the tests with `fabdistill.methods.register(TOY)`; no file outside tests/
names it. Ray workers and Serve replicas cannot import tests/ (torch-fidelity installs a top-level `tests`
package), so the tests send this module's code by value (cloudpickle.register_pickle_by_value).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional

import numpy as np
import torch

from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob, section
from fabdistill.methods import EvalTable, Method, TrainOutcome
from trainers.common import Cadence, generator
from trainers.launch import RunSection, TrainSession, launch


@dataclasses.dataclass
class TrainerSection:
    steps: int = knob(8, ge=1, le=100_000)
    lr: float = knob(0.3, gt=0, le=10)
    batch_size: int = knob(16, ge=1, le=4096, help="per worker")
    log_every: int = knob(1, ge=1)
    checkpoint_every: int = knob(4, ge=1)


@dataclasses.dataclass
class Config:
    slope: float = knob(3.0, ge=-100, le=100, help="the slope the weight should learn")
    trainer: TrainerSection = section(TrainerSection)
    run: RunSection = section(RunSection)


def toy_loop(config: dict) -> None:
    sess = TrainSession.current()
    tc = config["trainer"]
    torch.manual_seed(sess.run.seed)  # identical init on every rank
    raw = torch.nn.Linear(1, 1, bias=False)
    model = sess.prepare(raw)
    opt = torch.optim.SGD(model.parameters(), lr=tc["lr"])
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        raw.load_state_dict(state["model"])
        start = meta["step"]
    gen = generator(sess.run.seed, "toy-batches", sess.rank, start)
    cadence = Cadence(tc["log_every"], tc["checkpoint_every"], tc["steps"])
    for step in range(start + 1, tc["steps"] + 1):
        x = torch.randn(tc["batch_size"], 1, generator=gen)
        loss = ((model(x) - config["slope"] * x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cadence.report(step):
            state = (lambda: {"model": raw.state_dict()}) if cadence.checkpoint(step) else None
            sess.report({"loss": loss.item(), "world_size": sess.world_size, "resumed_from": start}, step=step,
                        state=state, meta={"method": "toy", "slope": config["slope"]})


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    loop_config = {"trainer": dataclasses.asdict(cfg.trainer), "slope": cfg.slope}
    return launch(toy_loop, loop_config, cfg.run, full_config=cfg, extra_callbacks=callbacks)


class ToyModel:
    """Inference object: the learned weight. Stateless per call."""

    def __init__(self, weight: float, meta: dict):
        self.weight, self.meta = weight, meta

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.weight * np.asarray(x, dtype=np.float64)


def load(checkpoint: str) -> ToyModel:
    state, meta = load_state(resolve_checkpoint(checkpoint))
    if meta.get("method") != "toy":
        raise ValueError(f"{checkpoint}: not a toy checkpoint")
    return ToyModel(float(state["model"]["weight"].item()), meta)


@dataclasses.dataclass
class EvalSettings:
    n: int = knob(16, ge=1, le=10_000, help="test points")


def evaluate(checkpoints: dict[str, str], settings: EvalSettings, out_dir: Optional[str]) -> EvalTable:
    rows = []
    for role, path in checkpoints.items():
        model = load(path)
        x = np.linspace(-1, 1, settings.n)
        err = float(np.abs(model.predict(x) - model.meta["slope"] * x).mean())
        rows.append({"model": role, "weight": model.weight, "error": err})
    return EvalTable(title=f"toy on {settings.n} points", rows=rows,
                     columns={"model": ("model", ""), "weight": ("weight", ".4f"), "error": ("mean |error|", ".4f")})


def _score(outcome: TrainOutcome, cfg: Config, settings: Any) -> dict:
    model = load(outcome.checkpoint_dir)
    return {"error": abs(model.weight - cfg.slope)}


def _space():
    from tune.spaces import MethodSpace

    return MethodSpace(method="toy", knobs={"lr": "trainer.lr", "steps": "trainer.steps"}, labels={"lr": "lr"},
                       score_name="error", score_mode="min", score_label="|w − slope|", early_stop_metric="loss",
                       steps_path="trainer.steps", score=_score)


def _student_class():
    """The Serve student kind, built against serve/'s StudentModel base (imported lazily: tests that do not
    serve need no FastAPI)."""
    from serve.framework import Reply, StudentModel

    class ToyStudent(StudentModel):
        kind = "toy"
        actions = {"predict": None}

        def load(self, checkpoint: str) -> None:
            self.model = load(checkpoint)

        def describe(self) -> dict[str, Any]:
            return {"kind": self.kind, "weight": self.model.weight}

        def validate_request(self, action: str, payload: dict[str, Any]):
            from serve.schemas import RequestError

            x = payload.get("x")
            if not isinstance(x, list) or not x or not all(isinstance(v, (int, float)) for v in x):
                raise RequestError.field("x", "expected a non-empty list of numbers")
            return x

        def group_key(self, action: str, request: Any) -> Hashable:
            return action

        def batch_weight(self, request: Any) -> int:
            return len(request)

        def handle_batch(self, action: str, requests: list[Any]) -> list[Any]:
            return [self.model.predict(np.asarray(r)).tolist() for r in requests]

        def respond(self, action: str, request: Any, result: Any) -> Reply:
            return Reply.json({"y": result})

    return ToyStudent


def __getattr__(name: str) -> Any:
    # `ToyStudent` is built on first use, so importing this module needs no serve/ dependencies.
    if name == "ToyStudent":
        cls = _student_class()
        globals()["ToyStudent"] = cls
        return cls
    raise AttributeError(name)


TOY = Method(name="toy", summary="fits y = slope·x (a test's toy method)", Config=Config, train=train, load=load,
             evaluate=evaluate, EvalSettings=EvalSettings, eval_roles=("model",),
             space=_space(), students=(f"{__name__}:ToyStudent",))
