"""Model-input encodings, one per data kind, in one registry: native values → network range, x = (v − offset)/scale.

| name          | kind    | tensor key (data/datasets.py) | native values                  | network range     |
|---------------|---------|-------------------------------|--------------------------------|-------------------|
| wafer_pm1     | wafer   | wafer_map (1, H, W)           | 0 off-wafer / 1 pass / 2 fail  | {−1, 0, +1}       |
| image_pm1     | image   | image (C, H, W)               | uint8 / 255 in [0, 1]          | [−1, 1]           |
| sem_pm1       | sem     | image (1, H, W)               | grey level in [0, 1]           | [−1, 1]           |
| overlay_nm20  | overlay | overlay (2, H, W)             | dx, dy in nm                   | nm / 20           |

Classifiers, the DDPM prior, Fast-AD and serve/ use wafer_pm1 / image_pm1 (the DDPM generates in [−1, 1]); the
FID feature extractor (models/feature_extractor.py) uses the encoding of its domain and records offset/scale in
its weights file. A checkpoint's meta names its encoding ("encoding": "wafer_pm1").
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from data.schema import KINDS


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How one kind's native values become network inputs: (x − offset) / scale."""

    name: str
    kind: str                   # dataset kind (data/schema.py KINDS)
    key: str                    # tensor key of the image in data/datasets.py's view of that kind
    offset: float
    scale: float
    in_channels: Optional[int]  # None: given by the data (the "image" kind holds 1 or 3 channels)
    unit: str                   # what the native values mean

    def encode(self, x: Tensor) -> Tensor:
        return (x - self.offset) / self.scale

    def decode(self, x: Tensor) -> Tensor:
        return x * self.scale + self.offset


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (
    Encoding("wafer_pm1", "wafer", "wafer_map", 1.0, 1.0, 1, "0 no die / 1 pass / 2 fail"),
    Encoding("image_pm1", "image", "image", 0.5, 0.5, None, "uint8 / 255, in [0, 1]"),
    Encoding("sem_pm1", "sem", "image", 0.5, 0.5, 1, "grey level in [0, 1]"),
    Encoding("overlay_nm20", "overlay", "overlay", 0.0, 20.0, 2, "nm"),
)}
KIND_ENCODING: dict[str, str] = {e.kind: e.name for e in ENCODINGS.values()}  # one encoding per kind
assert set(KIND_ENCODING) == set(KINDS), "every dataset kind needs exactly one encoding"


def get_encoding(name: str) -> Encoding:
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; one of {tuple(ENCODINGS)}")
    return ENCODINGS[name]


def encoding_for(kind: str) -> Encoding:
    """The encoding of a dataset kind."""
    if kind not in KIND_ENCODING:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    return ENCODINGS[KIND_ENCODING[kind]]


def encode_tensors(tensors: Mapping[str, Tensor], kind: str) -> Tensor:
    """data/datasets.py tensors of a kind (batch_to_tensors / table_to_tensors) → network input (N, C, H, W)."""
    enc = encoding_for(kind)
    if enc.key not in tensors:
        raise KeyError(f"{kind!r} tensors lack {enc.key!r} (have {sorted(tensors)})")
    return enc.encode(tensors[enc.key])


# --------------------------------------------------------------------------- raw arrays (serve, Fast-AD)

def encode_wafer(maps: np.ndarray | Tensor) -> Tensor:
    """Wafer maps (N, H, W) with values {0 off, 1 pass, 2 fail} → float (N, 1, H, W) in {−1, 0, +1}."""
    t = torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps)
    if t.ndim != 3:
        raise ValueError(f"wafer maps must be (N, H, W), got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2):
        raise ValueError(f"wafer map values must be 0, 1 or 2, got range [{int(t.min())}, {int(t.max())}]")
    return ENCODINGS["wafer_pm1"].encode(t.float().unsqueeze(1))  # (N, 1, H, W)


def decode_wafer(x: Tensor) -> Tensor:
    """Network-range images (N, 1, H, W) → wafer maps (N, H, W) uint8 in {0, 1, 2} (nearest level)."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W), got {tuple(x.shape)}")
    return ENCODINGS["wafer_pm1"].decode(x[:, 0].clamp(-1, 1).round()).to(torch.uint8)  # (N, H, W)


def encode_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, C, H, W) → float (N, C, H, W) in [−1, 1] (through [0, 1], as the "image" kind is read)."""
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if t.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(t.shape)}")
    return ENCODINGS["image_pm1"].encode(t.float() * (1.0 / 255.0))


def decode_images(x: Tensor) -> Tensor:
    """Network-range images (N, C, H, W) → uint8 (N, C, H, W)."""
    return (ENCODINGS["image_pm1"].decode(x.clamp(-1, 1)) * 255.0).round().to(torch.uint8)
