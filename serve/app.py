"""Ray Serve application: a FastAPI ingress in front of one deployment per student kind.

    serve run serve/config.yaml                                     # the checked-in settings
    serve run serve.app:build_app checkpoint=runs/ikddit-tiny-student   # one student, defaults

Routes
    POST /{kind}/{action}   e.g. POST /ikddit/generate; the route table is the student registry below
    GET  /models            what each student deployment loaded: kind, checkpoint, role, model config, limits
    GET  /healthz           200 when every student answers, 503 otherwise

Adding a student kind (segmentation, one-step generator, classifier ...): subclass :class:`StudentModel`
(``load`` / ``validate_request`` / ``group_key`` / ``handle_batch`` / ``respond``), wrap it in a three-line
deployment class deriving from :class:`StudentServer`, and ``register_student`` it. The ingress, batching,
limits, timeouts and error format come for free.

Batching. Each student replica gathers concurrent requests with ``serve.batch``; what gathers while the model is
busy joins its next call (up to ``max_batch_size`` requests), and inside a call, requests with the same
``group_key`` (for IKDDiT: steps and mask ratio) share every forward pass. Randomness is per
request: each request's own seeded generator draws its initial noise and its token masks, in the same order
as ``IKDDiTPipeline.sample``, so a seeded request gives the same maps alone or batched with others (equal up
to float32 rounding of batched matrix products; maps are returned rounded to 1e-4 nm).
"""

# No `from __future__ import annotations` here: FastAPI must see real annotations (`request: Request`) on the
# ingress methods that Serve wraps, or it treats them as query parameters.
import abc
import asyncio
import collections
import dataclasses
import json
import secrets
import threading
import time
from typing import Any, ClassVar, Hashable, Optional

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.schemas import (AppArgs, ClassifyRequest, GenerateRequest, RequestError, StudentArgs, parse_json_object,
                           validate)

JSON_DECIMALS = 4  # nm: 0.1 pm, far below overlay metrology precision; keeps responses compact


@dataclasses.dataclass
class Reply:
    """What a student deployment returns to the ingress: an HTTP status, a body and its media type."""

    status: int
    content: bytes
    media_type: str = "application/json"

    @classmethod
    def json(cls, data: Any, status: int = 200) -> "Reply":
        return cls(status, json.dumps(data, allow_nan=False).encode())

    @classmethod
    def error(cls, exc: RequestError) -> "Reply":
        return cls.json(exc.body(), status=exc.status)


# --------------------------------------------------------------------------- student registry

class StudentModel(abc.ABC):
    """One kind of student behind HTTP. Subclasses set `kind` and `actions` and implement the methods below.

    `actions` is the route table: action name -> request schema; each becomes ``POST /{kind}/{action}``.
    Instances live in one replica and must be safe for one batch at a time plus concurrent `validate_request`
    / `respond` calls (keep no per-request state on self).
    """

    kind: ClassVar[str]
    actions: ClassVar[dict[str, type[BaseModel]]]

    def __init__(self, args: StudentArgs):
        self.args = args
        self.device = _pick_device(args.device)
        self.load(args.checkpoint)

    @abc.abstractmethod
    def load(self, checkpoint: str) -> None:
        """Load weights; raise with a message naming `checkpoint` if it cannot be read."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What is loaded (kind, checkpoint, config), for GET /models."""

    @abc.abstractmethod
    def validate_request(self, action: str, payload: dict[str, Any]) -> BaseModel:
        """payload -> a request whose every field is resolved (defaults, seeds); raise RequestError (4xx)."""

    def group_key(self, action: str, request: BaseModel) -> Hashable:
        """Requests with equal keys can share one forward pass."""
        return action

    def batch_weight(self, request: BaseModel) -> int:
        """Work units of a request (e.g. samples), to cap a forward pass at `max_batch_samples`."""
        return 1

    @abc.abstractmethod
    def handle_batch(self, action: str, requests: list[BaseModel]) -> list[Any]:
        """Run requests sharing one group key together; return one result per request, in order."""

    @abc.abstractmethod
    def respond(self, action: str, request: BaseModel, result: Any) -> Reply:
        """Encode one result (JSON, PNG ...)."""

    def check_health(self) -> None:
        """Raise to mark the replica unhealthy (Serve then replaces it)."""


STUDENTS: dict[str, type[StudentModel]] = {}
DEPLOYMENTS: dict[str, Any] = {}  # kind -> serve.Deployment


def register_student(model_cls: type[StudentModel], deployment: Any) -> None:
    """Make `deployment` (a StudentServer subclass under @serve.deployment) serve `model_cls.kind`."""
    if model_cls.kind in STUDENTS:
        raise ValueError(f"student kind {model_cls.kind!r} is already registered")
    if not model_cls.actions:
        raise ValueError(f"{model_cls.__name__} declares no actions")
    STUDENTS[model_cls.kind] = model_cls
    DEPLOYMENTS[model_cls.kind] = deployment


def routes() -> list[str]:
    return [f"POST /{kind}/{action}" for kind, cls in STUDENTS.items() for action in cls.actions]


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is visible to this replica "
                           "(give the deployment ray_actor_options.num_gpus)")
    return torch.device(device)


# --------------------------------------------------------------------------- IKDDiT student

class IKDDiTModel(StudentModel):
    """IKDDiT masked student (or teacher) checkpoint: equipment log + ID -> overlay maps (dx, dy) in nm."""

    kind = "ikddit"
    actions = {"generate": GenerateRequest}

    def load(self, checkpoint: str) -> None:
        from trainers.ikddit import IKDDiTPipeline
        from trainers.launch import resolve_checkpoint

        try:
            self.checkpoint = resolve_checkpoint(checkpoint)
            self.pipeline = IKDDiTPipeline.from_checkpoint(self.checkpoint, device=self.device)
        except Exception as exc:  # FileNotFoundError, ValueError, S3 errors: all mean "cannot serve this"
            raise RuntimeError(f"IKDDiT student: cannot load checkpoint {checkpoint!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        self.requested_checkpoint = checkpoint
        meta = self.pipeline.meta
        self.default_mask_ratio = float(meta.get("mask_ratio", 0.5)) if self.pipeline.role == "student" else 0.0
        self.max_steps = min(self.args.max_steps, self.pipeline.diffusion.num_timesteps)
        self.valid = self.pipeline.valid.numpy().astype(bool)  # (H, W) on-wafer pixels
        self._nonfinite: Optional[str] = None

    def describe(self) -> dict[str, Any]:
        meta = self.pipeline.meta
        return {
            "kind": self.kind, "checkpoint": self.checkpoint, "requested_checkpoint": self.requested_checkpoint,
            "role": self.pipeline.role, "step": meta.get("step"), "model": meta.get("model"),
            "map_size": self.pipeline.map_size, "scale_nm": self.pipeline.scale_nm,
            "log_dim": self.pipeline.log_dim, "num_ids": self.pipeline.num_ids,
            "default_mask_ratio": self.default_mask_ratio, "device": str(self.device),
            "limits": {"max_n": self.args.max_n, "max_steps": self.max_steps},
        }

    def validate_request(self, action: str, payload: dict[str, Any]) -> GenerateRequest:
        req = validate(GenerateRequest, payload, max_n=self.args.max_n, max_steps=self.max_steps)
        if len(req.equipment_log) != self.pipeline.log_dim:
            raise RequestError.field("equipment_log", f"expected {self.pipeline.log_dim} values, "
                                                      f"got {len(req.equipment_log)}")
        if req.equipment_id >= self.pipeline.num_ids:
            raise RequestError.field("equipment_id",
                                     f"{req.equipment_id} out of range [0, {self.pipeline.num_ids})")
        mask_ratio = self.default_mask_ratio if req.mask_ratio is None else req.mask_ratio
        if self.pipeline.role == "student":
            kept = int(self.pipeline.net.num_patches * (1 - mask_ratio))
            if kept < 1:
                raise RequestError.field("mask_ratio", f"{mask_ratio} keeps no token of "
                                                       f"{self.pipeline.net.num_patches}; lower it")
        else:
            mask_ratio = 0.0  # a teacher sees every token
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return req.model_copy(update={"mask_ratio": float(mask_ratio), "seed": seed})

    def group_key(self, action: str, request: GenerateRequest) -> Hashable:
        return (action, request.steps, request.mask_ratio)

    def batch_weight(self, request: GenerateRequest) -> int:
        return request.n

    @torch.no_grad()
    def handle_batch(self, action: str, requests: list[GenerateRequest]) -> list[np.ndarray]:
        """DDIM (eta = 0) over the concatenated requests; noise and masks from each request's own generator.

        Returns one (n_i, 2, H, W) float32 array in nm per request.
        """
        pipe, dev = self.pipeline, self.device
        steps, mask_ratio = requests[0].steps, requests[0].mask_ratio
        sizes = [r.n for r in requests]
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        log = torch.tensor([r.equipment_log for r in requests], dtype=torch.float32)  # (R, log_dim)
        log = log.repeat_interleave(torch.tensor(sizes), dim=0).to(dev)  # (N, log_dim)
        eid = torch.tensor([r.equipment_id for r in requests]).repeat_interleave(torch.tensor(sizes)).to(dev)
        size = pipe.map_size
        # x_T: the first draw of each request's generator, then its token masks: as in IKDDiTPipeline.sample.
        x = torch.cat([torch.randn((n, 2, size, size), generator=g) for n, g in zip(sizes, gens)]).to(dev)
        model_fn = pipe.denoiser(log, eid, mask_ratio, gens, sizes)
        x = pipe.diffusion.ddim_sample(model_fn, None, steps=steps, x_T=x)  # (N, 2, H, W), eta = 0
        maps = (x * pipe.scale_nm * pipe.valid.to(dev)).float().cpu().numpy()  # (N, 2, H, W) nm
        if not np.isfinite(maps).all():
            self._nonfinite = f"non-finite maps at {time.strftime('%H:%M:%S')} (steps={steps})"
        return list(np.split(maps, np.cumsum(sizes)[:-1]))

    def respond(self, action: str, request: GenerateRequest, result: np.ndarray) -> Reply:
        if not np.isfinite(result).all():
            return Reply.json({"error": "the model produced non-finite values; the replica is marked unhealthy"},
                              status=500)
        info = {"kind": self.kind, "n": request.n, "steps": request.steps, "mask_ratio": request.mask_ratio,
                "seed": request.seed, "equipment_id": request.equipment_id}
        if request.format == "png":
            from fabdistill.viz import overlay_grid, png_bytes

            img = overlay_grid(result, titles=[f"#{i}" for i in range(request.n)], valid=self.valid,
                               heading=f"IKDDiT {self.pipeline.role} | equipment {request.equipment_id} | "
                                       f"seed {request.seed} | {request.steps} steps")
            return Reply(200, png_bytes(img), "image/png")
        rounded = np.round(result.astype(np.float64), JSON_DECIMALS) + 0.0  # + 0.0: no "-0.0" off-wafer
        return Reply.json({**info, "shape": list(result.shape), "units": "nm",
                           "dx": rounded[:, 0].tolist(), "dy": rounded[:, 1].tolist(),
                           "valid": self.valid.astype(int).tolist()})

    def check_health(self) -> None:
        if self._nonfinite:
            raise RuntimeError(f"IKDDiT student produced {self._nonfinite}")


# --------------------------------------------------------------------------- classifier student

MAX_IMAGE_SIDE = 256


class ClassifierModel(StudentModel):
    """A distilled classifier (Fast-AD's data-free student, or any trainers/classifier.py checkpoint):
    wafer maps (or images) -> class probabilities."""

    kind = "classifier"
    actions = {"classify": ClassifyRequest}

    def load(self, checkpoint: str) -> None:
        from trainers.classifier import load_classifier
        from trainers.launch import resolve_checkpoint

        try:
            self.checkpoint = resolve_checkpoint(checkpoint)
            self.net, self.meta = load_classifier(self.checkpoint, map_location=self.device)
        except Exception as exc:  # FileNotFoundError, ValueError (not a classifier), S3 errors
            raise RuntimeError(f"classifier student: cannot load checkpoint {checkpoint!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        self.requested_checkpoint = checkpoint
        self.classes = list(self.meta["classes"])
        self.wafer = self.meta["encoding"] == "wafer_pm1"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "checkpoint": self.checkpoint, "requested_checkpoint": self.requested_checkpoint,
                "method": self.meta.get("method", "classifier"), "step": self.meta.get("step"),
                "arch": self.meta["arch"], "encoding": self.meta["encoding"], "classes": self.classes,
                "in_channels": self.meta["in_channels"], "device": str(self.device),
                "last_eval": self.meta.get("last_eval"),
                "limits": {"max_n": self.args.max_n, "max_side": MAX_IMAGE_SIDE}}

    def validate_request(self, action: str, payload: dict[str, Any]) -> ClassifyRequest:
        req = validate(ClassifyRequest, payload, max_n=self.args.max_n)
        if req.top_k > len(self.classes):
            raise RequestError.field("top_k", f"{req.top_k} exceeds the {len(self.classes)} classes")
        try:
            arr = np.asarray(req.maps)
        except ValueError:  # ragged nesting
            arr = np.asarray([], dtype=object)
        want = "(n, H, W) wafer maps" if self.wafer else f"(n, {self.meta['in_channels']}, H, W) images"
        if arr.dtype == object or arr.ndim != (3 if self.wafer else 4):
            raise RequestError.field("maps", f"expected {want} as equal-length nested lists")
        if not self.wafer and arr.shape[1] != self.meta["in_channels"]:
            raise RequestError.field("maps", f"expected {self.meta['in_channels']} channels, got {arr.shape[1]}")
        h, w = arr.shape[-2:]
        if not (4 <= h <= MAX_IMAGE_SIDE and 4 <= w <= MAX_IMAGE_SIDE):
            raise RequestError.field("maps", f"map size {h}x{w} outside [4, {MAX_IMAGE_SIDE}] per side")
        if arr.dtype.kind not in "iu":  # strict: 1.0 or true is not a pixel value
            raise RequestError.field("maps", "values must be integers")
        top = 2 if self.wafer else 255
        if arr.min() < 0 or arr.max() > top:
            raise RequestError.field("maps", f"values must lie in [0, {top}]"
                                     + (" (0 off-wafer, 1 pass, 2 fail)" if self.wafer else ""))
        return req

    def group_key(self, action: str, request: ClassifyRequest) -> Hashable:
        return (action, np.asarray(request.maps).shape[1:])  # same-size maps share a forward pass

    def batch_weight(self, request: ClassifyRequest) -> int:
        return len(request.maps)

    @torch.no_grad()
    def handle_batch(self, action: str, requests: list[ClassifyRequest]) -> list[np.ndarray]:
        """One forward over the concatenated maps; returns one (n_i, num_classes) probability array per request."""
        from trainers.classifier import encode_images, encode_wafer

        arrays = [np.asarray(r.maps) for r in requests]
        x = np.concatenate(arrays)  # (N, H, W) or (N, C, H, W)
        x = encode_wafer(x) if self.wafer else encode_images(x)  # (N, C, H, W) in [-1, 1]
        probs = torch.softmax(self.net(x.to(self.device)).float(), dim=1).cpu().numpy()  # (N, K)
        return list(np.split(probs, np.cumsum([len(a) for a in arrays])[:-1]))

    def respond(self, action: str, request: ClassifyRequest, result: np.ndarray) -> Reply:
        order = np.argsort(-result, axis=1)[:, :request.top_k]
        predictions = [{"label": self.classes[int(row[0])], "index": int(row[0]),
                        "probability": round(float(p[row[0]]), 6),
                        "top_k": [{"label": self.classes[int(c)], "probability": round(float(p[c]), 6)}
                                  for c in row]}
                       for row, p in zip(order, result)]
        return Reply.json({"kind": self.kind, "n": len(request.maps), "classes": self.classes,
                           "predictions": predictions})


# --------------------------------------------------------------------------- student deployments

class StudentServer:
    """Shared body of every student deployment: load in __init__ (a bad checkpoint fails the deployment at
    start), validate, batch with serve.batch (continuing to gather while the model is busy), group and chunk
    each model call, encode the replies."""

    model_cls: ClassVar[type[StudentModel]]

    def __init__(self, args: dict[str, Any]):
        self.args = StudentArgs.model_validate(args)
        self.model = self.model_cls(self.args)
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

    async def _enqueue(self, items: list[tuple[str, BaseModel]]) -> list[asyncio.Future]:
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

    def _compute(self, items: list[tuple[str, BaseModel]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        groups: dict[Hashable, list[int]] = {}
        for i, (action, request) in enumerate(items):
            groups.setdefault(self.model.group_key(action, request), []).append(i)
        forwards = 0
        for indices in groups.values():
            for chunk in _chunks(indices, [self.model.batch_weight(items[i][1]) for i in indices],
                                 self.args.max_batch_samples):
                action = items[chunk[0]][0]
                outs = self.model.handle_batch(action, [items[i][1] for i in chunk])
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
                "routes": [f"POST /{self.model.kind}/{a}" for a in self.model.actions],
                "batching": {"max_batch_size": self.args.max_batch_size,
                             "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                             "max_batch_samples": self.args.max_batch_samples},
                "stats": stats}

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        self.model.check_health()


def _chunks(indices: list[int], weights: list[int], limit: int) -> list[list[int]]:
    """Split indices into consecutive chunks whose weights sum to <= limit (an oversized item goes alone)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, w in zip(indices, weights):
        if current and total + w > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += w
    if current:
        chunks.append(current)
    return chunks


# Options here are the code defaults; serve/config.yaml overrides them per deployment (autoscaling, resources).
# max_ongoing_requests must exceed max_batch_size, or a replica never sees enough requests to fill a batch.
@serve.deployment(max_ongoing_requests=64, max_queued_requests=1024, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
class IKDDiTStudent(StudentServer):
    model_cls = IKDDiTModel


register_student(IKDDiTModel, IKDDiTStudent)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=1024, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=10, health_check_timeout_s=30)
class ClassifierStudent(StudentServer):
    model_cls = ClassifierModel


register_student(ClassifierModel, ClassifierStudent)


# --------------------------------------------------------------------------- HTTP ingress

# Serve serialises a deployment class when it is decorated: whatever the ingress uses from this module must be
# defined above it, and what may change later (the registry) is passed in by build_app instead.


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


api = FastAPI(title="fabdistill students",
              description="Distilled students of fabdistill over HTTP. Routes: " + ", ".join(routes()))


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    """HTTP concerns only: body size, JSON parsing, routing to the student deployments, timeouts, encoding."""

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

def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """Serve application builder: `import_path: serve.app:build_app` with `args` (see serve/schemas.py AppArgs).

    Each student kind gets its own deployment (replicas, autoscaling and resources per kind); the ingress
    reaches them through DeploymentHandles.
    """
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(dict(args or {}))
        except ValidationError as exc:
            raise ValueError(f"serve.app:build_app arguments are invalid:\n{exc}") from None
    unknown = sorted(set(args.students) - set(STUDENTS))
    if unknown:
        raise ValueError(f"unknown student kinds {unknown}; registered: {sorted(STUDENTS)}")
    students = {kind: DEPLOYMENTS[kind].bind(student.model_dump()) for kind, student in args.students.items()}
    actions = {kind: list(STUDENTS[kind].actions) for kind in args.students}
    return Ingress.bind(students, actions, request_timeout_s=args.request_timeout_s,
                        max_body_bytes=args.max_body_bytes)


__all__ = ["AppArgs", "ClassifierModel", "ClassifierStudent", "DEPLOYMENTS", "IKDDiTModel", "IKDDiTStudent",
           "Ingress", "Reply", "STUDENTS", "StudentModel", "StudentServer", "build_app", "register_student", "routes"]
