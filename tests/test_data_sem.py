"""Synthetic SEM line/space images: exact masks, shared noise, defect physics, determinism."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.datasets import TableDataset
from data.parquet_io import SchemaError, from_fixed_list, validate_table
from data.sem import SEM_DEFECTS, generate_sem


def arrays(t: pa.Table, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    return (
        from_fixed_list(t["image"], (size, size)),
        from_fixed_list(t["clean"], (size, size)),
        from_fixed_list(t["mask"], (size, size)).astype(bool),
        t["defect_name"].to_pylist(),
    )


@pytest.fixture(scope="module")
def sem():
    return generate_sem(40, seed=0)


def test_mask_is_exactly_the_difference(sem):
    img, clean, mask, names = arrays(sem)
    np.testing.assert_array_equal(mask, img != clean)
    assert all(m.any() for m in mask)  # every sample has a visible defect
    assert (mask.mean((1, 2)) < 0.25).all()  # and it is local
    assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0 and 0.0 <= clean.min()
    assert set(names) == set(SEM_DEFECTS)
    validate_table(sem, "sem")


def test_noise_is_shared_and_present(sem):
    img, clean, mask, _ = arrays(sem)
    # outside the mask the twins are bit-identical, yet both carry noise (pixel-to-pixel jitter along a line)
    assert (img[~mask] == clean[~mask]).all()
    jitter = np.abs(np.diff(clean, axis=1)).mean()
    assert jitter > 0.02


def test_defect_physics(sem):
    img, clean, mask, names = arrays(sem)
    for i, name in enumerate(names):
        delta = (img[i][mask[i]] - clean[i][mask[i]]).mean()
        if name in ("bridge", "particle"):
            assert delta > 0.01, (name, delta)  # material added / bright particle
        elif name == "break":
            assert delta < -0.01, (name, delta)  # line material removed
    collapse = [i for i, n in enumerate(names) if n == "line_collapse"]
    bridges = [i for i, n in enumerate(names) if n == "bridge"]
    # a collapse moves a line over 10-30 rows; a bridge spans 2-5 rows (+ blur)
    rows = lambda i: np.ptp(np.nonzero(mask[i].any(1))[0]) + 1  # noqa: E731
    assert min(rows(i) for i in collapse) >= 8 and max(rows(i) for i in bridges) <= 9


def test_determinism_and_chunks():
    a = generate_sem(6, seed=7, size=32)
    assert a.equals(generate_sem(6, seed=7, size=32))
    assert a.equals(pa.concat_tables([generate_sem(2, 7, size=32), generate_sem(4, 7, size=32, start=2)]))
    assert not a["image"].equals(generate_sem(6, seed=8, size=32)["image"])


def test_defect_weights_and_errors():
    t = generate_sem(8, seed=1, size=32, defect_weights={"particle": 1})
    assert set(t["defect_name"].to_pylist()) == {"particle"}
    with pytest.raises(ValueError, match="unknown SEM defects"):
        generate_sem(1, 0, defect_weights={"scratch": 1})
    with pytest.raises(ValueError, match="size"):
        generate_sem(1, 0, size=8)


def test_validation_catches_wrong_mask():
    t = generate_sem(3, seed=2, size=32)
    zeros = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * 32 * 32, np.uint8)), 32 * 32)
    with pytest.raises(SchemaError, match="image != clean"):
        validate_table(t.set_column(t.column_names.index("mask"), "mask", zeros), "sem")


def test_torch_view():
    t = generate_sem(3, seed=3, size=32)
    item = TableDataset(t, "sem")[1]
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "image": (1, 32, 32),
        "clean": (1, 32, 32),
        "mask": (1, 32, 32),
        "defect": (),
    }
    assert item["mask"].dtype == torch.float32
    torch.testing.assert_close(item["mask"], (item["image"] != item["clean"]).float())
