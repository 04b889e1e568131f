"""Mixed-type wafer bin maps in the 38 classes of the public MixedWM38 set (Wang et al., IEEE TSM 2020), generated
from data/wafer.py's pattern generators, and an importer for MixedWM38's published ``.npz``.

MixedWM38: 38,015 maps of 52×52 dies (0 off-wafer, 1 pass, 2 fail), each labelled by an 8-dim multi-hot vector over
the basic patterns in this order (``arr_1``'s columns): Center, Donut, Edge_Loc, Edge_Ring, Loc, Near_Full, Scratch,
Random. The 38 classes (C1…C38 of the paper; index here = C number − 1):

| ids   | classes                                                                                           |
|-------|---------------------------------------------------------------------------------------------------|
| 0     | Normal (no pattern)                                                                               |
| 1–8   | Center, Donut, Edge_Loc, Edge_Ring, Loc, Near_Full, Scratch, Random                               |
| 9–21  | C+EL, C+ER, C+L, C+S, D+EL, D+ER, D+L, D+S, EL+L, EL+S, ER+L, ER+S, L+S                            |
| 22–33 | C+EL+L, C+EL+S, C+ER+L, C+ER+S, C+L+S, D+EL+L, D+EL+S, D+ER+L, D+ER+S, D+L+S, EL+L+S, ER+L+S        |
| 34–37 | C+L+EL+S, C+L+ER+S, D+L+EL+S, D+L+ER+S                                                            |

(The mixtures combine at most one of {C, D}, at most one of {EL, ER}, and any of {L, S}; Near_Full and Random only
occur alone: 13 two-, 12 three- and 4 four-pattern classes. Table and bit order as published with the set and used
by its public loaders.)

Generated map = union of its patterns' fails (each drawn by data.wafer.pattern_region, re-drawn until it fails at
least one die) plus background fails (i.i.d. at a rate drawn from ``background_rate``). Stored as a "wafer" table
(data/parquet_io.py) with extra columns, which the schema keeps:

    label             int16   the nine-class WM-811K index (WAFER_CLASSES) for Normal ("none") and the single-pattern
                              classes, −1 for mixtures (no WM-811K class fits; the schema caps label at 8)
    label_name        string  WAFER_CLASSES name, "" for mixtures
    pattern_mask      list<uint8>[H, W]     union of the patterns' fails
    mixed_label       int16   the 38-class id (table above)
    mixed_label_name  string  its MixedWM38 name
    pattern_labels    list<uint8>[8]        the multi-hot vector (MixedWM38 bit order)
    pattern_masks     list<uint8>[8, H, W]  each pattern's own fails (may overlap; all 0 for absent patterns)
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from data.importers import DataImportError
from data.parquet_io import to_fixed_list
from data.wafer import FAIL, OFF, PASS, WAFER_CLASSES, pattern_region, wafer_geometry, wafer_table

# the eight basic patterns in MixedWM38's bit order, as data/wafer.py names them, and their MixedWM38 names / codes
MIXED_PATTERNS: tuple[str, ...] = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random")
MIXED_PATTERN_NAMES: tuple[str, ...] = ("Center", "Donut", "Edge_Loc", "Edge_Ring", "Loc", "Near_Full", "Scratch",
                                        "Random")
MIXED_CODES: tuple[str, ...] = ("C", "D", "EL", "ER", "L", "NF", "S", "R")

_MIXTURES: tuple[str, ...] = (
    "C+EL", "C+ER", "C+L", "C+S", "D+EL", "D+ER", "D+L", "D+S", "EL+L", "EL+S", "ER+L", "ER+S", "L+S",
    "C+EL+L", "C+EL+S", "C+ER+L", "C+ER+S", "C+L+S", "D+EL+L", "D+EL+S", "D+ER+L", "D+ER+S", "D+L+S", "EL+L+S",
    "ER+L+S",
    "C+L+EL+S", "C+L+ER+S", "D+L+EL+S", "D+L+ER+S",
)
MIXED_CLASSES: tuple[str, ...] = ("Normal",) + MIXED_PATTERN_NAMES + _MIXTURES


def _multi_hot_table() -> np.ndarray:
    rows = [np.zeros(8, np.uint8)] + [np.eye(8, dtype=np.uint8)[i] for i in range(8)]
    for name in _MIXTURES:
        v = np.zeros(8, np.uint8)
        v[[MIXED_CODES.index(code) for code in name.split("+")]] = 1
        rows.append(v)
    return np.stack(rows)


MIXED_MULTI_HOT: np.ndarray = _multi_hot_table()  # (38, 8) uint8: class id → multi-hot
MIXED_MULTI_HOT.setflags(write=False)
_CLASS_OF_CODE = {int(v @ (1 << np.arange(8))): i for i, v in enumerate(MIXED_MULTI_HOT)}  # bitmask → class id


def class_patterns(class_id: int) -> tuple[str, ...]:
    """The data/wafer.py pattern names of one of the 38 classes (() for Normal)."""
    if not 0 <= class_id < len(MIXED_CLASSES):
        raise ValueError(f"mixed class id must be in [0, {len(MIXED_CLASSES)}), got {class_id}")
    return tuple(MIXED_PATTERNS[i] for i in np.flatnonzero(MIXED_MULTI_HOT[class_id]))


def classes_from_multi_hot(labels: np.ndarray) -> np.ndarray:
    """(N, 8) multi-hot labels (MixedWM38 bit order, values 0/1) → (N,) class ids in [0, 38).

    Raises ValueError naming the first row whose vector is not 0/1 or not one of the 38 published combinations.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != 8:
        raise ValueError(f"multi-hot labels must be (N, 8), got shape {labels.shape}")
    bad = np.flatnonzero(~np.isin(labels, (0, 1)).all(1))
    if bad.size:
        raise ValueError(f"label row {bad[0]} is {labels[bad[0]].tolist()}: multi-hot values must be 0 or 1")
    codes = labels.astype(np.int64) @ (1 << np.arange(8))
    out = np.array([_CLASS_OF_CODE.get(int(c), -1) for c in codes], dtype=np.int16)
    bad = np.flatnonzero(out < 0)
    if bad.size:
        names = [n for n, b in zip(MIXED_CODES, labels[bad[0]]) if b]
        raise ValueError(f"label row {bad[0]} ({'+'.join(names)}) is not one of the 38 MixedWM38 classes")
    return out


def mixed_class_probabilities(class_weights: Mapping[str, float] | Sequence[float] | None) -> np.ndarray:
    """Normalised class mix (38,) from a {MixedWM38 name: weight} mapping, a 38-sequence, or None (uniform)."""
    k = len(MIXED_CLASSES)
    if class_weights is None:
        return np.full(k, 1.0 / k)
    if isinstance(class_weights, Mapping):
        unknown = set(class_weights) - set(MIXED_CLASSES)
        if unknown:
            raise ValueError(f"unknown mixed wafer classes {sorted(unknown)}; expected names from {MIXED_CLASSES}")
        w = np.array([float(class_weights.get(c, 0.0)) for c in MIXED_CLASSES])
    else:
        w = np.asarray(list(class_weights), dtype=float)
        if w.shape != (k,):
            raise ValueError(f"class_weights needs {k} entries (MIXED_CLASSES), got shape {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"class_weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def _wm811k_label(class_id: int) -> int:
    """Nine-class label of a 38-class id: "none" for Normal, the pattern for single-pattern classes, −1 for mixtures."""
    pats = class_patterns(class_id)
    if not pats:
        return WAFER_CLASSES.index("none")
    return WAFER_CLASSES.index(pats[0]) if len(pats) == 1 else -1


def mixed_wafer_sample(class_id: int, rng: np.random.Generator, size: int,
                       background_rate: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One map of a 38-class id: (wafer_map (S, S) uint8 in {0, 1, 2}, pattern_masks (8, S, S) uint8)."""
    valid, _, _ = wafer_geometry(size)
    masks = np.zeros((len(MIXED_PATTERNS), size, size), np.uint8)
    for name in class_patterns(class_id):
        for _ in range(20):  # a pattern whose draw fails no die (tiny region, low p) is re-drawn
            region, p = pattern_region(name, rng, size)
            fails = region & valid & (rng.random((size, size)) < p)
            if fails.any():
                break
        else:
            raise RuntimeError(f"pattern {name} drew no failing die in 20 tries at size {size}")
        masks[MIXED_PATTERNS.index(name)] = fails
    background = valid & (rng.random((size, size)) < rng.uniform(*background_rate))
    wmap = np.where(valid, PASS, OFF).astype(np.uint8)
    wmap[masks.any(0) | background] = FAIL
    return wmap, masks


def generate_mixed_wafer(
    n: int,
    seed: int,
    size: int = 52,
    class_weights: Mapping[str, float] | Sequence[float] | None = None,
    background_rate: tuple[float, float] = (0.0, 0.04),
    wafers_per_lot: int = 25,
    start: int = 0,
) -> pa.Table:
    """``n`` mixed-type maps as a "wafer" table with the extra columns of the module docstring.

    Deterministic by (seed, sample index), so chunks with matching ``start`` concatenate to the full table.
    ``class_weights`` sets the 38-class mix (default uniform), e.g. ``{"Normal": 4, "C+EL": 1}``.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    if size < 8:
        raise ValueError(f"mixed wafer maps need size >= 8, got {size}")
    lo, hi = background_rate
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"background_rate must satisfy 0 <= lo <= hi <= 1, got {background_rate}")
    probs = mixed_class_probabilities(class_weights)
    valid_count = float(wafer_geometry(size)[0].sum())
    maps = np.zeros((n, size, size), np.uint8)
    masks = np.zeros((n, len(MIXED_PATTERNS), size, size), np.uint8)
    classes = np.zeros(n, np.int16)
    lot_ids, wafer_ids = [], []
    for i in range(n):
        g = start + i
        rng = np.random.default_rng([seed, g, 38])  # tag 38: a stream of its own, apart from generate_wafer's
        classes[i] = rng.choice(len(MIXED_CLASSES), p=probs)
        maps[i], masks[i] = mixed_wafer_sample(int(classes[i]), rng, size, background_rate)
        lot, slot = divmod(g, wafers_per_lot)
        lot_ids.append(f"M{seed}-L{lot:06d}")
        wafer_ids.append(f"M{seed}-L{lot:06d}-W{slot + 1:02d}")
    return mixed_wafer_table(maps, masks, classes, lot_ids, wafer_ids, die_size=np.full(n, valid_count))


def mixed_wafer_table(
    maps: np.ndarray,
    pattern_masks: np.ndarray | None,
    classes: np.ndarray,
    lot_ids: Sequence[str],
    wafer_ids: Sequence[str],
    *,
    die_size: np.ndarray | None = None,
    split: Sequence[str] | None = None,
) -> pa.Table:
    """A "wafer" table with the 38-class columns from maps (N, H, W), per-pattern masks (N, 8, H, W) or None
    (unknown: zeros) and 38-class ids (N,)."""
    maps = np.asarray(maps, dtype=np.uint8)
    if maps.ndim != 3:
        raise ValueError(f"wafer maps must be (N, H, W), got {maps.shape}")
    n, h, w = maps.shape
    classes = np.asarray(classes, dtype=np.int16)
    if classes.shape != (n,) or (n and (classes.min() < 0 or classes.max() >= len(MIXED_CLASSES))):
        raise ValueError(f"classes must be ({n},) ids in [0, {len(MIXED_CLASSES)}), got shape {classes.shape}")
    pm = (np.zeros((n, len(MIXED_PATTERNS), h, w), np.uint8) if pattern_masks is None
          else np.asarray(pattern_masks, dtype=np.uint8))
    if pm.shape != (n, len(MIXED_PATTERNS), h, w):
        raise ValueError(f"pattern_masks must be ({n}, {len(MIXED_PATTERNS)}, {h}, {w}), got {pm.shape}")
    labels = np.array([_wm811k_label(int(c)) for c in classes], dtype=np.int16)
    table = wafer_table(maps, pm.any(1).astype(np.uint8), labels, lot_ids, wafer_ids, die_size=die_size, split=split)
    return (table.append_column("mixed_label", pa.array(classes, type=pa.int16()))
            .append_column("mixed_label_name", pa.array([MIXED_CLASSES[c] for c in classes], type=pa.string()))
            .append_column("pattern_labels", to_fixed_list(MIXED_MULTI_HOT[classes] if n else
                                                           np.zeros((0, 8), np.uint8)))
            .append_column("pattern_masks", to_fixed_list(pm)))


####################################################################################################################
# MixedWM38 .npz importer
####################################################################################################################


def _resize_nearest(a: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) → (N, size, size) nearest-neighbour (die values must stay in {0, 1, 2})."""
    _, h, w = a.shape
    rows = np.minimum((np.arange(size) + 0.5) * h / size, h - 1).astype(int)
    cols = np.minimum((np.arange(size) + 0.5) * w / size, w - 1).astype(int)
    return a[:, rows][:, :, cols]


def load_mixedwm38(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read MixedWM38's .npz → (maps (N, H, W) uint8 in {0, 1, 2}, class ids (N,) int16).

    Keys must be exactly ``arr_0`` (maps, (N, H, W)) and ``arr_1`` (multi-hot labels, (N, 8)). The published file
    holds a few dies of value 3 (undocumented; its public loaders treat them as fails), mapped to 2 (fail); any
    other value is an error. Raises DataImportError naming the file and the problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataImportError(f"{path}: no such file (expected MixedWM38's .npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:  # no pickles: a crafted file cannot run code
            keys = sorted(npz.files)
            if keys != ["arr_0", "arr_1"]:
                raise DataImportError(f"{path}: expected the keys ['arr_0', 'arr_1'] (maps, multi-hot labels) of "
                                      f"MixedWM38's .npz, found {keys}")
            maps, labels = npz["arr_0"], npz["arr_1"]
    except DataImportError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise DataImportError(f"{path}: not a readable .npz (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if maps.ndim != 3 or min(maps.shape[1:], default=0) < 1:
        raise DataImportError(f"{path}: arr_0 (maps) must be (N, H, W), got shape {maps.shape}")
    if labels.ndim != 2 or labels.shape[1] != 8:
        raise DataImportError(f"{path}: arr_1 (labels) must be (N, 8) multi-hot, got shape {labels.shape}")
    if labels.shape[0] != maps.shape[0]:
        raise DataImportError(f"{path}: {maps.shape[0]} maps (arr_0) but {labels.shape[0]} label rows (arr_1)")
    if not (np.issubdtype(maps.dtype, np.integer) or np.issubdtype(maps.dtype, np.floating)):
        raise DataImportError(f"{path}: arr_0 must be numeric, got dtype {maps.dtype}")
    bad = ~np.isin(maps, (0, 1, 2, 3))
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
        raise DataImportError(f"{path}: map {i} holds values {sorted(np.unique(maps[i][bad[i]]).tolist())[:5]}; "
                              f"expected 0 (off-wafer), 1 (pass), 2 (fail) (3 is read as fail)")
    try:
        classes = classes_from_multi_hot(labels)
    except ValueError as e:
        raise DataImportError(f"{path}: {e}") from e
    return np.minimum(maps, 2).astype(np.uint8), classes


def import_mixedwm38(path: str | os.PathLike, *, size: int = 52, limit: int | None = None) -> pa.Table:
    """MixedWM38's .npz → a mixed "wafer" table (see the module docstring), maps resized nearest-neighbour to
    ``size``; per-pattern masks are unknown (zeros), lot_id "MixedWM38", wafer_id "MixedWM38-<row>"."""
    maps, classes = load_mixedwm38(path)
    if limit is not None:
        maps, classes = maps[:limit], classes[:limit]
    if maps.shape[1:] != (size, size):
        maps = _resize_nearest(maps, size)
    n = maps.shape[0]
    return mixed_wafer_table(maps, None, classes, ["MixedWM38"] * n, [f"MixedWM38-{i:05d}" for i in range(n)],
                             die_size=(maps != OFF).sum(axis=(1, 2)).astype(np.float32))
