"""fabdistill.storage and data.parquet_io against local paths and a local S3 server (moto, 127.0.0.1)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from data.overlay import generate_overlay
from data.parquet_io import SchemaError, read_dataset, write_dataset
from data.sem import generate_sem
from fabdistill import storage

try:
    from tests.s3_helpers import create_bucket, moto_env, start_moto_server
except ImportError:  # tests/ not importable as a package
    from s3_helpers import create_bucket, moto_env, start_moto_server

BUCKET = "fabdistill-test"


@pytest.fixture(scope="module")
def s3_base():
    """s3://BUCKET on a moto server started for this module; the environment points at it."""
    server, endpoint = start_moto_server()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in moto_env(endpoint).items():
                mp.setenv(k, v)
            mp.delenv("FABDISTILL_S3_ENDPOINT", raising=False)
            mp.delenv("AWS_SESSION_TOKEN", raising=False)
            create_bucket(endpoint, BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path, s3_base):
    if request.param == "local":
        return str(tmp_path / "store")
    return storage.join(s3_base, request.node.name.replace("[", "-").replace("]", ""))


def test_join_and_is_s3():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.join("s3://b/p/", "/a/", "c.txt") == "s3://b/p/a/c.txt"
    assert storage.join("/tmp", "a", "b") == os.path.join("/tmp", "a", "b")
    assert storage.split_s3("s3://b/a/c/") == ("b", "a/c")
    with pytest.raises(ValueError):
        storage.split_s3("/tmp/x")


def test_bytes_roundtrip_listdir_remove(base):
    storage.makedirs(base)
    f = storage.join(base, "a.bin")
    assert not storage.exists(f)
    storage.write_bytes(f, b"hello")
    storage.write_bytes(storage.join(base, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_bytes(f) == b"hello"
    assert storage.exists(f) and storage.exists(storage.join(base, "sub"))
    assert storage.listdir(base) == ["a.bin", "sub"]
    storage.write_bytes(f, b"again")  # overwrite
    assert storage.read_bytes(f) == b"again"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing.bin"))
    storage.remove_tree(base)
    assert not storage.exists(f) and not storage.exists(base)
    storage.remove_tree(base)  # removing nothing is fine


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    storage.write_bytes(str(target), b"{}")
    assert os.listdir(tmp_path) == ["x.json"]


def test_upload_download_dir(tmp_path, s3_base):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "one.txt").write_bytes(b"1")
    (src / "d" / "two.txt").write_bytes(b"22")
    uri = storage.join(s3_base, "tree")
    storage.upload_dir(str(src), uri)
    assert storage.listdir(uri) == ["d", "one.txt"]
    dst = tmp_path / "dst"
    storage.download_dir(uri, str(dst))
    assert (dst / "one.txt").read_bytes() == b"1" and (dst / "d" / "two.txt").read_bytes() == b"22"


def test_pyarrow_fs_uses_endpoint(s3_base):
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_fs(s3_base + "/some/prefix")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/some/prefix"
    fs_local, p = storage.pyarrow_fs("rel/dir")
    assert isinstance(fs_local, pafs.LocalFileSystem) and os.path.isabs(p)


def test_dataset_local_and_s3_identical(tmp_path, s3_base):
    table = generate_overlay(40, seed=3)
    local, remote = str(tmp_path / "ov"), storage.join(s3_base, "datasets", "ov")
    assert write_dataset(table, local, "overlay", rows_per_file=16) == 40
    assert write_dataset(table, remote, "overlay", rows_per_file=16) == 40
    assert storage.listdir(remote) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    a, b = read_dataset(local), read_dataset(remote)
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    assert a.select(table.column_names).equals(table)
    assert a.schema.metadata[b"fabdistill.kind"] == b"overlay"


def _failing(table: pa.Table):
    yield table
    raise RuntimeError("generator died")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_dataset_nothing_partial_on_error(tmp_path, s3_base, where):
    uri = str(tmp_path / "sem") if where == "local" else storage.join(s3_base, "atomic", "sem")
    good = generate_sem(6, seed=0, size=16)
    with pytest.raises(RuntimeError):
        write_dataset(_failing(good), uri, "sem")
    assert not storage.exists(uri)
    write_dataset(good, uri, "sem")
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old dataset
        write_dataset(_failing(generate_sem(3, seed=1, size=16)), uri, "sem")
    assert read_dataset(uri).select(good.column_names).equals(good)
    if where == "local":
        assert os.listdir(tmp_path) == ["sem"]  # no temp folders left behind
    with pytest.raises(FileExistsError):
        write_dataset(good, uri, "sem", overwrite=False)


def test_write_dataset_rejects_bad_tables(tmp_path):
    t = generate_sem(4, seed=0, size=16)
    broken = t.set_column(
        t.column_names.index("mask"),
        "mask",
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * 256, np.uint8)), 256),
    )
    with pytest.raises(SchemaError, match="mask"):
        write_dataset(broken, str(tmp_path / "bad"), "sem")
    with pytest.raises(SchemaError, match="lacks columns"):
        write_dataset(t.drop(["clean"]), str(tmp_path / "bad"), "sem")
    with pytest.raises(SchemaError, match="unknown dataset kind"):
        write_dataset(t, str(tmp_path / "bad"), "video")
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_dataset(str(tmp_path / "bad"))


def test_make_data_cli_writes_to_s3(s3_base):
    from apps.make_data import main

    uri = storage.join(s3_base, "cli", "sem")
    assert main(["sem", "--n", "5", "--size", "16", "--out", uri, "--seed", "4"]) == 0
    want = generate_sem(5, 4, size=16)
    assert read_dataset(uri).select(want.column_names).equals(want)
