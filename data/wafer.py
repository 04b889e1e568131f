"""Synthetic wafer bin maps in the nine WM-811K classes.

A map is an S x S grid (S = ``size``, 32 by default) of dies: 0 = no die (off-wafer), 1 = pass, 2 = fail.
Pixel (i, j) is on the wafer when its centre lies within R = S/2 of the grid centre; r below is the normalised
radius (distance / R) and theta the angle. Each map = pattern fails + background fails (i.i.d. with a rate
drawn from ``background_rate``, anywhere on the wafer). ``pattern_mask`` marks the dies that fail because of
the pattern.

| class     | pattern region (fails with probability p inside)                                   | p         |
|-----------|------------------------------------------------------------------------------------|-----------|
| Center    | disc r < rc, rc ~ U(0.15, 0.30)                                                    | 0.75-0.98 |
| Donut     | r_in <= r < r_out, r_in ~ U(0.25, 0.45), r_out = min(r_in + U(0.15, 0.30), 0.8)   | 0.60-0.95 |
| Edge-Loc  | r > re, re ~ U(0.70, 0.85), within an arc of half-width U(20, 50) deg              | 0.60-0.95 |
| Edge-Ring | r > re, re ~ U(0.80, 0.90), all around                                             | 0.60-0.95 |
| Loc       | ellipse, centre at r ~ U(0.25, 0.60), semi-axes U(0.10, 0.20) R                    | 0.60-0.95 |
| Near-full | the whole wafer                                                                    | 0.75-0.95 |
| Random    | the whole wafer                                                                    | 0.15-0.35 |
| Scratch   | a 1-die-wide gently curved line, start r < 0.7, length U(0.5, 1.2) R on the wafer  | 0.80-1.00 |
| none      | no pattern (background fails only)                                                 | -         |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from data.schema import NUM_WAFER_CLASSES, WAFER_CLASSES, to_fixed_list  # noqa: F401  (WAFER_CLASSES re-exported)

OFF, PASS, FAIL = 0, 1, 2


def wafer_geometry(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid, r, theta) of an S x S grid: on-wafer mask, normalised radius, angle (rad); each (S, S)."""
    if size < 4:
        raise ValueError(f"wafer map size must be >= 4, got {size}")
    c = (np.arange(size) + 0.5) - size / 2.0
    xx, yy = np.meshgrid(c, -c)  # (S, S); y up
    r = np.sqrt(xx**2 + yy**2) / (size / 2.0)
    return r <= 1.0, r, np.arctan2(yy, xx)


def class_probabilities(class_weights: Mapping[str, float] | Sequence[float] | None) -> np.ndarray:
    """Normalised class mix (NUM_WAFER_CLASSES,) from a {class: weight} mapping, a sequence of that length, or None
    (uniform)."""
    if class_weights is None:
        return np.full(NUM_WAFER_CLASSES, 1.0 / NUM_WAFER_CLASSES)
    if isinstance(class_weights, Mapping):
        unknown = set(class_weights) - set(WAFER_CLASSES)
        if unknown:
            raise ValueError(f"unknown wafer classes {sorted(unknown)}; expected names from {WAFER_CLASSES}")
        w = np.array([float(class_weights.get(c, 0.0)) for c in WAFER_CLASSES])
    else:
        w = np.asarray(list(class_weights), dtype=float)
        if w.shape != (NUM_WAFER_CLASSES,):
            raise ValueError(
                f"class_weights needs {NUM_WAFER_CLASSES} entries {WAFER_CLASSES}, got {w.shape}"
            )
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"class_weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def _angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def pattern_region(cls: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Region (S, S) bool where the class pattern acts, and its fail probability p (see the module table)."""
    valid, r, th = wafer_geometry(size)
    u = rng.uniform
    if cls == "Center":
        return r < u(0.15, 0.30), u(0.75, 0.98)
    if cls == "Donut":
        r_in = u(0.25, 0.45)
        r_out = min(r_in + u(0.15, 0.30), 0.8)
        return (r >= r_in) & (r < r_out), u(0.60, 0.95)
    if cls == "Edge-Loc":
        return (r > u(0.70, 0.85)) & (_angle_diff(th, u(-np.pi, np.pi)) < np.deg2rad(u(20, 50))), u(
            0.60, 0.95
        )
    if cls == "Edge-Ring":
        return r > u(0.80, 0.90), u(0.60, 0.95)
    if cls == "Loc":
        rc, tc, ang = u(0.25, 0.60), u(-np.pi, np.pi), u(0, np.pi)
        a, b = u(0.10, 0.20), u(0.10, 0.20)
        half = size / 2.0
        c = (np.arange(size) + 0.5) - half
        xx, yy = np.meshgrid(c / half, -c / half)
        dx, dy = xx - rc * np.cos(tc), yy - rc * np.sin(tc)
        p, q = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
        return (p / a) ** 2 + (q / b) ** 2 <= 1.0, u(0.60, 0.95)
    if cls == "Near-full":
        return valid.copy(), u(0.75, 0.95)
    if cls == "Random":
        return valid.copy(), u(0.15, 0.35)
    if cls == "Scratch":
        half = size / 2.0
        for _ in range(20):  # redraw scratches that leave the wafer almost at once
            r0, t0 = 0.7 * np.sqrt(u(0, 1)), u(-np.pi, np.pi)
            x, y = r0 * np.cos(t0) * half + half, -r0 * np.sin(t0) * half + half  # (col, row) in pixel units
            heading, curvature = u(-np.pi, np.pi), rng.normal(0.0, 0.5) / size  # rad per pixel step
            region = np.zeros((size, size), bool)
            length = u(0.5, 1.2) * half
            for _ in range(int(length / 0.25)):  # quarter-pixel steps so the line has no gaps
                i, j = int(np.floor(y)), int(np.floor(x))
                if 0 <= i < size and 0 <= j < size:
                    region[i, j] = True
                x, y = x + 0.25 * np.cos(heading), y - 0.25 * np.sin(heading)
                heading += 0.25 * curvature
            if (region & valid).sum() >= 0.4 * length:
                break
        return region, u(0.80, 1.00)
    if cls == "none":
        return np.zeros((size, size), bool), 0.0
    raise ValueError(f"unknown wafer class {cls!r}; expected one of {WAFER_CLASSES}")


def wafer_sample(
    cls: str, rng: np.random.Generator, size: int, background_rate: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """One map: (wafer_map (S, S) uint8 in {0, 1, 2}, pattern_mask (S, S) uint8)."""
    valid, _, _ = wafer_geometry(size)
    region, p = pattern_region(cls, rng, size)
    pattern = region & valid & (rng.random((size, size)) < p)
    background = valid & (rng.random((size, size)) < rng.uniform(*background_rate))
    wmap = np.where(valid, PASS, OFF).astype(np.uint8)
    wmap[pattern | background] = FAIL
    return wmap, pattern.astype(np.uint8)


def generate_wafer(
    n: int,
    seed: int,
    size: int = 32,
    class_weights: Mapping[str, float] | Sequence[float] | None = None,
    background_rate: tuple[float, float] = (0.0, 0.04),
    wafers_per_lot: int = 25,
    start: int = 0,
) -> pa.Table:
    """``n`` wafer maps as an Arrow table in the "wafer" schema (see data/parquet_io.py).

    Deterministic by (seed, sample index), so chunks with matching ``start`` concatenate to the full table.
    ``class_weights`` sets the class mix (default uniform); e.g. ``{"none": 8, "Center": 1}``.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    lo, hi = background_rate
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"background_rate must satisfy 0 <= lo <= hi <= 1, got {background_rate}")
    probs = class_probabilities(class_weights)
    valid_count = float(wafer_geometry(size)[0].sum())
    maps = np.zeros((n, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    labels = np.zeros(n, np.int16)
    lot_ids, wafer_ids = [], []
    for i in range(n):
        g = start + i
        rng = np.random.default_rng([seed, g, 3])
        labels[i] = rng.choice(NUM_WAFER_CLASSES, p=probs)
        maps[i], masks[i] = wafer_sample(WAFER_CLASSES[labels[i]], rng, size, background_rate)
        lot, slot = divmod(g, wafers_per_lot)
        lot_ids.append(f"S{seed}-L{lot:06d}")
        wafer_ids.append(f"S{seed}-L{lot:06d}-W{slot + 1:02d}")
    return wafer_table(maps, masks, labels, lot_ids, wafer_ids, die_size=np.full(n, valid_count))


def wafer_table(
    maps: np.ndarray,
    masks: np.ndarray | None,
    labels: np.ndarray,
    lot_ids: Sequence[str],
    wafer_ids: Sequence[str],
    *,
    die_size: np.ndarray | None = None,
    split: Sequence[str] | None = None,
) -> pa.Table:
    """A "wafer" table from maps (N, S, S) uint8, masks (N, S, S) or None (zeros), labels (N,), -1 = none."""
    maps = np.asarray(maps, dtype=np.uint8)
    if maps.ndim != 3:
        raise ValueError(f"wafer maps must be (N, H, W), got {maps.shape}")
    n, h, w = maps.shape
    masks = np.zeros_like(maps) if masks is None else np.asarray(masks, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int16)
    return pa.table(
        {
            "wafer_map": to_fixed_list(maps),
            "pattern_mask": to_fixed_list(masks),
            "label": pa.array(labels, type=pa.int16()),
            "label_name": pa.array([WAFER_CLASSES[k] if k >= 0 else "" for k in labels], type=pa.string()),
            "lot_id": pa.array(list(lot_ids), type=pa.string()),
            "wafer_id": pa.array(list(wafer_ids), type=pa.string()),
            "split": pa.array(list(split) if split is not None else [""] * n, type=pa.string()),
            "die_size": pa.array(
                np.full(n, np.nan) if die_size is None else np.asarray(die_size), type=pa.float32()
            ),
            "height": pa.array(np.full(n, h), type=pa.int32()),
            "width": pa.array(np.full(n, w), type=pa.int32()),
        }
    )
