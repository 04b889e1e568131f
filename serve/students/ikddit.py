"""IKDDiT student kind: POST /ikddit/generate, equipment log + ID -> overlay maps (dx, dy) in nm, JSON or PNG.

Batching and determinism: requests with the same steps and mask ratio share every forward pass. Each request's
own seeded generator draws its initial noise and its token masks in the order of ``IKDDiTPipeline.sample``
(the pipeline's ``sample_many`` does it; this module has no sampling loop of its own), so a seeded request
gives the same maps alone or batched with others (equal up to float32 rounding of batched matrix products;
maps are returned rounded to 1e-4 nm).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Hashable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fabdistill.checkpoints import resolve_checkpoint
from fabdistill.inference.ikddit import IKDDiTPipeline, default_mask_ratio
from serve.framework import Reply, StudentModel
from serve.schemas import MAX_SEED, FiniteFloat, RequestError, validate

JSON_DECIMALS = 4  # nm: 0.1 pm, far below overlay metrology precision; keeps responses compact


class GenerateRequest(BaseModel):
    """POST /ikddit/generate: n overlay maps for one equipment condition."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    equipment_log: list[FiniteFloat] = Field(min_length=1, description="standardised equipment-log vector")
    equipment_id: int = Field(ge=0, description="equipment / lot ID, in [0, num_ids)")
    n: int = Field(1, ge=1, description="maps to generate for this condition (<= max_n)")
    steps: int = Field(50, ge=1, description="DDIM steps (<= max_steps)")
    mask_ratio: Optional[FiniteFloat] = Field(None, ge=0.0, lt=1.0,
                                              description="student token mask ratio; default: the trained one")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="same seed, same maps; default: random")
    format: Literal["json", "png"] = "json"

    @field_validator("n")
    @classmethod
    def _n_limit(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_n")
        if limit is not None and v > limit:
            raise ValueError(f"n={v} exceeds the limit of {limit} maps per request; split the request")
        return v

    @field_validator("steps")
    @classmethod
    def _steps_limit(cls, v: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_steps")
        if limit is not None and v > limit:
            raise ValueError(f"steps={v} exceeds the limit of {limit}")
        return v


class IKDDiTStudent(StudentModel):
    """IKDDiT masked student (or teacher) checkpoint: equipment log + ID -> overlay maps (dx, dy) in nm."""

    kind = "ikddit"
    actions = {"generate": GenerateRequest}
    deployment_options = {"ray_actor_options": {"num_cpus": 1}}

    def load(self, checkpoint: str) -> None:
        try:
            self.checkpoint = resolve_checkpoint(checkpoint)
            self.pipeline = IKDDiTPipeline.from_checkpoint(self.checkpoint, device=self.device)
        except Exception as exc:  # FileNotFoundError, ValueError, S3 errors: all mean "cannot serve this"
            raise RuntimeError(f"IKDDiT student: cannot load checkpoint {checkpoint!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        self.requested_checkpoint = checkpoint
        self.default_mask_ratio = default_mask_ratio(self.pipeline.meta)
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
        try:  # None -> the checkpoint's ratio; a teacher sees every token (0)
            mask_ratio = self.pipeline.resolve_mask_ratio(req.mask_ratio)
        except ValueError:  # the schema bounds it to [0, 1): this ratio keeps no token
            raise RequestError.field("mask_ratio", f"{req.mask_ratio} keeps no token of "
                                                   f"{self.pipeline.num_patches}; lower it") from None
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return req.model_copy(update={"mask_ratio": float(mask_ratio), "seed": seed})

    def group_key(self, action: str, request: GenerateRequest) -> Hashable:
        return (action, request.steps, request.mask_ratio)

    def batch_weight(self, request: GenerateRequest) -> int:
        return request.n

    def handle_batch(self, action: str, requests: list[GenerateRequest]) -> list[np.ndarray]:
        """One DDIM run (eta = 0) over the concatenated requests, by the pipeline's sampler; each request's noise
        and masks come from its own seeded generator. Returns one (n_i, 2, H, W) float32 array in nm per request.
        """
        steps, mask_ratio = requests[0].steps, requests[0].mask_ratio  # equal within a group (group_key)
        log = np.asarray([r.equipment_log for r in requests], dtype=np.float32)  # (R, log_dim)
        ids = np.asarray([r.equipment_id for r in requests], dtype=np.int64)  # (R,)
        out = self.pipeline.sample_many(log, ids, [r.n for r in requests], [r.seed for r in requests],
                                        steps=steps, mask_ratio=mask_ratio)  # (n_i, 2, H, W) nm each
        if not all(np.isfinite(m).all() for m in out):
            self._nonfinite = f"non-finite maps at {time.strftime('%H:%M:%S')} (steps={steps})"
        return out

    def respond(self, action: str, request: GenerateRequest, result: np.ndarray) -> Reply:
        if not np.isfinite(result).all():
            return Reply.json({"error": "the model produced non-finite values; the replica is marked unhealthy"},
                              status=500)
        info = {"kind": self.kind, "n": request.n, "steps": request.steps, "mask_ratio": request.mask_ratio,
                "seed": request.seed, "equipment_id": request.equipment_id}
        if request.format == "png":
            from fabdistill.viz import overlay_heatmaps, png_bytes

            # A Figure per call (no pyplot state shared by the executor threads that run respond); one axes for
            # all maps keeps it ~0.2 s at n = 4 (~1.5 s at n = 64 on a loaded 2-core machine).
            fig = overlay_heatmaps(result, titles=[f"#{i}" for i in range(request.n)], valid=self.valid,
                                   heading=f"IKDDiT {self.pipeline.role} | equipment {request.equipment_id} | "
                                           f"seed {request.seed} | {request.steps} steps")
            return Reply(200, png_bytes(fig, compress_level=1), "image/png")
        rounded = np.round(result.astype(np.float64), JSON_DECIMALS) + 0.0  # + 0.0: no "-0.0" off-wafer
        return Reply.json({**info, "shape": list(result.shape), "units": "nm",
                           "dx": rounded[:, 0].tolist(), "dy": rounded[:, 1].tolist(),
                           "valid": self.valid.astype(int).tolist()})

    def check_health(self) -> None:
        if self._nonfinite:
            raise RuntimeError(f"IKDDiT student produced {self._nonfinite}")
