"""The DMD2 Serve kind on loopback: POST /dmd2/generate (JSON and PNG), seeded determinism alone and batched
across concurrent requests, the served samples equal to the pipeline's, and bad requests -> 4xx naming the field.
One Ray Serve start for the module."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

try:
    from tests.ikddit_fixture import QUIET, free_port, http, start_serve
    from tests.test_dmd2 import SIZE, write_tiny_checkpoint
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import QUIET, free_port, http, start_serve
    from test_dmd2 import SIZE, write_tiny_checkpoint

APP = "fabdistill-dmd2"
MAX_N = 8
G = "/dmd2/generate"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("dmd2") / "generator", num_steps=2))


@pytest.fixture(scope="module")
def server(ray_local, checkpoint):
    from ray import serve

    from serve.app import build_app

    url = start_serve(free_port())
    # A long batch wait so that concurrent requests share one generator call.
    student = {"checkpoint": checkpoint, "max_n": MAX_N, "batch_wait_timeout_s": 0.3}
    serve.run(build_app({"students": {"dmd2": student}, "max_body_bytes": 64 * 1024}), name=APP, route_prefix="/",
              logging_config=QUIET)
    yield url
    serve.shutdown()


def _post(url: str, body: dict) -> dict:
    status, _, content = http("POST", url + G, body)
    assert status == 200, content[:400]
    return json.loads(content)


def test_generate_json_by_index_and_by_name(server):
    reply = _post(server, {"class": 1, "n": 3, "seed": 5, "steps": 1})
    assert reply["class_name"] == "Donut" and reply["shape"] == [3, 1, SIZE, SIZE] and reply["steps"] == 1
    maps = np.asarray(reply["samples"])
    assert maps.shape == (3, SIZE, SIZE) and set(np.unique(maps)) <= {0, 1, 2}
    by_name = _post(server, {"class": "Donut", "n": 3, "seed": 5, "steps": 1})
    assert by_name["samples"] == reply["samples"] and by_name["class"] == 1
    default = _post(server, {"class": 0, "seed": 1})
    assert default["steps"] == 2 and default["n"] == 1  # the trained chain length, one sample


def test_seeded_requests_repeat_and_unseeded_ones_report_their_seed(server):
    a = _post(server, {"class": 4, "n": 2, "seed": 77, "steps": 3})
    assert _post(server, {"class": 4, "n": 2, "seed": 77, "steps": 3})["samples"] == a["samples"]
    assert _post(server, {"class": 4, "n": 2, "seed": 78, "steps": 3})["samples"] != a["samples"]
    unseeded = _post(server, {"class": 4, "n": 2, "steps": 3})
    replay = _post(server, {"class": 4, "n": 2, "steps": 3, "seed": unseeded["seed"]})
    assert replay["samples"] == unseeded["samples"]


def test_concurrent_requests_batch_and_match_their_solo_samples(server):
    bodies = [{"class": i % 9, "n": 1 + i % 3, "seed": 500 + i, "steps": 1 + i % 2} for i in range(8)]
    solo = [_post(server, b) for b in bodies]
    before = json.loads(http("GET", server + "/models")[2])["students"]["dmd2"]["stats"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _post(server, b), bodies))
    after = json.loads(http("GET", server + "/models")[2])["students"]["dmd2"]["stats"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == len(bodies) and batches < requests, (requests, batches)  # some requests shared a batch
    for a, b in zip(solo, together):
        assert a["samples"] == b["samples"] and a["shape"] == b["shape"]


def test_served_samples_equal_the_pipeline(server, checkpoint):
    from fabdistill.inference.dmd2 import DMD2Pipeline

    pipe = DMD2Pipeline.from_checkpoint(checkpoint)
    reply = _post(server, {"class": 7, "n": 2, "seed": 9, "steps": 2})
    np.testing.assert_array_equal(np.asarray(reply["samples"]), pipe.sample(7, 2, seed=9, steps=2)[:, 0])


def test_png_is_a_decodable_picture(server):
    from PIL import Image

    status, headers, content = http("POST", server + G, {"class": "Center", "n": 4, "seed": 2, "format": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(content))
    assert img.size[0] > 4 * SIZE and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) >= 3


def test_models_describes_the_generator(server, checkpoint):
    info = json.loads(http("GET", server + "/models")[2])
    assert "POST /dmd2/generate" in info["routes"]
    student = info["students"]["dmd2"]
    assert student["checkpoint"] == checkpoint and student["domain"] == "wafer" and len(student["classes"]) == 9
    assert student["limits"] == {"max_n": MAX_N, "steps": [1, 4]} and student["trained_steps"] == 2


GOOD = {"class": 1, "n": 1, "seed": 1, "steps": 1}
CASES = [  # (case id, body, status, text the error must contain)
    ("class-out-of-range", {**GOOD, "class": 9}, 422, "class: 9 out of range [0, 9)"),
    ("class-negative", {**GOOD, "class": -1}, 422, "class: -1 out of range"),
    ("class-unknown-name", {**GOOD, "class": "Doughnut"}, 422, "class: unknown class 'Doughnut'"),
    ("class-missing", {k: v for k, v in GOOD.items() if k != "class"}, 422, "class: Field required"),
    ("class-as-float", {**GOOD, "class": 1.0}, 422, "class"),
    ("n-too-large", {**GOOD, "n": MAX_N + 1}, 422, f"n: Value error, n={MAX_N + 1} exceeds the limit"),
    ("n-zero", {**GOOD, "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ("steps-five", {**GOOD, "steps": 5}, 422, "steps: Input should be less than or equal to 4"),
    ("steps-zero", {**GOOD, "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ("steps-as-string", {**GOOD, "steps": "2"}, 422, "steps: Input should be a valid integer"),
    ("seed-negative", {**GOOD, "seed": -3}, 422, "seed"),
    ("bad-format", {**GOOD, "format": "gif"}, 422, "format: Input should be 'json' or 'png'"),
    ("unknown-field", {**GOOD, "sampler": "heun"}, 422, "sampler: Extra inputs are not permitted"),
    ("python-name-of-class", {**{k: v for k, v in GOOD.items() if k != "class"}, "class_": 1}, 422, "class_"),
]


@pytest.mark.parametrize("body,status,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_naming_the_field(server, body, status, needle):
    got, headers, content = http("POST", server + G, json.dumps(body).encode())
    assert got == status, content[:400]
    payload = json.loads(content)
    assert needle in payload["error"], payload


def test_malformed_json_and_wrong_action_are_refused(server):
    status, _, content = http("POST", server + G, b'{"class": 1,, }')
    assert status == 400 and "malformed JSON" in json.loads(content)["error"]
    status, _, content = http("POST", server + "/dmd2/sample", GOOD)
    assert status == 404 and "unknown action 'sample'" in json.loads(content)["error"]
    assert _post(server, GOOD)["n"] == 1  # and the replica still serves
