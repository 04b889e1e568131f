"""Quality metrics: FID/KID through torch-fidelity (metrics.fid), overlay model-fit statistics (metrics.overlay).

Names are re-exported lazily, so `import metrics.overlay` does not pull in torch-fidelity.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_fid_kid": "metrics.fid",
    "load_domain_classifier": "metrics.fid",
    "register_domain_extractors": "metrics.fid",
    "to_uint8_rgb": "metrics.fid",
    "overlay_stats": "metrics.overlay",
    "compare_overlay_stats": "metrics.overlay",
    "conditional_fidelity": "metrics.overlay",
    "mean_plus_3sigma": "metrics.overlay",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'metrics' has no attribute {name!r}")
