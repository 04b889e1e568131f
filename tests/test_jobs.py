"""Ray Jobs: a training app submitted with `ray job submit --working-dir .` to a local cluster with token auth.

The cluster is this test's own: `ray start --head --block` in a new session, its own ports, its own --temp-dir
(so `ray.init()` elsewhere never finds it: the "current cluster" file lives in that dir) and its own token file.
It is stopped by killing the process group it started, plus any process that carries its token path in the
environment (job drivers run in sessions of their own). Never `ray stop`: that stops every Ray on the machine.
Deselect with `-m "not slow"`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(k: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _our_processes(marker: str) -> list[int]:
    """PIDs whose environment mentions `marker` (our cluster's unique token path): only what we started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="fdj-", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    token_path = os.path.join(temp_dir, "auth_token")
    Path(token_path).write_text(token)
    os.chmod(token_path, 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "RAY_AUTH_TOKEN"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                # The dashboard (which serves the Jobs API) starts 9 module processes; on a loaded 2-core CI box
                # that can take longer than Ray's default 60 s.
                "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"})
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = _free_ports(7)
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
         "--temp-dir", temp_dir, "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    info = {"address": address, "env": env, "token": token, "temp_dir": temp_dir}
    try:
        deadline = time.time() + 330
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if _get(address + "/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the test cluster's dashboard did not come up:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(2)
        yield info
    finally:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):  # the group `ray start` leads
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)
        for pid in _our_processes(token_path):  # stragglers: job drivers, workers that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_cluster_refuses_clients_without_the_token(cluster):
    status, _ = _get(cluster["address"] + "/api/jobs/", None)
    assert status == 401
    status, _ = _get(cluster["address"] + "/api/jobs/", "not-the-token")
    assert status == 403


def test_training_app_runs_unchanged_as_a_ray_job(cluster, tmp_path):
    storage = tmp_path / "runs"
    job_id = f"fabdistill-test-{secrets.token_hex(4)}"
    cmd = [RAY, "job", "submit", "--address", cluster["address"], "--submission-id", job_id, "--no-wait",
           "--working-dir", ".", "--runtime-env", "configs/runtime_env.yaml", "--",
           "python", "-m", "apps.train", "ikddit", "--config", "configs/ikddit_tiny.yaml",
           "--set", f"run.storage_path={storage}", "--set", "run.name=job-smoke", "--set", "phase=teacher",
           "--set", "teacher.steps=4", "--set", "teacher.checkpoint_every=2", "--set", "teacher.log_every=2",
           "--set", "data.num_train=64", "--set", "run.num_workers=1"]
    submitted = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]

    deadline, status = time.time() + 240, None
    while time.time() < deadline:
        code, body = _get(f"{cluster['address']}/api/jobs/{job_id}", cluster["token"])
        assert code == 200, body[:500]
        status = json.loads(body)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = json.loads(_get(f"{cluster['address']}/api/jobs/{job_id}/logs", cluster["token"])[1]).get("logs", "")
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        subprocess.run([RAY, "job", "stop", "--address", cluster["address"], job_id], env=cluster["env"],
                       capture_output=True, timeout=60)
    assert status == "SUCCEEDED", f"job ended {status}:\n{logs[-4000:]}"

    model = storage / "job-smoke-teacher" / "model"
    assert (model / "state.pt").is_file(), sorted(p.name for p in storage.rglob("*"))[:50]
    meta = json.loads((model / "meta.json").read_text())
    assert meta["method"] == "ikddit" and meta["role"] == "teacher" and meta["step"] == 4
    lines = (storage / "job-smoke-teacher" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    from fabdistill.inference.ikddit import IKDDiTPipeline

    assert IKDDiTPipeline.from_checkpoint(str(model)).role == "teacher"


def test_runtime_env_file_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((REPO / "configs" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**raw)
    assert set(raw) <= {"env_vars", "excludes", "working_dir", "py_modules", "pip", "uv", "config"}
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    for heavy in (".venv/", "runs/", ".git/"):
        assert heavy in raw["excludes"]
    assert not any("AWS" in k or "TOKEN" in k for k in raw["env_vars"])  # no credentials in job config
