"""KDCDDM: defect segmentation by cross-domain translation (defect image → its clean twin; mask = where they differ).

Three models of the paper (Knowledge Distillation Cross Domain Diffusion Model, IEEE TSM 2024):
    ICDDM   pixel-space conditional diffusion, ε_θ(x_t, t, defect image) (models.gan.ConditionalUNet), and its
            unpaired ablation: a clean-domain prior used by AnoDDPM-style partial diffusion to t₀
    CDLDM   the same translation in the latent space of a KL autoencoder (models.vae.KLAutoencoder)
    KDCDDM  a one-step student G(z_defect) ≈ teacher(z_defect), trained with a PatchGAN (models.gan) + λ_L1·L1
and two baselines: an autoencoder-reconstruction residual and a supervised UNet on the masks (upper bound).

Modules: config.py (Config), losses.py (one pure function per loss), loops.py (the per-worker loop and the phases),
driver.py (train: phases through trainers.launch, threshold calibration), evaluate.py, tune.py; inference is
fabdistill/inference/kdcddm.py, serving serve/students/kdcddm.py. Docs: docs/kdcddm.md.
"""

from fabdistill.inference.kdcddm import SampleSettings
from fabdistill.methods import Method
from trainers.kdcddm.config import Config
from trainers.kdcddm.evaluate import ROLES, EvalSettings
from trainers.kdcddm.losses import (conditional_diffusion_loss, discriminator_loss,  # noqa: F401
                                    kl_to_standard_normal, student_loss, vae_loss)

METHOD = Method(
    name="kdcddm",
    summary="defect segmentation by cross-domain diffusion: ICDDM, CDLDM and the one-step KDCDDM student",
    Config=Config,
    train="trainers.kdcddm.driver:train",
    load="fabdistill.inference.kdcddm:load",
    sample="fabdistill.inference.kdcddm:sample_to_files",
    SampleSettings=SampleSettings,
    evaluate="trainers.kdcddm.evaluate:evaluate",
    EvalSettings=EvalSettings,
    eval_roles=ROLES,
    space="trainers.kdcddm.tune:SPACE",
    students=("kdcddm",),
    default_config="configs/kdcddm.yaml",
)
