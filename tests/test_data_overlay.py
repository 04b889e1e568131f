"""Synthetic overlay maps: geometry, the 10-term model, determinism, conditioning, torch views."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.datasets import TableDataset, batch_to_tensors
from data.overlay import (
    LINEAR_TERMS,
    linear_terms_lstsq,
    generate_overlay,
    grid_coordinates,
    linear_overlay,
    log_base_dim,
)
from data.parquet_io import from_fixed_list, validate_table, write_dataset

SMALL = dict(num_scanners=4, num_chucks=2, num_reticles=4, wafers_per_lot=5)


def arrays(table: pa.Table, h: int = 32, w: int = 32) -> dict[str, np.ndarray]:
    return {
        "overlay": from_fixed_list(table["overlay"], (2, h, w)),
        "terms": from_fixed_list(table["terms"], (10,)),
        "log": from_fixed_list(table["log"], (table.schema.field("log").type.list_size,)),
        "eq": table["equipment_id"].to_numpy(),
    }


def test_grid_coordinates():
    c = grid_coordinates(32, 32)
    assert set(c) >= {"X", "Y", "x", "y", "valid"} and all(v.shape == (32, 32) for v in c.values())
    assert abs(c["valid"].mean() - np.pi / 4) < 0.03  # inscribed disc
    assert np.abs(c["x"]).max() <= 13.0 + 1e-9 and np.abs(c["y"]).max() <= 16.5 + 1e-9
    assert c["X"][0, 0] < 0 < c["X"][0, -1] and c["Y"][0, 0] > 0 > c["Y"][-1, 0]  # row 0 at the top, Y up
    with pytest.raises(ValueError):
        grid_coordinates(1, 32)


def test_model_equations():
    c = grid_coordinates(8, 8)
    t = dict.fromkeys(LINEAR_TERMS, 0.0)
    t.update(tx=1.0, mwx=2.0, rwy=3.0, rfx=0.5)
    m = linear_overlay(np.array([t[k] for k in LINEAR_TERMS]), c)
    v = c["valid"]
    np.testing.assert_allclose(m[0][v], (1.0 + 2.0 * c["X"] - 0.5 * c["y"])[v], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(m[1][v], (3.0 * c["X"])[v], rtol=1e-5, atol=1e-4)
    assert (m[:, ~v] == 0).all()


def test_fit_recovers_exact_terms():
    c = grid_coordinates(32, 32)
    rng = np.random.default_rng(0)
    terms = rng.normal(0, 1, (5, 10)) * np.array([3, 3, 0.05, 0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 0.5])
    fit, resid = linear_terms_lstsq(linear_overlay(terms, c), c)
    np.testing.assert_allclose(fit, terms, atol=1e-4)
    assert np.abs(resid).max() < 1e-3
    with pytest.raises(ValueError, match="maps must be"):
        linear_terms_lstsq(np.zeros((2, 2, 16, 16)), c)


def test_determinism_and_chunking():
    a = generate_overlay(12, seed=5, height=16, width=16, **SMALL)
    b = generate_overlay(12, seed=5, height=16, width=16, **SMALL)
    assert a.equals(b)
    chunks = pa.concat_tables(
        [
            generate_overlay(5, 5, height=16, width=16, start=0, **SMALL),
            generate_overlay(7, 5, height=16, width=16, start=5, **SMALL),
        ]
    )
    assert chunks.equals(a)
    c = generate_overlay(12, seed=6, height=16, width=16, **SMALL)
    assert not np.array_equal(arrays(a, 16, 16)["overlay"], arrays(c, 16, 16)["overlay"])


def test_context_seed_keeps_contexts_and_redraws_wafer_noise():
    ctx, other = 11, 12
    held = generate_overlay(12, seed=ctx, height=16, width=16, **SMALL)
    floor = generate_overlay(12, seed=other, height=16, width=16, context_seed=ctx, **SMALL)
    for col in ("log", "log_numeric", "equipment_id", "scanner", "chuck", "reticle", "lot_id"):
        assert floor[col].equals(held[col]), col
    assert len(set(floor["wafer_id"].to_pylist()) & set(held["wafer_id"].to_pylist())) == 0  # other wafers
    assert not np.allclose(arrays(floor, 16, 16)["overlay"], arrays(held, 16, 16)["overlay"])
    # Without wafer terms and measurement noise the two sets are the same maps: only the noise differs ...
    quiet = dict(height=16, width=16, wafer_noise=False, noise_nm=0.0, **SMALL)
    floor_quiet = generate_overlay(12, seed=other, context_seed=ctx, **quiet)
    np.testing.assert_array_equal(arrays(floor_quiet, 16, 16)["overlay"],
                                  arrays(generate_overlay(12, seed=ctx, **quiet), 16, 16)["overlay"])
    # ... and that noise is exactly the noise `other` draws for its own wafers (the draws are context-free).
    own = generate_overlay(12, seed=other, height=16, width=16, **SMALL)
    own_quiet = generate_overlay(12, seed=other, **quiet)
    noise_floor = arrays(floor, 16, 16)["overlay"] - arrays(floor_quiet, 16, 16)["overlay"]
    noise_own = arrays(own, 16, 16)["overlay"] - arrays(own_quiet, 16, 16)["overlay"]
    np.testing.assert_allclose(noise_floor, noise_own, atol=1e-4)
    assert generate_overlay(12, seed=ctx, context_seed=ctx, height=16, width=16, **SMALL).equals(held)


def test_fit_on_generated_maps_recovers_drawn_terms():
    t = generate_overlay(30, seed=1, higher_order=False, noise_nm=0.1)
    a = arrays(t)
    fit, resid = linear_terms_lstsq(a["overlay"], grid_coordinates(32, 32))
    err = np.abs(fit - a["terms"]).max(axis=0)
    tol = np.array([0.05, 0.05, 1e-3, 1e-3, 1e-3, 1e-3, 0.01, 0.01, 0.01, 0.01])  # nm, ppm, urad
    assert (err < tol).all(), dict(zip(LINEAR_TERMS, err))
    assert 0.05 < resid[:, :, grid_coordinates(32, 32)["valid"]].std() < 0.15  # only the noise is left


def test_magnitudes_and_schema():
    t = generate_overlay(50, seed=2)
    shapes = validate_table(t, "overlay")
    assert shapes["overlay"] == (2, 32, 32) and shapes["log"] == (128,)
    a = arrays(t)
    valid = grid_coordinates(32, 32)["valid"]
    p99 = np.percentile(np.abs(a["overlay"][:, :, valid]), 99)
    assert 3.0 < p99 < 100.0  # a few to tens of nm
    assert (a["overlay"][:, :, ~valid] == 0).all()
    mag = np.abs(a["terms"][:, [2, 3, 6, 7]])
    assert mag.max() < 3.0  # ppm
    hi = generate_overlay(50, seed=2, higher_order=True)
    assert not np.isnan(arrays(hi)["terms"]).any()


def test_context_is_encoded_and_ids_documented():
    t = generate_overlay(40, seed=3, log_dim=64, **SMALL)
    logs = arrays(t)["log"]
    assert logs.shape == (40, 64)
    scanner, chuck, reticle = (t[k].to_numpy() for k in ("scanner", "chuck", "reticle"))
    np.testing.assert_array_equal(logs[:, :4].argmax(1), scanner)
    np.testing.assert_array_equal(logs[:, 4:6].argmax(1), chuck)
    np.testing.assert_array_equal(logs[:, 6:10].argmax(1), reticle)
    np.testing.assert_array_equal(t["equipment_id"].to_numpy(), scanner * 2 + chuck)
    wafer_ids = t["wafer_id"].to_pylist()
    assert len(set(wafer_ids)) == 40 and all(
        w.startswith(lot) for w, lot in zip(wafer_ids, t["lot_id"].to_pylist())
    )
    with pytest.raises(ValueError, match="log_dim"):
        generate_overlay(2, 0, log_dim=8)
    with pytest.raises(ValueError, match="1000"):
        generate_overlay(2, 0, num_scanners=600, num_chucks=2, log_dim=2048)


def test_machines_have_distinguishable_fingerprints():
    """Nearest-centroid on fitted terms names the (scanner, chuck) of held-out wafers from another seed."""
    c = grid_coordinates(16, 16)
    train, test = (
        arrays(generate_overlay(n, s, height=16, width=16, **SMALL), 16, 16) for n, s in ((480, 0), (160, 1))
    )
    fit_tr, _ = linear_terms_lstsq(train["overlay"], c)
    fit_te, _ = linear_terms_lstsq(test["overlay"], c)
    ids = np.unique(train["eq"])
    assert len(ids) == 8
    cent = np.stack([fit_tr[train["eq"] == k].mean(0) for k in ids])
    d = (((fit_te[:, None] - cent[None]) / fit_tr.std(0)) ** 2).sum(-1)
    acc = (ids[d.argmin(1)] == test["eq"]).mean()
    assert acc > 0.8, acc  # chance is 1/8


def test_logs_determine_terms():
    """A linear read-out of the logs predicts each drawn term on held-out lots: conditioning is measurable."""
    train, test = (
        arrays(generate_overlay(n, s, height=16, width=16, **SMALL), 16, 16) for n, s in ((480, 0), (160, 1))
    )
    d = log_base_dim(4, 2, 4, 3)
    a = np.c_[train["log"][:, :d], np.ones(len(train["log"]))]
    b = np.c_[test["log"][:, :d], np.ones(len(test["log"]))]
    coef = np.linalg.lstsq(a, train["terms"], rcond=None)[0]
    r2 = 1 - ((b @ coef - test["terms"]) ** 2).mean(0) / test["terms"].var(0)
    assert (r2 > 0.5).all(), dict(zip(LINEAR_TERMS, r2.round(2)))


def test_torch_views(tmp_path):
    t = generate_overlay(6, seed=4, height=16, width=16, log_dim=48, **SMALL)
    write_dataset(t, str(tmp_path / "ov"), "overlay")
    ds = TableDataset(str(tmp_path / "ov"))
    assert ds.kind == "overlay" and len(ds) == 6
    item = ds[2]
    assert item["overlay"].shape == (2, 16, 16) and item["overlay"].dtype == torch.float32
    assert item["valid"].shape == (1, 16, 16) and item["log"].shape == (48,)
    assert item["equipment_id"].dtype == torch.int64 and item["terms"].shape == (10,)
    np.testing.assert_array_equal(item["overlay"].numpy(), from_fixed_list(t["overlay"], (2, 16, 16))[2])
    # a Ray-style numpy batch: fixed-size lists as 2-D arrays or as object arrays of rows
    batch = {
        k: np.stack(t[k].to_numpy(zero_copy_only=False))
        if pa.types.is_fixed_size_list(t.schema.field(k).type)
        else t[k].to_numpy(zero_copy_only=False)
        for k in t.column_names
    }
    out = batch_to_tensors(batch, "overlay")
    assert out["overlay"].shape == (6, 2, 16, 16) and out["log"].shape == (6, 48)
    torch.testing.assert_close(out["overlay"][2], item["overlay"])
    batch["overlay"] = t["overlay"].to_numpy(zero_copy_only=False)  # object array of 1-D rows
    torch.testing.assert_close(batch_to_tensors(batch, "overlay")["overlay"], out["overlay"])
    with pytest.raises(ValueError, match="height"):
        batch_to_tensors({k: v for k, v in batch.items() if k != "height"}, "overlay")


def test_make_data_cli_overlay(tmp_path):
    from apps.make_data import main
    from data.parquet_io import read_dataset

    out = tmp_path / "ov"
    assert (
        main(
            [
                "overlay",
                "--n",
                "12",
                "--out",
                str(out),
                "--seed",
                "9",
                "--chunk",
                "5",
                "--size",
                "16",
                "--log-dim",
                "64",
            ]
        )
        == 0
    )
    got = read_dataset(str(out))
    want = generate_overlay(12, 9, height=16, width=16, log_dim=64)
    assert got.select(want.column_names).equals(want)
