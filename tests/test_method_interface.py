"""The method interface: a toy method defined in tests/ runs through every app by registering one Method, and the
shared glue gives every method the same in-process path, checkpoints, fault injection and metrics."""

from __future__ import annotations

import json

import pytest
from ray import cloudpickle

from fabdistill.config import load_config
from fabdistill.methods import MethodError, get_method, method_names, register, unregister
from trainers.launch import read_metrics

try:  # torch-fidelity installs a top-level `tests` package: ours is reached through pytest's rootdir path
    import toy_method
except ImportError:  # pragma: no cover
    from tests import toy_method

TOY = toy_method.TOY
# Ray workers and Serve replicas cannot import tests/: the toy method's code travels by value.
cloudpickle.register_pickle_by_value(toy_method)


@pytest.fixture()
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def toy_cfg(tmp_path, *overrides: str):
    return load_config(toy_method.Config, None, [f"run.storage_path={tmp_path}", *overrides])


# --------------------------------------------------------------------------- registry and apps

def test_registry_lists_every_method_and_its_capabilities(toy):
    assert {"ikddit", "classifier", "ddpm", "fast_ad", "feature_extractor", "toy"} <= set(method_names())
    assert toy.capabilities() == ["train", "evaluate", "sweep", "serve"]
    with pytest.raises(MethodError, match="method 'toy' cannot sample .it can: train, evaluate, sweep, serve"):
        toy.get("sample")
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        get_method("nope")


def test_toy_method_through_apps_train_evaluate_and_sweep(toy, tmp_path, capsys):
    from apps import evaluate, sample, sweep, train

    train.main(["toy", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=t", "--set", "run.num_workers=0",
                "--set", "trainer.steps=12"])
    out = capsys.readouterr().out
    assert f"run {tmp_path}/t, checkpoint {tmp_path}/t/model" in out
    assert [m["step"] for m in read_metrics(str(tmp_path / "t"))] == list(range(1, 13))

    evaluate.main(["toy", "--checkpoint", f"model={tmp_path}/t", "--n", "8", "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "| model | weight | mean |error| |" in out and "| model | 2.99" in out
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert table["rows"][0]["error"] < 0.05

    sweep.main(["toy", "--space", "lr=0.1,0.3", "--space", "steps=4,8", "--dry-run"])
    out = capsys.readouterr().out
    assert "# 4 grid points" in out and "lr=0.3, steps=8" in out

    # asking a method for what it does not have: one line, exit 2, no traceback
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["toy", "--checkpoint", f"{tmp_path}/t", "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: method 'toy' cannot sample (it can: train, evaluate, sweep, "
                                               "serve)")
    with pytest.raises(SystemExit):
        evaluate.main(["toy", "--checkpoint", f"teacher={tmp_path}/t"])
    assert "no checkpoint role 'teacher'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["toy", "--checkpoint", f"model={tmp_path}/t", "--set", "nope=1"])
    assert "unknown key 'nope'" in capsys.readouterr().err


def test_help_lists_what_each_method_can_do(toy, capsys):
    from apps import sample

    with pytest.raises(SystemExit):
        sample.main(["--help"])
    out = capsys.readouterr().out
    assert "methods that can sample:" in out and "ikddit" in out and "toy " not in out


# --------------------------------------------------------------------------- one training path

def test_in_process_and_two_workers_train_through_the_same_loop(ray_local, tmp_path):
    local = toy_method.train(toy_cfg(tmp_path, "run.name=local", "run.num_workers=0"))
    ddp = toy_method.train(toy_cfg(tmp_path, "run.name=ddp", "run.num_workers=2"))
    first_local, first_ddp = read_metrics(local.run_dir)[0], read_metrics(ddp.run_dir)[0]
    assert first_local["world_size"] == 1 and first_ddp["world_size"] == 2
    assert first_local["step"] == first_ddp["step"] == 1
    assert first_local["loss"] == pytest.approx(first_ddp["loss"], rel=1e-6)  # same init, same rank-0 batch
    assert local.metrics["step"] == ddp.metrics["step"] == 8


def test_in_process_fault_injection_resumes_and_keeps_each_step_once(tmp_path):
    outcome = toy_method.train(toy_cfg(tmp_path, "run.name=f0", "run.num_workers=0", "run.crash_after_step=4",
                                       "run.max_failures=1"))
    rows = read_metrics(outcome.run_dir)
    assert [m["step"] for m in rows] == list(range(1, 9))
    assert all(m["resumed_from"] == 4 for m in rows[4:])
    # without restarts left the run stops after the checkpoint; rerunning the same name resumes
    cfg = toy_cfg(tmp_path, "run.name=f1", "run.num_workers=0", "run.crash_after_step=4")
    with pytest.raises(RuntimeError, match="rerun the same command to resume"):
        toy_method.train(cfg)
    outcome = toy_method.train(cfg)
    assert [m["step"] for m in read_metrics(outcome.run_dir)] == list(range(1, 9))


def test_killing_all_workers_after_a_checkpoint_restarts_and_keeps_each_step_once(ray_local, tmp_path):
    outcome = toy_method.train(toy_cfg(tmp_path, "run.name=kill", "run.num_workers=2", "run.crash_after_step=4",
                                       "run.max_failures=1", "trainer.checkpoint_every=2"))
    assert outcome.error is None
    rows = read_metrics(outcome.run_dir)
    assert [m["step"] for m in rows] == list(range(1, 9)), [m["step"] for m in rows]
    assert all(m["resumed_from"] == 4 for m in rows[4:])


def test_toy_student_serves_over_http(ray_local, toy, tmp_path):
    """The toy method's student kind, named by the import path its Method declares, deployed on local Serve."""
    from ray import serve

    try:
        from ikddit_fixture import QUIET, free_port, http
    except ImportError:  # pragma: no cover
        from tests.ikddit_fixture import QUIET, free_port, http
    from serve.app import build_app

    outcome = toy_method.train(toy_cfg(tmp_path, "run.name=served", "run.num_workers=0", "trainer.steps=12"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    try:
        kind = toy.students[0]
        serve.run(build_app({"students": {kind: {"checkpoint": outcome.checkpoint_dir}}}), name="toy",
                  route_prefix="/", logging_config=QUIET)
        status, _, body = http("POST", f"http://127.0.0.1:{port}/toy/predict", {"x": [1.0, -2.0]})
        assert status == 200, body
        y = json.loads(body)["y"]
        assert y[0] == pytest.approx(3.0, abs=0.05) and y[1] == pytest.approx(-6.0, abs=0.1)
        status, _, body = http("POST", f"http://127.0.0.1:{port}/toy/predict", {"x": "one"})
        assert status == 422 and b"x" in body
        assert http("POST", f"http://127.0.0.1:{port}/toy/predict", {"x": [0.5]})[0] == 200
    finally:
        serve.shutdown()
