"""What every data module agrees on, in a leaf module (it imports nothing from data/): class names, dataset
kinds, the Parquet metadata keys and the Arrow <-> numpy helpers for array columns.

data/parquet_io.py (schemas, validation, I/O), data/wafer.py, data/sem.py and data/overlay.py (generators) all
import from here, so none of them imports another.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# The nine WM-811K wafer-map pattern classes; a label is an index into this tuple (-1: unlabelled).
WAFER_CLASSES: tuple[str, ...] = (
    "Center",
    "Donut",
    "Edge-Loc",
    "Edge-Ring",
    "Loc",
    "Near-full",
    "Random",
    "Scratch",
    "none",
)
NUM_WAFER_CLASSES: int = len(WAFER_CLASSES)

# SEM defect types; a "defect" value is an index into this tuple.
SEM_DEFECTS: tuple[str, ...] = ("bridge", "break", "line_collapse", "particle")
NUM_SEM_DEFECTS: int = len(SEM_DEFECTS)

# Dataset kinds: one Parquet schema each (data/parquet_io.py), one tensor view each (data/datasets.py).
KINDS: tuple[str, ...] = ("overlay", "wafer", "sem", "image")

# Parquet schema metadata written with every part file.
SCHEMA_VERSION = "1"
META_KIND = b"fabdistill.kind"
META_VERSION = b"fabdistill.schema_version"
META_SHAPES = b"fabdistill.shapes"


class SchemaError(ValueError):
    """A table does not match the schema of its kind."""


def to_fixed_list(arr: np.ndarray) -> pa.FixedSizeListArray:
    """(N, ...) numpy array -> fixed_size_list column of length N, each row the flattened (C-order) sample."""
    arr = np.ascontiguousarray(arr)
    if arr.ndim < 2:
        raise ValueError(f"expected an (N, ...) array, got shape {arr.shape}")
    size = int(np.prod(arr.shape[1:]))
    if size == 0:
        raise ValueError(f"samples must not be empty, got shape {arr.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), size)


def from_fixed_list(col: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """fixed_size_list column -> numpy array (N, *shape)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape((len(col), *shape))


def table_kind(table: pa.Table) -> str | None:
    """The kind recorded in the schema metadata, or None."""
    meta = table.schema.metadata or {}
    kind = meta.get(META_KIND)
    return kind.decode() if kind else None


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SchemaError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
