"""KDCDDM's sweep space: t₀, λ_L1, latent width and threshold, scored by pixel IoU on the validation split.

A trial runs the configured phases (e.g. `phases: vae,cdldm,student` to sweep the student and its latent space) and
is scored on its final phase's model(s) with the same pipeline and metrics as `apps.evaluate kdcddm`, on validation
images only (the test split stays untouched by model selection).
"""

from __future__ import annotations

from typing import Any

from fabdistill.methods import TrainOutcome
from tune.spaces import MethodSpace, ScoreSettings


def score(outcome: TrainOutcome, cfg: Any, settings: ScoreSettings) -> dict:
    """IoU / AUROC / AP on `settings.n` validation images of the final phase's first segmenting model."""
    from fabdistill.checkpoints import load_state
    from fabdistill.inference.kdcddm import Segmenter, held_out_pairs
    from metrics.segmentation import segmentation_metrics

    if outcome.checkpoint_dir is None:
        raise ValueError("the trial produced no checkpoint to score")
    _, meta = load_state(outcome.checkpoint_dir)
    models = [m for m in meta["models"] if m != "vae"]
    if not models:
        raise ValueError("the trial's final phase is the VAE, which segments nothing; end the phases with a model")
    seg = Segmenter.from_checkpoint(outcome.checkpoint_dir, models[0])
    val = held_out_pairs(seg.domain, settings.n, seg.image_size, "validation")
    scores, _, spent = seg.score_many(val["defect"], settings.batch_size, settings.seed)
    got = segmentation_metrics(scores, val["mask"][:, 0].numpy() > 0.5, seg.threshold)
    return {"iou": got["iou"], "auroc": got["auroc"], "ap": got["ap"], "dice": got["dice"],
            "images_per_s": settings.n / max(spent, 1e-9), "model": models[0]}


SPACE = MethodSpace(
    method="kdcddm",
    knobs={"t0": "inference.t0", "lambda_l1": "student.l1_weight", "latent_channels": "vae.latent_channels",
           "threshold": "inference.threshold", "smooth_sigma": "inference.smooth_sigma", "student_steps": "student.steps",
           "lr_g": "student.lr_g", "lr_d": "student.lr_d", "cond_t_start": "inference.cond_t_start"},
    labels={"t0": "t₀", "lambda_l1": "λ_L1", "latent_channels": "latent width", "threshold": "inference.threshold"},
    score_name="iou", score_mode="max", score_label="IoU (validation, n={n})",
    early_stop_metric="loss",
    steps_path="student.steps",
    score=score,
    extra_scores=("auroc", "ap", "dice", "images_per_s"),
)
