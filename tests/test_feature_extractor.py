"""Domain feature net, its weights files, the in-process fit and the Ray Train loop (driven by a fake session)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fabdistill.config import ConfigError, load_config
from models.feature_extractor import (DomainFeatureNet, build_feature_net,
                                      load_feature_net, save_feature_net)
from trainers import feature_extractor as fe

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "metrics" / "weights" / "overlay_fe.pt"


def test_net_shapes_on_32_and_64_and_bad_input():
    net = DomainFeatureNet(2, 16, feature_dim=64, width=16)
    assert net.features(torch.randn(3, 2, 32, 32)).shape == (3, 64)
    assert net(torch.randn(3, 2, 64, 64)).shape == (3, 16)
    with pytest.raises(ValueError, match=r"expects \(N, 2, H, W\)"):
        net(torch.randn(3, 1, 32, 32))
    with pytest.raises(KeyError, match="unknown feature-net size"):
        build_feature_net("XXL", 2, 16)
    for size in ("S", "M"):  # commit-size nets stay under 5 MB of float32 weights
        n_params = sum(p.numel() for p in build_feature_net(size, 2, 16).parameters())
        assert n_params * 4 < 5 * 2**20


def test_weights_roundtrip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    net = build_feature_net("S", 1, 9).eval()
    path = tmp_path / "w.pt"
    save_feature_net(path, net, "wafer", [f"c{i}" for i in range(9)], extra={"heldout_accuracy": 0.5})
    loaded, meta = load_feature_net(path, "wafer")
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(loaded(x), net(x))
    assert meta["class_names"][3] == "c3" and meta["extra"]["heldout_accuracy"] == 0.5
    with pytest.raises(ValueError, match="for domain 'wafer', not 'overlay'"):
        load_feature_net(path, "overlay")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_feature_net(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load_feature_net(tmp_path / "bad.pt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a DomainFeatureNet weights file"):
        load_feature_net(tmp_path / "plain.pt")


def test_committed_overlay_weights_classify_fresh_maps():
    assert COMMITTED.is_file(), "regenerate: python -m trainers.feature_extractor --domain overlay --export " \
                                "metrics/weights/overlay_fe.pt"
    assert COMMITTED.stat().st_size < 5 * 2**20
    torch.load(COMMITTED, weights_only=True)  # plain tensors and numbers only
    net, meta = load_feature_net(COMMITTED, "overlay")
    x, y = fe.table_to_tensors(fe.generate_tables("overlay", 96, seed=4242, size=32), "overlay")
    acc = fe.accuracy(net, x, y, "overlay")
    assert acc >= 0.8, f"committed overlay extractor: accuracy {acc:.3f} on fresh maps (chance 1/16)"
    assert meta["extra"]["heldout_accuracy"] >= 0.8


def test_decode_batch_handles_ray_object_columns_and_unlabelled_rows():
    maps = np.arange(3 * 1 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16) % 3
    flat = maps.reshape(3, -1)
    obj = np.empty(3, dtype=object)
    obj[:] = [row for row in flat]  # what Ray's numpy batches hold for fixed_size_list columns
    base = {"label": np.array([2, -1, 5]), "height": np.array([16] * 3), "width": np.array([16] * 3)}
    for column in (flat, obj):
        x, y = fe.decode_batch({**base, "wafer_map": column}, "wafer")
        assert x.shape == (2, 1, 16, 16) and x.dtype == torch.float32
        assert y.tolist() == [2, 5]
        assert torch.equal(x[1, 0], torch.from_numpy(maps[2]).float())
    with pytest.raises(KeyError, match="lacks column 'wafer_map'"):
        fe.decode_batch(base, "wafer")


def test_train_step_on_an_all_unlabelled_batch_keeps_weights_finite():
    torch.manual_seed(0)
    net = build_feature_net("S", 1, 9)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    loss, ok = fe.train_step(net, opt, torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long), 1e-3)
    assert loss == 0.0 and ok == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # zero gradient, no decay
    loss, ok = fe.train_step(net, opt, torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]), 1e-3)
    assert math.isfinite(loss) and 0 <= ok <= 4


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [fe.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 1e-3


def test_fit_is_deterministic_and_learns():
    kw = dict(domain="overlay", n=160, seed=3, epochs=2, size="S", batch_size=32, n_val=64)
    net_a, acc_a = fe.fit_feature_extractor(**kw)
    net_b, acc_b = fe.fit_feature_extractor(**kw)
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert acc_a == acc_b and acc_a > 2 / 16  # well above chance after 10 steps


def test_config_file_loads_and_rejects_bad_values():
    cfg = load_config(fe.Config, REPO / "configs" / "feature_extractor.yaml")
    assert cfg.trainer.domain == "overlay" and cfg.run.num_workers == 2
    with pytest.raises(ConfigError, match="trainer.domain"):
        load_config(fe.Config, None, ["trainer.domain=cifar"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(fe.Config, None, ["trainer.epoch=3"])


# --------------------------------------------------------------------------- the Ray loop, without Ray

class _FakeShard:
    def __init__(self, table):
        self.table = table

    def iter_batches(self, batch_size, batch_format="numpy", drop_last=False, **_):
        assert batch_format == "numpy"
        n = self.table.num_rows
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            part = self.table.slice(i, batch_size)
            yield {c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}


class _FakeSession:
    rank, world_size, is_main, device = 0, 1, True, torch.device("cpu")

    def __init__(self, tables, restored=None):
        self.tables, self.restored, self.reports = tables, restored, []

    def prepare(self, model):
        return model

    def dataset(self, name):
        return _FakeShard(self.tables[name])

    def restore(self):
        return self.restored

    def report(self, metrics, *, step, state=None, meta=None):
        self.reports.append({"step": step, "metrics": metrics, "state": state, "meta": meta})


def test_loop_checkpoints_reports_and_resumes(monkeypatch):
    from trainers.launch import TrainSession

    tables = {"train": fe.generate_tables("overlay", 64, seed=0, size=32),
              "val": fe.generate_tables("overlay", 16, seed=1, size=32)}
    config = {"domain": "overlay", "size": "S", "num_classes": 16, "epochs": 2, "batch_size": 16, "lr": 3e-3,
              "weight_decay": 0.0, "checkpoint_every": 3, "shuffle_buffer": 0, "steps_per_epoch": 4,
              "seed": 0, "has_val": True}
    first = _FakeSession(tables)
    monkeypatch.setattr(TrainSession, "_current", first)
    fe.loop(config)
    # 4 steps per epoch: checkpoints at 3 and 6 (every 3 steps) and at each epoch end (4, 8)
    assert [r["step"] for r in first.reports] == [3, 4, 6, 8]
    ends = [r for r in first.reports if r["meta"]["epoch_done"]]
    assert [r["step"] for r in ends] == [4, 8]
    assert all(0 <= r["metrics"]["train_acc"] <= 1 and "val_acc" in r["metrics"] for r in ends)
    assert all(r["state"] is not None and set(r["state"]) == {"model", "opt"} for r in first.reports)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in first.reports)

    # resume from the mid-epoch checkpoint at step 6 (epoch 1, 2 batches done): steps 7, 8 remain
    ckpt = first.reports[2]
    second = _FakeSession(tables, restored=(ckpt["state"], {"step": 6, **ckpt["meta"]}))
    monkeypatch.setattr(TrainSession, "_current", second)
    fe.loop(config)
    assert [r["step"] for r in second.reports] == [8]
    assert second.reports[0]["meta"] == {"epoch": 1, "batch_in_epoch": 4, "epoch_done": True, "domain": "overlay"}

    # resuming a finished run trains nothing more
    done = first.reports[-1]
    third = _FakeSession(tables, restored=(done["state"], {"step": 8, **done["meta"]}))
    monkeypatch.setattr(TrainSession, "_current", third)
    fe.loop(config)
    assert third.reports == []


def test_train_driver_generates_data_and_writes_weights(tmp_path, monkeypatch):
    """train(cfg) end to end with `launch` replaced by an in-process run of the loop on the written Parquet."""
    from data.parquet_io import read_dataset
    from models.feature_extractor import load_feature_net
    from trainers.launch import RunSection, TrainOutcome, TrainSession, run_dir, save_state

    calls = {}

    def fake_launch(loop, loop_config, run, *, datasets, full_config):
        calls.update(loop_config=loop_config, datasets=datasets)
        sess = _FakeSession({name: read_dataset(uri) for name, uri in datasets.items()})
        monkeypatch.setattr(TrainSession, "_current", sess)
        loop(loop_config)
        last = sess.reports[-1]
        model_dir = tmp_path / "runs" / run.name / "model"
        save_state(model_dir, last["state"], {"step": last["step"], **last["meta"]})
        return TrainOutcome(run_dir(run), str(model_dir), last["metrics"], None)

    monkeypatch.setattr(fe, "launch", fake_launch)
    cfg = fe.Config(trainer=fe.TrainerSection(domain="wafer", epochs=1, batch_size=16, checkpoint_every=100),
                    data=fe.DataSection(n=64, n_val=16, size=32),
                    run=RunSection(name="fe_test", storage_path=str(tmp_path / "runs"), num_workers=2))
    outcome = fe.train(cfg)
    lc = calls["loop_config"]
    assert lc["num_classes"] == 9 and lc["steps_per_epoch"] == 64 // (16 * 2) and lc["has_val"]
    assert set(calls["datasets"]) == {"train", "val"}
    assert 0.0 <= outcome.metrics["val_acc"] <= 1.0
    net, meta = load_feature_net(Path(outcome.run_dir) / "feature_extractor.pt", "wafer")
    assert meta["class_names"][0] == "Center" and float(net.feat_std.min()) > 0
    assert not torch.equal(net.feat_mean, torch.zeros_like(net.feat_mean))  # calibrated on the training rows

    bad = fe.Config(trainer=fe.TrainerSection(domain="wafer", batch_size=64), data=fe.DataSection(n=64),
                    run=RunSection(name="fe_small", storage_path=str(tmp_path / "runs"), num_workers=2))
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        fe.train(bad)
