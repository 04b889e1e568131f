"""Fast-AD: data-free knowledge distillation with CADR-guided DDIM synthesis, on concurrent Ray actors.

A fab distils its wafer-map classifier (the teacher) into a small student without handing over a single labelled
wafer map: an unconditional DDPM (trained on unlabelled maps, trainers/ddpm.py) proposes images, the teacher steers
them towards chosen classes with Confidence-Aware Dynamic Rectification (CADR), and the student learns from the
teacher's soft labels on those images only. The student is evaluated on held-out REAL maps it never trains on.

The package, one seam per module (docs/fast_ad.md maps every equation to its line):

    config.py    Config and its sections (configs/fast_ad.yaml); the plain-dict specs the actors are built from
    cadr.py      the CADR equations, BN-statistics hooks, guidance loss, guided DDIM synthesis of one batch
    replay.py    FifoReplay (bounded FIFO with use counts) and the ReplayBuffer actor (asyncio back-pressure)
    learner.py   LearnerCore: student, KD step, held-out evaluation, checkpoints and resume; kd_loss
    actors.py    SynthesisWorker and StudentLearner actors (restarted by Ray; the learner resumes its checkpoint)
    driver.py    run_fast_ad (start, watch, shut down the actors) and train(cfg, callbacks) -> TrainOutcome
    evaluate.py  held-out top-1 of student and teacher (apps.evaluate fast_ad)
    tune.py      the sweep space (apps.sweep fast_ad): CADR and KD knobs, scored by held-out top-1

The sequential baseline of the speed benchmark lives in benchmarks/fast_ad_sequential.py.
"""

from fabdistill.methods import Method
from trainers.fast_ad.cadr import (BNStatHooks, SynthesisStopped, balanced_labels, bn_stat_loss,  # noqa: F401
                                   cadr_eps_transform, entropy_gate, guidance_loss, prediction_entropy,
                                   rectified_eps, rectify_gradient, synthesize, tweedie_x0)
from trainers.fast_ad.config import CADRSection, Config  # noqa: F401
from trainers.fast_ad.driver import run_fast_ad, train  # noqa: F401
from trainers.fast_ad.evaluate import EvalSettings
from trainers.fast_ad.learner import LearnerCore, kd_loss  # noqa: F401
from trainers.fast_ad.replay import BufferFull, FifoReplay, ReplayBuffer  # noqa: F401

METHOD = Method(
    name="fast_ad",
    summary="data-free distillation of a wafer-map classifier from CADR-guided DDIM samples, on Ray actors",
    Config=Config,
    train=train,
    load="fabdistill.inference.classifier:load_classifier",
    evaluate="trainers.fast_ad.evaluate:evaluate",
    EvalSettings=EvalSettings,
    eval_roles=("student", "teacher"),
    space="trainers.fast_ad.tune:SPACE",
    students=("classifier",),
    default_config="configs/fast_ad.yaml",
)
