"""Mixed-type wafer maps (data/mixed_wafer.py): the 38 MixedWM38 classes, their patterns, determinism, the importer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data.datasets import TableDataset
from data.importers import DataImportError
from data.mixed_wafer import (
    MIXED_CLASSES,
    MIXED_CODES,
    MIXED_MULTI_HOT,
    MIXED_PATTERNS,
    class_patterns,
    classes_from_multi_hot,
    generate_mixed_wafer,
    import_mixedwm38,
)
from data.parquet_io import from_fixed_list, read_dataset, validate_table, write_dataset
from data.wafer import FAIL, WAFER_CLASSES, wafer_geometry

S = 52
VALID, R, _ = wafer_geometry(S)


def arrays(t: pa.Table, size: int = S):
    n = t.num_rows
    return (from_fixed_list(t["wafer_map"], (size, size)), from_fixed_list(t["pattern_mask"], (size, size)),
            from_fixed_list(t["pattern_masks"], (8, size, size)), from_fixed_list(t["pattern_labels"], (8,)),
            np.asarray(t["mixed_label"]).reshape(n))


def test_the_38_class_table():
    assert MIXED_CLASSES == (
        "Normal", "Center", "Donut", "Edge_Loc", "Edge_Ring", "Loc", "Near_Full", "Scratch", "Random",
        "C+EL", "C+ER", "C+L", "C+S", "D+EL", "D+ER", "D+L", "D+S", "EL+L", "EL+S", "ER+L", "ER+S", "L+S",
        "C+EL+L", "C+EL+S", "C+ER+L", "C+ER+S", "C+L+S", "D+EL+L", "D+EL+S", "D+ER+L", "D+ER+S", "D+L+S",
        "EL+L+S", "ER+L+S",
        "C+L+EL+S", "C+L+ER+S", "D+L+EL+S", "D+L+ER+S",
    )
    counts = MIXED_MULTI_HOT.sum(1)
    assert [int((counts == k).sum()) for k in range(5)] == [1, 8, 13, 12, 4]
    assert len({tuple(v) for v in MIXED_MULTI_HOT}) == 38  # one vector per class
    assert MIXED_CODES == ("C", "D", "EL", "ER", "L", "NF", "S", "R")  # arr_1's bit order
    for v in MIXED_MULTI_HOT[counts > 1]:  # mixtures: ≤ 1 of {C, D}, ≤ 1 of {EL, ER}, never NF or R
        assert v[0] + v[1] <= 1 and v[2] + v[3] <= 1 and v[5] == 0 and v[7] == 0
    assert class_patterns(0) == () and class_patterns(34) == ("Center", "Edge-Loc", "Loc", "Scratch")
    assert classes_from_multi_hot(MIXED_MULTI_HOT).tolist() == list(range(38))
    with pytest.raises(ValueError, match=r"row 1 \(C\+D\)"):
        classes_from_multi_hot(np.array([[0] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="0 or 1"):
        classes_from_multi_hot(np.array([[2, 0, 0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("cid", range(38))
def test_each_class_contains_exactly_its_patterns(cid):
    name = MIXED_CLASSES[cid]
    t = generate_mixed_wafer(3, seed=cid, class_weights={name: 1.0})
    validate_table(t, "wafer")
    maps, union, masks, multi_hot, classes = arrays(t)
    assert (classes == cid).all() and set(t["mixed_label_name"].to_pylist()) == {name}
    assert (multi_hot == MIXED_MULTI_HOT[cid]).all()
    present = MIXED_MULTI_HOT[cid].astype(bool)
    per_pattern = masks.reshape(3, 8, -1).any(2)  # (3, 8): which patterns failed some die
    assert (per_pattern == present).all()  # every listed pattern is on the map, no other one is
    assert (union == masks.any(1)).all()  # pattern_mask is the union of the patterns' fails
    assert (maps[union.astype(bool)] == FAIL).all() and (maps[:, ~VALID] == 0).all() and (maps[:, VALID] > 0).all()
    assert not masks[:, :, ~VALID].any()  # patterns act on the wafer only
    # where the patterns sit (data/wafer.py's definitions)
    if present[0]:
        assert R[masks[:, 0].any(0)].max() < 0.3  # Center
    if present[1]:
        assert R[masks[:, 1].any(0)].min() >= 0.25  # Donut
    if present[3]:
        assert R[masks[:, 3].any(0)].min() > 0.8  # Edge-Ring
    # the nine-class label: Normal → none, singles → their WM-811K class, mixtures → −1
    expect = (WAFER_CLASSES.index("none") if cid == 0 else
              WAFER_CLASSES.index(MIXED_PATTERNS[int(np.flatnonzero(present)[0])]) if present.sum() == 1 else -1)
    assert t["label"].to_pylist() == [expect] * 3


def test_determinism_chunks_seed_and_size():
    a = generate_mixed_wafer(12, seed=5)
    assert a.equals(generate_mixed_wafer(12, seed=5))
    assert a.equals(pa.concat_tables([generate_mixed_wafer(5, 5), generate_mixed_wafer(7, 5, start=5)]))
    b = generate_mixed_wafer(12, seed=6)
    assert not a["wafer_map"].equals(b["wafer_map"])
    small = generate_mixed_wafer(4, seed=5, size=32)
    assert validate_table(small, "wafer")["wafer_map"] == (32, 32)
    assert from_fixed_list(small["pattern_masks"], (8, 32, 32)).shape == (4, 8, 32, 32)
    mix = np.asarray(generate_mixed_wafer(200, seed=1)["mixed_label"])
    assert len(set(mix.tolist())) > 30  # uniform over the 38 classes by default


def test_parquet_round_trip_keeps_the_38_class_columns(tmp_path):
    t = generate_mixed_wafer(6, seed=2, class_weights={"D+L+ER+S": 1, "Normal": 1})
    write_dataset(t, str(tmp_path / "mixed"), "wafer")
    back = read_dataset(str(tmp_path / "mixed"))
    for col in ("mixed_label", "mixed_label_name", "pattern_labels", "pattern_masks", "wafer_map"):
        assert back[col].equals(t[col]), col
    ds = TableDataset(back)
    assert len(ds) == 6 and ds[0]["wafer_map"].shape == (1, S, S)


def test_generator_errors():
    with pytest.raises(ValueError, match="unknown mixed wafer classes"):
        generate_mixed_wafer(2, 0, class_weights={"Center+Donut": 1})
    with pytest.raises(ValueError, match="38 entries"):
        generate_mixed_wafer(2, 0, class_weights=[1.0] * 9)
    with pytest.raises(ValueError, match="background_rate"):
        generate_mixed_wafer(2, 0, background_rate=(0.5, 0.1))


# ------------------------------------------------------------------------------------------------------ importer


def fixture_npz(path, n: int = 6, size: int = S, **override):
    """A small MixedWM38-style .npz: maps (n, size, size) in {0, 1, 2} with one undocumented 3, multi-hot labels."""
    rng = np.random.default_rng(0)
    valid = wafer_geometry(size)[0]
    maps = np.where(valid, rng.integers(1, 3, (n, size, size)), 0).astype(np.int64)
    maps[0, size // 2, size // 2] = 3  # the published file has a few such dies: read as fails
    classes = np.arange(n) * 7 % 38
    arrays_ = {"arr_0": maps, "arr_1": MIXED_MULTI_HOT[classes].astype(np.int64)}
    arrays_.update(override)
    np.savez(path, **arrays_)
    return maps, classes


def test_importer_round_trip(tmp_path):
    path = tmp_path / "MixedWM38.npz"
    maps, classes = fixture_npz(path)
    t = import_mixedwm38(path)
    validate_table(t, "wafer")
    got_maps, union, masks, multi_hot, got_classes = arrays(t)
    assert got_classes.tolist() == classes.tolist()
    assert t["mixed_label_name"].to_pylist() == [MIXED_CLASSES[c] for c in classes]
    assert (multi_hot == MIXED_MULTI_HOT[classes]).all()
    assert (got_maps == np.minimum(maps, 2)).all() and got_maps[0, S // 2, S // 2] == FAIL
    assert not union.any() and not masks.any()  # MixedWM38 has no pixel labels
    assert t["wafer_id"].to_pylist()[:2] == ["MixedWM38-00000", "MixedWM38-00001"]
    resized = import_mixedwm38(path, size=26, limit=3)
    assert resized.num_rows == 3 and validate_table(resized, "wafer")["wafer_map"] == (26, 26)


def test_importer_corrupt_inputs(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, maps=np.zeros((2, S, S)), labels=np.zeros((2, 8)))
    with pytest.raises(DataImportError, match=r"expected the keys \['arr_0', 'arr_1'\].*found \['labels', 'maps'\]"):
        import_mixedwm38(p)
    fixture_npz(p, arr_1=np.zeros((6, 7)))
    with pytest.raises(DataImportError, match=r"arr_1 \(labels\) must be \(N, 8\)"):
        import_mixedwm38(p)
    fixture_npz(p, arr_0=np.zeros((6, S * S)))
    with pytest.raises(DataImportError, match=r"arr_0 \(maps\) must be \(N, H, W\)"):
        import_mixedwm38(p)
    fixture_npz(p, arr_1=np.zeros((5, 8)))
    with pytest.raises(DataImportError, match="6 maps .* but 5 label rows"):
        import_mixedwm38(p)
    bad_labels = MIXED_MULTI_HOT[[0, 1, 2, 3, 4, 5]].astype(np.int64)
    bad_labels[4] = [0, 0, 0, 0, 0, 1, 0, 1]  # NF + R: not one of the 38
    fixture_npz(p, arr_1=bad_labels)
    with pytest.raises(DataImportError, match=r"label row 4 \(NF\+R\)"):
        import_mixedwm38(p)
    maps = np.ones((6, S, S), np.int64)
    maps[2, 0, 0] = 7
    fixture_npz(p, arr_0=maps)
    with pytest.raises(DataImportError, match=r"map 2 holds values \[7\]"):
        import_mixedwm38(p)
    good = tmp_path / "good.npz"
    fixture_npz(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataImportError, match="corrupt or truncated"):
        import_mixedwm38(truncated)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(DataImportError, match="junk.npz: not a readable .npz"):
        import_mixedwm38(junk)
    with pytest.raises(DataImportError, match="no such file"):
        import_mixedwm38(tmp_path / "missing.npz")


def test_make_data_verbs_generate_and_import(tmp_path, capsys):
    """`apps.make_data mixed-wafer` and `import-mixedwm38` write readable wafer datasets; a bad file writes nothing."""
    from apps.make_data import main

    assert main(["mixed-wafer", "--n", "5", "--size", str(S), "--seed", "3", "--out", str(tmp_path / "gen")]) == 0
    got = read_dataset(str(tmp_path / "gen"))
    assert got.num_rows == 5 and got["mixed_label"].to_pylist() == generate_mixed_wafer(5, 3, size=S)["mixed_label"].to_pylist()
    with pytest.raises(SystemExit):
        main(["mixed-wafer", "--n", "2", "--class-weights", "Center+Donut=1", "--out", str(tmp_path / "never")])
    assert "unknown mixed wafer classes" in capsys.readouterr().err and not (tmp_path / "never").exists()

    src = tmp_path / "MixedWM38.npz"
    _, classes = fixture_npz(src)
    assert main(["import-mixedwm38", str(src), "--out", str(tmp_path / "imp"), "--limit", "4"]) == 0
    assert read_dataset(str(tmp_path / "imp"))["mixed_label"].to_pylist() == classes[:4].tolist()
    assert main(["import-mixedwm38", str(src), "--out", str(tmp_path / "split"), "--eval-fraction", "0.5"]) == 0
    parts = [read_dataset(str(tmp_path / "split" / p))["wafer_id"].to_pylist() for p in ("train", "eval")]
    assert len(parts[0]) == len(parts[1]) == 3 and not set(parts[0]) & set(parts[1])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["import-mixedwm38", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "bad")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err and not (tmp_path / "bad").exists()
