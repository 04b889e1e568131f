"""The KDCDDM training phases the issue names (VAE, ICDDM, CDLDM, the one-step student) on a 2-worker Ray Train run
(tiny sizes): DDP and checkpoints for each, and for the student (the phase with the most moving parts: frozen teacher and VAE shipped to the workers through the object store,
two optimisers) an injected crash after the step-2 checkpoint and the worker group's resume from it; the exported
checkpoint then segments. The other two phases (ICDDM-unpaired, the baselines) run the same phase loop and are
trained in-process in test_kdcddm_pipeline.py; crashing every phase tested the same shared glue six times (≈ 6 min
on 2 cores)."""

from __future__ import annotations

import json


from fabdistill.config import from_dict
from trainers.kdcddm.config import Config

PHASE = {"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2}


def test_phases_train_on_two_workers_and_the_student_crashes_and_resumes(ray_local, tmp_path):
    from fabdistill.inference.kdcddm import Segmenter, held_out_pairs
    from trainers.kdcddm.driver import phase_checkpoints, train
    from trainers.launch import read_metrics

    sections = {
        "data": {"num_train": 16, "num_validation": 8},
        "vae": {**PHASE, "base_channels": 8, "downsample": 4},
        "icddm": {**PHASE, "size": "tiny", "base_channels": 8},
        "icddm_unpaired": {**PHASE, "size": "tiny", "base_channels": 8},
        "cdldm": {**PHASE, "size": "tiny"}, "student": {**PHASE, "teacher_steps": 2},
        "baselines": {**PHASE, "unet_size": "tiny", "base_channels": 8},
        "inference": {"steps": 2, "unpaired_steps": 2, "cond_t_start": 500}}
    run = {"name": "ray", "storage_path": str(tmp_path), "num_workers": 2}
    teachers = ["vae", "icddm", "cdldm"]
    first = train(from_dict(Config, {**sections, "phases": ",".join(teachers), "run": run}))
    assert list(first.phases) == teachers
    second = train(from_dict(Config, {
        **sections, "phases": "student", "cdldm_checkpoint": first.phases["cdldm"].checkpoint_dir,
        "run": {**run, "crash_after_step": 2, "max_failures": 1}}))
    outcomes = {**first.phases, **second.phases}
    assert sorted(outcomes) == sorted(teachers + ["student"])
    for phase, out in outcomes.items():
        rows = read_metrics(out.run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4], (phase, rows)
        assert rows[0]["world_size"] == 2, phase
        # the student: steps 1-2 by the first worker group, 3-4 by the restarted one, from the step-2 checkpoint
        resumed = [0, 0, 2, 2] if phase == "student" else [0, 0, 0, 0]
        assert [r["resumed_from"] for r in rows] == resumed, phase
        meta = json.loads(open(f"{out.checkpoint_dir}/meta.json").read())
        assert meta["step"] == 4 and meta["phase"] == phase
    found = phase_checkpoints(f"{tmp_path}/ray")
    assert {"icddm", "cdldm", "kdcddm"} <= set(found), found
    x = held_out_pairs("sem", 2, 32, "test")["defect"]
    out = Segmenter.from_checkpoint(found["kdcddm"], "kdcddm").segment(x)
    assert out["mask"].shape == (2, 32, 32)
