"""Classifier inference: input encodings, checkpoint loading and prediction, for every trained classifier
of any family (models/classifiers.py: ResNets, ShuffleNetV1, MobileNetV2) — trainers/classifier.py teachers,
Fast-AD's and SDD-LSKD's distilled students. serve/, evaluation and Fast-AD use these.

Input encodings live in data/encoding.py (one registry for every data kind); encode_wafer, decode_wafer and
encode_images are re-exported here for the code that feeds raw maps or images to a classifier.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from data.encoding import decode_wafer, encode_images, encode_wafer  # noqa: F401  (re-exported)
from fabdistill.checkpoints import load_state, resolve_checkpoint
from models.classifiers import classifier_from_meta

# Encodings a classifier may be trained on (data/encoding.py names).
CLASSIFIER_ENCODINGS = ("wafer_pm1", "image_pm1")


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


def classifier_meta(model: nn.Module, encoding: str, classes: Optional[list[str]] = None) -> dict[str, Any]:
    if encoding not in CLASSIFIER_ENCODINGS:
        raise ValueError(f"unknown classifier encoding {encoding!r}; one of {CLASSIFIER_ENCODINGS}")
    return {"kind": "classifier", **model.meta(), "encoding": encoding,
            "classes": list(classes) if classes else [str(i) for i in range(model.num_classes)]}


def load_classifier(path: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a checkpoint folder or a run folder (its model/ or newest checkpoint); the
    family is found from meta["arch"] (models/classifiers.py)."""
    state, meta = load_state(resolve_checkpoint(path), map_location=map_location)
    if meta.get("kind") != "classifier" or "model" not in state:
        raise ValueError(f"{path}: not a classifier checkpoint (meta kind {meta.get('kind')!r})")
    model = classifier_from_meta(meta)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), meta
