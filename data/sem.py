"""Synthetic SEM-like line/space images with one defect each, their clean twin and an exact defect mask.

Rendering (both twins share every random draw except the defect itself)
    Vertical lines of pitch p ~ U(8, 16) px (scaled by size / 64 below 64 px) and width = duty x p, duty ~
    U(0.4, 0.6). Each line edge wanders with line-edge roughness: smooth Gaussian noise along y (correlation
    ~4 px) of std ``roughness`` ~ U(0.2, 1.0) px. A line is a set of per-row intervals [left(y), right(y)];
    the coverage of each pixel is the overlap of its [x, x+1) span with the intervals (anti-aliased, clipped
    to 1). Grey value
        I = space + (line - space) * coverage + edge_gain * |grad coverage|        (SEM edge bloom)
    with space ~ U(0.15, 0.3), line ~ U(0.45, 0.6), edge_gain ~ U(0.1, 0.25); then a 3x3 binomial blur (beam
    spot), then additive Gaussian noise of std ``noise`` ~ U(0.02, 0.06) - the same noise array for both twins
    - and clip to [0, 1].

Defects (:data:`SEM_DEFECTS`), applied to the defect twin's geometry
    bridge         the space between two neighbouring lines filled over 2-5 rows
    break          a line removed over 2-5 rows
    line_collapse  a line bent sideways by a smooth bump (up to ~one space) over 10-30 rows, onto a neighbour
    particle       a bright disc (radius 1.5-4 px, grey 0.8-0.95) anywhere

Mask: ``mask = (image != clean)``, computed on the final float32 arrays, so it covers exactly the pixels where
the twins differ (the defect footprint widened by the blur, minus any pixel where clipping made them equal
again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from data.schema import SEM_DEFECTS, to_fixed_list  # noqa: F401  (SEM_DEFECTS re-exported)


def _smooth_noise(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-std 1-D Gaussian noise with Gaussian correlation length ``corr`` (n,)."""
    k = np.arange(-int(3 * corr), int(3 * corr) + 1)
    kern = np.exp(-0.5 * (k / corr) ** 2)
    raw = rng.normal(size=n + len(k) - 1)
    out = np.convolve(raw, kern, mode="valid")
    return out / (np.sqrt((kern**2).sum()))


def _coverage(intervals: np.ndarray, size: int) -> np.ndarray:
    """Per-row intervals (S, L, 2) [left, right] in px -> pixel coverage (S, S) in [0, 1]."""
    px = np.arange(size, dtype=np.float64)
    left = intervals[:, :, 0, None]  # (S, L, 1)
    right = intervals[:, :, 1, None]
    overlap = np.clip(np.minimum(right, px + 1.0) - np.maximum(left, px), 0.0, 1.0)  # (S, L, S)
    return np.clip(overlap.sum(axis=1), 0.0, 1.0)


def _blur(img: np.ndarray) -> np.ndarray:
    """3x3 binomial blur with edge replication; elementwise identical inputs give identical outputs."""
    p = np.pad(img, 1, mode="edge")
    rows = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * rows[:, :-2] + 0.5 * rows[:, 1:-1] + 0.25 * rows[:, 2:]


def _render(cov: np.ndarray, space: float, line: float, edge_gain: float) -> np.ndarray:
    gy, gx = np.gradient(cov)
    return space + (line - space) * cov + edge_gain * np.sqrt(gx**2 + gy**2)


def sem_pair(
    defect: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One (defect image, clean image) pair, each (S, S) float32 in [0, 1], and its parameters."""
    if defect not in SEM_DEFECTS:
        raise ValueError(f"unknown SEM defect {defect!r}; expected one of {SEM_DEFECTS}")
    u = rng.uniform
    pitch = u(8.0, 16.0) * min(1.0, size / 64.0)  # the same field of view at any size below 64 px
    width = u(0.4, 0.6) * pitch
    rough = u(0.2, 1.0)
    space_grey, line_grey, edge_gain, noise_sd = u(0.15, 0.3), u(0.45, 0.6), u(0.1, 0.25), u(0.02, 0.06)
    phase = u(0.0, pitch)
    n_lines = int(np.ceil(size / pitch)) + 2
    centres = phase - pitch + pitch * np.arange(n_lines)  # (L,) first line starts off-image
    lines = np.empty((size, n_lines, 2))
    for k in range(n_lines):
        lines[:, k, 0] = centres[k] - width / 2 + rough * _smooth_noise(rng, size, 4.0)
        lines[:, k, 1] = centres[k] + width / 2 + rough * _smooth_noise(rng, size, 4.0)
    noise = rng.normal(0.0, noise_sd, size=(size, size))

    # the defect, on the geometry of the defect twin only
    bad = lines.copy()
    extra = np.zeros((size, 0, 2))
    particle = None
    # a line that, with its right neighbour, lies inside the image
    inside = [k for k in range(n_lines - 1) if centres[k] > width and centres[k + 1] < size - width] or [
        int(np.argmin(np.abs(centres[:-1] - size / 2)))
    ]
    k = int(rng.choice(inside))
    if defect in ("bridge", "break"):
        h = int(rng.integers(2, 6))
        y0 = int(rng.integers(0, size - h))
        rows = slice(y0, y0 + h)
        if defect == "bridge":
            extra = np.zeros((size, 1, 2))
            extra[rows, 0, 0] = bad[rows, k, 1] - 0.5
            extra[rows, 0, 1] = bad[rows, k + 1, 0] + 0.5 if k + 1 < n_lines else bad[rows, k, 1] + pitch
        else:
            bad[rows, k, :] = bad[rows, k, :1]  # zero-width interval: the line is gone on these rows
    elif defect == "line_collapse":
        length = int(rng.integers(10, min(31, size)))
        y0 = int(rng.integers(0, size - length + 1))
        t = np.linspace(0.0, np.pi, length)
        shift = (pitch - width + 0.5) * np.sin(t) * rng.choice([-1.0, 1.0])
        bad[y0 : y0 + length, k, :] += shift[:, None]
    else:  # particle
        radius, grey = u(1.5, 4.0), u(0.8, 0.95)
        cy, cx = u(radius, size - radius), u(radius, size - radius)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        particle = (np.clip(radius + 0.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0.0, 1.0), grey)

    def finish(intervals: np.ndarray, with_particle: bool) -> np.ndarray:
        img = _render(_coverage(intervals, size), space_grey, line_grey, edge_gain)
        if with_particle and particle is not None:
            cov, grey = particle
            img = img * (1.0 - cov) + grey * cov
        return np.clip(_blur(img) + noise, 0.0, 1.0).astype(np.float32)

    clean = finish(lines, False)
    image = finish(np.concatenate([bad, extra], axis=1) if extra.shape[1] else bad, True)
    params = {"pitch": pitch, "line_width": width, "roughness": rough, "noise": noise_sd}
    return image, clean, params


def defect_probabilities(defect_weights: Mapping[str, float] | Sequence[float] | None) -> np.ndarray:
    """Normalised defect mix (4,) from a mapping, a sequence, or None (uniform)."""
    if defect_weights is None:
        return np.full(len(SEM_DEFECTS), 1.0 / len(SEM_DEFECTS))
    if isinstance(defect_weights, Mapping):
        unknown = set(defect_weights) - set(SEM_DEFECTS)
        if unknown:
            raise ValueError(f"unknown SEM defects {sorted(unknown)}; expected names from {SEM_DEFECTS}")
        w = np.array([float(defect_weights.get(d, 0.0)) for d in SEM_DEFECTS])
    else:
        w = np.asarray(list(defect_weights), dtype=float)
        if w.shape != (len(SEM_DEFECTS),):
            raise ValueError(f"defect_weights needs {len(SEM_DEFECTS)} entries {SEM_DEFECTS}, got {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"defect_weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def generate_sem(
    n: int,
    seed: int,
    size: int = 64,
    defect_weights: Mapping[str, float] | Sequence[float] | None = None,
    start: int = 0,
) -> pa.Table:
    """``n`` (defect, clean, mask) triples as an Arrow table in the "sem" schema (see data/parquet_io.py).

    Deterministic by (seed, sample index); chunks with matching ``start`` concatenate to the full table.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    if size < 16:
        raise ValueError(f"SEM image size must be >= 16, got {size}")
    probs = defect_probabilities(defect_weights)
    images = np.zeros((n, size, size), np.float32)
    cleans = np.zeros((n, size, size), np.float32)
    defects = np.zeros(n, np.int16)
    params: dict[str, list[float]] = {"pitch": [], "line_width": [], "roughness": [], "noise": []}
    for i in range(n):
        rng = np.random.default_rng([seed, start + i, 4])
        defects[i] = rng.choice(len(SEM_DEFECTS), p=probs)
        images[i], cleans[i], p = sem_pair(SEM_DEFECTS[defects[i]], rng, size)
        for key in params:
            params[key].append(p[key])
    masks = (images != cleans).astype(np.uint8)
    return pa.table(
        {
            "image": to_fixed_list(images),
            "clean": to_fixed_list(cleans),
            "mask": to_fixed_list(masks),
            "defect": pa.array(defects, type=pa.int16()),
            "defect_name": pa.array([SEM_DEFECTS[d] for d in defects], type=pa.string()),
            "sample_id": pa.array([f"S{seed}-{start + i:08d}" for i in range(n)], type=pa.string()),
            **{key: pa.array(np.asarray(v, np.float32), type=pa.float32()) for key, v in params.items()},
            "height": pa.array(np.full(n, size), type=pa.int32()),
            "width": pa.array(np.full(n, size), type=pa.int32()),
        }
    )
