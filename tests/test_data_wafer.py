"""Synthetic wafer maps: the nine WM-811K classes put their fails where their definitions say."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.datasets import TableDataset
from data.parquet_io import from_fixed_list, validate_table
from data.wafer import WAFER_CLASSES, class_probabilities, generate_wafer, wafer_geometry

S = 32
VALID, R, THETA = wafer_geometry(S)


def one_class(name: str, n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    t = generate_wafer(n, seed, size=S, class_weights={name: 1.0})
    assert set(t["label_name"].to_pylist()) == {name}
    return from_fixed_list(t["wafer_map"], (S, S)), from_fixed_list(t["pattern_mask"], (S, S)).astype(bool)


def test_classes_and_values():
    assert WAFER_CLASSES == (
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
    t = generate_wafer(45, seed=1)
    validate_table(t, "wafer")
    maps = from_fixed_list(t["wafer_map"], (S, S))
    masks = from_fixed_list(t["pattern_mask"], (S, S)).astype(bool)
    assert set(np.unique(maps)) <= {0, 1, 2}
    assert (maps[:, ~VALID] == 0).all() and (maps[:, VALID] > 0).all()  # round wafer
    assert (maps[masks] == 2).all()  # pattern dies are fails


def test_determinism_chunks_and_seed():
    a = generate_wafer(10, seed=3)
    assert a.equals(generate_wafer(10, seed=3))
    assert a.equals(pa.concat_tables([generate_wafer(4, 3), generate_wafer(6, 3, start=4)]))
    assert not a["wafer_map"].equals(generate_wafer(10, seed=4)["wafer_map"])


def test_center_donut_rings():
    _, m = one_class("Center")
    assert all(p.any() for p in m) and R[m.any(0)].max() < 0.3
    _, m = one_class("Donut")
    assert R[m.any(0)].min() >= 0.25 and R[m.any(0)].max() < 0.8
    _, m = one_class("Edge-Ring")
    assert R[m.any(0)].min() > 0.8
    for p in m:  # all around: every quadrant has pattern fails
        assert all(
            (p & (np.abs(((THETA - a + np.pi) % (2 * np.pi)) - np.pi) < np.pi / 4)).any()
            for a in (0, np.pi / 2, np.pi, -np.pi / 2)
        )


def test_edge_loc_is_a_local_arc():
    _, m = one_class("Edge-Loc")
    for p in m:
        assert p.any() and R[p].min() > 0.7
        # circular spread of the angles: an arc of <= 100 degrees, not a ring
        mean_dir = np.abs(np.exp(1j * THETA[p]).mean())
        assert mean_dir > 0.6


def test_loc_scratch_full_random():
    _, m = one_class("Loc")
    for p in m:
        assert p.any() and R[p].max() <= 0.81 and 0.15 < R[p].mean() < 0.7
    _, m = one_class("Scratch")
    for p in m:
        ii, jj = np.nonzero(p)
        # thin: few dies, and they lie along a line (one dominant principal axis)
        assert 3 <= p.sum() < 0.1 * VALID.sum()
        ev = np.linalg.eigvalsh(np.cov(np.stack([ii, jj]).astype(float)))
        assert ev[1] > 6 * ev[0]
    maps, _ = one_class("Near-full")
    assert ((maps == 2).sum((1, 2)) / VALID.sum()).min() > 0.65
    maps, _ = one_class("Random")
    frac = (maps == 2).sum((1, 2)) / VALID.sum()
    assert (frac > 0.1).all() and (frac < 0.45).all()
    inner, outer = ((maps == 2) & (R < 0.6)).sum(), ((maps == 2) & (R >= 0.6)).sum()
    assert inner > 0.2 * outer  # spread over the whole wafer


def test_none_has_only_background():
    maps, m = one_class("none", n=20)
    assert not m.any()
    frac = (maps == 2).sum((1, 2)) / VALID.sum()
    assert frac.max() < 0.08


def test_class_weights_change_the_mix():
    t = generate_wafer(200, seed=0, class_weights={"none": 8, "Center": 2})
    labels = t["label_name"].to_pylist()
    assert set(labels) == {"none", "Center"} and 0.65 < labels.count("none") / 200 < 0.95
    u = generate_wafer(200, seed=0)
    assert len(set(u["label_name"].to_pylist())) == 9
    np.testing.assert_allclose(class_probabilities([1] * 9), np.full(9, 1 / 9))
    with pytest.raises(ValueError, match="unknown wafer classes"):
        generate_wafer(2, 0, class_weights={"Centre": 1})
    with pytest.raises(ValueError, match="not all zero"):
        generate_wafer(2, 0, class_weights=[0] * 9)


def test_torch_view():
    t = generate_wafer(5, seed=2, size=16)
    ds = TableDataset(t, "wafer")
    item = ds[4]
    assert item["wafer_map"].shape == (1, 16, 16) and item["wafer_map"].dtype == torch.float32
    assert item["pattern_mask"].shape == (1, 16, 16) and item["label"].dtype == torch.int64
    assert int(item["label"]) == t["label"][4].as_py()


def test_make_data_cli_chunks_match_library(tmp_path):
    from apps.make_data import main
    from data.parquet_io import read_dataset

    out = tmp_path / "wafers"
    assert (
        main(
            [
                "wafer",
                "--n",
                "30",
                "--out",
                str(out),
                "--seed",
                "2",
                "--chunk",
                "8",
                "--size",
                "16",
                "--class-weights",
                "none=3,Scratch=1",
            ]
        )
        == 0
    )
    got = read_dataset(str(out))
    assert sorted(os.listdir(out)) == [f"part-{i:05d}.parquet" for i in range(4)]
    want = generate_wafer(30, 2, size=16, class_weights={"none": 3, "Scratch": 1})
    assert got.select(want.column_names).equals(want)
    with pytest.raises(SystemExit):
        main(["wafer", "--n", "3", "--out", str(tmp_path / "x"), "--class-weights", "Centre"])
