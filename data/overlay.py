"""Synthetic overlay maps on a 300 mm wafer, with equipment logs that determine their signature.

Geometry (:func:`grid_coordinates`)
    The wafer (diameter D, radius R = D/2) is rasterised to an H x W grid of pixel centres covering [-R, R]^2;
    column j -> X = -R + (j + 0.5) 2R / W, row i -> Y = R - (i + 0.5) 2R / H (row 0 at the top, Y up), in mm.
    A pixel is valid (on the wafer) when its centre has X^2 + Y^2 <= R^2. Exposure fields of fx x fy mm
    (26 x 33 by default) tile the wafer with one field centred on the wafer centre; intrafield coordinates are
    x = X - fx round(X / fx), y = Y - fy round(Y / fy).

Linear 10-term model (:data:`LINEAR_TERMS`, :func:`linear_overlay`, :func:`linear_terms_lstsq`)
    dx = tx + mwx X - rwx Y + mfx x - rfx y
    dy = ty + mwy Y + rwy X + mfy y + rfy x
    tx, ty translation [nm]; mwx, mwy wafer scaling [ppm]; rwx, rwy wafer rotation [urad] (rotation =
    (rwx + rwy)/2, non-orthogonality = rwx - rwy); mfx, mfy field magnification [ppm]; rfx, rfy field rotation
    [urad] (a positive rotation turns the grid counter-clockwise). Since 1 ppm x 1 mm = 1 urad x 1 mm = 1 nm,
    every term is in nm once multiplied by a coordinate in mm.

Higher-order terms (:data:`HIGHER_TERMS`, coefficients in nm; u = X/R, v = Y/R, r = sqrt(X^2 + Y^2))
    dx += k_x3 u^3 + k_xy2 u v^2 + e g(r) X / r
    dy += k_y3 v^3 + k_yx2 v u^2 + e g(r) Y / r,        g(r) = exp((r - R) / 10 mm)   (radial edge roll-off)
    plus i.i.d. Gaussian measurement noise (``noise_nm``) on valid pixels.

Where a map's terms come from (all magnitudes in :data:`FINGERPRINT_STD` / :data:`DRIFT`)
    terms = scanner fingerprint + (scanner, chuck) fingerprint + reticle fingerprint + drift(logs) + wafer
    noise. Fingerprints are fixed by ``fingerprint_seed`` (not by the sample seed), so train and test sets
    drawn with different seeds share the same machines. Drift is physical in direction: wafer temperature ->
    wafer scaling (silicon CTE 2.6 ppm/K), stage humidity -> wafer scaling, air pressure and reticle
    temperature -> field magnification, lens heating (driven by dose) -> field magnification and rotation,
    defocus x telecentricity -> translation. The higher-order and edge terms are a (scanner, chuck)
    fingerprint (chuck flatness / clamping). Resulting maps are a few to ~25 nm, as in production overlay
    data: wafer scaling ~0.05 ppm and rotation ~0.05 urad (7.5 nm at the wafer edge), field magnification /
    rotation ~0.5 ppm / urad (8 nm at the field corner). Rotations of 10-100 urad would give 1.5-15 um at the
    wafer edge, so they are not used here.

Context
    A lot (``wafers_per_lot`` consecutive samples) runs on one scanner with one reticle; wafers alternate
    chucks (chuck = slot % num_chucks). ``equipment_id = scanner * num_chucks + chuck`` (< 1000). The log
    vector (``log_dim``, 128 by default) is ``[onehot(scanner) | onehot(chuck) | onehot(reticle) | onehot(lens
    type) | standardised numeric logs | tanh(P f)]`` where f is everything before the padding and P a fixed
    Gaussian projection (seeded), so every dimension carries information. Lens type = scanner %
    num_lens_types.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from data.parquet_io import to_fixed_list

LINEAR_TERMS: tuple[str, ...] = ("tx", "ty", "mwx", "mwy", "rwx", "rwy", "mfx", "mfy", "rfx", "rfy")
HIGHER_TERMS: tuple[str, ...] = ("k_x3", "k_xy2", "k_y3", "k_yx2", "edge")
NUM_IDS = 1000  # equipment_id range expected by the conditional models
EDGE_LENGTH_MM = 10.0

# Numeric equipment logs: (name, nominal mean, nominal std), raw units; the log vector holds (x - mean) / std.
NUMERIC_LOGS: tuple[tuple[str, float, float], ...] = (
    ("dose_mj_cm2", 30.0, 3.0),
    ("focus_nm", 0.0, 20.0),
    ("wafer_temp_c", 22.0, 0.02),
    ("reticle_temp_c", 22.0, 0.05),
    ("pressure_hpa", 1013.25, 4.0),
    ("humidity_pct", 45.0, 3.0),
    ("lens_heating", 0.5, 0.2),
)

_DOSE = [name for name, _, _ in NUMERIC_LOGS].index("dose_mj_cm2")
_LH = [name for name, _, _ in NUMERIC_LOGS].index("lens_heating")

# Standard deviation of each source's contribution, per linear term (same order as LINEAR_TERMS).
# fmt: off
FINGERPRINT_STD: dict[str, tuple[float, ...]] = {
    #            tx   ty   mwx   mwy   rwx   rwy   mfx   mfy   rfx   rfy
    "scanner": (3.0, 3.0, 0.04, 0.04, 0.04, 0.04, 0.40, 0.40, 0.40, 0.40),
    "chuck":   (2.0, 2.0, 0.03, 0.03, 0.03, 0.03, 0.05, 0.05, 0.05, 0.05),
    "reticle": (0.5, 0.5, 0.00, 0.00, 0.00, 0.00, 0.20, 0.20, 0.20, 0.20),
    "wafer":   (0.7, 0.7, 0.008, 0.008, 0.008, 0.008, 0.03, 0.03, 0.03, 0.03),
}
# fmt: on
HIGHER_STD = {"chuck": (3.0, 3.0, 3.0, 3.0, 2.0), "wafer": (0.5, 0.5, 0.5, 0.5, 0.5)}
EDGE_MEAN_NM = -4.0  # edge roll-off pulls the rim inwards on average

# Drift sensitivities (raw log units -> term units). Constants are physics; ranges are drawn per scanner.
DRIFT: dict[str, Any] = {
    "si_cte_ppm_per_k": 2.6,  # wafer_temp -> mwx, mwy
    "quartz_cte_ppm_per_k": 0.5,  # reticle_temp -> mfx, mfy
    "humidity_ppm_per_pct": (0.002, 0.006),  # -> mwx, mwy
    "pressure_ppm_per_hpa": (0.005, 0.015),  # -> mfx, mfy
    "lens_heating_ppm": (0.2, 0.6),  # lens_heating in [0, 1] -> mfx, mfy
    "lens_heating_urad_std": 0.2,  # lens_heating -> rfx, rfy
    "telecentricity_nm_per_nm_std": 0.05,  # focus -> tx, ty
}


# ------------------------------------------------------------------------------------------------------------
# geometry and the linear model
# ------------------------------------------------------------------------------------------------------------


def grid_coordinates(
    height: int, width: int, wafer_diameter_mm: float = 300.0, field_mm: tuple[float, float] = (26.0, 33.0)
) -> dict[str, np.ndarray]:
    """Wafer coordinates X, Y and intrafield coordinates x, y (mm) of each pixel centre, plus ``valid``.

    Returns a dict of (H, W) arrays: X, Y, x, y (float64) and valid (bool).
    """
    if height < 2 or width < 2:
        raise ValueError(f"overlay grid must be at least 2x2, got {height}x{width}")
    if wafer_diameter_mm <= 0 or min(field_mm) <= 0:
        raise ValueError(
            f"wafer_diameter_mm and field_mm must be positive, got {wafer_diameter_mm}, {field_mm}"
        )
    r = wafer_diameter_mm / 2.0
    xs = -r + (np.arange(width) + 0.5) * (2 * r / width)
    ys = r - (np.arange(height) + 0.5) * (2 * r / height)
    X, Y = np.meshgrid(xs, ys)  # (H, W)
    fx, fy = field_mm
    x = X - fx * np.round(X / fx)
    y = Y - fy * np.round(Y / fy)
    valid = X**2 + Y**2 <= r**2
    return {"X": X, "Y": Y, "x": x, "y": y, "valid": valid}


def _design(coords: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Design matrices (P, 5) over all pixels: dx (tx, mwx, rwx, mfx, rfx), dy (ty, mwy, rwy, mfy, rfy)."""
    X, Y, x, y = (coords[k].reshape(-1) for k in ("X", "Y", "x", "y"))
    one = np.ones_like(X)
    ax = np.stack([one, X, -Y, x, -y], axis=1)
    ay = np.stack([one, Y, X, y, x], axis=1)
    return ax, ay


_X_IDX = [0, 2, 4, 6, 8]  # tx, mwx, rwx, mfx, rfx
_Y_IDX = [1, 3, 5, 7, 9]  # ty, mwy, rwy, mfy, rfy


def linear_overlay(terms: np.ndarray, coords: dict[str, np.ndarray]) -> np.ndarray:
    """The 10-term model: terms (10,) or (N, 10) -> (2, H, W) or (N, 2, H, W) float32, 0 off-wafer."""
    t = np.asarray(terms, dtype=np.float64)
    single = t.ndim == 1
    t = np.atleast_2d(t)
    if t.shape[-1] != len(LINEAR_TERMS):
        raise ValueError(f"terms must have {len(LINEAR_TERMS)} entries {LINEAR_TERMS}, got shape {t.shape}")
    h, w = coords["X"].shape
    ax, ay = _design(coords)
    dx = t[:, _X_IDX] @ ax.T  # (N, P)
    dy = t[:, _Y_IDX] @ ay.T
    out = np.stack([dx, dy], axis=1).reshape(-1, 2, h, w) * coords["valid"]
    out = out.astype(np.float32)
    return out[0] if single else out


def linear_terms_lstsq(maps: np.ndarray, coords: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of the 10-term model over valid pixels, batched.

    maps (N, 2, H, W) or (2, H, W) in nm -> (terms (N, 10), residual (N, 2, H, W), 0 off-wafer)
    (no leading N when the input had none).
    """
    m = np.asarray(maps, dtype=np.float64)
    single = m.ndim == 3
    if single:
        m = m[None]
    h, w = coords["X"].shape
    if m.ndim != 4 or m.shape[1:] != (2, h, w):
        raise ValueError(f"maps must be (N, 2, {h}, {w}) to match the coordinates, got {np.shape(maps)}")
    valid = coords["valid"].reshape(-1)
    ax, ay = _design(coords)
    flat = m.reshape(m.shape[0], 2, -1)
    cx = np.linalg.lstsq(ax[valid], flat[:, 0, valid].T, rcond=None)[0]  # (5, N)
    cy = np.linalg.lstsq(ay[valid], flat[:, 1, valid].T, rcond=None)[0]
    terms = np.zeros((m.shape[0], len(LINEAR_TERMS)))
    terms[:, _X_IDX] = cx.T
    terms[:, _Y_IDX] = cy.T
    resid = (m - linear_overlay(terms, coords).astype(np.float64)) * coords["valid"]
    terms, resid = terms.astype(np.float32), resid.astype(np.float32)
    return (terms[0], resid[0]) if single else (terms, resid)


def higher_order_overlay(ho: np.ndarray, coords: dict[str, np.ndarray]) -> np.ndarray:
    """3rd-order wafer terms and radial edge roll-off: ho (N, 5) nm -> (N, 2, H, W) float64, 0 off-wafer."""
    ho = np.atleast_2d(np.asarray(ho, dtype=np.float64))
    X, Y = coords["X"], coords["Y"]
    # R from the grid: the outermost pixel centre sits half a pixel inside the wafer rim.
    big_r = float(max(np.abs(X).max(), np.abs(Y).max()) + 0.5 * abs(X[0, 1] - X[0, 0]))
    u, v = X / big_r, Y / big_r
    r = np.maximum(np.sqrt(X**2 + Y**2), 1e-9)
    g = np.exp((r - big_r) / EDGE_LENGTH_MM)
    k = [ho[:, i, None, None] for i in range(5)]
    dx = k[0] * u**3 + k[1] * u * v**2 + k[4] * g * X / r
    dy = k[2] * v**3 + k[3] * v * u**2 + k[4] * g * Y / r
    return np.stack([dx, dy], axis=1) * coords["valid"]


# ------------------------------------------------------------------------------------------------------------
# machines: fingerprints and log encoding
# ------------------------------------------------------------------------------------------------------------


def fingerprints(
    num_scanners: int, num_chucks: int, num_reticles: int, fingerprint_seed: int
) -> dict[str, np.ndarray]:
    """Per-machine term offsets and drift sensitivities; each machine's draw depends only on its own index.

    Returns scanner (S, 10), chuck (S, C, 10), reticle (Rt, 10), chuck_ho (S, C, 5), humidity (S,),
    pressure (S,), lens_mag (S, 2), lens_rot (S, 2), telecentricity (S, 2).
    """
    sd = {k: np.asarray(v) for k, v in FINGERPRINT_STD.items()}
    out: dict[str, list] = {
        k: []
        for k in (
            "scanner",
            "chuck",
            "reticle",
            "chuck_ho",
            "humidity",
            "pressure",
            "lens_mag",
            "lens_rot",
            "telecentricity",
        )
    }
    for s in range(num_scanners):
        rng = np.random.default_rng([fingerprint_seed, 0, s])
        out["scanner"].append(rng.normal(0.0, sd["scanner"]))
        out["humidity"].append(rng.uniform(*DRIFT["humidity_ppm_per_pct"]))
        out["pressure"].append(rng.uniform(*DRIFT["pressure_ppm_per_hpa"]))
        out["lens_mag"].append(rng.uniform(*DRIFT["lens_heating_ppm"], size=2))
        out["lens_rot"].append(rng.normal(0.0, DRIFT["lens_heating_urad_std"], size=2))
        out["telecentricity"].append(rng.normal(0.0, DRIFT["telecentricity_nm_per_nm_std"], size=2))
        chucks, hos = [], []
        for c in range(num_chucks):
            rc = np.random.default_rng([fingerprint_seed, 1, s, c])
            chucks.append(rc.normal(0.0, sd["chuck"]))
            ho = rc.normal(0.0, HIGHER_STD["chuck"])
            ho[4] += EDGE_MEAN_NM
            hos.append(ho)
        out["chuck"].append(chucks)
        out["chuck_ho"].append(hos)
    for r in range(num_reticles):
        out["reticle"].append(np.random.default_rng([fingerprint_seed, 2, r]).normal(0.0, sd["reticle"]))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def drift_terms(numeric: np.ndarray, scanner: np.ndarray, fp: dict[str, np.ndarray]) -> np.ndarray:
    """Linear-term drift from raw numeric logs (N, K) on scanners (N,) -> (N, 10)."""
    names = [n for n, _, _ in NUMERIC_LOGS]
    col = {n: numeric[:, i] for i, n in enumerate(names)}
    nominal = {n: m for n, m, _ in NUMERIC_LOGS}
    d = np.zeros((numeric.shape[0], len(LINEAR_TERMS)))
    wafer_mag = DRIFT["si_cte_ppm_per_k"] * (col["wafer_temp_c"] - nominal["wafer_temp_c"]) + fp["humidity"][
        scanner
    ] * (col["humidity_pct"] - nominal["humidity_pct"])
    field_mag = DRIFT["quartz_cte_ppm_per_k"] * (col["reticle_temp_c"] - nominal["reticle_temp_c"]) + fp[
        "pressure"
    ][scanner] * (col["pressure_hpa"] - nominal["pressure_hpa"])
    lh = col["lens_heating"][:, None]
    d[:, [2, 3]] += wafer_mag[:, None]
    d[:, [6, 7]] += field_mag[:, None] + fp["lens_mag"][scanner] * lh
    d[:, [8, 9]] += fp["lens_rot"][scanner] * lh
    d[:, [0, 1]] += fp["telecentricity"][scanner] * col["focus_nm"][:, None]
    return d


def log_base_dim(num_scanners: int, num_chucks: int, num_reticles: int, num_lens_types: int) -> int:
    """Length of the informative part of the log vector (one-hots + numeric logs)."""
    return num_scanners + num_chucks + num_reticles + num_lens_types + len(NUMERIC_LOGS)


def encode_logs(
    scanner: np.ndarray,
    chuck: np.ndarray,
    reticle: np.ndarray,
    numeric: np.ndarray,
    *,
    num_scanners: int,
    num_chucks: int,
    num_reticles: int,
    num_lens_types: int,
    log_dim: int,
    projection_seed: int = 0,
) -> np.ndarray:
    """Equipment-log vectors (N, log_dim) float32: one-hots, standardised numerics, projected padding."""
    base_dim = log_base_dim(num_scanners, num_chucks, num_reticles, num_lens_types)
    if log_dim < base_dim:
        raise ValueError(
            f"log_dim={log_dim} is smaller than the {base_dim} informative log features "
            f"({num_scanners} scanners + {num_chucks} chucks + {num_reticles} reticles + "
            f"{num_lens_types} lens types + {len(NUMERIC_LOGS)} numeric logs)"
        )
    n = scanner.shape[0]
    mean = np.array([m for _, m, _ in NUMERIC_LOGS])
    std = np.array([s for _, _, s in NUMERIC_LOGS])
    parts = [
        np.eye(num_scanners)[scanner],
        np.eye(num_chucks)[chuck],
        np.eye(num_reticles)[reticle],
        np.eye(num_lens_types)[scanner % num_lens_types],
        (numeric - mean) / std,
    ]
    base = np.concatenate(parts, axis=1) if n else np.zeros((0, base_dim))
    pad = log_dim - base_dim
    if pad:
        proj = np.random.default_rng([projection_seed, base_dim, pad]).normal(
            0.0, 1.0 / np.sqrt(base_dim), size=(base_dim, pad)
        )
        base = np.concatenate([base, np.tanh(base @ proj)], axis=1)
    return base.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------------------


def generate_overlay(
    n: int,
    seed: int,
    height: int = 32,
    width: int = 32,
    log_dim: int = 128,
    num_scanners: int = 8,
    num_chucks: int = 2,
    num_reticles: int = 16,
    num_lens_types: int = 3,
    wafers_per_lot: int = 25,
    noise_nm: float = 0.5,
    higher_order: bool = True,
    wafer_noise: bool = True,
    wafer_diameter_mm: float = 300.0,
    field_mm: tuple[float, float] = (26.0, 33.0),
    fingerprint_seed: int = 2024,
    start: int = 0,
    context_seed: int | None = None,
) -> pa.Table:
    """``n`` overlay maps as an Arrow table in the "overlay" schema (see data/parquet_io.py).

    Deterministic by (seed, sample index): sample ``start + i`` is the same whether generated alone or in a
    chunk, so ``generate_overlay(n, s)`` equals the concatenation of chunks with matching ``start``.
    ``higher_order=False`` drops the 3rd-order / edge terms and ``wafer_noise=False`` the per-wafer random
    term offsets (useful to test fits and conditioning).

    ``context_seed`` draws each sample's equipment context (lot → scanner and reticle, slot → chuck, numeric
    logs, hence log vector and equipment_id) as ``generate_overlay(n, seed=context_seed)`` would, while its
    wafer terms and measurement noise still come from ``seed``: real maps with exactly the contexts of another
    set but independent noise (the context-matched floor of an FID table). ``context_seed=seed`` is the plain
    ``generate_overlay(n, seed)``.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    if min(num_scanners, num_chucks, num_reticles, num_lens_types, wafers_per_lot) < 1:
        raise ValueError(
            "num_scanners, num_chucks, num_reticles, num_lens_types and wafers_per_lot must be >= 1"
        )
    if num_scanners * num_chucks > NUM_IDS:
        raise ValueError(
            f"num_scanners * num_chucks = {num_scanners * num_chucks} exceeds {NUM_IDS} equipment ids"
        )
    if noise_nm < 0:
        raise ValueError(f"noise_nm must be >= 0, got {noise_nm}")
    coords = grid_coordinates(height, width, wafer_diameter_mm, field_mm)
    fp = fingerprints(num_scanners, num_chucks, num_reticles, fingerprint_seed)
    k = len(NUMERIC_LOGS)
    mean = np.array([m for _, m, _ in NUMERIC_LOGS])
    std = np.array([s for _, _, s in NUMERIC_LOGS])
    wafer_sd = np.asarray(FINGERPRINT_STD["wafer"])

    scanner = np.zeros(n, np.int64)
    reticle = np.zeros(n, np.int64)
    chuck = np.zeros(n, np.int64)
    numeric = np.zeros((n, k))
    wafer_terms = np.zeros((n, len(LINEAR_TERMS)))
    wafer_ho = np.zeros((n, len(HIGHER_TERMS)))
    noise = np.zeros((n, 2, height, width))
    lot_ids, wafer_ids = [], []
    lots: dict[int, tuple[int, int, np.ndarray]] = {}
    ctx_seed = seed if context_seed is None else int(context_seed)
    for i in range(n):
        g = start + i
        lot, slot = divmod(g, wafers_per_lot)
        if lot not in lots:
            rl = np.random.default_rng([ctx_seed, lot, 1])
            lots[lot] = (int(rl.integers(num_scanners)), int(rl.integers(num_reticles)), rl.normal(size=k))
        s, r, z_lot = lots[lot]
        rw = np.random.default_rng([seed, g, 2])
        z_wafer = rw.normal(size=k)
        if ctx_seed != seed:
            # The context's own wafer-level log draw. rw made its log draw above all the same, so the wafer terms
            # and noise below are exactly those that `seed` alone gives.
            z_wafer = np.random.default_rng([ctx_seed, g, 2]).normal(size=k)
        z = 0.8 * z_lot + 0.6 * z_wafer  # lot-level conditions dominate, wafers vary around them
        raw = mean + std * z
        # lens heating follows the dose (more energy through the lens), plus its own scatter
        raw[_LH] = np.clip(0.5 + 0.15 * (raw[_DOSE] - mean[_DOSE]) / std[_DOSE] + 0.15 * z[_LH], 0.0, 1.0)
        scanner[i], reticle[i], chuck[i], numeric[i] = s, r, slot % num_chucks, raw
        wafer_terms[i] = rw.normal(0.0, wafer_sd)
        wafer_ho[i] = rw.normal(0.0, HIGHER_STD["wafer"])
        noise[i] = rw.normal(0.0, 1.0, size=(2, height, width))
        lot_ids.append(f"S{ctx_seed}-L{lot:06d}")
        # Another seed's wafer in this context is another wafer: its own ID.
        wafer_ids.append(f"S{ctx_seed}-L{lot:06d}-W{slot + 1:02d}" + (f"-N{seed}" if ctx_seed != seed else ""))

    terms = (
        fp["scanner"][scanner]
        + fp["chuck"][scanner, chuck]
        + fp["reticle"][reticle]
        + drift_terms(numeric, scanner, fp)
    )
    if wafer_noise:
        terms = terms + wafer_terms
    ho = fp["chuck_ho"][scanner, chuck] + (wafer_ho if wafer_noise else 0.0)
    maps = linear_overlay(terms, coords).astype(np.float64)
    if higher_order:
        maps = maps + higher_order_overlay(ho, coords)
    maps = (maps + noise_nm * noise) * coords["valid"]
    logs = encode_logs(
        scanner,
        chuck,
        reticle,
        numeric,
        num_scanners=num_scanners,
        num_chucks=num_chucks,
        num_reticles=num_reticles,
        num_lens_types=num_lens_types,
        log_dim=log_dim,
    )
    if not higher_order:
        ho = np.zeros_like(ho)
    return overlay_table(
        maps.astype(np.float32),
        np.broadcast_to(coords["valid"], (n, height, width)),
        logs,
        equipment_id=scanner * num_chucks + chuck,
        lot_id=lot_ids,
        wafer_id=wafer_ids,
        scanner=scanner,
        chuck=chuck,
        reticle=reticle,
        log_numeric=numeric,
        terms=terms,
        ho_terms=ho,
    )


def overlay_table(
    maps: np.ndarray,
    valid: np.ndarray,
    logs: np.ndarray,
    *,
    equipment_id: np.ndarray,
    lot_id: list[str],
    wafer_id: list[str],
    scanner: np.ndarray | None = None,
    chuck: np.ndarray | None = None,
    reticle: np.ndarray | None = None,
    log_numeric: np.ndarray | None = None,
    terms: np.ndarray | None = None,
    ho_terms: np.ndarray | None = None,
) -> pa.Table:
    """Build an "overlay" table from arrays: maps (N, 2, H, W) nm, valid (N, H, W), logs (N, D).

    Unknown context (imports) is stored as -1 for the integer columns and NaN for the float ones.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4 or maps.shape[1] != 2:
        raise ValueError(f"overlay maps must be (N, 2, H, W), got {maps.shape}")
    n, _, h, w = maps.shape
    logs = np.asarray(logs, dtype=np.float32)
    if logs.ndim != 2 or logs.shape[0] != n:
        raise ValueError(f"logs must be (N={n}, D), got {logs.shape}")

    def ints(a: np.ndarray | None, dtype: Any) -> pa.Array:
        return pa.array(np.full(n, -1) if a is None else np.asarray(a), type=dtype)

    def floats(a: np.ndarray | None, width_: int) -> pa.Array:
        return to_fixed_list(
            np.full((n, width_), np.nan, np.float32) if a is None else np.asarray(a, np.float32)
        )

    return pa.table(
        {
            "overlay": to_fixed_list(maps),
            "valid": to_fixed_list(np.asarray(valid, dtype=np.uint8).reshape(n, h, w)),
            "log": to_fixed_list(logs),
            "log_numeric": floats(log_numeric, len(NUMERIC_LOGS)),
            "equipment_id": ints(equipment_id, pa.int32()),
            "scanner": ints(scanner, pa.int16()),
            "chuck": ints(chuck, pa.int16()),
            "reticle": ints(reticle, pa.int16()),
            "lot_id": pa.array(list(lot_id), type=pa.string()),
            "wafer_id": pa.array(list(wafer_id), type=pa.string()),
            "terms": floats(terms, len(LINEAR_TERMS)),
            "ho_terms": floats(ho_terms, len(HIGHER_TERMS)),
            "height": pa.array(np.full(n, h), type=pa.int32()),
            "width": pa.array(np.full(n, w), type=pa.int32()),
        }
    )
