"""Importers for real data into the Parquet schemas of data/parquet_io.py.

MPOM folders (kind "overlay") - ``SRC/<sample>/`` for every sample folder (sorted by name):
    overlay_prev.png  8-bit RGB(A) overlay map. Decoding: dx = (R - 127.5) / 127.5 * scale_nm,
                      dy = (G - 127.5) / 127.5 * scale_nm (so 0 -> -scale_nm, 255 -> +scale_nm). B is the
                      on-wafer mask (non-zero = on the wafer); an all-zero B means "no mask" and the inscribed
                      circle of the grid is used. Off-wafer pixels are set to 0. Maps whose size differs from
                      the target are resized nearest-neighbour.
    logs.json         {"features": [f1, f2, ...]} numeric equipment-log features, zero-padded to ``log_dim``.
    id.txt            one integer, the equipment id, 0 <= id < 1000.
    wafer_id = the sample folder's name; lot_id = the name of SRC.
WM-811K ``LSWMD.pkl`` (kind "wafer") - a pandas DataFrame with columns waferMap (2-D array of 0/1/2),
    failureType ([['Center']] ... or [] for unlabelled), dieSize, lotName, waferIndex, trianTestLabel
    ([['Training']] / [['Test']] / []). Maps are resized nearest-neighbour to ``size`` x ``size``; unlabelled
    wafers get label -1; split is "train" / "test" / "". pattern_mask is all 0 (WM-811K has no pixel labels).
CIFAR-10/100 ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (kind "image") - the pickled batches
    (b'data' (N, 3072) uint8 in CHW order, b'labels' or b'fine_labels' / b'coarse_labels', b'filenames') and
    the meta file with the label names; split "train" / "test".

Pickles are loaded with a restricted unpickler that only builds numpy / pandas / pyarrow data objects, so a
malicious pickle cannot run code. ``trusted=True`` (WM-811K) falls back to plain ``pandas.read_pickle`` for
exotic pickles; use it only on files you trust. A corrupt, truncated or malformed input raises
:class:`DataImportError` naming the file (and the row or member); nothing is written, since tables are only
handed to :func:`data.parquet_io.write_dataset` (atomic) once complete.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from data.overlay import NUM_IDS, grid_coordinates, overlay_table
from data.schema import WAFER_CLASSES, to_fixed_list
from data.wafer import wafer_table


class DataImportError(ValueError):
    """A source file is missing, corrupt, truncated or not in the expected format."""


# ------------------------------------------------------------------------------------------------------------
# restricted unpickling
# ------------------------------------------------------------------------------------------------------------

_RENAMED_MODULES = {
    "pandas.indexes": "pandas.core.indexes",
    "pandas.core.index": "pandas.core.indexes.base",
    "pandas.tslib": "pandas._libs.tslib",
    "pandas.lib": "pandas._libs.lib",
}
_SAFE_BUILTINS = {
    "slice",
    "range",
    "complex",
    "set",
    "frozenset",
    "bytearray",
    "bytes",
    "list",
    "dict",
    "tuple",
    "str",
    "int",
    "float",
    "bool",
    "object",
}
_SAFE_FUNCTIONS = {
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pyarrow.lib", "_restore_array"),
    ("pyarrow.lib", "type_for_alias"),
    ("pyarrow.lib", "py_buffer"),
}
_SAFE_PANDAS_FUNCTION_PREFIXES = (
    "_unpickle",
    "_new_",
    "new_block",
    "_nat_unpickle",
    "__nat_unpickle",
    "__pyx_unpickle",
)  # Cython's generated reconstructors


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy / pandas / pyarrow data classes and their reconstructors."""

    def find_class(self, module: str, name: str) -> Any:
        for old, new in _RENAMED_MODULES.items():
            if module == old or module.startswith(old + "."):
                module = new + module[len(old) :]
        try:
            from pandas.compat.pickle_compat import _class_locations_map

            module, name = _class_locations_map.get((module, name), (module, name))
        except ImportError:
            pass
        if (module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS) or (
            module,
            name,
        ) in _SAFE_FUNCTIONS:
            return super().find_class(module, name)
        root = module.split(".")[0]
        if root in ("numpy", "pandas", "pyarrow"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and _safe_class(obj):
                return obj
            if root == "pandas" and callable(obj) and name.startswith(_SAFE_PANDAS_FUNCTION_PREFIXES):
                return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a numpy/pandas data object)")


def _safe_class(cls: type) -> bool:
    mod = getattr(cls, "__module__", "") or ""
    if mod.startswith("numpy"):
        return (
            issubclass(cls, (np.ndarray, np.dtype, np.generic))
            and not issubclass(cls, np.memmap)
            or mod.startswith("numpy.dtypes")
        )
    if mod.startswith("pandas"):
        return not mod.startswith(("pandas.io", "pandas.plotting", "pandas.util", "pandas.testing"))
    if mod.startswith("pyarrow"):
        return issubclass(
            cls, (pa.DataType, pa.Array, pa.ChunkedArray, pa.Buffer, pa.Field, pa.Schema, pa.Scalar)
        )
    return False


def restricted_load(f: BinaryIO, *, encoding: str = "latin1") -> Any:
    """``pickle.load`` that builds only numpy / pandas / pyarrow data (py2 pickles need encoding 'latin1')."""
    return _RestrictedUnpickler(f, encoding=encoding).load()


# ------------------------------------------------------------------------------------------------------------
# MPOM
# ------------------------------------------------------------------------------------------------------------

MPOM_FILES = ("overlay_prev.png", "logs.json", "id.txt")


def _resize_nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes to (height, width) (pixel-centre sampling)."""
    h, w = a.shape[-2:]
    if (h, w) == (height, width):
        return a
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return a[..., rows[:, None], cols[None, :]]


def decode_overlay_png(
    data: bytes, *, scale_nm: float, height: int, width: int, name: str = "overlay_prev.png"
) -> tuple[np.ndarray, np.ndarray]:
    """PNG bytes -> (overlay (2, H, W) float32 nm, valid (H, W) bool), decoding as in the module docstring."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types for truncated / non-PNG data
        raise DataImportError(f"{name}: not a readable PNG image ({e})") from e
    if img.mode not in ("RGB", "RGBA"):
        raise DataImportError(f"{name}: expected an 8-bit RGB or RGBA PNG, got mode {img.mode!r}")
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1)  # (3, h, w)
    rgb = _resize_nearest(rgb, height, width)
    overlay = (rgb[:2] - 127.5) / 127.5 * scale_nm
    blue = rgb[2]
    valid = blue > 0 if blue.any() else grid_coordinates(height, width)["valid"]
    return (overlay * valid).astype(np.float32), valid


def encode_overlay_png(overlay: np.ndarray, valid: np.ndarray, *, scale_nm: float) -> bytes:
    """Inverse of :func:`decode_overlay_png` (up to 8-bit rounding): (2, H, W) nm + (H, W) mask -> PNG."""
    from PIL import Image

    rg = np.clip(np.rint(np.asarray(overlay) / scale_nm * 127.5 + 127.5), 0, 255)
    b = np.asarray(valid, dtype=bool) * 255.0
    img = np.stack([rg[0], rg[1], b], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _mpom_sample(
    folder: str, *, scale_nm: float, height: int, width: int, log_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    for f in MPOM_FILES:
        if not os.path.isfile(os.path.join(folder, f)):
            raise DataImportError(f"{os.path.join(folder, f)}: missing (an MPOM sample needs {MPOM_FILES})")
    png = os.path.join(folder, "overlay_prev.png")
    with open(png, "rb") as fh:
        overlay, valid = decode_overlay_png(
            fh.read(), scale_nm=scale_nm, height=height, width=width, name=png
        )
    logs_path = os.path.join(folder, "logs.json")
    try:
        with open(logs_path, encoding="utf-8") as fh:
            feats = np.asarray(json.load(fh)["features"], dtype=np.float64)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataImportError(f'{logs_path}: expected JSON {{"features": [numbers...]}} ({e!r})') from e
    if feats.ndim != 1 or not np.isfinite(feats).all():
        raise DataImportError(f"{logs_path}: 'features' must be a flat list of finite numbers")
    if feats.size > log_dim:
        raise DataImportError(f"{logs_path}: {feats.size} features exceed log_dim={log_dim}")
    logs = np.zeros(log_dim, np.float32)
    logs[: feats.size] = feats
    id_path = os.path.join(folder, "id.txt")
    try:
        with open(id_path, encoding="utf-8") as fh:
            eq = int(fh.read().strip())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataImportError(f"{id_path}: expected one integer equipment id ({e})") from e
    if not 0 <= eq < NUM_IDS:
        raise DataImportError(f"{id_path}: equipment id {eq} outside [0, {NUM_IDS})")
    return overlay, valid, logs, eq


def mpom_folders(src: str) -> list[str]:
    """Sorted sample folders of an MPOM directory (sub-folders holding overlay_prev.png)."""
    if not os.path.isdir(src):
        raise DataImportError(f"{src}: not a directory (expected an MPOM folder of sample folders)")
    folders = sorted(
        os.path.join(src, d)
        for d in os.listdir(src)
        if os.path.isdir(os.path.join(src, d)) and not d.startswith(".")
    )
    if not folders:
        raise DataImportError(f"{src}: no sample folders found (each needs {MPOM_FILES})")
    return folders


def iter_mpom(
    src: str,
    *,
    scale_nm: float,
    height: int = 32,
    width: int = 32,
    log_dim: int = 128,
    chunk_rows: int = 1024,
) -> Iterator[pa.Table]:
    """MPOM samples as "overlay" tables of up to ``chunk_rows`` rows."""
    if scale_nm <= 0:
        raise ValueError(f"scale_nm must be > 0, got {scale_nm}")
    folders = mpom_folders(src)
    lot = os.path.basename(os.path.normpath(src))
    for off in range(0, len(folders), chunk_rows):
        part = folders[off : off + chunk_rows]
        samples = [
            _mpom_sample(f, scale_nm=scale_nm, height=height, width=width, log_dim=log_dim) for f in part
        ]
        yield overlay_table(
            np.stack([s[0] for s in samples]),
            np.stack([s[1] for s in samples]),
            np.stack([s[2] for s in samples]),
            equipment_id=np.array([s[3] for s in samples]),
            lot_id=[lot] * len(part),
            wafer_id=[os.path.basename(f) for f in part],
        )


def import_mpom(
    src: str, *, scale_nm: float, height: int = 32, width: int = 32, log_dim: int = 128
) -> pa.Table:
    """All MPOM samples under ``src`` as one "overlay" table."""
    return pa.concat_tables(
        list(iter_mpom(src, scale_nm=scale_nm, height=height, width=width, log_dim=log_dim))
    )


# ------------------------------------------------------------------------------------------------------------
# WM-811K
# ------------------------------------------------------------------------------------------------------------

_SPLITS = {"training": "train", "train": "train", "test": "test"}


def _unwrap(value: Any) -> str:
    """WM-811K cell ([['Center']], [], 'Center', ['Center']) -> 'Center' or '' for empty."""
    while isinstance(value, (np.ndarray, list, tuple)):
        flat = list(np.asarray(value, dtype=object).reshape(-1))
        if not flat:
            return ""
        value = flat[0]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def load_lswmd(path: str, *, trusted: bool = False) -> Any:
    """Load ``LSWMD.pkl`` as a pandas DataFrame (restricted unpickler unless ``trusted``)."""
    import pandas as pd

    if not os.path.isfile(path):
        raise DataImportError(f"{path}: no such file")
    try:
        if trusted:
            import pandas.core.indexes

            sys.modules.setdefault("pandas.indexes", pandas.core.indexes)  # pickles from pandas < 0.20
            df = pd.read_pickle(path)
        else:
            with open(path, "rb") as fh:
                df = restricted_load(fh, encoding="latin1")
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        TypeError,
        ValueError,
        KeyError,
        MemoryError,
        OSError,
    ) as e:
        hint = (
            " (if you trust this file, load it with trusted=True / --trust-pickle)"
            if isinstance(e, pickle.UnpicklingError) and "refusing" in str(e)
            else ""
        )
        raise DataImportError(
            f"{path}: corrupt, truncated or not an LSWMD pickle ({type(e).__name__}: {e}){hint}"
        ) from e
    if not isinstance(df, pd.DataFrame):
        raise DataImportError(f"{path}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in ("waferMap", "failureType") if c not in df.columns]
    if missing:
        raise DataImportError(f"{path}: lacks columns {missing}; has {list(df.columns)}")
    return df


def iter_wm811k(
    path: str, *, size: int = 32, trusted: bool = False, limit: int | None = None, chunk_rows: int = 65536
) -> Iterator[pa.Table]:
    """WM-811K wafers as "wafer" tables of up to ``chunk_rows`` rows."""
    df = load_lswmd(path, trusted=trusted)
    if limit is not None:
        df = df.iloc[:limit]
    n = len(df)
    col = {
        c: (df[c].to_numpy() if c in df.columns else None)
        for c in ("waferMap", "failureType", "dieSize", "lotName", "waferIndex", "trianTestLabel")
    }
    classes = {c: i for i, c in enumerate(WAFER_CLASSES)}
    for off in range(0, n, chunk_rows):
        rows = range(off, min(off + chunk_rows, n))
        maps = np.zeros((len(rows), size, size), np.uint8)
        labels = np.zeros(len(rows), np.int16)
        lots, wafers, splits, dies = [], [], [], np.full(len(rows), np.nan)
        for k, i in enumerate(rows):
            m = np.asarray(col["waferMap"][i])
            if m.ndim != 2 or m.size == 0:
                raise DataImportError(
                    f"{path}: row {i}: waferMap must be a non-empty 2-D array, got shape {m.shape}"
                )
            if not np.isin(m, (0, 1, 2)).all():
                raise DataImportError(
                    f"{path}: row {i}: waferMap values must be 0/1/2, got {np.unique(m)[:10]}"
                )
            maps[k] = _resize_nearest(m.astype(np.uint8), size, size)
            name = _unwrap(col["failureType"][i])
            if name and name not in classes:
                raise DataImportError(
                    f"{path}: row {i}: unknown failureType {name!r}; expected {WAFER_CLASSES}"
                )
            labels[k] = classes[name] if name else -1
            lot = _unwrap(col["lotName"][i]) if col["lotName"] is not None else ""
            idx = col["waferIndex"][i] if col["waferIndex"] is not None else np.nan
            lots.append(lot)
            wafers.append(f"{lot}-W{int(idx):02d}" if np.isfinite(idx) else f"{lot}-row{i}")
            split = _unwrap(col["trianTestLabel"][i]) if col["trianTestLabel"] is not None else ""
            splits.append(_SPLITS.get(split.lower(), split.lower()))
            if col["dieSize"] is not None:
                dies[k] = float(col["dieSize"][i])
        yield wafer_table(maps, None, labels, lots, wafers, die_size=dies, split=splits)


def import_wm811k(path: str, *, size: int = 32, trusted: bool = False, limit: int | None = None) -> pa.Table:
    """All of ``LSWMD.pkl`` (or its first ``limit`` rows) as one "wafer" table."""
    return pa.concat_tables(list(iter_wm811k(path, size=size, trusted=trusted, limit=limit)))


# ------------------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = {
    10: (
        "cifar-10-batches-py",
        ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        ["test_batch"],
        "batches.meta",
    ),
    100: ("cifar-100-python", ["train"], ["test"], "meta"),
}


def import_cifar(path: str) -> pa.Table:
    """A CIFAR-10 or CIFAR-100 python archive (detected from its contents) as one "image" table."""
    if not os.path.isfile(path):
        raise DataImportError(f"{path}: no such file")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = set(tar.getnames())
            which = next((k for k, lay in _CIFAR_LAYOUT.items() if f"{lay[0]}/{lay[3]}" in names), None)
            if which is None:
                raise DataImportError(f"{path}: not a CIFAR-10/100 python archive (no batches.meta or meta)")
            root, train, test, meta_name = _CIFAR_LAYOUT[which]

            def load(member: str) -> dict:
                full = f"{root}/{member}"
                if full not in names:
                    raise DataImportError(f"{path}: member {full} missing")
                fh = tar.extractfile(full)
                if fh is None:
                    raise DataImportError(f"{path}: member {full} is not a file")
                try:
                    obj = restricted_load(io.BytesIO(fh.read()), encoding="bytes")
                except (
                    pickle.UnpicklingError,
                    EOFError,
                    ValueError,
                    TypeError,
                    AttributeError,
                    IndexError,
                ) as e:
                    raise DataImportError(
                        f"{path}: member {full} is corrupt ({type(e).__name__}: {e})"
                    ) from e
                if not isinstance(obj, dict):
                    raise DataImportError(f"{path}: member {full} is not a pickled dict")
                return obj

            meta = load(meta_name)
            name_key = b"label_names" if which == 10 else b"fine_label_names"
            label_names = [x.decode() if isinstance(x, bytes) else str(x) for x in meta.get(name_key, [])]
            parts = [(load(m), "train", m) for m in train] + [(load(m), "test", m) for m in test]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataImportError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from e

    tables = []
    for batch, split, member in parts:
        where = f"{path}: member {root}/{member}"
        try:
            data = np.asarray(batch[b"data"])
            labels = np.asarray(batch[b"labels"] if which == 10 else batch[b"fine_labels"], dtype=np.int64)
            coarse = (
                np.asarray(batch[b"coarse_labels"], dtype=np.int64)
                if which == 100
                else np.full(len(labels), -1)
            )
        except KeyError as e:
            raise DataImportError(f"{where}: missing key {e}") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataImportError(f"{where}: b'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
        if len(labels) != len(data) or len(coarse) != len(data):
            raise DataImportError(f"{where}: {len(data)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= max(len(label_names), 1)):
            raise DataImportError(f"{where}: labels outside [0, {len(label_names)})")
        files = [f.decode() if isinstance(f, bytes) else str(f) for f in batch.get(b"filenames", [])]
        n = len(data)
        tables.append(
            pa.table(
                {
                    "image": to_fixed_list(data.reshape(n, 3, 32, 32)),
                    "label": pa.array(labels, type=pa.int16()),
                    "coarse_label": pa.array(coarse, type=pa.int16()),
                    "label_name": pa.array([label_names[k] for k in labels], type=pa.string()),
                    "split": pa.array([split] * n, type=pa.string()),
                    "filename": pa.array(files if len(files) == n else [""] * n, type=pa.string()),
                    "channels": pa.array(np.full(n, 3), type=pa.int32()),
                    "height": pa.array(np.full(n, 32), type=pa.int32()),
                    "width": pa.array(np.full(n, 32), type=pa.int32()),
                }
            )
        )
    return pa.concat_tables(tables)
