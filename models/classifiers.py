"""One registry over the classifier families: every classifier of this repo is built, and rebuilt from checkpoint
metadata, through here.

    family        module                 archs
    resnet        models/resnet_cifar.py resnet8 … resnet110, resnet8x4, resnet32x4, resnet18/34, tiny …
    shufflenet    models/shufflenet.py   shufflev1, shufflev1_tiny
    mobilenetv2   models/mobilenetv2.py  mobilenetv2, mobilenetv2_w1, mobilenetv2_tiny

Every family shares one contract: `forward(x, return_features=False)`, a final `nn.Linear` named `fc` (what SDD's
multi-scale logits reuse), `meta()` = {"arch", "num_classes", "in_channels"}. Arch names are unique across families,
so a checkpoint's meta needs no family key (older ResNet checkpoints load unchanged).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from models.mobilenetv2 import MOBILENETV2_SIZES, MobileNetV2
from models.resnet_cifar import RESNET_ARCHS, ResNet
from models.shufflenet import SHUFFLENET_SIZES, ShuffleNetV1

__all__ = ["CLASSIFIER_FAMILIES", "CLASSIFIER_ARCHS", "family_of", "build_classifier", "classifier_from_meta"]

# family -> (its named sizes, the constructor taking (spec, num_classes, in_channels, arch))
CLASSIFIER_FAMILIES: dict[str, tuple[dict[str, Any], Callable[..., nn.Module]]] = {
    "resnet": (RESNET_ARCHS, ResNet),
    "shufflenet": (SHUFFLENET_SIZES, ShuffleNetV1),
    "mobilenetv2": (MOBILENETV2_SIZES, MobileNetV2),
}
_LABEL = {"resnet": "ResNet", "shufflenet": "ShuffleNet", "mobilenetv2": "MobileNetV2"}


def _arch_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for family, (sizes, _) in CLASSIFIER_FAMILIES.items():
        for arch in sizes:
            if arch in table:
                raise RuntimeError(f"arch {arch!r} is defined by both {table[arch]} and {family}")
            table[arch] = family
    return table


CLASSIFIER_ARCHS: dict[str, str] = _arch_table()  # arch -> family, every classifier this repo can build


def family_of(arch: str) -> str:
    """The family of a named arch, or a ValueError listing every known arch."""
    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"unknown classifier arch {arch!r}; choose one of {', '.join(CLASSIFIER_ARCHS)}")
    return CLASSIFIER_ARCHS[arch]


def build_classifier(arch: str, num_classes: int = 100, in_channels: int = 3, family: str | None = None) -> nn.Module:
    """A classifier of a named size from any family; `family` (optional) insists on one, with that family's error."""
    if family is not None:
        if family not in CLASSIFIER_FAMILIES:
            raise ValueError(f"unknown classifier family {family!r}; one of {', '.join(CLASSIFIER_FAMILIES)}")
        sizes, _ = CLASSIFIER_FAMILIES[family]
        if arch not in sizes:
            raise ValueError(f"unknown {_LABEL[family]} arch {arch!r}; choose one of {', '.join(sizes)}")
    sizes, cls = CLASSIFIER_FAMILIES[family or family_of(arch)]
    return cls(sizes[arch], num_classes=num_classes, in_channels=in_channels, arch=arch)


def classifier_from_meta(meta: dict[str, Any], family: str | None = None) -> nn.Module:
    """Rebuild from checkpoint metadata {"arch", "num_classes", "in_channels"} (weights not loaded)."""
    missing = [k for k in ("arch", "num_classes", "in_channels") if k not in meta]
    if missing:
        what = _LABEL.get(family or "", "classifier")
        raise ValueError(f"checkpoint meta lacks {missing}: not a {what} checkpoint? (meta keys: {sorted(meta)})")
    return build_classifier(str(meta["arch"]), int(meta["num_classes"]), int(meta["in_channels"]), family=family)
