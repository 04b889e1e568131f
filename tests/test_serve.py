"""Ray Serve: the IKDDiT student over HTTP on 127.0.0.1 (shapes, seeds, batching, PNG, /healthz, /models), the
classifier student, a plug-in student defined here (outside serve/) deployed by its import path, and the offline
checks of serve/config.yaml, student discovery and the serving sampler."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from serve.framework import Reply, StudentModel
from serve.schemas import validate

try:
    from tests.ikddit_fixture import QUIET, equipment_logs, free_port, http, start_serve, write_tiny_student
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import QUIET, equipment_logs, free_port, http, start_serve, write_tiny_student

REPO = Path(__file__).resolve().parents[1]
APP = "fabdistill-test"


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    x: int


class EchoStudent(StudentModel):
    """A plug-in student kind defined outside serve/: POST /echo/double doubles x. `delay_s` makes it slow."""

    kind, actions = "echo", {"double": Echo}
    deployment_options = {"ray_actor_options": {"num_cpus": 0.1}}
    delay_s = 0.0
    calls: list[int] = []  # requests per handle_batch call (in-process tests)

    def load(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def describe(self) -> dict:
        return {"kind": self.kind, "checkpoint": self.checkpoint}

    def validate_request(self, action: str, payload: dict[str, Any]) -> Echo:
        return validate(Echo, payload)

    def handle_batch(self, action: str, requests: list[Echo]) -> list[int]:
        type(self).calls.append(len(requests))
        time.sleep(self.delay_s)  # a slow model: later requests arrive while it runs
        if any(r.x < 0 for r in requests):
            raise RuntimeError("negative input")
        return [2 * r.x for r in requests]

    def respond(self, action: str, request: Echo, result: int) -> Reply:
        return Reply.json({"y": result})


ECHO = f"{__name__}:EchoStudent"  # its import path, as the app args name a plug-in


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_tiny_student(tmp_path_factory.mktemp("ikddit") / "student"))


@pytest.fixture(scope="module")
def logs() -> tuple[np.ndarray, np.ndarray]:
    return equipment_logs(16, seed=3)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory) -> str:
    """A tiny wafer-map classifier trained in-process (run.num_workers=0) by the classifier method's own train()."""
    from fabdistill.config import load_config
    from trainers.classifier import Config, train

    cfg = load_config(Config, REPO / "configs" / "classifier_wafer.yaml", [
        "data.n_train=288", "data.n_eval=0", "data.size=16", "model.arch=tiny", "optim.epochs=3",
        "optim.batch_size=32", "optim.warmup_steps=4", f"run.storage_path={tmp_path_factory.mktemp('runs')}",
        "run.name=classifier", "run.num_workers=0"])
    outcome = train(cfg)
    assert outcome.error is None and outcome.checkpoint_dir, outcome
    return outcome.checkpoint_dir


@pytest.fixture(scope="module")
def server(ray_local, checkpoint, classifier_checkpoint):
    """The app of serve/app.py on the session's local Ray, with the two built-in student kinds (IKDDiT and a
    classifier) and the plug-in EchoStudent named by its import path; a long batch wait so concurrent requests
    batch."""
    from ray import serve

    from serve.app import build_app

    url = start_serve(free_port())
    serve.run(build_app({"students": {"ikddit": {"checkpoint": checkpoint, "batch_wait_timeout_s": 0.25,
                                                 "max_n": 8, "max_steps": 50},
                                      "classifier": {"checkpoint": classifier_checkpoint, "max_n": 16},
                                      ECHO: {"checkpoint": "mem://echo"}}}),
              name=APP, route_prefix="/", logging_config=QUIET)
    yield url
    serve.shutdown()


def _request(logs, i: int, **extra) -> dict:
    log, ids = logs
    return {"equipment_log": log[i].tolist(), "equipment_id": int(ids[i]), "steps": 6, **extra}


def _post(url: str, body: dict) -> dict:
    status, headers, content = http("POST", url + "/ikddit/generate", body)
    assert status == 200, content[:500]
    assert headers["content-type"].startswith("application/json")
    return json.loads(content)


def _maps(reply: dict) -> np.ndarray:
    return np.stack([np.asarray(reply["dx"]), np.asarray(reply["dy"])], axis=1)  # (n, 2, H, W)


# --------------------------------------------------------------------------- over HTTP

def test_generate_json_shapes_units_and_wafer_mask(server, logs):
    reply = _post(server, _request(logs, 0, n=3, seed=11))
    maps = _maps(reply)
    assert reply["shape"] == [3, 2, 32, 32] and maps.shape == (3, 2, 32, 32)
    assert reply["units"] == "nm" and reply["seed"] == 11 and reply["steps"] == 6 and reply["mask_ratio"] == 0.5
    assert np.isfinite(maps).all() and np.abs(maps).max() > 0.1  # perturbed weights give non-trivial maps
    valid = np.asarray(reply["valid"], dtype=bool)
    assert valid.shape == (32, 32) and 0 < valid.sum() < 32 * 32
    assert np.all(maps[:, :, ~valid] == 0.0)  # off-wafer pixels are zero
    assert not np.allclose(maps[0], maps[1])  # n maps of one condition differ (own noise each)


def test_seed_gives_identical_maps_and_no_seed_is_reported(server, logs):
    first = _post(server, _request(logs, 1, n=2, seed=123))
    again = _post(server, _request(logs, 1, n=2, seed=123))
    other = _post(server, _request(logs, 1, n=2, seed=124))
    assert first["dx"] == again["dx"] and first["dy"] == again["dy"]
    assert not np.allclose(_maps(first), _maps(other))
    unseeded = _post(server, _request(logs, 1))
    replay = _post(server, _request(logs, 1, seed=unseeded["seed"]))  # the reported seed reproduces the maps
    assert replay["dx"] == unseeded["dx"]


def test_concurrent_requests_batch_and_match_their_solo_maps(server, logs):
    bodies = [_request(logs, i, n=1 + i % 3, seed=1000 + i, mask_ratio=0.5) for i in range(8)]
    solo = [_post(server, b) for b in bodies]
    before = json.loads(http("GET", server + "/models")[2])["students"]["ikddit"]["stats"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _post(server, b), bodies))
    after = json.loads(http("GET", server + "/models")[2])["students"]["ikddit"]["stats"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == len(bodies) and batches < requests, (requests, batches)  # some requests shared a batch
    for a, b in zip(solo, together):
        # Same seed, same maps; batched matrix products may differ in the last float32 bit (maps are rounded
        # to 1e-4 nm), so allow two rounding steps.
        np.testing.assert_allclose(_maps(b), _maps(a), rtol=0, atol=2e-4)
        assert a["shape"] == b["shape"]


def test_served_maps_equal_the_pipeline_sampler(server, logs, checkpoint):
    from fabdistill.inference.ikddit import IKDDiTPipeline

    reply = _post(server, _request(logs, 4, n=2, seed=77))
    pipe = IKDDiTPipeline.from_checkpoint(checkpoint)
    log, ids = logs
    ref = pipe.sample(np.repeat(log[4:5], 2, 0), np.repeat(ids[4:5], 2), steps=6, mask_ratio=0.5, seed=77)
    np.testing.assert_allclose(_maps(reply), ref.numpy(), rtol=0, atol=2e-4)


def test_png_is_a_decodable_picture(server, logs):
    from PIL import Image

    body = _request(logs, 2, n=2, seed=5, format="png")
    status, headers, content = http("POST", server + "/ikddit/generate", body)
    assert status == 200 and headers["content-type"] == "image/png"
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(content))
    img.load()
    assert img.format == "PNG" and img.mode == "RGB" and img.width > 2 * 96 and img.height > 96
    colours = np.asarray(img).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 20  # heat maps and colour bar, not a blank canvas


def test_healthz_and_models(server, checkpoint):
    status, _, body = http("GET", server + "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok",
                                                  "students": {"ikddit": "ok", "classifier": "ok", "echo": "ok"}}
    status, _, body = http("GET", server + "/models")
    info = json.loads(body)
    assert status == 200 and info["routes"] == ["POST /ikddit/generate", "POST /classifier/classify",
                                                "POST /echo/double"]
    student = info["students"]["ikddit"]
    assert student["checkpoint"] == checkpoint and student["role"] == "student"
    assert student["model"]["size"] == "tiny" and student["log_dim"] == 128 and student["num_ids"] == 1000
    assert student["limits"] == {"max_n": 8, "max_steps": 50}
    assert student["batching"]["max_batch_size"] == 32


def test_classifier_student_serves_wafer_maps(server, classifier_checkpoint):
    """Fast-AD's student through the same pattern: POST /classifier/classify agrees with the checkpoint offline."""
    import torch

    from data.wafer import generate_wafer
    from fabdistill.inference.classifier import encode_wafer, load_classifier

    table = generate_wafer(12, seed=77, size=16)
    maps = np.asarray(table.column("wafer_map").to_pylist(), dtype=np.int64).reshape(12, 16, 16)  # {0, 1, 2}
    status, _, body = http("POST", server + "/classifier/classify", {"maps": maps.tolist(), "top_k": 2})
    assert status == 200, body[:300]
    out = json.loads(body)
    model, meta = load_classifier(classifier_checkpoint)
    with torch.no_grad():
        expected = torch.softmax(model(encode_wafer(maps)), 1)
    assert out["n"] == 12 and out["classes"] == meta["classes"] and len(out["predictions"]) == 12
    for pred, probs in zip(out["predictions"], expected):
        assert pred["index"] == int(probs.argmax()) and pred["label"] == meta["classes"][pred["index"]]
        assert len(pred["top_k"]) == 2 and abs(pred["probability"] - float(probs.max())) < 1e-4
    info = json.loads(http("GET", server + "/models")[2])["students"]["classifier"]
    assert info["method"] == meta.get("method", "classifier") and info["encoding"] == "wafer_pm1"
    assert info["step"] == meta["step"] > 0

    bad = [({"maps": [[[0, 1, 1, 3]] * 4]}, "values must lie in [0, 2]"),
           ({"maps": [[[0.5] * 8] * 8]}, "values must be integers"),
           ({"maps": [[[1] * 8] * 8, [[1] * 7] * 8]}, "equal-length"),
           ({"maps": [[[1] * 2] * 2]}, "outside [4, 256]"),
           ({"maps": [[[1] * 8] * 8], "top_k": 10}, "exceeds the 9 classes"),
           ({"maps": [[[1] * 8] * 8]} | {"topk": 1}, "topk"),
           ({"maps": [[[1] * 8] * 8] * 17}, "limit of 16")]
    for body, words in bad:
        status, _, content = http("POST", server + "/classifier/classify", body)
        assert 400 <= status < 500 and words in content.decode(), (body, status, content[:300])
    assert http("POST", server + "/classifier/classify", {"maps": maps[:1].tolist()})[0] == 200  # still serving


def test_plugin_student_defined_outside_serve_is_routed_by_its_kind(server):
    """EchoStudent lives in this test module, not under serve/: named by its import path in the app args, it is
    deployed under its class name and answers POST /{its kind}/{action}."""
    status, _, body = http("POST", server + "/echo/double", {"x": 21})
    assert status == 200 and json.loads(body) == {"y": 42}
    status, _, body = http("POST", server + "/echo/double", {"x": "7"})
    assert status == 422 and "x: Input should be a valid integer" in body.decode()
    status, _, body = http("POST", server + "/echo/triple", {"x": 7})
    assert status == 404 and "unknown action 'triple'" in body.decode()
    info = json.loads(http("GET", server + "/models")[2])["students"]["echo"]
    assert info["checkpoint"] == "mem://echo" and info["routes"] == ["POST /echo/double"]


# --------------------------------------------------------------------------- offline (no Ray)

def test_serving_sampler_matches_pipeline_bit_for_bit_when_alone(checkpoint, logs):
    from fabdistill.inference.ikddit import IKDDiTPipeline
    from serve.schemas import StudentArgs
    from serve.students.ikddit import IKDDiTStudent

    model = IKDDiTStudent(StudentArgs(checkpoint=checkpoint, device="cpu"))
    pipe = IKDDiTPipeline.from_checkpoint(checkpoint)
    log, ids = logs
    for i, (n, mask_ratio) in enumerate([(1, 0.5), (3, 0.25), (2, 0.0)]):
        req = model.validate_request("generate", {"equipment_log": log[i].tolist(), "equipment_id": int(ids[i]),
                                                  "n": n, "steps": 4, "seed": 9 + i, "mask_ratio": mask_ratio})
        served = model.handle_batch("generate", [req])[0]
        ref = pipe.sample(np.repeat(log[i:i + 1], n, 0), np.repeat(ids[i:i + 1], n), steps=4,
                          mask_ratio=mask_ratio, seed=9 + i).numpy()
        assert np.array_equal(served, ref)


def test_default_mask_ratio_comes_from_the_checkpoint(checkpoint, logs):
    from serve.schemas import StudentArgs
    from serve.students.ikddit import IKDDiTStudent

    model = IKDDiTStudent(StudentArgs(checkpoint=checkpoint, device="cpu"))
    log, ids = logs
    req = model.validate_request("generate", {"equipment_log": log[0].tolist(), "equipment_id": int(ids[0])})
    assert model.default_mask_ratio == 0.5 and req.mask_ratio == 0.5  # the fixture's training ratio
    assert req.seed is not None and req.steps == 50


def test_chunks_cap_samples_per_forward():
    from serve.framework import chunks

    assert chunks([0, 1, 2, 3], [2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert chunks([5, 6, 7], [1, 9, 1], 4) == [[5], [6], [7]]  # an oversized request runs alone
    assert chunks([], [], 4) == []


def test_unreadable_checkpoint_names_the_path(tmp_path):
    from serve.schemas import StudentArgs
    from serve.students.ikddit import IKDDiTStudent

    missing = str(tmp_path / "no-such-run")
    with pytest.raises(RuntimeError, match="cannot load checkpoint.*no-such-run"):
        IKDDiTStudent(StudentArgs(checkpoint=missing, device="cpu"))


def test_classifier_kind_refuses_a_checkpoint_of_another_kind(checkpoint):
    from serve.schemas import StudentArgs
    from serve.students.classifier import ClassifierStudent

    with pytest.raises(RuntimeError, match="classifier student: cannot load checkpoint.*not a classifier"):
        ClassifierStudent(StudentArgs(checkpoint=checkpoint, device="cpu"))  # an IKDDiT student


def test_build_app_arguments_are_validated():
    from serve.app import build_app

    with pytest.raises(ValueError, match="checkpoint"):
        build_app({})
    with pytest.raises(ValueError, match="max_batch_sise"):
        build_app({"students": {"ikddit": {"checkpoint": "x", "max_batch_sise": 4}}})
    with pytest.raises(ValueError, match=r"unknown student kinds \['segmenter'\].*built-in kinds: "
                                         r"\['classifier', .*'ikddit'.*\].*import path"):
        build_app({"students": {"segmenter": {"checkpoint": "x"}}})
    with pytest.raises(ValueError, match=r"cannot import 'no_such_package.mod' \(ModuleNotFoundError"):
        build_app({"students": {"no_such_package.mod:Student": {"checkpoint": "x"}}})
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_app({"students": {f"{__name__}:Nope": {"checkpoint": "x"}}})
    with pytest.raises(ValueError, match="share the route kind 'ikddit'"):
        build_app({"students": {"ikddit": {"checkpoint": "x"},
                                "serve.students.ikddit:IKDDiTStudent": {"checkpoint": "y"}}})


def test_student_kinds_are_found_in_the_students_package():
    """Every module of serve/students/ is imported and its StudentModel subclasses are served by `kind`: no list
    to keep, no registration call, no ordering rule. Plug-ins resolve by import path and are checked."""
    from serve.framework import builtin_students, check_student, resolve_student
    from serve.students.classifier import ClassifierStudent
    from serve.students.ikddit import IKDDiTStudent

    found = builtin_students()  # every module of serve/students/, whatever methods have added since
    assert found["classifier"] is ClassifierStudent and found["ikddit"] is IKDDiTStudent
    assert all(cls.kind == kind for kind, cls in found.items())
    assert resolve_student("ikddit") is IKDDiTStudent
    assert resolve_student(ECHO) is EchoStudent
    assert resolve_student("serve.students.classifier:ClassifierStudent") is ClassifierStudent

    class NoKind(EchoStudent):
        kind = "Not A Segment"

    class Unfinished(StudentModel):
        kind, actions = "unfinished", {"go": Echo}

    class NoActions(EchoStudent):
        actions = {}

    with pytest.raises(ValueError, match="kind must be a lower-case URL segment"):
        check_student(NoKind, "NoKind")
    with pytest.raises(ValueError, match="does not implement describe, handle_batch, load, respond, "
                                         "validate_request"):
        check_student(Unfinished, "Unfinished")
    with pytest.raises(ValueError, match="actions must map action names"):
        check_student(NoActions, "NoActions")
    with pytest.raises(ValueError, match="not a serve.framework.StudentModel subclass"):
        resolve_student(f"{__name__}:Echo")


def test_serve_config_yaml_is_valid_and_matches_the_app():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import Ingress
    from serve.framework import resolve_student, student_deployment
    from serve.schemas import AppArgs

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    assert args.students["ikddit"].checkpoint
    names = {d.name for d in app.deployments}
    assert names == {Ingress.name} | {student_deployment(resolve_student(k)).name for k in args.students}
    assert student_deployment(resolve_student("ikddit")).name == "IKDDiTStudent"
    for d in raw["applications"][0]["deployments"]:
        assert "autoscaling_config" in d and "num_replicas" not in d
        auto = d["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    student = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "IKDDiTStudent")
    assert student["max_ongoing_requests"] > args.students["ikddit"].max_batch_size


def test_busy_batches_merge_and_failures_reach_every_request():
    """The replica's contract, with the plug-in student made slow. While the model is busy, the small batches
    serve.batch keeps handing over are merged into the next model call (up to max_batch_size); max_batch_size=1
    never merges; a model failure reaches every request of its call. (serve.batch itself needs a replica, so the
    batches it would form are handed to `_enqueue` directly here; the Serve tests above cover the real path.)"""
    import asyncio

    from serve.framework import StudentServer

    class SlowEcho(EchoStudent):
        delay_s = 0.3
        calls: list[int] = []

    async def traffic(max_batch_size: int, xs: list[int]) -> list:
        server = StudentServer(SlowEcho, {"checkpoint": "mem://echo", "max_batch_size": max_batch_size})
        futures = await server._enqueue([("double", Echo(x=xs[0]))])
        await asyncio.sleep(0.1)  # the model is now busy with the first request
        for x in xs[1:]:  # one-request batches, as serve.batch forms them every batch_wait_timeout_s
            futures += await server._enqueue([("double", Echo(x=x))])
            await asyncio.sleep(0.02)
        return await asyncio.gather(*futures, return_exceptions=True)

    assert asyncio.run(traffic(32, list(range(6)))) == [0, 2, 4, 6, 8, 10]
    assert SlowEcho.calls == [1, 5]  # five batches that arrived while busy: one model call
    SlowEcho.calls.clear()
    asyncio.run(traffic(1, list(range(4))))
    assert SlowEcho.calls == [1, 1, 1, 1]
    SlowEcho.calls.clear()
    outcome = asyncio.run(traffic(32, [1, 2, -3]))
    assert outcome[0] == 2
    assert all(isinstance(r, RuntimeError) and "negative input" in str(r) for r in outcome[1:])

    bad = asyncio.run(StudentServer(ECHO, {"checkpoint": "mem://echo"}).run("double", {"x": "7"}))
    assert bad.status == 422 and b"x: Input should be a valid integer" in bad.content
    unknown = asyncio.run(StudentServer(EchoStudent, {"checkpoint": "mem://echo"}).run("triple", {"x": 7}))
    assert unknown.status == 404


def test_a_straggler_waits_for_the_clients_the_last_call_answered():
    """Closed-loop clients return one round trip after their replies. A request that arrives first must not
    start a call of its own while the others are on their way (calls would then alternate full / nearly
    empty): within batch_linger_s of the last call, the next call waits for as many requests as that call
    took. With batch_linger_s=0 the straggler runs alone."""
    import asyncio

    from serve.framework import StudentServer

    class SlowEcho(EchoStudent):
        delay_s = 0.5
        calls: list[int] = []

    async def traffic(linger: float) -> list:
        server = StudentServer(SlowEcho, {"checkpoint": "mem://echo", "batch_linger_s": linger})
        first = await server._enqueue([("double", Echo(x=1)), ("double", Echo(x=2))])  # one call of two
        await asyncio.gather(*first)
        straggler = await server._enqueue([("double", Echo(x=3))])
        await asyncio.sleep(0.01)  # the other client's round trip
        second = await server._enqueue([("double", Echo(x=4))])
        return await asyncio.gather(*first, *straggler, *second)

    assert asyncio.run(traffic(0.2)) == [2, 4, 6, 8]
    assert SlowEcho.calls == [2, 2]
    SlowEcho.calls.clear()
    assert asyncio.run(traffic(0.0)) == [2, 4, 6, 8]
    assert SlowEcho.calls == [2, 1, 1]
