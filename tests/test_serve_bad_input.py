"""Bad input to the students' HTTP API gets a 4xx whose body names the problem, and the replica keeps serving;
an unreadable checkpoint fails the deployment at start, naming the path."""

from __future__ import annotations

import json

import numpy as np
import pytest

try:
    from tests.ikddit_fixture import QUIET, equipment_logs, free_port, http, start_serve, write_tiny_student
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import QUIET, equipment_logs, free_port, http, start_serve, write_tiny_student

APP = "fabdistill-bad-input"
MAX_N, MAX_STEPS, MAX_BODY = 4, 20, 64 * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_tiny_student(tmp_path_factory.mktemp("ikddit") / "student"))


@pytest.fixture(scope="module")
def server(ray_local, checkpoint):
    from ray import serve

    from serve.app import build_app

    url = start_serve(free_port())
    student = {"checkpoint": checkpoint, "max_n": MAX_N, "max_steps": MAX_STEPS}
    serve.run(build_app({"students": {"ikddit": student}, "max_body_bytes": MAX_BODY}),
              name=APP, route_prefix="/", logging_config=QUIET)
    yield url
    serve.shutdown()


LOG, IDS = equipment_logs(1, seed=0)
GOOD = {"equipment_log": LOG[0].tolist(), "equipment_id": int(IDS[0]), "n": 1, "steps": 3, "seed": 1}


def _with(**changes) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()
_LOG_TEXT = json.dumps(GOOD["equipment_log"])

# (case id, path, raw body, expected status, text the body must contain: the field / problem)
G = "/ikddit/generate"
CASES = [
    ("log-too-short", G, _with(equipment_log=GOOD["equipment_log"][:100]), 422,
     "equipment_log: expected 128 values, got 100"),
    ("log-too-long", G, _with(equipment_log=GOOD["equipment_log"] + [0.0]), 422, "equipment_log"),
    ("log-empty", G, _with(equipment_log=[]), 422, "equipment_log"),
    ("id-too-large", G, _with(equipment_id=1000), 422, "equipment_id: 1000 out of range [0, 1000)"),
    ("id-negative", G, _with(equipment_id=-1), 422, "equipment_id"),
    ("n-too-large", G, _with(n=MAX_N + 1), 422, f"n: Value error, n={MAX_N + 1} exceeds the limit"),
    ("n-zero", G, _with(n=0), 422, "n: Input should be greater than or equal to 1"),
    ("steps-too-large", G, _with(steps=MAX_STEPS + 1), 422, "steps: Value error"),
    ("steps-zero", G, _with(steps=0), 422, "steps: Input should be greater than or equal to 1"),
    ("nan-literal", G,
     json.dumps(GOOD).replace(_LOG_TEXT, "[" + ", ".join(["NaN"] + ["0.0"] * 127) + "]").encode(), 422,
     "equipment_log.0: Input should be a finite number"),
    ("infinity-literal", G,
     json.dumps(GOOD).replace(_LOG_TEXT, "[" + ", ".join(["0.0"] * 5 + ["-Infinity"] + ["0.0"] * 122) + "]").encode(),
     422, "equipment_log.5"),
    ("id-as-string", G, _with(equipment_id="14"), 422, "equipment_id: Input should be a valid integer"),
    ("n-as-float", G, _with(n=2.5), 422, "n: Input should be a valid integer"),
    ("steps-as-bool", G, _with(steps=True), 422, "steps"),
    ("log-as-string", G, _with(equipment_log="1,2,3"), 422, "equipment_log: Input should be a valid list"),
    ("log-with-string", G, _with(equipment_log=["a"] + GOOD["equipment_log"][1:]), 422,
     "equipment_log.0"),
    ("missing-log", G, _with(equipment_log=_DROP), 422, "equipment_log: Field required"),
    ("unknown-field", G, _with(stepz=10), 422, "stepz: Extra inputs are not permitted"),
    ("mask-ratio-one", G, _with(mask_ratio=1.0), 422, "mask_ratio: Input should be less than 1"),
    ("mask-ratio-negative", G, _with(mask_ratio=-0.1), 422, "mask_ratio"),
    ("mask-ratio-keeps-nothing", G, _with(mask_ratio=0.99), 422, "mask_ratio: 0.99 keeps no token"),
    ("seed-negative", G, _with(seed=-3), 422, "seed"),
    ("bad-format", G, _with(format="gif"), 422, "format: Input should be 'json' or 'png'"),
    ("malformed-json", G, b'{"equipment_log": [1, 2,, 3]', 400, "body: malformed JSON"),
    ("not-utf8", G, b"\xff\xfe\x00garbage", 400, "body: malformed JSON"),
    ("empty-body", G, b"", 400, "body: empty body"),
    ("json-array", G, b"[1, 2, 3]", 422, "body: expected a JSON object, got list"),
    ("body-too-large", G, b'{"pad": "' + b"x" * (MAX_BODY + 10) + b'"}', 413,
     "exceeds the limit of 65536"),
    ("unknown-student", "/segmenter/generate", _with(), 404, "no student 'segmenter'"),
    ("unknown-action", "/ikddit/translate", _with(), 404, "unknown action 'translate'"),
]


@pytest.mark.parametrize("path,body,status,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_naming_the_problem(server, path, body, status, needle):
    got, headers, content = http("POST", server + path, body)
    assert got == status, content[:400]
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(content)
    assert needle in payload["error"], payload
    assert payload["detail"] and all({"field", "message", "type"} <= set(d) for d in payload["detail"])


def test_wrong_method_is_refused(server):
    status, _, _ = http("GET", server + "/ikddit/generate")
    assert status == 405


def test_replica_still_serves_after_bad_requests(server):
    # Runs after the parametrised cases (file order): the same replica answers a good request and stays healthy.
    status, _, content = http("POST", server + G, GOOD)
    assert status == 200, content[:400]
    reply = json.loads(content)
    assert reply["shape"] == [1, 2, 32, 32] and np.isfinite(np.asarray(reply["dx"])).all()
    status, _, content = http("GET", server + "/healthz")
    assert status == 200 and json.loads(content)["status"] == "ok"
    stats = json.loads(http("GET", server + "/models")[2])["students"]["ikddit"]["stats"]
    assert stats["requests"] >= 1  # bad requests never reached the sampler's batch queue
    assert stats["requests"] < len(CASES)


def test_unreadable_checkpoint_fails_the_deployment_at_start(server, tmp_path):
    """A corrupt state.pt: serve.run fails at deploy time, and the deployment status names the path."""
    from ray import serve

    from serve.framework import student_deployment
    from serve.students.ikddit import IKDDiTStudent

    bad = tmp_path / "corrupt-student"
    bad.mkdir()
    (bad / "state.pt").write_bytes(b"this is not a torch checkpoint")
    (bad / "meta.json").write_text(json.dumps({"method": "ikddit", "role": "student"}))
    # The student deployment alone (no second replica to start) and one constructor attempt instead of the
    # default three, to keep the test short.
    student = student_deployment(IKDDiTStudent, max_constructor_retry_count=1).bind(IKDDiTStudent,
                                                                                   {"checkpoint": str(bad)})
    with pytest.raises(RuntimeError, match="Deploying application bad-checkpoint failed"):
        serve.run(student, name="bad-checkpoint", route_prefix=None, logging_config=QUIET)
    status = serve.status().applications["bad-checkpoint"]
    message = status.deployments["IKDDiTStudent"].message
    assert f"cannot load checkpoint '{bad}'" in message and "unreadable checkpoint" in message
    serve.delete("bad-checkpoint")
    # The good application is untouched.
    assert http("POST", server + G, GOOD)[0] == 200
