"""Sampling IKDDiT checkpoints to files: Parquet in the overlay schema plus a PNG people can look at."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from fabdistill import storage
from trainers.ikddit import IKDDiTPipeline


def sample_to_files(checkpoint: str, *, n: int, steps: int, mask_ratio: Optional[float], sampler: str = "ddim",
                    seed: int = 0, conditions: str = "", out_dir: str) -> str:
    from data.parquet_io import read_dataset, write_dataset
    from fabdistill.viz import overlay_grid, save_png
    from trainers.ikddit_eval import HELD_OUT_SEED, sample_batched

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    pipe = IKDDiTPipeline.from_checkpoint(checkpoint)
    if conditions:
        table = read_dataset(conditions)
        if table.num_rows < n:
            raise ValueError(f"{conditions}: {table.num_rows} rows, fewer than --n {n}")
        table = table.slice(0, n)
    else:
        from data.overlay import generate_overlay

        table = generate_overlay(n, seed=HELD_OUT_SEED + 1, height=pipe.map_size, width=pipe.map_size,
                                 log_dim=pipe.log_dim)
    from data.parquet_io import from_fixed_list

    log = from_fixed_list(table.column("log"), (pipe.log_dim,)).astype(np.float32)
    ids = table.column("equipment_id").to_numpy().astype(np.int64)
    ratio = mask_ratio if mask_ratio is not None else pipe.meta.get("mask_ratio", 0.5)
    if pipe.role == "teacher":
        ratio = 0.0
    if sampler == "ddpm":
        maps = np.concatenate([pipe.sample(log[i:i + 256], ids[i:i + 256], sampler="ddpm", seed=seed + i).numpy()
                               for i in range(0, n, 256)])
    else:
        maps, _ = sample_batched(pipe, log, ids, steps=steps, mask_ratio=ratio, seed=seed, label=pipe.role)
    # Same rows as the conditioning table, with the generated maps in place of the real ones.
    index = table.schema.get_field_index("overlay")
    flat = pa.FixedSizeListArray.from_arrays(pa.array(maps.astype(np.float32).reshape(-1)), maps[0].size)
    generated = table.set_column(index, table.schema.field("overlay"), flat)
    parquet_uri = storage.join(out_dir, "samples")
    write_dataset(generated, parquet_uri, "overlay")
    from data.overlay import grid_coordinates

    k = min(n, 8)
    grid = overlay_grid(maps[:k], [f"{pipe.role} id {int(i)}" for i in ids[:k]],
                        valid=grid_coordinates(pipe.map_size, pipe.map_size)["valid"], columns=4,
                        heading=f"IKDDiT {pipe.role}, {sampler} {steps} steps, mask ratio {ratio}")
    png_uri = storage.join(out_dir, "samples.png")
    save_png(grid, png_uri)
    return f"wrote {n} maps to {parquet_uri} and a picture to {png_uri}"
