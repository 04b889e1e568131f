"""KDCDDM student kind: POST /kdcddm/segment (image -> defect mask + score map) and POST /kdcddm/translate (image ->
its clean translation), JSON or PNG out.

The image comes as `image`, a JSON array (H, W) or (1, H, W) of grey values in [0, 1] (wafer maps: map value / 2),
or as `png`, a base64-encoded greyscale PNG (8- or 16-bit) inside the JSON body (the ingress reads JSON bodies).
Any KDCDDM checkpoint holding one segmenting model serves (the one-step student above all; CDLDM or ICDDM work too,
at their diffusion cost); inference is fabdistill.inference.kdcddm.Segmenter. Requests with the same action and
steps share one forward pass. The student is deterministic, so batching changes nothing; a diffusion checkpoint
draws a batch's noise from its first request's seed.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from typing import Any, Hashable, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fabdistill.checkpoints import resolve_checkpoint
from fabdistill.inference.kdcddm import Segmenter
from serve.framework import Reply, StudentModel
from serve.schemas import MAX_SEED, FiniteFloat, RequestError, validate

JSON_DECIMALS = 4
MAX_PNG_BYTES = 4 << 20


class TranslateRequest(BaseModel):
    """POST /kdcddm/translate: one image, given as `image` (JSON array) or `png` (base64), not both."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    image: Optional[list[Any]] = Field(None, description="(H, W) or (1, H, W) grey values in [0, 1]")
    png: Optional[str] = Field(None, min_length=1, description="base64 of a greyscale PNG")
    format: Literal["json", "png"] = "json"
    steps: Optional[int] = Field(None, ge=1, description="DDIM steps of a diffusion checkpoint (<= max_steps)")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="noise seed of a diffusion checkpoint")

    @field_validator("steps")
    @classmethod
    def _steps_limit(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        limit = (info.context or {}).get("max_steps")
        if v is not None and limit is not None and v > limit:
            raise ValueError(f"steps={v} exceeds the limit of {limit}")
        return v


class SegmentRequest(TranslateRequest):
    """POST /kdcddm/segment: as translate, plus an optional score threshold (default: the calibrated one)."""

    threshold: Optional[FiniteFloat] = Field(None, ge=0.0, le=1.0, description="score threshold; default: the "
                                                                              "one chosen on the validation split")


def decode_png(text: str, size: int) -> np.ndarray:
    """base64 PNG -> (H, W) float32 in [0, 1]; RequestError naming `png` for every way it can be wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError.field("png", "not valid base64") from None
    if len(raw) > MAX_PNG_BYTES:
        raise RequestError.field("png", f"{len(raw)} bytes exceed the limit of {MAX_PNG_BYTES}", status=413)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError.field("png", "not an image (cannot decode it as PNG)") from None
    if img.format != "PNG":
        raise RequestError.field("png", f"expected a PNG, got {img.format}")
    if img.mode == "L":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    elif img.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "1":
        arr = np.asarray(img, dtype=np.float32)
    else:
        bands = len(img.getbands())
        raise RequestError.field("png", f"expected a greyscale PNG (1 channel), got mode {img.mode} ({bands} "
                                        "channels)")
    if arr.shape != (size, size):
        raise RequestError.field("png", f"expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def decode_array(value: list, size: int) -> np.ndarray:
    """JSON (H, W) or (1, H, W) array -> (H, W) float32 in [0, 1]."""
    if not value:
        raise RequestError.field("image", "empty array; send (H, W) grey values")
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nesting
        raise RequestError.field("image", "rows of unequal length; send a rectangular (H, W) array") from None
    if arr.dtype == object:
        raise RequestError.field("image", "rows of unequal length; send a rectangular (H, W) array")
    if arr.dtype.kind not in "iuf":
        raise RequestError.field("image", f"values must be numbers, got {arr.dtype.kind!r} data")
    if arr.ndim == 3:
        channels = arr.shape[-1] if arr.shape[0] == size and arr.shape[-1] != size else arr.shape[0]  # HWC or CHW
        if arr.shape[0] != 1:
            raise RequestError.field("image", f"expected 1 channel (H, W) or (1, H, W), got {channels} channels "
                                              f"(shape {list(arr.shape)})")
        arr = arr[0]
    if arr.ndim != 2:
        raise RequestError.field("image", f"expected an (H, W) array, got {arr.ndim} dimensions")
    if arr.shape != (size, size):
        raise RequestError.field("image", f"expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise RequestError.field("image", "values must be finite")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise RequestError.field("image", f"values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]")
    return arr


class KDCDDMStudent(StudentModel):
    """A KDCDDM checkpoint (the one-step student, or CDLDM / ICDDM): image -> clean translation, score map, mask."""

    kind = "kdcddm"
    actions = {"segment": SegmentRequest, "translate": TranslateRequest}
    deployment_options = {"ray_actor_options": {"num_cpus": 0.5}}

    def load(self, checkpoint: str) -> None:
        try:
            self.checkpoint = resolve_checkpoint(checkpoint)
            self.seg = Segmenter.from_checkpoint(self.checkpoint, device=self.device)
        except Exception as exc:
            raise RuntimeError(f"KDCDDM student: cannot load checkpoint {checkpoint!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        if not self.seg.translates:
            raise RuntimeError(f"KDCDDM student: {checkpoint!r} holds the supervised baseline, which cannot translate")
        self.requested_checkpoint = checkpoint
        self.size = self.seg.image_size
        self.max_steps = min(self.args.max_steps, self.seg.diffusion.num_timesteps)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "checkpoint": self.checkpoint, "requested_checkpoint": self.requested_checkpoint,
                "model": self.seg.model, "domain": self.seg.domain, "image_size": self.size,
                "threshold": self.seg.threshold, "step": self.seg.meta.get("step"), "device": str(self.device),
                "limits": {"max_steps": self.max_steps}}

    def validate_request(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        schema = SegmentRequest if action == "segment" else TranslateRequest
        req = validate(schema, payload, max_steps=self.max_steps)
        if (req.image is None) == (req.png is None):
            raise RequestError.field("image", "send exactly one of 'image' (JSON array) and 'png' (base64 PNG)")
        pixels = decode_array(req.image, self.size) if req.image is not None else decode_png(req.png, self.size)
        threshold = getattr(req, "threshold", None)
        if action == "segment" and threshold is None and self.seg.threshold is None:
            raise RequestError.field("threshold", "this checkpoint has no calibrated threshold; send one")
        return {"pixels": pixels, "format": req.format, "steps": req.steps,
                "seed": req.seed if req.seed is not None else secrets.randbelow(2**31),
                "threshold": threshold if threshold is not None else self.seg.threshold}

    def group_key(self, action: str, request: dict[str, Any]) -> Hashable:
        return (action, request["steps"])

    def handle_batch(self, action: str, requests: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """One translation over the stacked images: (R, 1, H, W) -> per request {"score", "translation"}."""
        x = torch.from_numpy(np.stack([r["pixels"] for r in requests])[:, None])
        score, clean = self.seg.score(x, seed=requests[0]["seed"], steps=requests[0]["steps"])
        return [{"score": score[i].cpu().numpy(), "translation": clean[i, 0].cpu().numpy()}
                for i in range(len(requests))]

    def respond(self, action: str, request: dict[str, Any], result: dict[str, np.ndarray]) -> Reply:
        from fabdistill.viz import png_bytes

        info = {"kind": self.kind, "model": self.seg.model, "shape": [self.size, self.size]}
        if action == "translate":
            if request["format"] == "png":
                return Reply(200, png_bytes(_grey(result["translation"])), "image/png")
            return Reply.json({**info, "translation": _rounded(result["translation"])})
        mask = result["score"] >= request["threshold"]
        if request["format"] == "png":  # input | score map (scaled to its max) | mask, side by side
            score = result["score"] / max(float(result["score"].max()), 1e-6)
            return Reply(200, png_bytes(_grey(np.concatenate([request["pixels"], score, mask], axis=1))),
                         "image/png")
        return Reply.json({**info, "threshold": request["threshold"], "defect_pixels": int(mask.sum()),
                           "mask": mask.astype(int).tolist(), "score": _rounded(result["score"])})


def _grey(arr: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray((np.clip(np.asarray(arr, np.float64), 0, 1) * 255).round().astype(np.uint8), "L")


def _rounded(arr: np.ndarray) -> list:
    return (np.round(arr.astype(np.float64), JSON_DECIMALS) + 0.0).tolist()
