"""Overlay task metrics: 10-term linear model fits, |mean| + 3σ, term distributions, conditional fidelity.

For each map (dx, dy in nm on an H×W wafer grid) the 10-parameter linear model of data/overlay.py
(tx, ty, mwx, mwy, rwx, rwy, mfx, mfy, rfx, rfy) is fitted by least squares over the valid (on-wafer) sites.
Per map and per axis we report, over valid sites only:

    raw       |mean(d)| + 3·std(d)           what a fab's overlay spec is written against
    residual  |mean(r)| + 3·std(r), r = d − fit   what the linear model (the scanner's correctables) cannot fix

std is the sample standard deviation (ddof = 1), as metrology tools report it.
A generator that reproduces a fab's overlay must reproduce the *distribution* of the fitted terms across
wafers, not just look like a map: :func:`compare_overlay_stats` measures that per term with the
Wasserstein-1 distance normalised by the real data's spread.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from data.overlay import LINEAR_TERMS, linear_terms_lstsq, grid_coordinates

AXES = ("x", "y")


def _as_maps(maps: Any, which: str = "maps") -> np.ndarray:
    if torch.is_tensor(maps):
        maps = maps.detach().cpu().numpy()
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4 or m.shape[1] != 2:
        raise ValueError(f"{which}: overlay maps must be (N, 2, H, W) in nm, got shape {m.shape}")
    if m.shape[0] == 0:
        raise ValueError(f"{which}: no maps")
    return m


def mean_plus_3sigma(values: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """|mean| + 3·std (ddof = 1) over the last axis, or over the `valid` entries of it.

    values (..., P), valid (P,) bool → (...).
    """
    v = np.asarray(values, dtype=np.float64)
    if valid is not None:
        v = v[..., np.asarray(valid, dtype=bool)]
    if v.shape[-1] < 2:
        raise ValueError(f"|mean|+3σ needs at least 2 valid sites, got {v.shape[-1]}")
    return np.abs(v.mean(axis=-1)) + 3.0 * v.std(axis=-1, ddof=1)


def overlay_stats(maps_nm: Any, coords: Optional[dict[str, np.ndarray]] = None) -> dict[str, Any]:
    """Model-fit statistics of a set of overlay maps.

    Args:
        maps_nm: (N, 2, H, W) or (2, H, W) array/tensor of dx, dy in nm.
        coords: grid_coordinates(H, W) of data/overlay.py (default: the 300 mm wafer, 26×33 mm fields).

    Returns:
        dict with
          ``n``; ``term_names`` (the 10 names);
          ``terms`` (N, 10) fitted terms [nm, ppm, µrad];
          ``raw_m3s``, ``residual_m3s``: {"x": (N,), "y": (N,)} |mean|+3σ per map in nm;
          ``term_mean``, ``term_std``: {name: float} across the set;
          ``raw_m3s_mean``, ``residual_m3s_mean``: {"x": float, "y": float} set averages.
    """
    m = _as_maps(maps_nm)
    n, _, h, w = m.shape
    if coords is None:
        coords = grid_coordinates(h, w)
    if coords["X"].shape != (h, w):
        raise ValueError(f"coords are for a {coords['X'].shape} grid, maps are {h}x{w}")
    if not np.isfinite(m[:, :, coords["valid"]]).all():
        raise ValueError("maps contain NaN or inf on valid sites")
    valid = coords["valid"].reshape(-1)
    terms, resid = linear_terms_lstsq(m, coords)                     # (N, 10), (N, 2, H, W)
    flat_raw = m.reshape(n, 2, -1)
    flat_res = resid.reshape(n, 2, -1).astype(np.float64)
    raw = {a: mean_plus_3sigma(flat_raw[:, i], valid) for i, a in enumerate(AXES)}
    res = {a: mean_plus_3sigma(flat_res[:, i], valid) for i, a in enumerate(AXES)}
    terms = terms.astype(np.float64)
    return {
        "n": n,
        "term_names": list(LINEAR_TERMS),
        "terms": terms,
        "raw_m3s": raw,
        "residual_m3s": res,
        "term_mean": {t: float(terms[:, i].mean()) for i, t in enumerate(LINEAR_TERMS)},
        "term_std": {t: float(terms[:, i].std(ddof=1)) if n > 1 else 0.0 for i, t in enumerate(LINEAR_TERMS)},
        "raw_m3s_mean": {a: float(raw[a].mean()) for a in AXES},
        "residual_m3s_mean": {a: float(res[a].mean()) for a in AXES},
    }


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two 1-D empirical distributions: ∫ |F_a(t) − F_b(t)| dt."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein1: empty sample")
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def _normalised(w1: float, scale: float) -> float:
    if scale > 0:
        return w1 / scale
    return 0.0 if w1 == 0 else float("inf")


def compare_overlay_stats(real: Any, generated: Any,
                          coords: Optional[dict[str, np.ndarray]] = None) -> dict[str, Any]:
    """Compare term and |mean|+3σ distributions of generated maps against real ones.

    `real` / `generated`: (N, 2, H, W) maps in nm, or dicts already returned by :func:`overlay_stats`.

    Returns:
        ``terms``: {name: {real_mean, real_std, gen_mean, gen_std, w1, w1_norm}} where
            w1_norm = W1(real, gen) / std(real) (0 is identical; ~1 is off by one real standard deviation);
        ``mean_w1_norm``: the average of w1_norm over the 10 terms (one number to rank generators);
        ``raw_m3s`` / ``residual_m3s``: {axis: {real_mean, gen_mean, w1_norm}}.
    """
    rs = real if isinstance(real, dict) else overlay_stats(real, coords)
    gs = generated if isinstance(generated, dict) else overlay_stats(generated, coords)
    per_term = {}
    for i, name in enumerate(LINEAR_TERMS):
        r, g = rs["terms"][:, i], gs["terms"][:, i]
        w1 = wasserstein1(r, g)
        per_term[name] = {
            "real_mean": rs["term_mean"][name], "real_std": rs["term_std"][name],
            "gen_mean": gs["term_mean"][name], "gen_std": gs["term_std"][name],
            "w1": w1, "w1_norm": _normalised(w1, rs["term_std"][name]),
        }
    out: dict[str, Any] = {"terms": per_term,
                           "mean_w1_norm": float(np.mean([v["w1_norm"] for v in per_term.values()]))}
    for key in ("raw_m3s", "residual_m3s"):
        out[key] = {}
        for a in AXES:
            r, g = rs[key][a], gs[key][a]
            scale = float(r.std(ddof=1)) if r.size > 1 else 0.0
            out[key][a] = {"real_mean": float(r.mean()), "gen_mean": float(g.mean()),
                           "w1_norm": _normalised(wasserstein1(r, g), scale)}
    return out


@torch.no_grad()
def conditional_fidelity(
    generated_maps: Any,
    equipment_labels: Any,
    classifier: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    batch_size: int = 256,
) -> float:
    """Fraction of generated maps whose predicted equipment fingerprint is the one they were conditioned on.

    Args:
        generated_maps: (N, 2, H, W) in nm.
        equipment_labels: (N,) integer labels (equipment_id = scanner × num_chucks + chuck, as in data/overlay.py).
        classifier: a callable taking native-unit maps (N, 2, H, W) and returning logits (N, K), e.g.
            ``metrics.fid.load_domain_classifier("overlay")``; a bare DomainFeatureNet is wrapped with the
            overlay input encoding.

    Returns:
        top-1 accuracy in [0, 1]; chance level is 1/K.
    """
    from models.feature_extractor import DomainFeatureNet

    if isinstance(classifier, DomainFeatureNet):
        from metrics.fid import DomainClassifier
        classifier = DomainClassifier(classifier, "overlay")
    if isinstance(classifier, nn.Module):
        classifier.eval()
    maps = torch.as_tensor(_as_maps(generated_maps, "generated_maps"), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(equipment_labels)).long().reshape(-1)
    if labels.shape[0] != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {labels.shape[0]} equipment labels")
    device = next(classifier.parameters()).device if isinstance(classifier, nn.Module) else torch.device("cpu")
    correct = 0
    for i in range(0, maps.shape[0], batch_size):
        logits = classifier(maps[i:i + batch_size].to(device))                # (B, K)
        if logits.dim() != 2:
            raise ValueError(f"classifier must return logits (N, K), got shape {tuple(logits.shape)}")
        y = labels[i:i + batch_size].to(logits.device)
        if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
            raise ValueError(f"equipment labels must be in [0, {logits.shape[1]}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        correct += int((logits.argmax(dim=1) == y).sum())
    return correct / maps.shape[0]
