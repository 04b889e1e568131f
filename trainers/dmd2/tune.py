"""DMD2's sweep space: distillation knobs (update ratio, GAN weights, learning rates) over one shared teacher,
scored by the generator's FID-N against held-out real samples.

`prepare` generates the training set and trains the EDM teacher once; every trial is a `phase: distill` run
from it, so a sweep of N trials costs one teacher and N distillations. Trials are scored with the evaluation's
own sampling and FID code (trainers/dmd2/evaluate.py), on the held-out seed, never a training seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fabdistill.methods import TrainOutcome
from tune.spaces import MethodSpace, ScoreSettings

SHARED_RUN = "shared"  # <sweep>/shared/data (training set) and <sweep>/shared-teacher (the teacher)




def prepare(cfg: Any, sweep_dir: str) -> Any:
    """Generate the data and train the teacher once (or reuse a given / already trained one); returns the
    `phase: distill` config every trial starts from."""
    from fabdistill import storage
    from fabdistill.checkpoints import resolve_checkpoint
    from trainers import dmd2
    from trainers.dmd2.teacher import prepare_training_data

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=SHARED_RUN, storage_path=sweep_dir))
    uri, _ = prepare_training_data(cfg)  # idempotent: generated once into <sweep>/shared/data
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_uri=storage.absolute(uri)))
    teacher = cfg.teacher_checkpoint
    if teacher:
        teacher = resolve_checkpoint(storage.absolute(teacher))
    else:
        done = storage.join(sweep_dir, f"{SHARED_RUN}-teacher", "model")
        if storage.exists(storage.join(done, "state.pt")):
            print(f"[sweep] reusing the sweep's teacher {done}", flush=True)
            teacher = done
        else:
            print(f"[sweep] training the shared teacher once ({cfg.teacher.steps} steps)", flush=True)
            teacher = dmd2.train(dataclasses.replace(cfg, phase="teacher")).phase("teacher").checkpoint_dir
    return dataclasses.replace(cfg, phase="distill", teacher_checkpoint=teacher)






def score(outcome: TrainOutcome, cfg: Any, settings: ScoreSettings) -> dict:
    """FID-N / KID and class fidelity of the generator (its trained chain length) on N held-out samples."""
    from fabdistill.inference.dmd2 import DMD2Pipeline, row_seeds, sample_in_batches
    from trainers.dmd2.evaluate import load_judge, real_set
    from trainers.dmd2.evaluate import score as score_samples

    checkpoint = outcome.checkpoint_dir  # the final phase's
    if checkpoint is None:
        raise ValueError("the trial produced no generator checkpoint to score")
    pipe = DMD2Pipeline.from_checkpoint(checkpoint)
    real, labels = real_set(settings.n, pipe.domain, pipe.image_size)
    x, spent = sample_in_batches(pipe, labels, row_seeds(settings.seed, settings.n), batch_size=settings.batch_size,
                                 label=f"generator ratio {cfg.distill.dfake_gen_update_ratio}")
    scores = score_samples(x, real, labels, pipe.domain, load_judge(pipe.domain))
    return {**scores, "images_per_s": settings.n / max(spent, 1e-9)}


SPACE = MethodSpace(
    method="dmd2",
    knobs={"ratio": "distill.dfake_gen_update_ratio", "gan": "distill.gan",
           "gen_gan_weight": "distill.gen_cls_loss_weight", "disc_gan_weight": "distill.guidance_cls_loss_weight",
           "gen_lr": "distill.gen_lr", "fake_lr": "distill.fake_lr", "steps": "distill.steps",
           "num_steps": "distill.num_steps", "batch_size": "distill.batch_size"},
    labels={"ratio": "dfake_gen_update_ratio", "gen_gan_weight": "w_G (GAN)", "disc_gan_weight": "w_D (GAN)",
            "gen_lr": "generator lr", "fake_lr": "fake score lr"},
    score_name="fid", score_mode="min", score_label="FID-{n}",
    # The fake-score loss is every trial's shared term (the DM surrogate's scale depends on the ratio).
    early_stop_metric="loss_fake",
    steps_path="distill.steps",
    prepare=prepare, score=score,
    # The reference's ImageNet-64 results (FID-50k): with the GAN term 1.51, without 2.61.
    reference={"gan": {0.0: 2.61, 1.0: 1.51}}, reference_label="DMD2 paper, ImageNet-64 FID-50k",
    extra_scores=("kid_mean", "kid_std", "class_fidelity", "images_per_s"),
)
