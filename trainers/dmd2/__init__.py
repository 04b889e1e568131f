"""DMD2: an EDM teacher distilled into a one-step (or few-step) generator (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis"; reference tianweiy/DMD2), on wafer maps (9
classes) or SEM images (4 defect types). docs/dmd2.md ties each equation to its line of code.

One seam per module:

    config.py    the typed config (configs/dmd2*.yaml)
    losses.py    EDM denoising loss (teacher, fake score), DM gradient + surrogate loss, GAN losses on the
                 fake network's bottleneck, the loss combinations with the reference weights, few-step σ
                 levels and backward simulation
    schedule.py  which optimiser steps at which iteration (dfake_gen_update_ratio: two time-scale updates)
    teacher.py   phase 1: the class-conditional EDM teacher's per-worker loop; σ_data measured on the driver
    distill.py   phase 2: the DMD2 per-worker loop (generator + fake score [+ GAN head])
    evaluate.py  FID/KID with the measured real floor, class fidelity, images/s; the teacher at 35 and 1/2/4 NFE
    tune.py      the sweep space (ratio, GAN weights, learning rates) over one shared teacher

Both phases run through trainers/launch.launch on N workers and resume from their latest checkpoint
(`<name>-teacher`, `<name>-distill`). Inference (sampling by class, seeded per request) is
fabdistill/inference/dmd2.py; the Serve kind serve/students/dmd2.py.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from fabdistill.inference.dmd2 import SampleSettings
from fabdistill.methods import Method, TrainOutcome
from trainers.dmd2.config import Config
from trainers.dmd2.evaluate import EvalSettings
from trainers.dmd2.losses import (REFERENCE_GEN_CLS_LOSS_WEIGHT, REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT,  # noqa: F401
                                  DMGrad, backward_simulation, distribution_matching, dm_gradient,
                                  dm_surrogate_loss, dmd_timestep_range, edm_denoising_loss, edm_loss_weight,
                                  fake_objective, fake_score_loss, few_step_sigmas, gan_discriminator_loss,
                                  gan_generator_loss, gan_logits, generator_objective, regression_loss,
                                  sample_grid_sigma, teacher_pairs)
from trainers.dmd2.schedule import (UpdatePlan, check_ratio, generator_turn,  # noqa: F401
                                    generator_updates_before, update_plan)


def load_teacher_state(path: str) -> tuple[dict, dict]:
    """(teacher EMA state dict, meta) of a DMD2 teacher checkpoint or run folder; ValueError if it is not one."""
    from fabdistill.checkpoints import load_state, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    state, meta = load_state(checkpoint)
    if meta.get("method") != "dmd2" or meta.get("role") != "teacher":
        raise ValueError(f"{path}: not a DMD2 teacher checkpoint (meta: method {meta.get('method')!r}, "
                         f"role {meta.get('role')!r})")
    return state["teacher"], {**meta, "checkpoint": checkpoint}


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Run the configured phase(s): one TrainOutcome whose `phases` hold each phase's run ("teacher",
    "distill"), the top-level fields the final phase's. `callbacks`: extra Ray Train callbacks (a Tune trial)."""
    from trainers.dmd2.distill import distill_loop, needs_real_data
    from trainers.dmd2.teacher import prepare_training_data, teacher_config, teacher_loop
    from trainers.launch import ensure_ray, launch

    if cfg.run.num_workers > 0:
        ensure_ray()
    # Data are generated (or read) for the teacher, and for distillation only when it reads real samples.
    needs_data = cfg.phase != "distill" or needs_real_data(dataclasses.asdict(cfg.distill))
    uri, sigma_data = prepare_training_data(cfg) if needs_data else ("", 0.0)
    phases: dict[str, TrainOutcome] = {}
    teacher_path = cfg.teacher_checkpoint
    if cfg.phase in ("teacher", "both"):
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-teacher")
        print(f"[dmd2] teacher: EDM UNet {cfg.model.size} on {cfg.data.domain} {cfg.data.image_size}², σ_data "
              f"{sigma_data:.4f}, {cfg.teacher.steps} steps on {cfg.run.num_workers} workers", flush=True)
        phases["teacher"] = launch(teacher_loop, teacher_config(cfg, sigma_data), run, datasets={"train": uri},
                                   full_config=cfg, extra_callbacks=callbacks)
        teacher_path = phases["teacher"].checkpoint_dir
    if cfg.phase in ("distill", "both"):
        teacher_state, meta = load_teacher_state(teacher_path)
        if meta["domain"] != cfg.data.domain or meta["net"]["image_size"] != cfg.data.image_size:
            raise ValueError(f"teacher {teacher_path} is {meta['domain']} {meta['net']['image_size']}²; the config "
                             f"asks for {cfg.data.domain} {cfg.data.image_size}²")
        base = {"distill": dataclasses.asdict(cfg.distill), "net": meta["net"], "domain": meta["domain"],
                "class_names": meta["class_names"], "teacher_checkpoint": meta["checkpoint"],
                "teacher_step": meta.get("step")}
        if cfg.run.num_workers > 0:  # put once; every worker fetches it from the object store
            import ray

            base["teacher_state_ref"] = ray.put(teacher_state)
        else:
            base["teacher_state"] = teacher_state
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-distill")
        d = cfg.distill
        print(f"[dmd2] distill: {d.num_steps}-step generator, ratio {d.dfake_gen_update_ratio}, GAN "
              f"{'on' if d.gan else 'off'}, {d.steps} iterations", flush=True)
        phases["distill"] = launch(distill_loop, base, run,
                                   datasets={"train": uri} if needs_real_data(base["distill"]) else None,
                                   full_config=cfg, extra_callbacks=callbacks)
    final = phases["distill" if "distill" in phases else "teacher"]
    return dataclasses.replace(final, phases=phases)


METHOD = Method(
    name="dmd2",
    summary="EDM teacher distilled into a one-step generator of wafer maps / SEM images (DMD2)",
    Config=Config,
    train=train,
    load="fabdistill.inference.dmd2:DMD2Pipeline.from_checkpoint",
    sample="fabdistill.inference.dmd2:sample_to_files",
    SampleSettings=SampleSettings,
    evaluate="trainers.dmd2.evaluate:evaluate",
    EvalSettings=EvalSettings,
    eval_roles=("generator", "teacher"),
    space="trainers.dmd2.tune:SPACE",
    students=("dmd2",),
    default_config="configs/dmd2_tiny.yaml",
)
