"""DMD2 generator kind: POST /dmd2/generate, class (+ n, seed, steps ∈ 1..4) -> wafer maps or SEM images, JSON or PNG.

Batching and determinism: requests with the same `steps` share every generator call (one forward per chain
step over all their samples). Each request draws its noise, and for a few-step chain its renoising noise, from
its own seeded generator in the order of ``DMD2Pipeline.sample`` (the pipeline's ``sample_many`` does it; this
module has no sampling loop of its own), so a seeded request gives the same samples alone or batched with others
(wafer maps are integers; SEM grey levels are returned rounded to 1e-4).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Hashable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fabdistill.checkpoints import resolve_checkpoint
from fabdistill.inference.dmd2 import MAX_GENERATOR_STEPS, DMD2Pipeline, class_grid
from serve.framework import Reply, StudentModel
from serve.schemas import MAX_SEED, RequestError, validate

JSON_DECIMALS = 4  # SEM grey levels: far below one of 256 display levels


class GenerateRequest(BaseModel):
    """POST /dmd2/generate: n samples of one class (a wafer-map class or an SEM defect type)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    class_: Union[int, str] = Field(alias="class", description="class index, or its name (e.g. 'Donut', 'bridge')")
    n: int = Field(1, ge=1, description="samples to generate (<= max_n)")
    steps: Optional[int] = Field(None, ge=1, le=MAX_GENERATOR_STEPS,
                                 description="generator chain steps; default: the trained chain length")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="same seed, same samples; default: random")
    format: Literal["json", "png"] = "json"

    @field_validator("n")
    @classmethod
    def _n_limit(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_n")
        if limit is not None and v > limit:
            raise ValueError(f"n={v} exceeds the limit of {limit} samples per request; split the request")
        return v


class DMD2Student(StudentModel):
    """A distilled DMD2 generator checkpoint: class -> samples in one to four generator calls."""

    kind = "dmd2"
    actions = {"generate": GenerateRequest}
    deployment_options = {"ray_actor_options": {"num_cpus": 1}}

    def load(self, checkpoint: str) -> None:
        try:
            self.checkpoint = resolve_checkpoint(checkpoint)
            self.pipeline = DMD2Pipeline.from_checkpoint(self.checkpoint, device=self.device)
        except Exception as exc:  # FileNotFoundError, ValueError, S3 errors: all mean "cannot serve this"
            raise RuntimeError(f"DMD2 student: cannot load checkpoint {checkpoint!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        if self.pipeline.role != "generator":
            raise RuntimeError(f"DMD2 student: {checkpoint!r} is a {self.pipeline.role} checkpoint; serve a "
                               "distilled generator (the run's -distill folder)")
        self.requested_checkpoint = checkpoint
        self._nonfinite: Optional[str] = None

    def describe(self) -> dict[str, Any]:
        meta = self.pipeline.meta
        return {"kind": self.kind, "checkpoint": self.checkpoint, "requested_checkpoint": self.requested_checkpoint,
                "domain": self.pipeline.domain, "classes": list(self.pipeline.class_names),
                "image_size": self.pipeline.image_size, "trained_steps": self.pipeline.default_steps,
                "step": meta.get("step"), "device": str(self.device),
                "limits": {"max_n": self.args.max_n, "steps": [1, MAX_GENERATOR_STEPS]}}

    def validate_request(self, action: str, payload: dict[str, Any]) -> GenerateRequest:
        if isinstance(payload, dict) and "class_" in payload:  # the alias is the only spelling
            raise RequestError.field("class_", "unknown field; the class is given as 'class'")
        req = validate(GenerateRequest, payload, max_n=self.args.max_n)
        names = self.pipeline.class_names
        label = req.class_
        if isinstance(label, str):
            if label not in names:
                raise RequestError.field("class", f"unknown class {label!r}; expected one of {list(names)} "
                                                  f"or an index in [0, {len(names)})")
            label = names.index(label)
        elif not 0 <= label < len(names):
            raise RequestError.field("class", f"{label} out of range [0, {len(names)})")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        steps = req.steps if req.steps is not None else self.pipeline.default_steps
        return req.model_copy(update={"class_": int(label), "seed": seed, "steps": steps})

    def group_key(self, action: str, request: GenerateRequest) -> Hashable:
        return (action, request.steps)

    def batch_weight(self, request: GenerateRequest) -> int:
        return request.n

    def handle_batch(self, action: str, requests: list[GenerateRequest]) -> list[np.ndarray]:
        """One generator chain over the concatenated requests (equal steps within a group); each request's noise
        from its own seeded generator. Returns one (n_i, 1, H, W) float32 array in native units per request."""
        out = self.pipeline.sample_many([r.class_ for r in requests], [r.n for r in requests],
                                        [r.seed for r in requests], steps=requests[0].steps)
        if not all(np.isfinite(x).all() for x in out):
            self._nonfinite = f"non-finite samples at {time.strftime('%H:%M:%S')} (steps={requests[0].steps})"
        return out

    def respond(self, action: str, request: GenerateRequest, result: np.ndarray) -> Reply:
        if not np.isfinite(result).all():
            return Reply.json({"error": "the model produced non-finite values; the replica is marked unhealthy"},
                              status=500)
        name = self.pipeline.class_names[request.class_]
        if request.format == "png":
            from fabdistill.viz import png_bytes

            labels = np.full(request.n, request.class_)
            fig = class_grid(result, labels, self.pipeline.class_names, self.pipeline.domain,
                             heading=f"DMD2 {request.steps}-step | {name} | seed {request.seed}",
                             per_row=min(request.n, 16))  # a matplotlib Figure per call, all tiles on one axes
            return Reply(200, png_bytes(fig, compress_level=1), "image/png")
        if self.pipeline.domain == "wafer":
            values, units = result[:, 0].astype(np.int64).tolist(), "0 no die / 1 pass / 2 fail"
        else:
            values, units = (np.round(result[:, 0].astype(np.float64), JSON_DECIMALS) + 0.0).tolist(), "grey [0, 1]"
        return Reply.json({"kind": self.kind, "domain": self.pipeline.domain, "class": request.class_,
                           "class_name": name, "n": request.n, "steps": request.steps, "seed": request.seed,
                           "shape": list(result.shape), "units": units, "samples": values})

    def check_health(self) -> None:
        if self._nonfinite:
            raise RuntimeError(f"DMD2 student produced {self._nonfinite}")
