"""Fab data: synthetic generators, importers for real data, Parquet I/O and torch views.

Light re-exports only (numpy / pyarrow); ``data.datasets`` and ``data.encoding`` (torch) and ``data.importers``
are imported on demand. Module order, leaf first: schema → parquet_io → overlay / wafer / sem → importers;
datasets and encoding sit on top; none imports a module above it.
"""

from data.schema import KINDS, NUM_WAFER_CLASSES, SEM_DEFECTS, WAFER_CLASSES, SchemaError
from data.overlay import LINEAR_TERMS, linear_terms_lstsq, generate_overlay, grid_coordinates, linear_overlay
from data.parquet_io import ray_dataset, read_dataset, validate_table, write_dataset
from data.sem import generate_sem
from data.wafer import generate_wafer

__all__ = [
    "KINDS",
    "LINEAR_TERMS",
    "NUM_WAFER_CLASSES",
    "SEM_DEFECTS",
    "WAFER_CLASSES",
    "SchemaError",
    "linear_terms_lstsq",
    "generate_overlay",
    "generate_sem",
    "generate_wafer",
    "grid_coordinates",
    "linear_overlay",
    "read_dataset",
    "ray_dataset",
    "validate_table",
    "write_dataset",
]
