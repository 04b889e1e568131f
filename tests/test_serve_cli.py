"""`python -m serve run <config>` (serve/commands.py), the command `make demo` prints: a checkpoint that cannot be
served exits 1 with one error naming the path, before Ray starts; a tiny IKDDiT student under a runs-like folder
is served and the printed curl request gets its maps; Ctrl-C exits 0 and leaves no process behind.

The served run starts its own local Ray in a child process (RAY_ADDRESS=local: never the session's Ray nor any
other cluster on the machine). Every process it starts inherits a marker in its environment, so the test can
check that none is left and stop only its own if one is."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

try:
    from tests.ikddit_fixture import free_port, http, write_tiny_student
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import free_port, http, write_tiny_student

REPO = Path(__file__).resolve().parents[1]
CHECKED_IN = REPO / "serve" / "config.yaml"
MARKER_VAR = "FABDISTILL_SERVE_CLI_TEST"


def _config(tmp_path: Path, students: dict[str, dict], port: int) -> Path:
    """The checked-in config with only `students` (kind -> settings over the checked-in ones) and their
    deployments, on `port`."""
    from serve.framework import resolve_student, student_deployment

    raw = yaml.safe_load(CHECKED_IN.read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    checked_in = app["args"]["students"]
    app["args"]["students"] = {kind: {**checked_in.get(kind, {}), **settings} for kind, settings in students.items()}
    names = {"Ingress"} | {student_deployment(resolve_student(kind)).name for kind in students}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in names]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _env(marker: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": "local", MARKER_VAR: marker, "PYTHONUNBUFFERED": "1"}


def _marked_processes(marker: str) -> list[int]:
    """PIDs whose environment carries `marker`: only processes this test started (and their children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if f"{MARKER_VAR}={marker}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _assert_nothing_left(marker: str, grace_s: float = 30.0) -> None:
    deadline = time.monotonic() + grace_s
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours only (the marker); stop them so a failure leaves nothing running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"


# --------------------------------------------------------------------------- offline

def test_checked_in_config_serves_what_make_demo_writes_and_the_demo_command_is_plain():
    from serve.commands import example_commands, read_config, student_checkpoints
    from serve.schemas import AppArgs

    (app,) = read_config(CHECKED_IN)["applications"]
    assert student_checkpoints(app) == {"ikddit": "runs/demo-student"}  # configs/ikddit_demo.yaml: run.name demo
    AppArgs.model_validate(app["args"])
    cmds = example_commands(python="python")
    assert cmds.serve == "python -m serve run serve/config.yaml"
    assert cmds.curl.startswith("curl -s -X POST http://127.0.0.1:8000/ikddit/generate -H 'Content-Type: "
                                "application/json' -d '{\"equipment_log\":[0.0,")
    body = json.loads(shlex.split(cmds.curl)[-1])
    assert len(body["equipment_log"]) == 128 and body["seed"] == 0 and body["n"] == 1
    other = example_commands(checkpoint="runs/exp1 student", port=8123, python="python")
    assert other.serve == "python -m serve run serve/config.yaml --checkpoint 'ikddit=runs/exp1 student' --port 8123"
    assert "http://127.0.0.1:8123/ikddit/generate" in other.curl
    raw = read_config(CHECKED_IN, {"ikddit": "runs/x", "classifier": "runs/fast_ad_wafer"}, port=9001)
    assert student_checkpoints(raw["applications"][0]) == {"ikddit": "runs/x", "classifier": "runs/fast_ad_wafer"}
    assert raw["http_options"]["port"] == 9001


def test_deploy_failures_are_reduced_to_the_error_line():
    from serve.commands import deploy_failure, failure_text

    message = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
               "Traceback (most recent call last):\n"
               '  File "/x/replica.py", line 1867, in initialize\n'
               "    await self._user_callable_wrapper.initialize_callable()\n"
               "RuntimeError: Traceback (most recent call last):\n"
               '  File "/x/ikddit.py", line 70, in load\n'
               '    raise RuntimeError(f"IKDDiT student: cannot load checkpoint")\n'
               "RuntimeError: IKDDiT student: cannot load checkpoint 'runs/x': ValueError: runs/x/state.pt: bad\n")
    assert failure_text(message) == ("RuntimeError: IKDDiT student: cannot load checkpoint 'runs/x': ValueError: "
                                     "runs/x/state.pt: bad")
    assert failure_text("plain message") == "plain message"
    app = SimpleNamespace(message="", deployments={
        "Ingress": SimpleNamespace(status="HEALTHY", message=""),
        "IKDDiTStudent": SimpleNamespace(status="DEPLOY_FAILED", message=message)})
    assert deploy_failure(app) == f"deployment IKDDiTStudent: {failure_text(message)}"


# --------------------------------------------------------------------------- the real command

def test_unservable_checkpoints_exit_non_zero_naming_each_path_before_ray_starts(tmp_path):
    missing = tmp_path / "runs" / "no-such-student"
    corrupt = tmp_path / "runs" / "corrupt-classifier"
    corrupt.mkdir(parents=True)
    (corrupt / "state.pt").write_bytes(b"not a torch file")
    config = _config(tmp_path, {"ikddit": {"checkpoint": str(missing)}, "classifier": {"checkpoint": str(corrupt)}},
                     free_port())
    marker = uuid.uuid4().hex
    done = subprocess.run([sys.executable, "-m", "serve", "run", str(config)], cwd=REPO, env=_env(marker),
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert f"student 'ikddit': cannot serve checkpoint '{missing}': no checkpoint found" in done.stderr
    assert f"{corrupt / 'state.pt'}: unreadable checkpoint: not a valid checkpoint archive" in done.stderr
    assert "Traceback" not in output and "weights_only" not in output
    assert "Started a local Ray" not in output  # refused before any Ray process started
    _assert_nothing_left(marker, grace_s=5)


@pytest.mark.slow
def test_the_demo_serve_command_serves_a_tiny_student_and_its_curl_gets_maps(tmp_path):
    from serve.commands import example_commands

    checkpoint = write_tiny_student(tmp_path / "runs" / "demo-student")
    port = free_port()
    config = _config(tmp_path, {"ikddit": {"max_steps": 60}}, 8000)  # the checked-in student, port and settings
    cmds = example_commands("ikddit", str(checkpoint), port, config=str(config), python=sys.executable)
    assert cmds.serve.endswith(f"--checkpoint ikddit={checkpoint} --port {port}")
    marker = uuid.uuid4().hex
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(shlex.split(cmds.serve), cwd=REPO, env=_env(marker), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while f"[serve] fabdistill: serving at http://127.0.0.1:{port}/" not in log.read_text():  # RUNNING
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1.0)
        assert http("GET", f"http://127.0.0.1:{port}/healthz", timeout=30)[0] == 200
        done = subprocess.run(cmds.curl + " -w '\\n%{http_code}'", shell=True, capture_output=True, text=True,
                              timeout=120, check=False)
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", done.stdout[-500:]
        reply = json.loads(body)
        assert reply["shape"] == [1, 2, 32, 32] and reply["seed"] == 0 and reply["units"] == "nm"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _assert_nothing_left(marker)
