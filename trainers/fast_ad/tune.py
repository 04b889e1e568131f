"""Fast-AD's sweep space (`python -m apps.sweep fast_ad --space eta=0.05,0.1,0.3 ...`): CADR's guidance knobs and
the student's KD knobs, scored by the exported student's held-out top-1 on real maps (maximised); ASHA may stop
weak trials on the learner's KD loss (reported to Tune every progress interval, trainers/fast_ad/driver.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fabdistill import storage
from tune.spaces import MethodSpace, ScoreSettings




def prepare(cfg: Any, sweep_dir: str) -> Any:
    """Once per sweep: check the teacher and the prior exist and pin them (and eval.uri) as absolute paths, since
    trials run in Tune's trial folders where a relative path would not resolve."""
    from fabdistill.checkpoints import resolve_checkpoint
    from trainers.fast_ad.driver import check_checkpoints

    check_checkpoints(cfg)
    models = dataclasses.replace(cfg.models,
                                 teacher_checkpoint=resolve_checkpoint(storage.absolute(cfg.models.teacher_checkpoint)),
                                 diffusion_checkpoint=resolve_checkpoint(storage.absolute(cfg.models.diffusion_checkpoint)))
    ev = cfg.eval if cfg.eval.uri is None else dataclasses.replace(cfg.eval, uri=storage.absolute(cfg.eval.uri))
    return dataclasses.replace(cfg, models=models, eval=ev)


def score(outcome: Any, cfg: Any, settings: ScoreSettings) -> dict:
    """{"heldout_top1", "teacher_top1", "teacher_agreement"} of the trial's exported student on `settings.n`
    held-out real maps (the trial config's held-out seed, size, or dataset)."""
    from trainers.fast_ad.evaluate import EvalSettings, evaluate

    if not outcome.checkpoint_dir:
        raise ValueError(f"{outcome.run_dir}: the trial exported no student to score")
    ev = cfg.eval
    table = evaluate({"student": outcome.checkpoint_dir, "teacher": cfg.models.teacher_checkpoint},
                     EvalSettings(n=settings.n, seed=ev.seed, size=ev.size, uri=ev.uri, split=ev.split,
                                  batch_size=settings.batch_size))
    student, teacher = table.row("student"), table.row("teacher")
    return {"heldout_top1": student["top1"], "teacher_top1": teacher["top1"],
            "teacher_agreement": student["teacher_agreement"]}


def trial_cpus(base: dict) -> float:
    """What one trial's actors take: the synthesis workers plus the learner (not run.num_workers)."""
    return base["synthesis"]["num_workers"] * base["synthesis"]["num_cpus"] + base["student"]["num_cpus"]


SPACE = MethodSpace(
    method="fast_ad",
    knobs={"eta": "cadr.eta", "lambda_max": "cadr.lambda_max", "tau_ent": "cadr.tau_ent", "k": "cadr.k",
           "gamma": "cadr.gamma", "bn_weight": "cadr.bn_weight", "gate": "cadr.gate",
           "ddim_steps": "cadr.ddim_steps", "kd_temperature": "student.kd_temperature", "lr": "student.lr",
           "student_arch": "models.student_arch"},
    labels={"eta": "η", "lambda_max": "λ_max", "tau_ent": "τ_ent", "k": "gate sharpness k", "gamma": "γ (CE)",
            "bn_weight": "L_BN weight", "gate": "CADR gate", "ddim_steps": "DDIM steps",
            "kd_temperature": "KD temperature T", "lr": "student lr", "student_arch": "student"},
    score_name="heldout_top1",
    score_mode="max",
    score_label="held-out top-1 ({n} real maps)",
    early_stop_metric="kd_loss",
    steps_path="student.steps",
    score=score,
    prepare=prepare,
    extra_scores=("teacher_top1", "teacher_agreement"),
    trial_cpus=trial_cpus,
)
