"""Torch-side views of the Parquet datasets: THE decoder of Ray Data numpy batches and Arrow tables into tensors.

`batch_to_tensors` (a Ray Data / in-process shard batch), `table_to_tensors` (a whole pyarrow Table) and the
map-style `TableDataset` return the same tensors (per sample; a batch adds a leading N):

| kind    | key          | shape      | dtype   | meaning                                        |
|---------|--------------|------------|---------|------------------------------------------------|
| overlay | overlay      | (2, H, W)  | float32 | dx, dy in nm (0 off-wafer)                      |
|         | valid        | (1, H, W)  | float32 | 1 on the wafer                                 |
|         | log          | (D,)       | float32 | equipment-log vector                           |
|         | equipment_id | ()         | int64   | 0 <= id < 1000                                 |
|         | terms        | (10,)      | float32 | drawn linear terms (NaN for imports)           |
| wafer   | wafer_map    | (1, H, W)  | float32 | 0 off-wafer, 1 pass, 2 fail                    |
|         | pattern_mask | (1, H, W)  | float32 | dies failing because of the pattern            |
|         | label        | ()         | int64   | index in WAFER_CLASSES, -1 unlabelled          |
| sem     | image, clean | (1, H, W)  | float32 | grey values in [0, 1]                          |
|         | mask         | (1, H, W)  | float32 | 1 where image != clean                         |
|         | defect       | ()         | int64   | index in SEM_DEFECTS                           |
| image   | image        | (C, H, W)  | float32 | uint8 / 255, in [0, 1]                         |
|         | label        | ()         | int64   | class index                                    |
|         | coarse_label | ()         | int64   | CIFAR-100 superclass, -1 otherwise             |

Scaling to the model's range is data/encoding.py's business (one encoding per kind).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from data.parquet_io import read_dataset, validate_table
from data.schema import KINDS, from_fixed_list, table_kind

# key -> (channels prefix: int, "C" or None for a vector/scalar, numpy dtype, scale)
_ARRAYS: dict[str, dict[str, tuple[Any, Any, float]]] = {
    "overlay": {
        "overlay": (2, np.float32, 1.0),
        "valid": (1, np.float32, 1.0),
        "log": (None, np.float32, 1.0),
        "terms": (None, np.float32, 1.0),
    },
    "wafer": {"wafer_map": (1, np.float32, 1.0), "pattern_mask": (1, np.float32, 1.0)},
    "sem": {"image": (1, np.float32, 1.0), "clean": (1, np.float32, 1.0), "mask": (1, np.float32, 1.0)},
    "image": {"image": ("C", np.float32, 1.0 / 255.0)},
}
_SCALARS: dict[str, tuple[str, ...]] = {
    "overlay": ("equipment_id",),
    "wafer": ("label",),
    "sem": ("defect",),
    "image": ("label", "coarse_label"),
}


def _stack(value: Any) -> np.ndarray:
    """A batch column as a 2-D numeric array; Ray may hand fixed-size lists over as object arrays of rows."""
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = np.stack([np.asarray(x) for x in arr])
    return arr.reshape(arr.shape[0], -1)


def _dims(batch: dict[str, Any], kind: str) -> tuple[int, int, int]:
    """(C, H, W) from the shape columns of a batch."""
    try:
        h, w = int(np.asarray(batch["height"]).reshape(-1)[0]), int(np.asarray(batch["width"]).reshape(-1)[0])
    except KeyError as e:
        raise ValueError(f"{kind!r} batch needs its 'height' and 'width' columns to restore shapes") from e
    c = int(np.asarray(batch["channels"]).reshape(-1)[0]) if "channels" in batch else 1
    return c, h, w


def _check_label_column(kind: str, label_column: str | None) -> None:
    if label_column not in (None, "label") and "label" not in _SCALARS.get(kind, ()):
        raise ValueError(f"label_column={label_column!r}: {kind!r} data have no 'label' key to fill")


def numpy_batch(batch: dict[str, Any], kind: str, label_column: str | None = None) -> dict[str, np.ndarray]:
    """Ray-style batch (dict of column arrays) -> dict of numpy arrays in the shapes of the module table.

    `label_column` (wafer / image kinds) reads another integer column as the `label` key, e.g. "mixed_label" for
    the 38-class mixed-type maps of data/mixed_wafer.py; None (the default) reads `label`."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if not batch:
        raise ValueError("empty batch")
    _check_label_column(kind, label_column)
    c, h, w = _dims(batch, kind)
    out: dict[str, np.ndarray] = {}
    for key, (ch, dtype, scale) in _ARRAYS[kind].items():
        if key not in batch:
            raise ValueError(f"{kind!r} batch lacks column {key!r}; has {sorted(batch)}")
        flat = _stack(batch[key])
        n = flat.shape[0]
        if ch is None:
            arr = flat
        else:
            channels = c if ch == "C" else ch
            if flat.shape[1] != channels * h * w:
                raise ValueError(
                    f"{kind!r} column {key!r} has {flat.shape[1]} values per row, expected {channels}x{h}x{w}"
                )
            arr = flat.reshape(n, channels, h, w)
        arr = arr.astype(dtype, copy=False)
        out[key] = arr * dtype(scale) if scale != 1.0 else arr
    for key in _SCALARS[kind]:
        column = label_column if (key == "label" and label_column) else key
        if column not in batch:
            raise ValueError(f"{kind!r} batch lacks column {column!r}"
                             + (" (the label_column)" if column != key else "") + f"; has {sorted(batch)}")
        out[key] = np.asarray(batch[column]).reshape(-1).astype(np.int64)
    return out


def batch_to_tensors(batch: dict[str, Any], kind: str, label_column: str | None = None) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch -> dict of tensors with a leading batch dimension (shapes in the module table);
    `label_column` as in numpy_batch."""
    return {
        k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
        for k, v in numpy_batch(batch, kind, label_column).items()
    }


def _table_columns(table: pa.Table, kind: str, shapes: dict[str, tuple[int, ...]],
                   label_column: str | None = None) -> dict[str, np.ndarray]:
    """A validated table's columns of `kind` as numpy (array columns (N, *shape)), the input of numpy_batch."""
    _check_label_column(kind, label_column)
    extra = [label_column] if label_column and label_column not in _SCALARS[kind] else []
    missing = [name for name in extra if name not in table.column_names]
    if missing:
        raise ValueError(f"{kind!r} table lacks the label_column {missing[0]!r}; has {table.column_names}")
    return {
        name: (from_fixed_list(table[name], shapes[name]) if name in shapes else table[name].to_numpy())
        for name in list(_ARRAYS[kind]) + list(_SCALARS[kind]) + extra + ["height", "width"]
        + (["channels"] if kind == "image" else [])
    }


def table_to_tensors(table: pa.Table, kind: str | None = None,
                     label_column: str | None = None) -> dict[str, torch.Tensor]:
    """A whole pyarrow Table → dict of tensors as batch_to_tensors (kind: from the table's metadata if None;
    `label_column` as in numpy_batch)."""
    kind = kind or table_kind(table)
    if kind is None:
        raise ValueError("the table records no dataset kind; pass kind= one of " + ", ".join(KINDS))
    if table.num_rows == 0:
        raise ValueError(f"empty {kind!r} table")
    columns = _table_columns(table, kind, validate_table(table, kind), label_column)
    return batch_to_tensors(columns, kind, label_column)


def keep_labelled(tensors: dict[str, torch.Tensor], label_key: str) -> dict[str, torch.Tensor]:
    """The rows whose `label_key` is >= 0 (−1 marks an unlabelled row)."""
    if label_key not in tensors:
        raise KeyError(f"no label column {label_key!r} (have {sorted(tensors)})")
    keep = tensors[label_key] >= 0
    return tensors if bool(keep.all()) else {k: v[keep] for k, v in tensors.items()}


class TableDataset(Dataset):
    """Map-style dataset over a Parquet dataset (URI, local or s3://) or an in-memory Arrow table.

    ``kind`` defaults to the one recorded in the dataset's metadata; ``label_column`` reads another column as
    `label` (numpy_batch). Items are dicts of tensors as in the module table. The table is validated and decoded
    into numpy arrays once, at construction.
    """

    def __init__(self, uri_or_table: str | os.PathLike | pa.Table, kind: str | None = None,
                 label_column: str | None = None) -> None:
        table = (
            read_dataset(os.fspath(uri_or_table))
            if isinstance(uri_or_table, (str, os.PathLike))
            else uri_or_table
        )
        if not isinstance(table, pa.Table):
            raise TypeError(f"expected a URI or a pyarrow.Table, got {type(uri_or_table).__name__}")
        kind = kind or table_kind(table)
        if kind is None:
            raise ValueError("the table records no dataset kind; pass kind= one of " + ", ".join(KINDS))
        self.kind = kind
        self.shapes = validate_table(table, kind)
        arrays = (numpy_batch(_table_columns(table, kind, self.shapes, label_column), kind, label_column)
                  if table.num_rows else {})
        self._arrays = {
            k: np.require(v, requirements=["C", "W"]) for k, v in arrays.items()
        }  # torch wants writable
        self._n = table.num_rows

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for a dataset of {self._n} samples")
        return {k: torch.as_tensor(v[index]) for k, v in self._arrays.items()}
