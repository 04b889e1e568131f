"""DMD2: an EDM teacher distilled into a one-step (or few-step) generator (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis"; reference tianweiy/DMD2).

The building blocks, one seam per module (the Ray Train loop, teacher trainer, inference and evaluation build
on them):

    losses.py    EDM denoising loss (teacher, fake score), DM gradient + surrogate loss, GAN losses on the
                 fake network's bottleneck, the loss combinations with the reference weights, few-step σ
                 levels and backward simulation
    schedule.py  which optimiser steps at which iteration (dfake_gen_update_ratio: two time-scale updates)

The networks (class-conditional EDM UNet, its preconditioned denoiser with a bottleneck output, the GAN head)
are in models/edm_unet.py; σ grid, preconditioning and samplers in the EDM core (models/edm.py).
"""

from trainers.dmd2.losses import (REFERENCE_GEN_CLS_LOSS_WEIGHT, REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT,  # noqa: F401
                                  DMGrad, backward_simulation, distribution_matching, dm_gradient,
                                  dm_surrogate_loss, dmd_timestep_range, edm_denoising_loss, edm_loss_weight,
                                  fake_objective, fake_score_loss, few_step_sigmas, gan_discriminator_loss,
                                  gan_generator_loss, gan_logits, generator_objective, sample_grid_sigma)
from trainers.dmd2.schedule import (UpdatePlan, check_ratio, generator_turn,  # noqa: F401
                                    generator_updates_before, update_plan)
