"""The speed benchmark's baseline for Fast-AD (benchmarks/fast_ad.py): the same work as the concurrent actor loop,
in one process, one thing at a time. It drives the very pieces the actors run (cadr.synthesize, FifoReplay,
LearnerCore) with the same seeds, so the speed ratio measures concurrency and nothing else."""

from __future__ import annotations

import time
from typing import Any

import torch

from trainers.common import generator
from trainers.fast_ad.actors import load_synthesis_models, synthesis_generator
from trainers.fast_ad.cadr import BNStatHooks, synthesize
from trainers.fast_ad.config import CADRSection, Config, learner_spec, synthesis_spec
from trainers.fast_ad.learner import LearnerCore, device_for
from trainers.fast_ad.replay import FifoReplay


def run_sequential(cfg: Config, total_steps: int, total_images: int, threads: int = 1) -> dict[str, Any]:
    """`total_images` CADR images and `total_steps` student steps, synthesis spread evenly between the steps.

    Times from the first synthesis to the last student step (model loading excluded, as run_fast_ad's loop_s).
    Returns steps, images, elapsed_s, steps_per_s, images_per_s, synthesis_s, learner_s and the final held-out
    heldout_top1 / teacher_agreement. Writes nothing to disk.
    """
    if total_steps < 1 or total_images < 1:
        raise ValueError(f"run_sequential needs total_steps and total_images >= 1, got {total_steps}, "
                         f"{total_images}")
    torch.set_num_threads(threads)
    synth_spec = synthesis_spec(cfg)
    spec = {**learner_spec(cfg, None), "steps": total_steps, "torch_threads": threads}
    core = LearnerCore(spec)
    core.evaluate()
    cadr = CADRSection(**synth_spec["cadr"])
    teacher, unet, diffusion = load_synthesis_models(synth_spec, device_for(cfg.synthesis.num_gpus))
    hooks = BNStatHooks(teacher) if cadr.gate != "off" else None
    buf = FifoReplay(cfg.buffer.size, cfg.buffer.min_uses)
    gen = generator(cfg.run.seed, "replay")  # the ReplayBuffer actor's sampling stream
    bs = cfg.synthesis.batch_size
    min_fill = cfg.buffer.min_fill or bs
    made, batch_id = 0, 0
    synth_time = learn_time = 0.0
    t_start = time.time()
    while core.step < total_steps:
        # synthesise until we are on schedule (and until the student has something to sample)
        while made < total_images and (made < total_images * (core.step + 1) / total_steps or len(buf) < min_fill):
            t0 = time.time()
            out = synthesize(unet, teacher, diffusion, bs, cadr, synthesis_generator(cfg.run.seed, batch_id), hooks)
            synth_time += time.time() - t0
            buf.put(out["x"], out["y"], out["logits"], force=True)  # one process: nothing to wait for
            made, batch_id = made + bs, batch_id + 1
        t0 = time.time()
        core.train_step(buf.sample(cfg.student.batch_size, gen))
        learn_time += time.time() - t0
    elapsed = time.time() - t_start
    final = core.evaluate()
    return {"steps": core.step, "images": made, "elapsed_s": elapsed, "steps_per_s": core.step / elapsed,
            "images_per_s": made / elapsed, "synthesis_s": synth_time, "learner_s": learn_time,
            "heldout_top1": final["heldout_top1"], "teacher_agreement": final["teacher_agreement"]}
