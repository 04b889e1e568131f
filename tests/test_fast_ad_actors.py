"""Fast-AD's concurrent loop on a local Ray with tiny models (16×16 wafer maps): producers and learner overlap in
time, the bounded buffer fills but never overflows, the student improves, and killed synthesis / learner actors are
restarted without losing the run (the learner from its checkpoint)."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray")

from trainers.fast_ad import Config  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The session's local Ray (tests/conftest.py: 4 logical CPUs)."""
    yield ray_local


def _tiny_run(module, config: str, root, name: str, overrides: list[str]):
    """Train through the method's own train(cfg) in-process (run.num_workers=0), the path apps.train takes."""
    from fabdistill.config import load_config

    cfg = load_config(module.Config, config, [*overrides, "run.num_workers=0", f"run.storage_path={root}",
                                              f"run.name={name}"])
    return module.train(cfg).checkpoint_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A quickly trained tiny teacher and a barely trained tiny DDPM prior, exported by their own trainers."""
    from trainers import classifier, ddpm

    root = tmp_path_factory.mktemp("fast_ad")
    teacher = _tiny_run(classifier, "configs/classifier_wafer.yaml", root / "runs", "teacher",
                        ["model.arch=tiny", f"data.size={SIZE}", "data.n_train=256", "data.n_eval=64",
                         "optim.epochs=2", "optim.batch_size=64", "optim.warmup_steps=2"])
    prior = _tiny_run(ddpm, "configs/ddpm_wafer.yaml", root / "runs", "prior",
                      [f"data.size={SIZE}", "data.n_train=32", "optim.steps=2", "optim.batch_size=16",
                       "optim.log_every=1", "optim.checkpoint_every=2", "optim.warmup_steps=1",
                       "optim.sample_count=0"])
    return {"root": root, "teacher": teacher, "prior": prior}


def _config(root, name: str, **overrides) -> Config:
    from fabdistill.config import from_dict

    data = {
        "models": {"teacher_checkpoint": root["teacher"], "diffusion_checkpoint": root["prior"],
                   "student_arch": "tiny"},
        "cadr": {"ddim_steps": 4},
        "synthesis": {"num_workers": 2, "batch_size": 8},
        "buffer": {"size": 32, "min_uses": 1},
        "student": {"steps": 150, "batch_size": 16, "lr": 0.05, "warmup_steps": 10, "checkpoint_every": 20},
        "eval": {"n_heldout": 64, "size": SIZE, "every": 50},
        "loop": {"log_every_s": 1.0, "record_timeline": True, "shutdown_grace_s": 15.0, "max_restarts": 2},
        "run": {"name": name, "storage_path": str(root["root"] / "distill")},
    }
    for key, value in overrides.items():
        sec, knob_name = key.split(".")
        data[sec][knob_name] = value
    return from_dict(Config, data)


def _our_live_actors() -> list:
    from ray.util.state import list_actors

    names = {"SynthesisWorker", "StudentLearner", "ReplayBuffer"}
    address = ray.get_runtime_context().gcs_address  # this test's cluster (other Rays may run on the machine)
    return [a for a in list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=1000)
            if a.class_name in names]


def test_loop_overlaps_stays_bounded_and_improves(ray_cluster, checkpoints):
    from fabdistill.inference.classifier import load_classifier
    from trainers.fast_ad import run_fast_ad
    from trainers.fast_ad.driver import to_outcome

    cfg = _config(checkpoints, "overlap")
    s = run_fast_ad(cfg)

    assert s["step"] == 150
    # producers and learner ran at the same time: synthesis intervals overlap learner-step intervals
    steps = s["step_intervals"]
    synth = [(p["synth_start"], p["synth_end"]) for p in s["puts"]]
    assert len(steps) == 150 and len(synth) >= 2
    during = sum(1 for a, b in steps if any(c < b and a < d for c, d in synth))
    assert during >= 0.3 * len(steps), f"only {during}/{len(steps)} learner steps overlapped a synthesis"
    first, last = steps[0][0], steps[-1][1]
    assert sum(1 for p in s["puts"] if first < p["push_end"] < last) >= 1  # pushes while the learner trains
    assert {p["worker"] for p in s["puts"]} == {0, 1}
    # bounded: the buffer filled up to its capacity and never beyond
    assert s["buffer"]["total_put"] > cfg.buffer.size
    assert s["buffer"]["max_fill"] == cfg.buffer.size
    # the student improved: KD loss of the last steps below the first ones
    losses = s["losses"]
    assert sum(losses[-15:]) / 15 < 0.8 * sum(losses[:15]) / 15
    # metrics and a loadable, servable student checkpoint
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "metrics.jsonl"))]
    assert rows and rows[-1]["final"] and rows[-1]["student_step"] == 150
    model, meta = load_classifier(s["checkpoint_dir"])
    assert meta["method"] == "fast_ad" and meta["arch"] == "tiny" and meta["step"] == 150
    assert not _our_live_actors()  # clean shutdown
    # what train() returns: the exported student and the scalar summary a sweep reads
    outcome = to_outcome(s)
    assert outcome.checkpoint_dir == os.path.join(outcome.run_dir, "model") == s["checkpoint_dir"]
    assert outcome.metrics["step"] == 150 and outcome.metrics["kd_loss"] == pytest.approx(sum(losses[-20:]) / 20)
    assert outcome.metrics["heldout_top1"] == s["history"][-1]["heldout_top1"]


def test_sequential_baseline_does_the_same_work_in_one_process(checkpoints):
    from benchmarks.fast_ad_sequential import run_sequential

    cfg = _config(checkpoints, "sequential")
    r = run_sequential(cfg, total_steps=6, total_images=24)
    assert r["steps"] == 6 and r["images"] == 24  # 3 synthesis batches of 8
    assert r["synthesis_s"] > 0 and r["learner_s"] > 0 and r["elapsed_s"] >= r["synthesis_s"] + r["learner_s"]
    assert 0.0 <= r["heldout_top1"] <= 1.0
    assert not (checkpoints["root"] / "distill" / "sequential").exists()  # the baseline writes nothing


def test_killed_actors_restart_and_the_loop_carries_on(ray_cluster, checkpoints):
    from trainers.fast_ad import run_fast_ad

    cfg = _config(checkpoints, "chaos", **{"student.steps": 100000, "loop.time_limit_s": 15.0,
                                           "synthesis.batch_size": 8})
    events: dict = {"phase": 0}

    def on_tick(elapsed: float, h: dict) -> None:
        per_worker = h["buffer_stats"]["per_worker"]
        if events["phase"] == 0 and h["buffer_stats"]["total_put"] >= 16:
            events.update(phase=1, worker0_before=per_worker.get(0, 0))
            ray.kill(h["workers"][0], no_restart=False)  # Ray restarts it and retries its loop
        elif (events["phase"] == 1 and per_worker.get(0, 0) > events["worker0_before"]
              and (h["progress"].get("step") or 0) >= 40):
            events.update(phase=2, learner_step_at_kill=h["progress"]["step"])
            ray.kill(h["learner"], no_restart=False)

    s = run_fast_ad(cfg, on_tick=on_tick)

    assert events["phase"] == 2, f"the faults were not both injected: {events}"
    # the killed synthesis actor came back and produced more
    assert s["buffer"]["per_worker"][0] > events["worker0_before"]
    # the learner was restarted and resumed from its checkpoint, not from step 0
    assert s["restarted"] is True
    # learner_step_at_kill is the progress the driver's last tick saw (up to loop.log_every_s old), and the kill
    # lands asynchronously: the learner may write one or two more checkpoints (every 20 steps) before it dies
    assert s["restored_step"] is not None and s["restored_step"] % 20 == 0
    assert 20 <= s["restored_step"] <= events["learner_step_at_kill"] + 2 * 20
    assert s["step"] > s["restored_step"]
    assert not _our_live_actors()
