"""Parquet datasets: one documented schema per kind, atomic writes, local paths or ``s3://`` URIs.

A dataset is a directory (or S3 prefix) of ``part-NNNNN.parquet`` files. Arrays are stored row-wise as
``fixed_size_list`` columns in C order, with their shape given twice: as ``height`` / ``width`` (and
``channels``) columns on every row, which survive any reader (Ray Data batches included), and as JSON in the
schema metadata (``fabdistill.kind``, ``fabdistill.schema_version``, ``fabdistill.shapes``). Extra columns are
allowed and kept.

Schemas (``list<T>[shape]`` is a fixed-size list of T holding an array of that shape):

kind "overlay"  overlay list<float32>[2, H, W] (dx, dy in nm, 0 off-wafer) | valid list<uint8>[H, W] |
                log list<float32>[D] | log_numeric list<float32>[K] (raw logs, NaN if unknown) |
                equipment_id int32 in [0, 1000) | scanner, chuck, reticle int16 (-1 if unknown) |
                lot_id, wafer_id string | terms list<float32>[10] (drawn linear terms, NaN if unknown) |
                ho_terms list<float32>[5] | height, width int32
kind "wafer"    wafer_map list<uint8>[H, W] (0 off-wafer, 1 pass, 2 fail) | pattern_mask list<uint8>[H, W]
                (fails caused by the pattern; all 0 when unknown) | label int16 (index in WAFER_CLASSES, -1
                unlabelled) | label_name string | lot_id, wafer_id, split string | die_size float32 | height,
                width int32
kind "sem"      image, clean list<float32>[H, W] in [0, 1] | mask list<uint8>[H, W], equal to
                (image != clean) unless an extra bool column has_mask is true (user-labelled masks of real
                image pairs) | defect int16 (index in SEM_DEFECTS, -1 unknown) | defect_name, sample_id string |
                pitch, line_width, roughness, noise float32 (px, px, px, grey) | height, width int32
kind "image"    image list<uint8>[C, H, W] (CHW) | label int16 | coarse_label int16 (-1 if none) | label_name,
                split, filename string | channels, height, width int32
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.schema import (  # noqa: F401  (re-exported: data/overlay.py and callers import them from here)
    KINDS,
    META_KIND,
    META_SHAPES,
    META_VERSION,
    NUM_SEM_DEFECTS,
    NUM_WAFER_CLASSES,
    SCHEMA_VERSION,
    SchemaError,
    from_fixed_list,
    table_kind,
    to_fixed_list,
)
from fabdistill import storage

# name -> ("list", value type, shape) or ("scalar", arrow type). Shape entries: int, "C"/"H"/"W" (from the
# shape columns) or None (any fixed length).
_L = "list"
_S = "scalar"
SCHEMAS: dict[str, dict[str, tuple]] = {
    "overlay": {
        "overlay": (_L, pa.float32(), (2, "H", "W")),
        "valid": (_L, pa.uint8(), ("H", "W")),
        "log": (_L, pa.float32(), (None,)),
        "log_numeric": (_L, pa.float32(), (None,)),
        "equipment_id": (_S, pa.int32()),
        "scanner": (_S, pa.int16()),
        "chuck": (_S, pa.int16()),
        "reticle": (_S, pa.int16()),
        "lot_id": (_S, pa.string()),
        "wafer_id": (_S, pa.string()),
        "terms": (_L, pa.float32(), (10,)),
        "ho_terms": (_L, pa.float32(), (5,)),
        "height": (_S, pa.int32()),
        "width": (_S, pa.int32()),
    },
    "wafer": {
        "wafer_map": (_L, pa.uint8(), ("H", "W")),
        "pattern_mask": (_L, pa.uint8(), ("H", "W")),
        "label": (_S, pa.int16()),
        "label_name": (_S, pa.string()),
        "lot_id": (_S, pa.string()),
        "wafer_id": (_S, pa.string()),
        "split": (_S, pa.string()),
        "die_size": (_S, pa.float32()),
        "height": (_S, pa.int32()),
        "width": (_S, pa.int32()),
    },
    "sem": {
        "image": (_L, pa.float32(), ("H", "W")),
        "clean": (_L, pa.float32(), ("H", "W")),
        "mask": (_L, pa.uint8(), ("H", "W")),
        "defect": (_S, pa.int16()),
        "defect_name": (_S, pa.string()),
        "sample_id": (_S, pa.string()),
        "pitch": (_S, pa.float32()),
        "line_width": (_S, pa.float32()),
        "roughness": (_S, pa.float32()),
        "noise": (_S, pa.float32()),
        "height": (_S, pa.int32()),
        "width": (_S, pa.int32()),
    },
    "image": {
        "image": (_L, pa.uint8(), ("C", "H", "W")),
        "label": (_S, pa.int16()),
        "coarse_label": (_S, pa.int16()),
        "label_name": (_S, pa.string()),
        "split": (_S, pa.string()),
        "filename": (_S, pa.string()),
        "channels": (_S, pa.int32()),
        "height": (_S, pa.int32()),
        "width": (_S, pa.int32()),
    },
}


# ------------------------------------------------------------------------------------------------------------
# array shapes (the Arrow <-> numpy helpers live in data/schema.py)
# ------------------------------------------------------------------------------------------------------------


def column_shapes(table: pa.Table, kind: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each array column, resolved from the shape columns (first row)."""
    if table.num_rows == 0:
        meta = table.schema.metadata or {}
        if META_SHAPES in meta:
            return {k: tuple(v) for k, v in json.loads(meta[META_SHAPES]).items()}
        raise SchemaError(f"cannot resolve shapes of an empty {kind!r} table without fabdistill metadata")
    dims = {"H": int(table["height"][0].as_py()), "W": int(table["width"][0].as_py())}
    if "channels" in table.column_names:
        dims["C"] = int(table["channels"][0].as_py())
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in SCHEMAS[kind].items():
        if spec[0] != _L:
            continue
        list_size = table.schema.field(name).type.list_size
        shapes[name] = tuple(
            list_size if d is None else (dims[d] if isinstance(d, str) else d) for d in spec[2]
        )
    return shapes


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


def _check_range(
    table: pa.Table, col: str, lo: float, hi: float, kind: str, allowed: Iterable[int] | None = None
) -> None:
    arr = table[col]
    if pa.types.is_fixed_size_list(arr.type):
        arr = pa.chunked_array([c.flatten() for c in arr.chunks], type=arr.type.value_type)
    if len(arr) == 0:
        return
    if pa.types.is_floating(arr.type):
        if not pc.all(pc.is_finite(arr)).as_py():
            raise SchemaError(f"{kind!r} column {col!r} contains NaN or infinite values")
    mm = pc.min_max(arr)
    vmin, vmax = mm["min"].as_py(), mm["max"].as_py()
    if vmin < lo or vmax > hi:
        raise SchemaError(
            f"{kind!r} column {col!r} has values in [{vmin}, {vmax}], expected within [{lo}, {hi}]"
        )
    if allowed is not None:
        bad = pc.sum(pc.invert(pc.is_in(arr, value_set=pa.array(list(allowed), type=arr.type)))).as_py()
        if bad:
            raise SchemaError(f"{kind!r} column {col!r} has {bad} values outside {sorted(allowed)}")


def validate_table(table: pa.Table, kind: str) -> dict[str, tuple[int, ...]]:
    """Check columns, types, shapes and value ranges of a ``kind`` table; return the per-sample array shapes.

    Raises :class:`SchemaError` naming the first problem found.
    """
    if kind not in KINDS:
        raise SchemaError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if not isinstance(table, pa.Table):
        raise SchemaError(f"expected a pyarrow.Table, got {type(table).__name__}")
    spec = SCHEMAS[kind]
    missing = [c for c in spec if c not in table.column_names]
    if missing:
        raise SchemaError(f"{kind!r} table lacks columns {missing}; has {table.column_names}")
    for name, s in spec.items():
        t = table.schema.field(name).type
        if s[0] == _L:
            if not pa.types.is_fixed_size_list(t) or t.value_type != s[1]:
                raise SchemaError(f"{kind!r} column {name!r} must be fixed_size_list<{s[1]}>, got {t}")
        elif t != s[1]:
            raise SchemaError(f"{kind!r} column {name!r} must be {s[1]}, got {t}")
        if table[name].null_count:
            raise SchemaError(f"{kind!r} column {name!r} has {table[name].null_count} nulls")
    shape_cols = ["height", "width"] + (["channels"] if "channels" in spec else [])
    for c in shape_cols:
        if table.num_rows and pc.count_distinct(table[c]).as_py() != 1:
            raise SchemaError(f"{kind!r} column {c!r} must be constant within a table (fixed-size samples)")
    shapes = column_shapes(table, kind)
    for name, shape in shapes.items():
        size = table.schema.field(name).type.list_size
        if int(np.prod(shape)) != size:
            raise SchemaError(
                f"{kind!r} column {name!r} holds {size} values per row, but its shape is {shape} "
                f"(from the height/width columns)"
            )
    if kind == "overlay":
        _check_range(table, "overlay", -1e6, 1e6, kind)
        _check_range(table, "valid", 0, 1, kind)
        _check_range(table, "log", -1e6, 1e6, kind)
        _check_range(table, "equipment_id", 0, 999, kind)
    elif kind == "wafer":
        _check_range(table, "wafer_map", 0, 2, kind)
        _check_range(table, "pattern_mask", 0, 1, kind)
        _check_range(table, "label", -1, NUM_WAFER_CLASSES - 1, kind)
    elif kind == "sem":
        for c in ("image", "clean"):
            _check_range(table, c, 0.0, 1.0, kind)
        _check_range(table, "mask", 0, 1, kind)
        _check_range(table, "defect", -1, NUM_SEM_DEFECTS - 1, kind)  # -1: unknown type (imported images)
        # Synthetic twins differ exactly where the defect is; real image pairs differ everywhere by noise, so a
        # table whose `has_mask` column is true carries the user's own labelled masks instead (data/defect_folder).
        labelled = "has_mask" in table.column_names and bool(np.asarray(table["has_mask"]).any())
        if table.num_rows and not labelled:
            diff = from_fixed_list(table["image"], shapes["image"]) != from_fixed_list(
                table["clean"], shapes["clean"]
            )
            if not np.array_equal(diff, from_fixed_list(table["mask"], shapes["mask"]).astype(bool)):
                raise SchemaError("'sem' column 'mask' must equal (image != clean) exactly")
    elif kind == "image":
        _check_range(table, "label", 0, 32767, kind)
        if table.num_rows and shapes["image"][0] not in (1, 3):
            raise SchemaError(f"'image' channels must be 1 or 3, got {shapes['image'][0]}")
    return shapes


def with_metadata(table: pa.Table, kind: str, shapes: dict[str, tuple[int, ...]]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta.update(
        {
            META_KIND: kind.encode(),
            META_VERSION: SCHEMA_VERSION.encode(),
            META_SHAPES: json.dumps({k: list(v) for k, v in shapes.items()}).encode(),
        }
    )
    return table.replace_schema_metadata(meta)


# ------------------------------------------------------------------------------------------------------------
# write / read
# ------------------------------------------------------------------------------------------------------------


def _parts(tables: pa.Table | Iterable[pa.Table], rows_per_file: int) -> Iterable[pa.Table]:
    if isinstance(tables, pa.Table):
        for off in range(0, max(tables.num_rows, 1), rows_per_file):
            yield tables.slice(off, rows_per_file)
    else:
        yield from tables


def _write_parts(tables: pa.Table | Iterable[pa.Table], folder: str, kind: str, rows_per_file: int) -> int:
    rows, first_shapes, i = 0, None, 0
    for part in _parts(tables, rows_per_file):
        if part.num_rows == 0:
            continue
        shapes = validate_table(part, kind)
        if first_shapes is None:
            first_shapes = shapes
        elif shapes != first_shapes:
            raise SchemaError(f"part {i} has shapes {shapes}, but earlier parts have {first_shapes}")
        pq.write_table(
            with_metadata(part, kind, shapes),
            os.path.join(folder, f"part-{i:05d}.parquet"),
            row_group_size=1024,
            compression="zstd",
        )
        rows += part.num_rows
        i += 1
    if rows == 0:
        raise SchemaError(f"refusing to write an empty {kind!r} dataset")
    return rows


def write_dataset(
    table: pa.Table | Iterable[pa.Table],
    uri: str,
    kind: str,
    *,
    overwrite: bool = True,
    rows_per_file: int = 8192,
) -> int:
    """Validate and write a dataset of ``kind`` to a local directory or ``s3://`` prefix; return rows written.

    ``table`` may be one table or an iterable of tables (written as one part file each, so generators can
    stream). Atomic for local paths: parts go to a hidden sibling directory that replaces ``uri`` only once
    every part is written; on any error nothing is left at ``uri`` (an existing dataset there stays
    untouched). On S3 the parts are first written to a local temporary directory, then uploaded; a failed
    upload removes what it uploaded.
    """
    if kind not in KINDS:
        raise SchemaError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    uri = str(uri)
    if not overwrite and storage.exists(uri):
        raise FileExistsError(f"{uri} exists (pass overwrite=True to replace it)")
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="fabdistill-write-") as tmp:
            rows = _write_parts(table, tmp, kind, rows_per_file)
            storage.remove_tree(uri)
            try:
                storage.upload_dir(tmp, uri)
            except BaseException:
                storage.remove_tree(uri)
                raise
        return rows
    target = os.path.abspath(uri)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        rows = _write_parts(table, tmp, kind, rows_per_file)
        if os.path.lexists(target):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            storage.remove_tree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def parquet_files(uri: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, sorted parquet file paths) of a dataset directory/prefix or a single file."""
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no dataset at {uri}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File
        and f.path.endswith(".parquet")
        and not posixpath.basename(f.path).startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return fs, files


def read_dataset(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a dataset (directory / prefix of part files, or one file) into one table, parts in name order."""
    fs, files = parquet_files(uri)
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, filesystem=fs, columns=columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise SchemaError(f"cannot read parquet file {f} of dataset {uri}: {e}") from e
    first = tables[0].schema
    try:
        out = pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise SchemaError(f"parts of dataset {uri} have different schemas: {e}") from e
    return out.replace_schema_metadata(first.metadata)


def ray_dataset(uri: str, **kwargs: Any) -> Any:
    """``ray.data.read_parquet`` on a dataset, with the filesystem that :mod:`fabdistill.storage` would use.

    With a custom S3 endpoint (local S3 server) Ray must be handed a configured ``S3FileSystem`` and a path
    without the scheme; for AWS and local paths the same explicit filesystem is harmless.
    """
    import ray.data

    fs, path = storage.pyarrow_fs(uri)
    kwargs.setdefault("file_extensions", ["parquet"])
    return ray.data.read_parquet(path, filesystem=fs, **kwargs)
