"""A tiny IKDDiT student checkpoint for serving tests and benchmarks, written without Ray Train (milliseconds).

Freshly built networks are adaLN-Zero: their final layers are zero, so an x0-predicting student returns the
same (zero) map for every seed and request, and a determinism test could not fail. The weights here are
therefore perturbed with seeded noise: maps then depend on the condition, the noise and the token mask, while
staying reproducible (same seed -> same checkpoint bytes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

MAP_SIZE = 32
SCALE_NM = 5.0


def write_tiny_student(directory: str | Path, seed: int = 0, weight_noise: float = 0.05, **model_overrides) -> Path:
    """Write a tiny IKDDiT student checkpoint folder (state.pt + meta.json) and return its path.

    `model_overrides` set fields of the model section (e.g. num_timesteps=10 for a fast DDPM test)."""
    from fabdistill.checkpoints import save_state
    from fabdistill.inference.ikddit import build_networks
    from trainers.ikddit import ModelSection

    directory = Path(directory)
    model = dataclasses.asdict(ModelSection(**{"size": "tiny", **model_overrides}))
    torch.manual_seed(seed)
    nets = build_networks(model, MAP_SIZE)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("student", "embedding"):
            for p in nets[name].parameters():
                p.add_(weight_noise * torch.randn(p.shape, generator=gen))
    save_state(directory,
               {"student": nets["student"].state_dict(), "embedding": nets["embedding"].state_dict()},
               {"method": "ikddit", "role": "student", "model": model, "map_size": MAP_SIZE,
                "scale_nm": SCALE_NM, "mask_ratio": 0.5, "step": 0})
    return directory


def equipment_logs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real (synthetic-generator) equipment logs (n, 128) float32 and equipment IDs (n,) int64."""
    from data.overlay import generate_overlay

    table = generate_overlay(n, seed=seed, height=MAP_SIZE, width=MAP_SIZE)
    logs = np.asarray(table.column("log").to_pylist(), dtype=np.float32)
    ids = np.asarray(table.column("equipment_id").to_pylist(), dtype=np.int64)
    return logs, ids


# --------------------------------------------------------------------------- Serve on loopback (tests, benchmarks)

def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(port: int) -> str:
    """Start Ray Serve's HTTP proxy on 127.0.0.1:port (Ray must be initialised); returns the base URL."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    return f"http://127.0.0.1:{port}"


QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve logging for tests: failures only


def http(method: str, url: str, body: bytes | dict | None = None, timeout: float = 60.0,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request with urllib -> (status, headers, body); 4xx/5xx are returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
