"""Validation shared by every student kind (pydantic v2, which Ray Serve's FastAPI brings): the error format,
JSON body parsing, the builder's arguments (AppArgs, StudentArgs). Each kind's request schemas live in its own
module under serve/students/.

Every rejection names the field it is about: ``{"error": "...", "detail": [{"field": "equipment_log.3",
"message": "equipment_log.3: Input should be a finite number", "type": "finite_number"}]}``.

Schemas are strict: ``"3"`` is not an integer, ``true`` is not a number, unknown fields are refused (a typo such
as ``"step"`` must not silently fall back to a default), and NaN/Infinity (which Python's ``json`` accepts as
literals) are refused. Limits that depend on the deployment (``max_n``, ``max_steps``) come in through the
validation context (:func:`validate`), so one schema serves every deployment.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]  # refuses NaN and Infinity
MAX_SEED = 2**63 - 1  # seeds are int64


# --------------------------------------------------------------------------- errors

class RequestError(Exception):
    """A client error: HTTP `status` (4xx) and a list of {field, message, type} items."""

    def __init__(self, status: int, errors: list[dict[str, str]], summary: str = "invalid request"):
        self.status, self.errors = status, errors
        self.summary = summary + ": " + "; ".join(e["message"] for e in errors)
        super().__init__(self.summary)

    @classmethod
    def field(cls, field: str, message: str, status: int = 422, kind: str = "value_error") -> "RequestError":
        return cls(status, [{"field": field, "message": f"{field}: {message}", "type": kind}])

    def body(self) -> dict[str, Any]:
        return {"error": self.summary, "detail": self.errors}


def errors_from_validation(exc: ValidationError) -> RequestError:
    """pydantic's ValidationError -> RequestError(422) whose items name the field (dotted path)."""
    items = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        items.append({"field": field, "message": f"{field}: {err['msg']}", "type": err["type"]})
    return RequestError(422, items)


def parse_json_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    """Bytes of an HTTP body -> dict. 413 when larger than max_bytes, 400 when not JSON, 422 when not an object."""
    if len(body) > max_bytes:
        raise RequestError.field("body", f"request body of {len(body)} bytes exceeds the limit of {max_bytes}",
                                 status=413, kind="too_large")
    if not body.strip():
        raise RequestError.field("body", "empty body; send a JSON object", status=400, kind="json_invalid")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError.field("body", f"malformed JSON ({exc})", status=400, kind="json_invalid") from None
    if not isinstance(data, dict):
        raise RequestError.field("body", f"expected a JSON object, got {type(data).__name__}", kind="dict_type")
    return data


def validate(schema: type[BaseModel], data: dict[str, Any], **context: Any) -> BaseModel:
    """schema.model_validate with limits in the context; raises RequestError(422) naming the fields."""
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        raise errors_from_validation(exc) from None


# --------------------------------------------------------------------------- application arguments

class StudentArgs(BaseModel):
    """One student deployment: where its checkpoint is and how it batches."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(min_length=1, description="checkpoint folder, run folder, or s3:// URI of either")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda if visible")
    max_batch_size: int = Field(32, ge=1, le=1024, description="requests per batch; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=5.0, description="wait for a batch to fill")
    batch_linger_s: float = Field(0.1, ge=0.0, le=5.0,
                                  description="after a model call, wait up to this long (at most a quarter of that "
                                              "call's time) for its answered clients to return; 0: off")
    max_batch_samples: int = Field(256, ge=1, le=65536, description="maps per forward pass (chunks a batch)")
    max_n: int = Field(64, ge=1, le=4096, description="maps per request")
    max_steps: int = Field(250, ge=1, le=4000, description="sampler steps per request")


class AppArgs(BaseModel):
    """Arguments of `serve.app:build_app` (serve run ... key=value, or `args:` in serve/config.yaml).

    `checkpoint` is shorthand for ``students: {ikddit: {checkpoint: ...}}``.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = Field(None, min_length=1, description="IKDDiT student checkpoint (shorthand)")
    students: dict[str, StudentArgs] = Field(
        default_factory=dict, description="a built-in kind (a module of serve/students/) or a plug-in's import path "
                                          "'package.module:ClassName' -> that student's arguments")
    request_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="per request, answered with 504")
    replica_wait_s: float = Field(30.0, gt=0.0, le=3600.0,
                                  description="after a student replica dies mid-request, how long the ingress waits "
                                              "for a live one to retry on before answering 503 (within "
                                              "request_timeout_s)")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="larger bodies get 413")

    @model_validator(mode="after")
    def _resolve_shorthand(self) -> "AppArgs":
        if self.checkpoint is not None:
            if "ikddit" in self.students:
                raise ValueError("give the IKDDiT checkpoint once: either `checkpoint` or `students.ikddit`")
            self.students["ikddit"] = StudentArgs(checkpoint=self.checkpoint)
        if not self.students:
            raise ValueError("no student to serve: pass checkpoint=<path or s3:// URI> "
                             "(or students: {ikddit: {checkpoint: ...}})")
        return self
