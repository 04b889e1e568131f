"""The student's side of Fast-AD, without Ray: model, optimiser, the KD step on replayed synthetic batches, held-out
evaluation on REAL data, and checkpoints (weights only) with resume. The StudentLearner actor (actors.py) and the
sequential benchmark baseline (benchmarks/fast_ad_sequential.py) both drive a `LearnerCore`.

    L_KD = T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))   batch mean, T = 4        trainers/distillers.py kd_loss

The student trains on L_KD only: the teacher's logits were stored with each image at synthesis time (BN statistics
enter through the guidance, cadr.py), so a step needs no teacher forward unless `augment` relabels the images.

Checkpoints go through trainers/launch.py (`write_checkpoint` prunes to `num_to_keep`; the exported `model/` holds
the student's weights only, what `fabdistill.inference.classifier.load_classifier` and serve/ read).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Optional

import torch
from torch import Tensor

from fabdistill import storage
from fabdistill.checkpoints import load_state, save_state
from fabdistill.inference.classifier import classifier_meta, load_classifier, predict_logits
from models.resnet_cifar import ResNet, build_resnet
from trainers.common import derive_seed, generator, lr_at, set_lr
from trainers.distillers import kd_loss  # the KD every method shares
from trainers.launch import export_checkpoint, list_checkpoints, write_checkpoint

MODEL_DIR = "model"  # the exported student, next to the checkpoint_step_* folders


def device_for(num_gpus: float) -> torch.device:
    """The actor's device: a GPU when it reserved one and one is visible, else the CPU."""
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def heldout_set(spec: dict) -> tuple[Tensor, Tensor]:
    """Held-out real data (x (N, C, H, W), y (N,)) from an eval spec (config.EvalSection as a dict): the teacher's
    own held-out set, so student and teacher are compared on the same maps."""
    from trainers.classifier import heldout_tensors

    return heldout_tensors(spec.get("uri"), spec.get("split"), spec["n_heldout"], spec["seed"], spec["size"])


class LearnerCore:
    """Student model, optimiser, KD step, held-out evaluation and checkpoints for one run folder.

    `spec` is config.learner_spec(cfg, run_dir); with a run_dir that already holds checkpoints, the student,
    optimiser and step are restored from the newest readable one.
    """

    def __init__(self, spec: dict):
        from trainers.classifier import make_optimizer

        torch.set_num_threads(spec["torch_threads"])
        self.spec = spec
        self.device = device_for(spec["num_gpus"])
        self.teacher, tmeta = load_classifier(spec["teacher_checkpoint"], map_location=self.device)
        self.teacher.requires_grad_(False)
        self.encoding = tmeta.get("encoding", "wafer_pm1")
        self.classes = tmeta.get("classes")
        torch.manual_seed(derive_seed(spec["seed"], "student_init"))
        self.student: ResNet = build_resnet(spec["student_arch"], tmeta["num_classes"], tmeta["in_channels"])
        self.student.to(self.device)
        self.opt = make_optimizer(self.student, spec["optimizer"], spec["lr"], spec["weight_decay"])
        self.gen = generator(spec["seed"], "learner_augment")
        self.step = 0
        self.restored_step: Optional[int] = None
        self.history: list[dict[str, Any]] = []  # evaluations
        self.run_dir: Optional[str] = spec.get("run_dir")
        self.eval_x, self.eval_y = heldout_set(spec["eval"])
        self.eval_teacher_logits = predict_logits(self.teacher, self.eval_x)  # (N, K), once
        if self.run_dir and storage.exists(self.run_dir):
            self.restore()

    # --- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One KD step on a replayed batch {"x" (B, C, H, W), "logits" (B, K)}; returns {"kd_loss", "lr"}."""
        from trainers.classifier import random_dihedral

        x = torch.as_tensor(batch["x"]).to(self.device)
        t_logits = torch.as_tensor(batch["logits"]).to(self.device)
        if self.spec["augment"]:
            x = random_dihedral(x, self.gen)
            with torch.no_grad():
                t_logits = self.teacher(x)  # the stored logits belong to the un-augmented images
        lr = lr_at(self.step + 1, self.spec["steps"], self.spec["lr"], warmup_steps=self.spec["warmup_steps"],
                   schedule="cosine")
        set_lr(self.opt, lr)
        self.student.train()
        s_logits = self.student(x)  # (B, K)
        loss = kd_loss(s_logits, t_logits, self.spec["kd_temperature"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"kd_loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out real top-1, agreement with the teacher's predictions and KD to the teacher; kept in history."""
        logits = predict_logits(self.student, self.eval_x)
        t_logits = self.eval_teacher_logits
        result = {"step": self.step,
                  "heldout_top1": float((logits.argmax(1) == self.eval_y).float().mean()),
                  "teacher_agreement": float((logits.argmax(1) == t_logits.argmax(1)).float().mean()),
                  "heldout_kd": float(kd_loss(logits, t_logits, self.spec["kd_temperature"])),
                  "time": time.time()}
        self.history.append(result)
        return result

    # --- checkpoints (weights only: state.pt + meta.json)
    def meta(self) -> dict[str, Any]:
        return {**classifier_meta(self.student, self.encoding, self.classes), "method": "fast_ad",
                "step": self.step, "teacher_checkpoint": self.spec["teacher_checkpoint"],
                "diffusion_checkpoint": self.spec["diffusion_checkpoint"],
                "last_eval": self.history[-1] if self.history else None}

    def save_checkpoint(self, export: bool = False) -> Optional[str]:
        """Write checkpoint_step_N (student + optimiser), pruned to num_to_keep; with `export`, also the
        weights-only `model/` that serve/ loads. Returns the checkpoint folder (None without a run folder)."""
        if not self.run_dir:
            return None
        weights = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        meta = self.meta()
        dest = write_checkpoint(self.run_dir, self.step, {"model": weights, "optimizer": self.opt.state_dict()},
                                meta, self.spec["num_to_keep"])
        if export:
            with tempfile.TemporaryDirectory() as tmp:
                save_state(tmp, {"model": weights}, meta)
                export_checkpoint(tmp, storage.join(self.run_dir, MODEL_DIR))
        return dest

    def restore(self) -> Optional[int]:
        """Load the newest readable checkpoint of the run folder; returns its step (None: nothing to resume)."""
        for path in reversed(list_checkpoints(self.run_dir)):
            try:
                state, meta = load_state(path, map_location=self.device)
            except (FileNotFoundError, ValueError):
                continue  # a checkpoint cut short by a crash: fall back to the previous one
            if meta.get("arch") != self.student.arch:
                raise ValueError(f"{path}: holds a {meta.get('arch')} student, config asks for "
                                 f"{self.student.arch}; use another run.name")
            self.student.load_state_dict(state["model"])
            if "optimizer" in state:
                self.opt.load_state_dict(state["optimizer"])
            self.step = self.restored_step = int(meta["step"])
            return self.step
        return None
