"""KDCDDM: defect segmentation by cross-domain translation (defect image → its clean twin; mask = where they differ).

Three models of the paper (Knowledge Distillation Cross Domain Diffusion Model, IEEE TSM 2024):
    ICDDM   pixel-space conditional diffusion, ε_θ(x_t, t, defect image) (models.gan.ConditionalUNet)
    CDLDM   the same translation in the latent space of a KL autoencoder (models.vae.KLAutoencoder)
    KDCDDM  a one-step student G(z_defect) ≈ teacher(z_defect), trained with a PatchGAN (models.gan) + λ_L1·L1

This package holds the building blocks so far: losses.py (one pure function per loss). The training loops, the
Method declaration and the evaluation come later and plug into fabdistill.methods.
"""

from trainers.kdcddm.losses import (conditional_diffusion_loss, discriminator_loss,  # noqa: F401
                                    kl_to_standard_normal, student_loss, vae_loss)
