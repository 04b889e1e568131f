"""Every KDCDDM training phase on a 2-worker Ray Train run (tiny sizes): DDP, checkpoints, an injected crash after
the step-2 checkpoint, and the worker group's resume from it; the exported checkpoints then segment."""

from __future__ import annotations

import json


from fabdistill.config import from_dict
from trainers.kdcddm.config import PHASES, Config

PHASE = {"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2}


def test_every_phase_trains_on_two_workers_crashes_and_resumes(ray_local, tmp_path):
    from fabdistill.inference.kdcddm import MODELS, Segmenter, held_out_pairs
    from trainers.kdcddm.driver import phase_checkpoints, train
    from trainers.launch import read_metrics

    cfg = from_dict(Config, {
        "data": {"num_train": 16, "num_validation": 8},
        "vae": {**PHASE, "base_channels": 8, "downsample": 4},
        "icddm": {**PHASE, "size": "tiny", "base_channels": 8},
        "icddm_unpaired": {**PHASE, "size": "tiny", "base_channels": 8},
        "cdldm": {**PHASE, "size": "tiny"}, "student": {**PHASE, "teacher_steps": 2},
        "baselines": {**PHASE, "unet_size": "tiny", "base_channels": 8},
        "inference": {"steps": 2, "unpaired_steps": 2, "cond_t_start": 500},
        "run": {"name": "ray", "storage_path": str(tmp_path), "num_workers": 2, "crash_after_step": 2,
                "max_failures": 1}})
    outcome = train(cfg)
    assert list(outcome.phases) == list(PHASES)
    for phase, out in outcome.phases.items():
        rows = read_metrics(out.run_dir)
        # steps 1-2 by the first worker group, 3-4 by the restarted one, resumed from the step-2 checkpoint
        assert [r["step"] for r in rows] == [1, 2, 3, 4], (phase, rows)
        assert [r["resumed_from"] for r in rows] == [0, 0, 2, 2] and rows[0]["world_size"] == 2, phase
        meta = json.loads(open(f"{out.checkpoint_dir}/meta.json").read())
        assert meta["step"] == 4 and meta["phase"] == phase
    found = phase_checkpoints(f"{tmp_path}/ray")
    assert sorted(found) == sorted(MODELS)
    x = held_out_pairs("sem", 2, 32, "test")["defect"]
    out = Segmenter.from_checkpoint(found["kdcddm"], "kdcddm").segment(x)
    assert out["mask"].shape == (2, 32, 32)
