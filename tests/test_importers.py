"""Importers: small fixtures in the real MPOM / LSWMD.pkl / CIFAR formats, round-trips and corrupt inputs."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from apps.make_data import main as make_data
from data.datasets import TableDataset
from data.importers import (
    DataImportError,
    decode_overlay_png,
    encode_overlay_png,
    import_cifar,
    import_mpom,
    import_wm811k,
)
from data.overlay import grid_coordinates
from data.parquet_io import from_fixed_list, read_dataset, validate_table

# ------------------------------------------------------------------------------------------------ MPOM


def make_mpom(root, n: int = 3, size: int = 32, blue_mask: bool = True):
    """MPOM folder; returns the expected (overlay (n, 2, size, size), valid, logs (n, 128) prefix, ids)."""
    rng = np.random.default_rng(0)
    valid = grid_coordinates(size, size)["valid"]
    out = {"rgb": [], "feats": [], "ids": []}
    for i in range(n):
        d = root / f"wafer_{i:03d}"
        d.mkdir(parents=True)
        rgb = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        rgb[..., 2] = valid * 255 if blue_mask else 0
        Image.fromarray(rgb, "RGB").save(d / "overlay_prev.png")
        feats = rng.normal(size=5 + i).round(4).tolist()
        (d / "logs.json").write_text(json.dumps({"features": feats}))
        (d / "id.txt").write_text(f"{17 * i + 3}\n")
        out["rgb"].append(rgb)
        out["feats"].append(feats)
        out["ids"].append(17 * i + 3)
    return out, valid


def test_mpom_roundtrip(tmp_path):
    src = tmp_path / "lotA"
    ref, valid = make_mpom(src)
    t = import_mpom(str(src), scale_nm=20.0)
    validate_table(t, "overlay")
    ov = from_fixed_list(t["overlay"], (2, 32, 32))
    for i, rgb in enumerate(ref["rgb"]):
        expect = (rgb[..., :2].transpose(2, 0, 1).astype(np.float64) - 127.5) / 127.5 * 20.0 * valid
        np.testing.assert_allclose(ov[i], expect, atol=1e-4)
        logs = from_fixed_list(t["log"], (128,))[i]
        np.testing.assert_allclose(logs[: len(ref["feats"][i])], ref["feats"][i], rtol=1e-6)
        assert not logs[len(ref["feats"][i]) :].any()
    assert t["equipment_id"].to_pylist() == ref["ids"]
    assert t["wafer_id"].to_pylist() == ["wafer_000", "wafer_001", "wafer_002"]
    assert set(t["lot_id"].to_pylist()) == {"lotA"} and set(t["scanner"].to_pylist()) == {-1}
    np.testing.assert_array_equal(from_fixed_list(t["valid"], (32, 32))[0], valid)


def test_mpom_png_codec_and_resize():
    rng = np.random.default_rng(1)
    valid = grid_coordinates(16, 16)["valid"]
    ov = rng.uniform(-25, 25, (2, 16, 16)) * valid
    back, v = decode_overlay_png(
        encode_overlay_png(ov, valid, scale_nm=30.0), scale_nm=30.0, height=16, width=16
    )
    np.testing.assert_array_equal(v, valid)
    assert np.abs(back - ov).max() <= 30.0 / 127.5 / 2 + 1e-5  # half a quantisation step
    big = np.repeat(np.repeat(ov, 2, axis=1), 2, axis=2)  # 32 x 32, each pixel doubled
    png = encode_overlay_png(big, np.repeat(np.repeat(valid, 2, 0), 2, 1), scale_nm=30.0)
    small, _ = decode_overlay_png(png, scale_nm=30.0, height=16, width=16)
    np.testing.assert_allclose(small, back, atol=1e-5)  # nearest-neighbour downsizing
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., :2] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    m, v = decode_overlay_png(buf.getvalue(), scale_nm=10.0, height=8, width=8)
    np.testing.assert_array_equal(v, grid_coordinates(8, 8)["valid"])  # all-zero blue: inscribed circle
    assert np.allclose(m[:, v], 10.0)


@pytest.mark.parametrize("damage", ["truncated_png", "missing_id", "bad_id", "bad_json"])
def test_mpom_corrupt_inputs(tmp_path, damage):
    src = tmp_path / "lot"
    make_mpom(src)
    bad = src / "wafer_001"
    if damage == "truncated_png":
        data = (bad / "overlay_prev.png").read_bytes()
        (bad / "overlay_prev.png").write_bytes(data[: len(data) // 2])
        culprit = "overlay_prev.png"
    elif damage == "missing_id":
        os.remove(bad / "id.txt")
        culprit = "id.txt"
    elif damage == "bad_id":
        (bad / "id.txt").write_text("1000")
        culprit = "id.txt"
    else:
        (bad / "logs.json").write_text('{"feat": [1, 2]}')
        culprit = "logs.json"
    with pytest.raises(DataImportError, match=f"wafer_001.*{culprit}"):
        import_mpom(str(src), scale_nm=10.0)
    out = tmp_path / "out"
    assert make_data(["import-mpom", str(src), "--out", str(out), "--scale-nm", "10"]) == 2
    assert not out.exists() and os.listdir(tmp_path) == ["lot"]


def test_mpom_cli(tmp_path):
    make_mpom(tmp_path / "lot", n=2)
    assert (
        make_data(["import-mpom", str(tmp_path / "lot"), "--out", str(tmp_path / "ds"), "--scale-nm", "5"])
        == 0
    )
    ds = TableDataset(str(tmp_path / "ds"))
    assert len(ds) == 2 and ds[1]["overlay"].shape == (2, 32, 32) and int(ds[1]["equipment_id"]) == 20


# ------------------------------------------------------------------------------------------------ WM-811K


def make_lswmd(path, protocol: int = pickle.HIGHEST_PROTOCOL):
    """A DataFrame laid out like LSWMD.pkl (object columns, [['label']] / [] cells), pickled to ``path``."""
    rng = np.random.default_rng(2)
    maps = [
        rng.integers(0, 3, (32, 32)),
        rng.integers(0, 3, (64, 64)),
        rng.integers(0, 3, (25, 27)),
        rng.integers(0, 3, (32, 32)),
    ]
    ftype = [np.array([["Center"]]), np.array([["none"]]), np.zeros((0, 0)), np.array([["Edge-Ring"]])]
    split = [np.array([["Training"]]), np.array([["Test"]]), np.zeros((0, 0)), np.array([["Training"]])]
    df = pd.DataFrame(
        {
            "waferMap": pd.Series([m.astype(np.uint8) for m in maps], dtype=object),
            "dieSize": [1683.0, 1683.0, 533.0, 600.0],
            "lotName": pd.Series(["lot1", "lot1", "lot2", "lot3"], dtype=object),
            "waferIndex": [1.0, 2.0, 7.0, 25.0],
            "trianTestLabel": pd.Series(split, dtype=object),
            "failureType": pd.Series(ftype, dtype=object),
        }
    )
    with open(path, "wb") as f:
        pickle.dump(df, f, protocol=protocol)
    return maps


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_wm811k_roundtrip(tmp_path, protocol):
    path = tmp_path / "LSWMD.pkl"
    maps = make_lswmd(path, protocol)
    t = import_wm811k(str(path), size=32)
    validate_table(t, "wafer")
    got = from_fixed_list(t["wafer_map"], (32, 32))
    np.testing.assert_array_equal(got[0], maps[0])
    np.testing.assert_array_equal(got[3], maps[3])
    np.testing.assert_array_equal(got[1], maps[1][1::2, 1::2])  # nearest-neighbour at pixel centres
    assert set(np.unique(got[2])) <= {0, 1, 2}
    assert t["label_name"].to_pylist() == ["Center", "none", "", "Edge-Ring"]
    assert t["label"].to_pylist() == [0, 8, -1, 3]
    assert t["split"].to_pylist() == ["train", "test", "", "train"]
    assert t["wafer_id"].to_pylist() == ["lot1-W01", "lot1-W02", "lot2-W07", "lot3-W25"]
    assert t["die_size"].to_pylist() == [1683.0, 1683.0, 533.0, 600.0]
    assert not from_fixed_list(t["pattern_mask"], (32, 32)).any()
    assert import_wm811k(str(path), size=16, limit=2).num_rows == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_wm811k_corrupt_and_malicious(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "LSWMD.pkl"
    make_lswmd(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataImportError, match="LSWMD.pkl"):
        import_wm811k(str(path))
    assert make_data(["import-wm811k", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataImportError, match="refusing to load"):
        import_wm811k(str(evil))
    assert not (tmp_path / "pwned").exists()
    df = pd.DataFrame(
        {
            "waferMap": pd.Series([np.full((4, 4), 7, np.uint8)], dtype=object),
            "failureType": pd.Series([np.array([["Center"]])], dtype=object),
        }
    )
    df.to_pickle(tmp_path / "bad_values.pkl")
    with pytest.raises(DataImportError, match="row 0.*0/1/2"):
        import_wm811k(str(tmp_path / "bad_values.pkl"))


def test_wm811k_cli(tmp_path):
    make_lswmd(tmp_path / "LSWMD.pkl")
    assert (
        make_data(
            ["import-wm811k", str(tmp_path / "LSWMD.pkl"), "--out", str(tmp_path / "wm"), "--size", "24"]
        )
        == 0
    )
    ds = TableDataset(str(tmp_path / "wm"))
    assert len(ds) == 4 and ds[0]["wafer_map"].shape == (1, 24, 24) and int(ds[2]["label"]) == -1


# ------------------------------------------------------------------------------------------------ CIFAR


def make_cifar(path, which: int):
    rng = np.random.default_rng(which)
    root = "cifar-10-batches-py" if which == 10 else "cifar-100-python"
    members, expected = {}, []

    def batch(n, name):
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        d = {
            b"batch_label": name.encode(),
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        if which == 10:
            d[b"labels"] = rng.integers(0, 10, n).tolist()
            expected.append((data, d[b"labels"], [-1] * n))
        else:
            d[b"fine_labels"] = rng.integers(0, 100, n).tolist()
            d[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
            expected.append((data, d[b"fine_labels"], d[b"coarse_labels"]))
        return d

    if which == 10:
        for k in range(1, 6):
            members[f"data_batch_{k}"] = batch(2, f"data_batch_{k}")
        members["test_batch"] = batch(3, "test_batch")
        members["batches.meta"] = {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": 2,
        }
    else:
        members["train"] = batch(5, "train")
        members["test"] = batch(3, "test")
        members["meta"] = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return expected


@pytest.mark.parametrize("which", [10, 100])
def test_cifar_roundtrip(tmp_path, which):
    path = tmp_path / f"cifar-{which}-python.tar.gz"
    expected = make_cifar(path, which)
    t = import_cifar(str(path))
    validate_table(t, "image")
    data = np.concatenate([e[0] for e in expected])
    np.testing.assert_array_equal(from_fixed_list(t["image"], (3, 32, 32)), data.reshape(-1, 3, 32, 32))
    assert t["label"].to_pylist() == sum((list(e[1]) for e in expected), [])
    assert t["coarse_label"].to_pylist() == sum((list(e[2]) for e in expected), [])
    n_test = 3
    assert t["split"].to_pylist() == ["train"] * (len(data) - n_test) + ["test"] * n_test
    prefix = "class" if which == 10 else "fine"
    assert t["label_name"][0].as_py() == f"{prefix}{t['label'][0].as_py()}"
    out = tmp_path / "ds"
    assert make_data(["import-cifar", str(path), "--out", str(out)]) == 0
    item = TableDataset(str(out))[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    torch.testing.assert_close(item["image"], torch.from_numpy(data[0].reshape(3, 32, 32) / 255.0).float())
    assert read_dataset(str(out)).num_rows == len(data)


def test_cifar_corrupt(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    make_cifar(path, 10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataImportError, match="cifar-10-python.tar.gz"):
        import_cifar(str(path))
    assert make_data(["import-cifar", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(DataImportError, match="junk.tar.gz"):
        import_cifar(str(tmp_path / "junk.tar.gz"))
