"""Fab data: synthetic generators, importers for real data, Parquet I/O and torch views.

Light re-exports only (numpy / pyarrow); ``data.datasets`` (torch) and ``data.importers`` are imported on
demand.
"""

from data.overlay import LINEAR_TERMS, fit_linear_terms, generate_overlay, grid_coordinates, linear_overlay
from data.parquet_io import KINDS, SchemaError, ray_dataset, read_dataset, validate_table, write_dataset
from data.sem import SEM_DEFECTS, generate_sem
from data.wafer import WAFER_CLASSES, generate_wafer

__all__ = [
    "KINDS",
    "LINEAR_TERMS",
    "SEM_DEFECTS",
    "WAFER_CLASSES",
    "SchemaError",
    "fit_linear_terms",
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
