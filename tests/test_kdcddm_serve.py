"""The KDCDDM Serve kind on loopback: POST /kdcddm/segment and /kdcddm/translate answer (JSON array or base64
PNG in, JSON or PNG out); bad images get 4xx naming the field; good requests after them succeed and batch."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

try:
    from tests.ikddit_fixture import QUIET, free_port, http, start_serve
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import QUIET, free_port, http, start_serve

SIZE = 32
APP = "fabdistill-kdcddm"


def write_student(directory) -> str:
    """A KDCDDM student checkpoint (VAE + generator + defect prior) with seeded, perturbed weights (no training)."""
    from fabdistill.checkpoints import save_state
    from models.gan import build_conditional_unet, build_generator
    from models.vae import build_vae

    torch.manual_seed(0)
    nets = {"vae": build_vae("tiny", 1, SIZE, downsample=4, base_channels=8), "generator": build_generator("tiny", 4, 8),
            "prior": build_conditional_unet("tiny", 4, 0, 8)}
    with torch.no_grad():
        for p in nets["generator"].parameters():
            p.add_(0.02 * torch.randn(p.shape))  # a fresh G is the identity: make the translation differ
    save_state(directory, {"models": {"kdcddm": {k: v.state_dict() for k, v in nets.items()}}},
               {"method": "kdcddm", "phase": "student", "domain": "sem", "image_size": SIZE, "step": 0,
                "diffusion": {"num_timesteps": 1000, "schedule": "cosine"}, "inference": {"steps": 4},
                "models": {"kdcddm": {k: v.meta() for k, v in nets.items()}}, "thresholds": {"kdcddm": 0.05}})
    return str(directory)


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    checkpoint = write_student(tmp_path_factory.mktemp("kdcddm") / "student")
    url = start_serve(free_port())
    serve.run(build_app({"students": {"kdcddm": {"checkpoint": checkpoint, "max_steps": 50}}}),
              name=APP, route_prefix="/", logging_config=QUIET)
    yield url
    serve.shutdown()


IMAGE = np.random.default_rng(0).uniform(0, 1, (SIZE, SIZE)).round(3)


def png_b64(arr: np.ndarray, mode: str = "L") -> str:
    buf = io.BytesIO()
    if mode == "L":
        Image.fromarray((arr * 255).astype(np.uint8), "L").save(buf, format="PNG")
    elif mode == "RGB":
        Image.fromarray(np.stack([(arr * 255).astype(np.uint8)] * 3, -1), "RGB").save(buf, format="PNG")
    else:  # JPEG bytes: an image, but not a PNG
        Image.fromarray((arr * 255).astype(np.uint8), "L").save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


S, T = "/kdcddm/segment", "/kdcddm/translate"
CASES = [
    ("wrong-size", S, {"image": IMAGE[:16, :16].tolist()}, 422, "image: expected a 32x32 image, got 16x16"),
    ("wrong-channels-array", S, {"image": np.stack([IMAGE] * 3).tolist()}, 422, "image: expected 1 channel"),
    ("wrong-channels-hwc", T, {"image": np.stack([IMAGE] * 3, -1).tolist()}, 422, "got 3 channels"),
    ("wrong-channels-png", S, {"png": png_b64(IMAGE, "RGB")}, 422, "png: expected a greyscale PNG (1 channel), got mode RGB"),
    ("png-wrong-size", S, {"png": png_b64(IMAGE[:20, :24])}, 422, "png: expected a 32x32 image, got 24x20"),
    ("not-an-image", S, {"png": base64.b64encode(b"definitely not a picture").decode()}, 422, "png: not an image"),
    ("jpeg-not-png", T, {"png": png_b64(IMAGE, "JPEG")}, 422, "png: expected a PNG, got JPEG"),
    ("not-base64", S, {"png": "@@@ not base64 @@@"}, 422, "png: not valid base64"),
    ("empty-array", S, {"image": []}, 422, "image: empty array"),
    ("empty-png", S, {"png": ""}, 422, "png: String should have at least 1 character"),
    ("neither", S, {"format": "json"}, 422, "image: send exactly one of"),
    ("both", T, {"image": IMAGE.tolist(), "png": png_b64(IMAGE)}, 422, "image: send exactly one of"),
    ("out-of-range", S, {"image": (IMAGE * 3).tolist()}, 422, "image: values must lie in [0, 1]"),
    ("ragged", S, {"image": [[0.1, 0.2], [0.3]]}, 422, "image: rows of unequal length"),
    ("strings", S, {"image": [["a"] * SIZE] * SIZE}, 422, "image: values must be numbers"),
    ("not-a-list", T, {"image": "0.5"}, 422, "image: Input should be a valid list"),
    ("bad-format", S, {"image": IMAGE.tolist(), "format": "gif"}, 422, "format: Input should be 'json' or 'png'"),
    ("threshold-above-one", S, {"image": IMAGE.tolist(), "threshold": 2.0}, 422, "threshold"),
    ("threshold-on-translate", T, {"image": IMAGE.tolist(), "threshold": 0.1}, 422,
     "threshold: Extra inputs are not permitted"),
    ("steps-too-many", S, {"image": IMAGE.tolist(), "steps": 51}, 422, "steps: Value error, steps=51 exceeds"),
    ("unknown-field", S, {"image": IMAGE.tolist(), "imgae": 1}, 422, "imgae: Extra inputs are not permitted"),
    ("unknown-action", "/kdcddm/inpaint", {"image": IMAGE.tolist()}, 404, "unknown action 'inpaint'"),
]


@pytest.mark.parametrize("path,body,status,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_naming_the_field(server, path, body, status, needle):
    got, headers, content = http("POST", server + path, body)
    assert got == status, content[:400]
    payload = json.loads(content)
    assert needle in payload["error"], payload
    assert payload["detail"] and all({"field", "message", "type"} <= set(d) for d in payload["detail"])


def test_nan_literal_is_refused(server):
    body = json.dumps({"image": IMAGE.tolist()}).replace(str(IMAGE[0, 0]), "NaN", 1).encode()
    got, _, content = http("POST", server + S, body)
    assert got == 422 and "image: values must be finite" in json.loads(content)["error"]


def test_good_requests_after_bad_ones_segment_and_translate(server):
    status, _, content = http("POST", server + S, {"image": IMAGE.tolist()})
    assert status == 200, content[:400]
    reply = json.loads(content)
    mask, score = np.asarray(reply["mask"]), np.asarray(reply["score"])
    assert mask.shape == score.shape == (SIZE, SIZE) and reply["threshold"] == 0.05
    assert np.array_equal(mask, (score >= 0.05 - 1e-4).astype(int)) or abs(mask.sum() - reply["defect_pixels"]) == 0
    assert reply["defect_pixels"] == int(mask.sum()) and np.isfinite(score).all()
    # the same image as a PNG upload, threshold given, PNG out: input | score | mask side by side
    status, headers, content = http("POST", server + S, {"png": png_b64(IMAGE), "format": "png", "threshold": 0.1})
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(content)).size == (3 * SIZE, SIZE)
    status, _, content = http("POST", server + T, {"image": [IMAGE.tolist()]})  # (1, H, W) is accepted
    clean = np.asarray(json.loads(content)["translation"])
    assert status == 200 and clean.shape == (SIZE, SIZE) and 0 <= clean.min() and clean.max() <= 1
    status, headers, content = http("POST", server + T, {"image": IMAGE.tolist(), "format": "png"})
    assert status == 200 and Image.open(io.BytesIO(content)).size == (SIZE, SIZE)


def test_concurrent_requests_are_batched_and_match_single_ones(server):
    images = [np.random.default_rng(i).uniform(0, 1, (SIZE, SIZE)).round(3) for i in range(6)]
    alone = json.loads(http("POST", server + T, {"image": images[0].tolist()})[2])["translation"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda im: http("POST", server + T, {"image": im.tolist()}), images))
    assert all(r[0] == 200 for r in replies)
    assert np.allclose(json.loads(replies[0][2])["translation"], alone, atol=2e-4)  # the student is deterministic
    stats = json.loads(http("GET", server + "/models")[2])["students"]["kdcddm"]["stats"]
    assert stats["requests"] >= 7 and stats["batches"] <= stats["requests"]
