"""IKDDiT's sweep space: student knobs over one shared teacher, scored by FID-N against the held-out maps.

A sweep over student knobs costs one teacher run plus N student runs, not N teacher runs: `prepare` generates
the training set and trains the teacher once, and every trial is a `phase: student` run. Trials are scored with
the same sampling and FID code as `apps.evaluate` (trainers/ikddit_eval.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fabdistill.methods import TrainOutcome
from tune.spaces import MethodSpace, ScoreSettings

SHARED_RUN = "shared"  # <sweep>/shared/data (training set) and <sweep>/shared-teacher (the teacher)


def prepare(cfg: Any, sweep_dir: str) -> Any:
    """Generate the training set once and train the teacher once; returns the student config every trial starts
    from. A teacher already given (`teacher_checkpoint`) or already trained in this sweep folder is reused."""
    from fabdistill import storage
    from fabdistill.checkpoints import resolve_checkpoint
    from trainers import ikddit

    shared_run = dataclasses.replace(cfg.run, name=SHARED_RUN, storage_path=sweep_dir)
    cfg = dataclasses.replace(cfg, run=shared_run)
    uri, _ = ikddit.prepare_training_data(cfg)  # idempotent: generated once into <sweep>/shared/data
    uri = storage.absolute(uri)  # trials run in Tune's trial folders: relative paths would not resolve there
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_uri=uri))
    teacher = cfg.teacher_checkpoint
    if not teacher:
        done = storage.join(sweep_dir, f"{SHARED_RUN}-teacher", "model")
        if storage.exists(storage.join(done, "state.pt")):
            print(f"[sweep] reusing the sweep's teacher {done}", flush=True)
            teacher = done
        else:
            print(f"[sweep] training the shared teacher once ({cfg.teacher.steps} steps)", flush=True)
            teacher = ikddit.train(dataclasses.replace(cfg, phase="teacher")).phase("teacher").checkpoint_dir
    else:
        teacher = resolve_checkpoint(storage.absolute(teacher))
    return dataclasses.replace(cfg, phase="student", teacher_checkpoint=teacher)








def score(outcome: TrainOutcome, cfg: Any, settings: ScoreSettings) -> dict:
    """FID-N / KID and conditional fidelity of student samples (DDIM, the trial's mask ratio) against N held-out
    real maps, and the context-matched real floor of FID-N (trainers/ikddit_eval.py: N real maps with the held-out
    contexts and independent noise, scored with the same code; the same in every trial).

    The real maps come from the generator with data/seeds.OVERLAY_HELD_OUT, never a training seed; samples are
    conditioned on those maps' own equipment logs and IDs, so the score measures conditional generation too.
    """
    from data.seeds import OVERLAY_HELD_OUT, check_not_held_out
    from fabdistill.inference.ikddit import IKDDiTPipeline
    from metrics.fid import load_domain_classifier
    from metrics.overlay import conditional_fidelity
    from trainers.ikddit_eval import fid_kid, floor_set, held_out_set, sample_held_out

    check_not_held_out(cfg.data.seed, "data.seed", OVERLAY_HELD_OUT)
    checkpoint = outcome.checkpoint_dir  # the final phase's
    if checkpoint is None:
        raise ValueError("the trial produced no student checkpoint to score")
    pipe = IKDDiTPipeline.from_checkpoint(checkpoint)
    real = held_out_set(settings.n, pipe.map_size, pipe.log_dim)
    maps, spent = sample_held_out(pipe, real, steps=settings.steps, mask_ratio=cfg.student.mask_ratio,
                                  seed=settings.seed, batch_size=settings.batch_size,
                                  label=f"student mask {cfg.student.mask_ratio}")
    fid = fid_kid(maps, real)
    floor = fid_kid(floor_set(settings.n, pipe.map_size, pipe.log_dim)["maps"], real)
    fidelity = conditional_fidelity(maps, real["equipment_id"], load_domain_classifier("overlay"))
    return {"fid": fid["fid"], "kid_mean": fid["kid_mean"], "kid_std": fid["kid_std"],
            "cond_fidelity": fidelity, "floor_fid": floor["fid"],
            "maps_per_s": settings.n / max(spent, 1e-9), "feature_extractor": fid["feature_extractor"]}


SPACE = MethodSpace(
    method="ikddit",
    knobs={"mask_ratio": "student.mask_ratio", "lambda1": "student.lambda1", "lambda2": "student.lambda2",
           "lr": "student.lr", "disc_lr": "student.disc_lr", "steps": "student.steps",
           "batch_size": "student.batch_size", "ema_decay": "student.ema_decay"},
    labels={"mask_ratio": "Mask Ratio", "lambda1": "λ1", "lambda2": "λ2", "lr": "lr", "kid_mean": "KID",
            "cond_fidelity": "cond. fidelity"},
    score_name="fid", score_mode="min", score_label="FID-{n}",
    # The total loss carries λ-weighted terms, so comparing it across λ values would favour small λ;
    # L_DSM is the term every trial shares.
    early_stop_metric="loss_dsm",
    steps_path="student.steps",
    prepare=prepare, score=score,
    # The paper's ablation (FID-15k on MPOM): best at 50 %, collapsing at 70 %.
    reference={"mask_ratio": {0.0: 27.46, 0.25: 26.06, 0.5: 24.66, 0.7: 123.85}},
    reference_label="paper FID-15k",
    extra_scores=("kid_mean", "kid_std", "cond_fidelity", "floor_fid", "maps_per_s"),
    table_scores=("kid_mean", "cond_fidelity"),
    floor_score="floor_fid", floor_label="real floor (context-matched)",
)
