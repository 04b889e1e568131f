"""The serving framework: what every student kind shares. Kinds live in serve/students/ (one module each).

    StudentModel   one kind of student behind HTTP (subclass it: ``kind``, ``actions``, load / validate / batch)
    StudentServer  the replica around a StudentModel: batching, draining, grouping, limits, statistics
    Ingress        the FastAPI deployment: body limits, JSON parsing, routing, timeouts, the error format
    Reply          what a replica hands back to the ingress (status, body, media type)
    build_app      the Serve application builder behind ``serve.app:build_app``

Student kinds are found, not listed: :func:`builtin_students` imports every module of the ``serve.students``
package and collects the concrete StudentModel subclasses (each with its own ``kind``). A student defined
anywhere else (a plug-in, a test's toy method) is named by its import path ``"package.module:ClassName"`` in the
application arguments; its routes use the class's ``kind``. build_app imports it, and ships a plug-in's module to
the replicas by value (cloudpickle), so the replicas need not be able to import it themselves.

Every kind runs in the same deployment class, :data:`StudentDeployment`, deployed under the StudentModel class's
name (``IKDDiTStudent``, ``ClassifierStudent``): serve/config.yaml addresses deployments by these names.

Batching. Each student replica gathers concurrent requests with ``serve.batch``; what gathers while the model is
busy joins its next call (up to ``max_batch_size`` requests), and inside a call, requests with the same
``group_key`` share one ``handle_batch`` call, chunked at ``max_batch_samples`` work units.
"""

# No `from __future__ import annotations` here: FastAPI must see real annotations (`request: Request`) on the
# ingress methods that Serve wraps, or it treats them as query parameters.
import abc
import asyncio
import collections
import dataclasses
import functools
import importlib
import inspect
import json
import pkgutil
import re
import sys
import threading
from typing import Any, ClassVar, Hashable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import cloudpickle, serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.schemas import AppArgs, RequestError, StudentArgs, parse_json_object

STUDENTS_PACKAGE = "serve.students"
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")  # one URL path segment


@dataclasses.dataclass
class Reply:
    """What a student replica returns to the ingress: an HTTP status, a body and its media type."""

    status: int
    content: bytes
    media_type: str = "application/json"

    @classmethod
    def json(cls, data: Any, status: int = 200) -> "Reply":
        return cls(status, json.dumps(data, allow_nan=False).encode())

    @classmethod
    def error(cls, exc: RequestError) -> "Reply":
        return cls.json(exc.body(), status=exc.status)


# --------------------------------------------------------------------------- the student interface

class StudentModel(abc.ABC):
    """One kind of student behind HTTP. Subclasses set `kind` and `actions` and implement the methods below.

    `actions` is the route table: action name -> its request schema (documentation only; `validate_request`
    does the validation, and may use it); each action becomes ``POST /{kind}/{action}``.
    `deployment_options` are Serve deployment options for this kind (e.g. ``ray_actor_options``), over the
    framework's defaults and under serve/config.yaml.
    Instances live in one replica and must be safe for one batch at a time plus concurrent `validate_request`
    / `respond` calls (keep no per-request state on self).
    """

    kind: ClassVar[str]
    actions: ClassVar[dict[str, Any]]
    deployment_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, args: StudentArgs):
        self.args = args
        self.device = pick_device(args.device)
        self.load(args.checkpoint)

    @abc.abstractmethod
    def load(self, checkpoint: str) -> None:
        """Load weights; raise with a message naming `checkpoint` if it cannot be read."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What is loaded (kind, checkpoint, config), for GET /models."""

    @abc.abstractmethod
    def validate_request(self, action: str, payload: dict[str, Any]) -> Any:
        """payload -> a request whose every field is resolved (defaults, seeds); raise RequestError (4xx)."""

    def group_key(self, action: str, request: Any) -> Hashable:
        """Requests with equal keys can share one `handle_batch` call (one forward pass)."""
        return action

    def batch_weight(self, request: Any) -> int:
        """Work units of a request (e.g. samples), to cap one `handle_batch` call at `max_batch_samples`."""
        return 1

    @abc.abstractmethod
    def handle_batch(self, action: str, requests: list[Any]) -> list[Any]:
        """Run requests sharing one group key together; return one result per request, in order."""

    @abc.abstractmethod
    def respond(self, action: str, request: Any, result: Any) -> Reply:
        """Encode one result (JSON, PNG ...)."""

    def check_health(self) -> None:
        """Raise to mark the replica unhealthy (Serve then replaces it)."""


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda when this replica sees a GPU, else cpu; an explicit cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is visible to this replica "
                           "(give the deployment ray_actor_options.num_gpus)")
    return torch.device(device)


# --------------------------------------------------------------------------- finding student kinds

class UnknownStudent(ValueError):
    """A student name that is neither a built-in kind nor an import path."""


def check_student(cls: Any, name: str) -> type[StudentModel]:
    """Refuse anything that cannot be served, naming `name` (how the user asked for it) and the problem."""
    if not (isinstance(cls, type) and issubclass(cls, StudentModel)):
        raise ValueError(f"student {name!r}: {cls!r} is not a serve.framework.StudentModel subclass")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ValueError(f"student {name!r}: {cls.__name__} does not implement {missing}")
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise ValueError(f"student {name!r}: {cls.__name__}.kind must be a lower-case URL segment "
                         f"(pattern {KIND_PATTERN.pattern}), got {kind!r}")
    actions = getattr(cls, "actions", None)
    if not isinstance(actions, dict) or not actions or not all(
            isinstance(a, str) and KIND_PATTERN.match(a) for a in actions):
        raise ValueError(f"student {name!r}: {cls.__name__}.actions must map action names (URL segments) to "
                         f"request schemas, got {actions!r}")
    return cls


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[tuple[str, type[StudentModel]], ...]:
    package = importlib.import_module(STUDENTS_PACKAGE)
    found: dict[str, type[StudentModel]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__, prefix=package.__name__ + "."),
                       key=lambda m: m.name):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            # Only classes defined in this module: an imported base or sibling is collected where it lives.
            if (isinstance(obj, type) and issubclass(obj, StudentModel) and obj.__module__ == module.__name__
                    and not inspect.isabstract(obj)):
                check_student(obj, f"{module.__name__}:{obj.__name__}")
                if obj.kind in found:
                    other = found[obj.kind]
                    raise ValueError(f"student kind {obj.kind!r} is defined twice: {other.__module__}:"
                                     f"{other.__name__} and {module.__name__}:{obj.__name__}")
                found[obj.kind] = obj
    return tuple(found.items())


def builtin_students() -> dict[str, type[StudentModel]]:
    """kind -> StudentModel subclass, for every module of serve/students/ (found by importing them)."""
    return dict(_discover())


def resolve_student(name: str) -> type[StudentModel]:
    """A built-in kind ("ikddit") or an import path ("package.module:ClassName") -> its StudentModel class."""
    if ":" not in name:
        students = builtin_students()
        if name not in students:
            raise UnknownStudent(f"unknown student kind {name!r}; built-in kinds: {sorted(students)}; name a "
                                 f"plug-in by its import path 'package.module:ClassName'")
        return students[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"student {name!r}: an import path is 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"student {name!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
                         f"it must be importable where build_app runs") from None
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"student {name!r}: module {module_name!r} has no attribute {attr!r}") from None
    return check_student(cls, name)


def routes_of(cls: type[StudentModel]) -> list[str]:
    return [f"POST /{cls.kind}/{action}" for action in cls.actions]


# --------------------------------------------------------------------------- the replica

class StudentServer:
    """Body of every student replica: load in __init__ (a bad checkpoint fails the deployment at start),
    validate, batch with serve.batch (continuing to gather while the model is busy), group and chunk each model
    call, encode the replies. Deployed as :data:`StudentDeployment`; usable directly in-process (tests)."""

    def __init__(self, student: Union[str, type[StudentModel]], args: dict[str, Any]):
        model_cls = resolve_student(student) if isinstance(student, str) else check_student(student, repr(student))
        self.args = StudentArgs.model_validate(args)
        self.model = model_cls(self.args)
        # serve.batch gathers concurrent requests (max_batch_size=1 serves unbatched). It forms a new batch every
        # batch_wait_timeout_s even while the model is busy, so `_enqueue` only queues each batch and returns
        # futures at once; `_drain` then feeds the model everything that waits, max_batch_size requests a call.
        self._batched = serve.batch(max_batch_size=self.args.max_batch_size,
                                    batch_wait_timeout_s=self.args.batch_wait_timeout_s)(self._enqueue)
        self._pending: collections.deque = collections.deque()  # (item, future) waiting for the model
        self._drainer: Optional[asyncio.Task] = None
        self._stats_lock = threading.Lock()
        self._stats = {"batches": 0, "requests": 0, "samples": 0, "forward_groups": 0}
        self._recent_batches: collections.deque = collections.deque(maxlen=64)  # requests per batch

    async def run(self, action: str, payload: dict[str, Any]) -> Reply:
        if action not in self.model.actions:
            return Reply.error(RequestError.field("action", f"unknown action {action!r} for {self.model.kind}; "
                                                            f"have {sorted(self.model.actions)}", status=404))
        try:
            request = self.model.validate_request(action, payload)
        except RequestError as exc:
            return Reply.error(exc)
        result = await (await self._batched((action, request)))  # a place in the queue, then the result
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.model.respond, action, request, result)  # PNG off the loop

    async def _enqueue(self, items: list[tuple[str, Any]]) -> list[asyncio.Future]:
        """serve.batch's handler: queue the batch's requests for `_drain`; one future per request."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        """One model call at a time, each taking up to max_batch_size waiting requests: while the model is busy,
        requests pile up and the next call takes them together (continuous batching)."""
        loop = asyncio.get_running_loop()
        while self._pending:
            taken = []
            while self._pending and len(taken) < self.args.max_batch_size:
                item, future = self._pending.popleft()
                if not future.done():  # a request that timed out meanwhile costs nothing
                    taken.append((item, future))
            if not taken:
                continue
            try:
                results = await loop.run_in_executor(None, self._compute, [item for item, _ in taken])
            except Exception as exc:  # every request of the call gets the error (the ingress answers 500)
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(taken, results):
                if not future.done():
                    future.set_result(result)

    def _compute(self, items: list[tuple[str, Any]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        groups: dict[Hashable, list[int]] = {}
        for i, (action, request) in enumerate(items):
            groups.setdefault(self.model.group_key(action, request), []).append(i)
        forwards = 0
        for indices in groups.values():
            for chunk in chunks(indices, [self.model.batch_weight(items[i][1]) for i in indices],
                                self.args.max_batch_samples):
                action = items[chunk[0]][0]
                outs = self.model.handle_batch(action, [items[i][1] for i in chunk])
                if len(outs) != len(chunk):
                    raise RuntimeError(f"{type(self.model).__name__}.handle_batch returned {len(outs)} results "
                                       f"for {len(chunk)} requests")
                for i, out in zip(chunk, outs):
                    results[i] = out
                forwards += 1
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["requests"] += len(items)
            self._stats["samples"] += sum(self.model.batch_weight(r) for _, r in items)
            self._stats["forward_groups"] += forwards
            self._recent_batches.append(len(items))
        return results

    def describe(self) -> dict[str, Any]:
        with self._stats_lock:
            stats = dict(self._stats)
            recent = list(self._recent_batches)
        stats["mean_batch_requests"] = round(stats["requests"] / stats["batches"], 3) if stats["batches"] else 0.0
        stats["recent_batch_requests"] = recent  # the last 64 batches, oldest first
        return {**self.model.describe(),
                "routes": routes_of(type(self.model)),
                "batching": {"max_batch_size": self.args.max_batch_size,
                             "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                             "max_batch_samples": self.args.max_batch_samples},
                "stats": stats}

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        self.model.check_health()


def chunks(indices: list[int], weights: list[int], limit: int) -> list[list[int]]:
    """Split indices into consecutive chunks whose weights sum to <= limit (an oversized item goes alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, w in zip(indices, weights):
        if current and total + w > limit:
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += w
    if current:
        out.append(current)
    return out


# Code defaults of every student deployment; a kind's `deployment_options` and then serve/config.yaml override
# them. max_ongoing_requests must exceed max_batch_size, or a replica never sees enough requests to fill a batch.
StudentDeployment = serve.deployment(max_ongoing_requests=64, max_queued_requests=1024,
                                     ray_actor_options={"num_cpus": 1}, health_check_period_s=10,
                                     health_check_timeout_s=30)(StudentServer)


def student_deployment(cls: type[StudentModel], **options: Any) -> serve.Deployment:
    """The deployment serving `cls`: named after the class (what serve/config.yaml addresses), with the
    kind's `deployment_options` and then `options` over the defaults. Bind it with ``(name_or_class, args)``."""
    return StudentDeployment.options(name=cls.__name__, **{**cls.deployment_options, **options})


# --------------------------------------------------------------------------- HTTP ingress

def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


api = FastAPI(title="fabdistill students",
              description="Distilled students of fabdistill over HTTP: POST /{kind}/{action}; GET /models lists "
                          "the routes and what each student loaded; GET /healthz.")


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    """HTTP concerns only: body size, JSON parsing, routing to the student deployments, timeouts, encoding.
    The route table comes in as arguments (from build_app), so the ingress depends on no registry."""

    def __init__(self, students: dict[str, DeploymentHandle], actions: dict[str, list[str]],
                 request_timeout_s: float = 60.0, max_body_bytes: int = 1 << 20):
        if set(students) != set(actions):
            raise ValueError(f"route table {sorted(actions)} does not match the students {sorted(students)}")
        self.students, self.actions = students, actions
        self.routes = [f"POST /{kind}/{action}" for kind, names in actions.items() for action in names]
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        status: dict[str, str] = {}
        for kind, handle in self.students.items():
            try:
                status[kind] = await asyncio.wait_for(handle.ping.remote(), timeout=5.0)
            except Exception as exc:  # timeout, replica gone: unhealthy, say why
                status[kind] = f"unavailable: {type(exc).__name__}"
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "students": status},
                            status_code=200 if ok else 503)

    @api.get("/models")
    async def models(self) -> JSONResponse:
        described = {kind: await handle.describe.remote() for kind, handle in self.students.items()}
        return JSONResponse({"students": described, "routes": self.routes})

    @api.post("/{kind}/{action}")
    async def call(self, kind: str, action: str, request: Request) -> Response:
        if kind not in self.students:
            return _error_response(RequestError.field(
                "path", f"no student {kind!r}; serving {sorted(self.students)}", status=404, kind="not_found"))
        if action not in self.actions[kind]:
            return _error_response(RequestError.field(
                "path", f"unknown action {action!r} for {kind}; routes: {self.routes}", status=404,
                kind="not_found"))
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_body_bytes:  # refuse before reading a huge body
            return _error_response(RequestError.field(
                "body", f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}",
                status=413, kind="too_large"))
        try:
            payload = parse_json_object(await request.body(), self.max_body_bytes)
        except RequestError as exc:
            return _error_response(exc)
        try:
            reply: Reply = await asyncio.wait_for(self.students[kind].run.remote(action, payload),
                                                  timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"request timed out after {self.request_timeout_s} s"}, status_code=504)
        except BackPressureError:
            return JSONResponse({"error": f"student {kind!r} is overloaded; retry later"}, status_code=503,
                                headers={"Retry-After": "1"})
        except Exception as exc:  # a failure inside the student: say which, keep the traceback in the logs
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return JSONResponse({"error": f"student {kind!r} failed: {cause[:300]}"}, status_code=500)
        return Response(content=reply.content, status_code=reply.status, media_type=reply.media_type)


# --------------------------------------------------------------------------- application builder

def _ship_by_value(cls: type[StudentModel]) -> None:
    """Pickle a plug-in's own module by value: a replica then needs the modules the plug-in imports, but not the
    plug-in's module on its sys.path (a module of tests/, a class defined in a function). Built-in kinds travel
    by reference: serve.students is importable wherever serve.framework is."""
    module = sys.modules.get(cls.__module__)
    if module is None or module.__name__ == "__main__" or module.__name__.startswith(STUDENTS_PACKAGE + "."):
        return  # __main__ is pickled by value anyway
    cloudpickle.register_pickle_by_value(module)


def build_app(args: Union[dict[str, Any], AppArgs]) -> serve.Application:
    """Serve application builder: `import_path: serve.app:build_app` with `args` (serve/schemas.py AppArgs).

    `args.students` maps a built-in kind ("ikddit") or a plug-in's import path ("pkg.module:Class") to that
    student's arguments. Each student gets its own deployment (replicas, autoscaling and resources per kind);
    the ingress reaches them through DeploymentHandles and routes POST /{kind}/{action}.
    """
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(dict(args or {}))
        except ValidationError as exc:
            raise ValueError(f"serve.app:build_app arguments are invalid:\n{exc}") from None
    classes: dict[str, type[StudentModel]] = {}
    unknown = []
    for name in args.students:
        try:
            classes[name] = resolve_student(name)
        except UnknownStudent:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown student kinds {unknown}; built-in kinds: {sorted(builtin_students())}; "
                         f"name a plug-in by its import path 'package.module:ClassName'")
    by_kind: dict[str, str] = {}
    by_deployment: dict[str, str] = {}
    for name, cls in classes.items():
        for table, key, what in ((by_kind, cls.kind, "route kind"), (by_deployment, cls.__name__, "deployment")):
            if key in table:
                raise ValueError(f"students {table[key]!r} and {name!r} share the {what} {key!r}")
            table[key] = name
    for cls in classes.values():
        _ship_by_value(cls)
    students = {cls.kind: student_deployment(cls).bind(cls, args.students[name].model_dump())
                for name, cls in classes.items()}
    actions = {cls.kind: list(cls.actions) for cls in classes.values()}
    return Ingress.bind(students, actions, request_timeout_s=args.request_timeout_s,
                        max_body_bytes=args.max_body_bytes)


__all__ = ["Ingress", "Reply", "StudentDeployment", "StudentModel", "StudentServer", "UnknownStudent", "build_app",
           "builtin_students", "check_student", "chunks", "pick_device", "resolve_student", "routes_of",
           "student_deployment"]
