"""Fast-AD's concurrent loop on a local Ray with tiny models (16×16 wafer maps): producers and learner overlap in
time, the bounded buffer fills but never overflows, the student improves, and killed synthesis / learner actors are
restarted without losing the run (the learner from its checkpoint)."""

from __future__ import annotations

import json
import os

import pytest
import torch

ray = pytest.importorskip("ray")

from trainers.fast_ad import Config  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The session's local Ray (tests/conftest.py: 4 logical CPUs)."""
    yield ray_local


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A quickly trained tiny teacher and an (untrained) tiny DDPM UNet, saved as fabdistill checkpoints."""
    from models.diffusion import GaussianDiffusion
    from models.resnet_cifar import build_resnet
    from models.unet import build_unet
    from trainers.classifier import fit_classifier, save_classifier, wafer_tensors
    from trainers.ddpm import save_ddpm

    root = tmp_path_factory.mktemp("fast_ad")
    torch.manual_seed(0)
    x, y = wafer_tensors(256, seed=1, size=SIZE)
    teacher = build_resnet("tiny", 9, 1)
    fit_classifier(teacher, x, y, epochs=2, batch_size=64, lr=0.05)
    save_classifier(str(root / "teacher"), teacher, "wafer_pm1")
    save_ddpm(str(root / "ddpm"), build_unet("tiny", 1, SIZE).eval(), GaussianDiffusion(1000))
    return root


def _config(root, name: str, **overrides) -> Config:
    from fabdistill.config import from_dict

    data = {
        "models": {"teacher_checkpoint": str(root / "teacher"), "diffusion_checkpoint": str(root / "ddpm"),
                   "student_arch": "tiny"},
        "cadr": {"ddim_steps": 4},
        "synthesis": {"num_workers": 2, "batch_size": 8},
        "buffer": {"size": 32, "min_uses": 1},
        "student": {"steps": 150, "batch_size": 16, "lr": 0.05, "warmup_steps": 10, "checkpoint_every": 20},
        "eval": {"n_heldout": 64, "size": SIZE, "every": 50},
        "loop": {"log_every_s": 1.0, "record_timeline": True, "shutdown_grace_s": 15.0, "max_restarts": 2},
        "run": {"name": name, "storage_path": str(root / "runs")},
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
    from trainers.classifier import load_classifier
    from trainers.fast_ad import run_fast_ad

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
    assert s["restored_step"] is not None and 20 <= s["restored_step"] <= events["learner_step_at_kill"]
    assert s["step"] > s["restored_step"]
    assert not _our_live_actors()
