"""Classifier student kind: POST /classifier/classify, wafer maps (or images) -> class probabilities.

Serves any classifier checkpoint (Fast-AD's data-free student, `apps.train classifier` teachers and students):
load, encodings and prediction come from fabdistill.inference.classifier. Maps of one size in concurrent
requests share one forward pass.
"""

from __future__ import annotations

from typing import Any, Hashable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fabdistill.checkpoints import resolve_checkpoint
from fabdistill.inference.classifier import encode_images, encode_wafer, load_classifier, predict_logits
from serve.framework import Reply, StudentModel
from serve.schemas import RequestError, validate

MAX_IMAGE_SIDE = 256


class ClassifyRequest(BaseModel):
    """POST /classifier/classify: class probabilities for n wafer maps (or images) of one size.

    `maps` is (n, H, W) for wafer-map students (values 0 off-wafer, 1 pass, 2 fail), or (n, C, H, W) uint8 for
    image students (CIFAR); the deployment checks the shape and values against the checkpoint it loaded.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    maps: list[list[list[Any]]] = Field(min_length=1, description="(n, H, W) wafer maps or (n, C, H, W) images")
    top_k: int = Field(3, ge=1, description="classes listed per map, most probable first (<= num_classes)")

    @field_validator("maps")
    @classmethod
    def _n_limit(cls, v: list, info: ValidationInfo) -> list:
        limit = (info.context or {}).get("max_n")
        if limit is not None and len(v) > limit:
            raise ValueError(f"{len(v)} maps exceed the limit of {limit} per request; split the request")
        return v


class ClassifierStudent(StudentModel):
    """A distilled classifier (Fast-AD's data-free student, or any `apps.train classifier` checkpoint):
    wafer maps (or images) -> class probabilities."""

    kind = "classifier"
    actions = {"classify": ClassifyRequest}
    deployment_options = {"ray_actor_options": {"num_cpus": 0.5}}

    def load(self, checkpoint: str) -> None:
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

    def handle_batch(self, action: str, requests: list[ClassifyRequest]) -> list[np.ndarray]:
        """One forward over the concatenated maps; returns one (n_i, num_classes) probability array per request."""
        arrays = [np.asarray(r.maps) for r in requests]
        x = np.concatenate(arrays)  # (N, H, W) or (N, C, H, W)
        x = encode_wafer(x) if self.wafer else encode_images(x)  # (N, C, H, W) in [-1, 1]
        probs = torch.softmax(predict_logits(self.net, x), dim=1).numpy()  # (N, K)
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
