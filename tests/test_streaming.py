"""Streaming training data from Parquet (data/streaming.py, TrainSession.stream/batches): the data.loader knobs,
the auto choice by size, the in-process streamer, every row exactly once per epoch across 2 Ray Train workers, and
the IKDDiT teacher training on a streamed set."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray import cloudpickle

from data.overlay import generate_overlay
from data.parquet_io import parquet_files, write_dataset
from data.streaming import LoaderKnobs, dataset_bytes, resolve_loader, stream_parquet
from fabdistill.config import ConfigError, load_config
from trainers.launch import RunSection, TrainSession, launch, read_metrics

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def overlay_set(path, n: int, rows_per_file: int) -> str:
    """An overlay dataset of `n` maps in several part files, with an extra `row_id` column 0..n-1."""
    table = generate_overlay(n, seed=3, height=16, width=16, log_dim=64)
    table = table.append_column("row_id", pa.array(np.arange(n, dtype=np.int64)))
    write_dataset(table, str(path), "overlay", rows_per_file=rows_per_file)
    return str(path)


def test_loader_knobs_have_defaults_and_bad_values_fail_naming_the_key():
    from trainers.ikddit import Config

    cfg = load_config(Config)
    assert (cfg.data.loader, cfg.data.stream_threshold_mb, cfg.data.shuffle_buffer) == ("auto", 2048.0, 4096)
    cfg = load_config(Config, overrides=["data.loader=stream", "data.shuffle_buffer=0"])
    assert (cfg.data.loader, cfg.data.shuffle_buffer) == ("stream", 0)
    for override, key in [("data.loader=disk", "data.loader"), ("data.stream_threshold_mb=-1",
                                                                 "data.stream_threshold_mb"),
                          ("data.shuffle_buffer=lots", "data.shuffle_buffer"),
                          ("data.shuffle_buffer=-5", "data.shuffle_buffer"), ("data.loaders=stream", "data.loaders")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(Config, overrides=[override])


def test_auto_streams_when_the_per_worker_size_exceeds_the_threshold(tmp_path):
    uri = overlay_set(tmp_path / "ds", 64, rows_per_file=16)
    assert len(parquet_files(uri)[1]) == 4
    mb = dataset_bytes(uri) / 2**20
    assert mb > 0
    assert resolve_loader(LoaderKnobs(loader="auto", stream_threshold_mb=mb / 3), uri, 2) == "stream"  # mb/2 each
    assert resolve_loader(LoaderKnobs(loader="auto", stream_threshold_mb=mb / 1.5), uri, 2) == "memory"
    assert resolve_loader(LoaderKnobs(loader="auto", stream_threshold_mb=mb / 1.5), uri, 0) == "stream"  # 1 reader
    assert resolve_loader(LoaderKnobs(loader="memory", stream_threshold_mb=0), uri, 2) == "memory"
    assert resolve_loader(LoaderKnobs(loader="stream"), uri, 2) == "stream"


def test_stream_parquet_reads_every_row_once_per_epoch_through_a_shuffle_buffer(tmp_path):
    uri = overlay_set(tmp_path / "ds", 100, rows_per_file=30)
    in_order = [i for b in stream_parquet(uri, 10) for i in b["row_id"]]
    assert in_order == list(range(100))  # no buffer: read order
    epochs = [[i for b in stream_parquet(uri, 10, shuffle_buffer=40, seed=s) for i in b["row_id"]] for s in (0, 1)]
    for ids in epochs:
        assert sorted(ids) == list(range(100)) and ids != in_order
    assert epochs[0] != epochs[1]  # a new seed each epoch, a new order
    sizes = [len(b["row_id"]) for b in stream_parquet(uri, 32, shuffle_buffer=40)]
    assert sizes == [32, 32, 32]  # drop_last: the last 4 rows wait for the next epoch's shuffle
    assert sum(len(b["row_id"]) for b in stream_parquet(uri, 32, drop_last=False)) == 100


def id_loop(config: dict) -> None:
    """Each rank writes the row ids it streamed, per epoch, to the run folder."""
    sess = TrainSession.current()
    assert sess.loader("train") == "stream"
    for epoch in range(config["epochs"]):
        ids = [int(i) for batch in sess.stream("train", config["batch_size"], epoch=epoch,
                                               collate=lambda b: torch.as_tensor(b["row_id"]))
               for i in batch]
        with open(f"{sess.run_dir}/ids_rank{sess.rank}_epoch{epoch}.json", "w") as f:
            json.dump(ids, f)
    sess.report({"rows": len(ids)}, step=1, state={"done": torch.ones(1)})


def test_two_workers_stream_every_row_exactly_once_per_epoch(ray_local, tmp_path):
    n = 96  # 48 rows per worker, 6 batches of 8: nothing dropped
    uri = overlay_set(tmp_path / "ds", n, rows_per_file=12)  # 8 part files
    run = RunSection(name="ids", storage_path=str(tmp_path / "runs"), num_workers=2, cpus_per_worker=0.5)
    outcome = launch(id_loop, {"epochs": 2, "batch_size": 8}, run, datasets={"train": uri},
                     loader=LoaderKnobs(loader="stream", shuffle_buffer=16))
    assert outcome.error is None
    orders = []
    for epoch in range(2):
        per_rank = [json.loads((tmp_path / "runs" / "ids" / f"ids_rank{r}_epoch{epoch}.json").read_text())
                    for r in range(2)]
        assert [len(ids) for ids in per_rank] == [n // 2, n // 2]  # an equal split: DDP steps stay in lock-step
        assert sorted(per_rank[0] + per_rank[1]) == list(range(n)), epoch  # every row once, none twice
        orders.append(per_rank)
    assert any(ids != sorted(ids) for per_rank in orders for ids in per_rank)  # the local buffer shuffled


def test_ikddit_teacher_trains_on_a_streamed_set_in_process(tmp_path):
    from trainers.ikddit import Config, overlay_scale_nm, overlay_scale_nm_streamed, train

    uri = str(tmp_path / "overlay")
    table = generate_overlay(48, seed=5, height=32, width=32, log_dim=128)
    write_dataset(table, uri, "overlay", rows_per_file=16)
    assert overlay_scale_nm_streamed(uri) == pytest.approx(overlay_scale_nm(table), rel=1e-5)
    cfg = load_config(Config, "configs/ikddit_tiny.yaml", overrides=[
        f"run.storage_path={tmp_path}", "run.name=st", "run.num_workers=0", "phase=teacher", f"data.train_uri={uri}",
        "data.loader=stream", "data.shuffle_buffer=16", "teacher.steps=8", "teacher.batch_size=8",
        "teacher.log_every=2", "teacher.checkpoint_every=8", "run.profile=true", "run.torch_threads=1"])
    threads = torch.get_num_threads()
    outcome = train(cfg)
    assert torch.get_num_threads() == threads  # the session put the process's threads back
    rows = read_metrics(outcome.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # 48 rows = 6 batches an epoch: the loop ran into epoch 2
    assert all(np.isfinite(r["loss"]) for r in rows)
    for key in ("prof_data_ms", "prof_forward_ms", "prof_backward_ms", "prof_optimizer_ms"):
        assert all(r[key] > 0 for r in rows), key
    assert "prof_allreduce_ms" not in rows[0]  # one process: no DDP
    assert "(streamed)" in (tmp_path / "st-teacher" / "console.log").read_text()
