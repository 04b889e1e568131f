"""The serving framework: what every student kind shares. Kinds live in serve/students/ (one module each).

    StudentModel   one kind of student behind HTTP (subclass it: ``kind``, ``actions``, load / validate / batch)
    StudentServer  the replica around a StudentModel: batching, draining, grouping, limits, statistics
    Ingress        the FastAPI deployment: body limits, JSON parsing, routing, timeouts, failover, the error format
    Reply          what a replica hands back to the ingress (status, body, media type)
    build_app      the Serve application builder behind ``serve.app:build_app``

Student kinds are found, not listed: :func:`builtin_students` imports every module of the ``serve.students``
package and collects the concrete StudentModel subclasses (each with its own ``kind``). A student defined
anywhere else (a plug-in, a test's toy method) is named by its import path ``"package.module:ClassName"`` in the
application arguments; its routes use the class's ``kind``. build_app imports it, and ships a plug-in's module to
the replicas by value (cloudpickle), so the replicas need not be able to import it themselves.

Every kind runs in the same deployment class, :data:`StudentDeployment`, deployed under the StudentModel class's
name (``IKDDiTStudent``, ``ClassifierStudent``): serve/config.yaml addresses deployments by these names.

Failover. A student replica that dies (process killed, node lost) fails every request it held with an actor
error; the ingress retries each of them once on a live replica (every request is seeded, so the retry gives the
same answer) and answers 503 with ``Retry-After`` when no replica answers within ``replica_wait_s``: a replica
failure is never a 500. A student's own exception (a bug, a bad checkpoint value) is a 500; bad input is a 4xx,
answered by the replica and never retried.

Checkpoints. build_app checks every student's checkpoint cheaply (:meth:`StudentModel.check_checkpoint`) before
it binds anything, so a wrong path fails the application at once with one error naming it, instead of replicas
that fail to start and are restarted; each replica still loads the weights itself.

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
import logging
import os
import pkgutil
import re
import sys
import threading
import time
from typing import Any, ClassVar, Hashable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import cloudpickle, serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from fabdistill import storage
from fabdistill.checkpoints import check_checkpoint
from serve.schemas import AppArgs, RequestError, StudentArgs, parse_json_object

STUDENTS_PACKAGE = "serve.students"
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")  # one URL path segment
logger = logging.getLogger("ray.serve")


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

    @classmethod
    def check_checkpoint(cls, checkpoint: str) -> None:
        """A cheap check that `checkpoint` can be served, run by build_app before any replica starts; raise with a
        message naming it. The default accepts a fabdistill checkpoint folder or run folder, local or s3://
        (:func:`fabdistill.checkpoints.check_checkpoint`: it resolves, state.pt looks like a torch file, meta.json
        parses), and leaves a URI of any other scheme (a plug-in's own store) to `load`. Weights are not read."""
        if "://" in checkpoint and not storage.is_s3(checkpoint):
            return
        check_checkpoint(checkpoint)

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


class CheckpointUnavailable(ValueError):
    """A student whose checkpoint cannot be served (missing, unreadable): build_app refuses the application."""


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
        self._last_call = (0.0, 0.0, 0)  # (end on time.perf_counter, seconds it took, requests it took)
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
            await self._linger()
            taken = []
            while self._pending and len(taken) < self.args.max_batch_size:
                item, future = self._pending.popleft()
                if not future.done():  # a request that timed out meanwhile costs nothing
                    taken.append((item, future))
            if not taken:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self._compute, [item for item, _ in taken])
            except Exception as exc:  # every request of the call gets the error (the ingress answers 500)
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                ended = time.perf_counter()
                self._last_call = (ended, ended - started, len(taken))
            for (_, future), result in zip(taken, results):
                if not future.done():
                    future.set_result(result)

    async def _linger(self) -> None:
        """Closed-loop clients come back one round trip after their replies; a request that arrives first (a
        straggler of the last call) would otherwise start a call of its own, and the returning clients wait
        that whole call out: calls alternate between nearly full and nearly empty. So a call that would start
        within batch_linger_s (at most a quarter of the last call's time) of the last one's end waits until as
        many requests as that call took are here. One client at a time never waits: one request is that many."""
        end, took_s, took_n = self._last_call
        deadline = end + min(self.args.batch_linger_s, 0.25 * took_s)
        want = min(took_n, self.args.max_batch_size)
        while len(self._pending) < want and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)

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
                             "batch_linger_s": self.args.batch_linger_s,
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


# A replica (its worker process or node) went away: the request did not fail in the model and can run elsewhere.
# RayActorError covers ActorDiedError (killed, crashed, OOM) and ActorUnavailableError (unreachable for now).
REPLICA_FAILURES = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)
RETRY_AFTER_S = 5  # Retry-After when no replica is ready: about what a replacement replica needs to start


def is_replica_failure(exc: BaseException) -> bool:
    """True if `exc` says the replica died or is unreachable, not that the request failed inside it."""
    if isinstance(exc, REPLICA_FAILURES):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), REPLICA_FAILURES)


def _unavailable(message: str, reason: str, retry_after_s: float) -> JSONResponse:
    """503 with Retry-After (whole seconds, at least 1) and a JSON body naming the reason."""
    seconds = max(1, int(retry_after_s + 0.999))
    return JSONResponse({"error": message, "reason": reason, "retry_after_s": seconds}, status_code=503,
                        headers={"Retry-After": str(seconds)})


class _Answered(Exception):
    """Raised by Ingress._remote when the ingress answers instead of the student (503, 504, 500)."""

    def __init__(self, response: JSONResponse):
        super().__init__(response.status_code)
        self.response = response


api = FastAPI(title="fabdistill students",
              description="Distilled students of fabdistill over HTTP: POST /{kind}/{action}; GET /models lists "
                          "the routes and what each student loaded; GET /healthz.")


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    """HTTP concerns only: body size, JSON parsing, routing to the student deployments, timeouts, failover (one
    retry when a replica dies under a request, else 503 + Retry-After), encoding. The route table comes in as
    arguments (from build_app), so the ingress depends on no registry."""

    def __init__(self, students: dict[str, DeploymentHandle], actions: dict[str, list[str]],
                 request_timeout_s: float = 60.0, max_body_bytes: int = 1 << 20, replica_wait_s: float = 30.0):
        if set(students) != set(actions):
            raise ValueError(f"route table {sorted(actions)} does not match the students {sorted(students)}")
        self.students, self.actions = students, actions
        self.routes = [f"POST /{kind}/{action}" for kind, names in actions.items() for action in names]
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.replica_wait_s = replica_wait_s
        self._probes: dict[str, asyncio.Future] = {}  # kind -> the running "is a replica live?" probe

    async def _remote(self, kind: str, method: str, *args: Any) -> Any:
        """`await students[kind].<method>.remote(*args)` within request_timeout_s, retried once on a live replica
        when the replica dies under it. Raises _Answered with the ingress's own answer: 503 + Retry-After when no
        replica is ready or the student is overloaded, 504 on timeout, 500 when the student itself raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(getattr(self.students[kind], method).remote(*args),
                                              timeout=max(deadline - loop.time(), 1e-3))
            except asyncio.TimeoutError:
                raise _Answered(JSONResponse({"error": f"request timed out after {self.request_timeout_s} s"},
                                             status_code=504)) from None
            except BackPressureError as exc:  # the queue is full: retrying now would only add load
                raise _Answered(_unavailable(f"student {kind!r} is overloaded (its queue is full); retry later",
                                             "overloaded", getattr(exc, "retry_after_s", None) or 1)) from None
            except DeploymentUnavailableError:
                raise _Answered(_unavailable(f"student {kind!r} is unavailable: its deployment failed to start",
                                             "deployment_unavailable", RETRY_AFTER_S)) from None
            except Exception as exc:  # noqa: BLE001  sorted below: a replica failure, or the student raised
                if not is_replica_failure(exc):  # the student raised: say which, keep the traceback in the logs
                    cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    raise _Answered(JSONResponse({"error": f"student {kind!r} failed: {cause[:300]}"},
                                                 status_code=500)) from None
                failure = type(exc).__name__
            if attempt == 2:
                raise _Answered(_unavailable(f"student {kind!r}: the replica failed again on retry ({failure}); "
                                             "retry later", "replica_failed", RETRY_AFTER_S))
            wait = min(self.replica_wait_s, deadline - loop.time())
            if not await self._replica_ready(kind, wait):
                raise _Answered(_unavailable(
                    f"student {kind!r} has no ready replica: the one serving this request went away ({failure}) and "
                    f"none answered within {wait:.0f} s; retry later", "no_ready_replica", RETRY_AFTER_S))
            logger.warning("student %r: replica went away (%s) mid-request; retrying on a live replica", kind,
                           failure)
        raise AssertionError("unreachable")

    async def _replica_ready(self, kind: str, timeout: float) -> bool:
        """Whether a live replica of `kind` answers a ping within `timeout`. A replica's death fails every
        request it held at once: they share one probe instead of each pinging."""
        probe = self._probes.get(kind)
        if probe is None or probe.done():
            probe = self._probes[kind] = asyncio.ensure_future(self._probe(kind))
        done, _ = await asyncio.wait({probe}, timeout=max(timeout, 0.0))
        return probe in done and probe.result()

    async def _probe(self, kind: str) -> bool:
        """Ping `kind` until a replica answers (the router queues the ping until a replacement is up), for at most
        replica_wait_s; a ping that meets the dead replica again (the router has not dropped it yet) is resent."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.replica_wait_s
        while (left := end - loop.time()) > 0:
            try:
                return await asyncio.wait_for(self.students[kind].ping.remote(), timeout=left) == "ok"
            except asyncio.TimeoutError:
                return False
            except Exception as exc:  # noqa: BLE001  any other failure: no replica is ready
                if not is_replica_failure(exc):
                    return False
            await asyncio.sleep(min(0.2, max(end - loop.time(), 0.0)))
        return False

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
        try:
            described = {kind: await self._remote(kind, "describe") for kind in self.students}
        except _Answered as answered:
            return answered.response
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
            reply: Reply = await self._remote(kind, "run", action, payload)
        except _Answered as answered:
            return answered.response
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
    check_checkpoints(classes, args)
    for cls in classes.values():
        _ship_by_value(cls)
    students = {cls.kind: student_deployment(cls).bind(cls, args.students[name].model_dump())
                for name, cls in classes.items()}
    actions = {cls.kind: list(cls.actions) for cls in classes.values()}
    return Ingress.bind(students, actions, request_timeout_s=args.request_timeout_s,
                        max_body_bytes=args.max_body_bytes, replica_wait_s=args.replica_wait_s)


def check_checkpoints(classes: dict[str, type[StudentModel]], args: AppArgs) -> None:
    """Every student's `check_checkpoint`; one CheckpointUnavailable naming each bad path (a line per student).
    Relative paths resolve against this process's working directory, which the message names."""
    problems = []
    for name, cls in classes.items():
        checkpoint = args.students[name].checkpoint
        try:
            cls.check_checkpoint(checkpoint)
        except Exception as exc:  # noqa: BLE001  FileNotFoundError, ValueError, S3 errors: all "cannot serve"
            where = "" if "://" in checkpoint or os.path.isabs(checkpoint) else f" (relative to {os.getcwd()})"
            text = str(exc).removeprefix(f"{checkpoint}: ")  # errors about the folder itself start with its path
            problems.append(f"student {name!r}: cannot serve checkpoint {checkpoint!r}{where}: {text}")
    if problems:
        raise CheckpointUnavailable("\n".join(problems))


__all__ = ["REPLICA_FAILURES", "CheckpointUnavailable", "Ingress", "Reply", "StudentDeployment", "StudentModel",
           "StudentServer", "UnknownStudent", "build_app", "builtin_students", "check_checkpoints", "check_student",
           "chunks", "is_replica_failure", "pick_device", "resolve_student", "routes_of", "student_deployment"]
