"""Classifier inference: input encodings, checkpoint loading and prediction, for every trained classifier
(trainers/classifier.py teachers, Fast-AD and distilled students). serve/, evaluation and Fast-AD use these.

Input encodings (one place):
  * wafer maps ("wafer" kind, values 0 off-wafer / 1 pass / 2 fail) → one channel x = value − 1 ∈ {−1, 0, +1};
  * images ("image" kind, uint8 CHW) → x = value / 127.5 − 1 ∈ [−1, 1].
Both ranges are [−1, 1], the range the DDPM (trainers/ddpm.py) generates in.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from fabdistill.checkpoints import load_state, resolve_checkpoint
from models.resnet_cifar import ResNet, resnet_from_meta

ENCODINGS = ("wafer_pm1", "image_pm1")


def encode_wafer(maps: np.ndarray | Tensor) -> Tensor:
    """Wafer maps (N, H, W) with values {0 off, 1 pass, 2 fail} → float (N, 1, H, W) in {−1, 0, +1}."""
    t = torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps)
    if t.ndim != 3:
        raise ValueError(f"wafer maps must be (N, H, W), got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2):
        raise ValueError(f"wafer map values must be 0, 1 or 2, got range [{int(t.min())}, {int(t.max())}]")
    return (t.float() - 1.0).unsqueeze(1)  # (N, 1, H, W)


def decode_wafer(x: Tensor) -> Tensor:
    """Network-range images (N, 1, H, W) → wafer maps (N, H, W) uint8 in {0, 1, 2} (nearest level)."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W), got {tuple(x.shape)}")
    return (x[:, 0].clamp(-1, 1).round() + 1).to(torch.uint8)  # (N, H, W)


def encode_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, C, H, W) → float (N, C, H, W) in [−1, 1]."""
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if t.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(t.shape)}")
    return t.float() / 127.5 - 1.0


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Eval-mode logits (N, K), in chunks; restores the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def evaluate_top1(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] on (x (N, C, H, W), y (N,))."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need matching non-empty x and y, got {tuple(x.shape)} and {tuple(y.shape)}")
    return float((predict_logits(model, x, batch_size).argmax(1) == y.cpu()).float().mean())


def classifier_meta(model: ResNet, encoding: str, classes: Optional[list[str]] = None) -> dict[str, Any]:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; one of {ENCODINGS}")
    return {"kind": "classifier", **model.meta(), "encoding": encoding,
            "classes": list(classes) if classes else [str(i) for i in range(model.num_classes)]}


def load_classifier(path: str, map_location: str | torch.device = "cpu") -> tuple[ResNet, dict[str, Any]]:
    """(model in eval mode, meta) from a checkpoint folder or a run folder (its model/ or newest checkpoint)."""
    state, meta = load_state(resolve_checkpoint(path), map_location=map_location)
    if meta.get("kind") != "classifier" or "model" not in state:
        raise ValueError(f"{path}: not a classifier checkpoint (meta kind {meta.get('kind')!r})")
    model = resnet_from_meta(meta)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), meta
