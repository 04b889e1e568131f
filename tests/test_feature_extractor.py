"""Domain feature net, its weights files, the training loop (fake session and in-process train) and the export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fabdistill.config import ConfigError, load_config
from models.feature_extractor import DomainFeatureNet, build_feature_net, load_feature_net, save_feature_net
from trainers import feature_extractor as fe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
    x, y = fe.domain_tensors(fe.generate_tables("overlay", 96, seed=4242, size=32), "overlay")
    acc = fe.accuracy(net, x, y, "overlay")
    assert acc >= 0.8, f"committed overlay extractor: accuracy {acc:.3f} on fresh maps (chance 1/16)"
    assert meta["extra"]["heldout_accuracy"] >= 0.8
    assert meta["extra"]["command"].startswith("python -m trainers.feature_extractor --domain overlay --export")


def test_labelled_images_decode_ray_object_columns_and_drop_unlabelled_rows():
    from data.datasets import batch_to_tensors
    from data.wafer import generate_wafer

    table = generate_wafer(3, seed=0, size=16)
    maps = table["wafer_map"].combine_chunks().flatten().to_numpy().reshape(3, 16, 16).copy()
    base = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names if c not in ("wafer_map",)}
    base["label"] = np.array([2, -1, 5])
    flat = maps.reshape(3, -1)
    obj = np.empty(3, dtype=object)
    obj[:] = [row for row in flat]  # what Ray's numpy batches hold for fixed_size_list columns
    for column in (flat, obj):
        x, y = fe.labelled_images(batch_to_tensors({**base, "wafer_map": column}, "wafer"), "wafer")
        assert x.shape == (2, 1, 16, 16) and x.dtype == torch.float32
        assert y.tolist() == [2, 5]
        assert torch.equal(x[1, 0], torch.from_numpy(maps[2]).float())
    with pytest.raises(ValueError, match="lacks column 'wafer_map'"):
        batch_to_tensors(base, "wafer")


def test_export_trains_through_train_and_is_deterministic(tmp_path):
    """The committed-weights path is train(cfg) in-process (run.num_workers=0); the same seed gives the same file."""
    # wafer maps: every class appears in a small set (overlay equipment comes in lots of 25 wafers)
    small = {"data.n": 128, "data.n_val": 64, "trainer.epochs": 2, "trainer.batch_size": 32}
    extra_a = fe.export_feature_extractor("wafer", str(tmp_path / "a.pt"), seed=3, **small)
    extra_b = fe.export_feature_extractor("wafer", str(tmp_path / "b.pt"), seed=3, **small)
    net_a, meta_a = load_feature_net(tmp_path / "a.pt", "wafer")
    net_b, _ = load_feature_net(tmp_path / "b.pt", "wafer")
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert extra_a["heldout_accuracy"] == extra_b["heldout_accuracy"] > 2 / 9  # well above chance after 8 steps
    assert extra_a["n_val"] == 64 and extra_a["step"] == 2 * (128 // 32)
    assert "--set data.n=128" in meta_a["extra"]["command"]


def test_config_file_loads_and_rejects_bad_values():
    cfg = load_config(fe.Config, REPO / "configs" / "feature_extractor.yaml")
    assert cfg.trainer.domain == "overlay" and cfg.run.num_workers == 2
    with pytest.raises(ConfigError, match="trainer.domain"):
        load_config(fe.Config, None, ["trainer.domain=cifar"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(fe.Config, None, ["trainer.epoch=3"])


# --------------------------------------------------------------------------- the loop, driven by a fake session

class _FakeSession:
    rank, world_size, is_main, device = 0, 1, True, torch.device("cpu")

    def __init__(self, tables, restored=None):
        self.tables, self.restored, self.reports = tables, restored, []

    def prepare(self, model):
        return model

    def load_shard(self, name, kind):
        from data.datasets import table_to_tensors

        return table_to_tensors(self.tables[name], kind)

    def all_reduce_mean(self, values):
        return list(values)

    def restore(self):
        return self.restored

    def report(self, metrics, *, step, state=None, meta=None):
        import copy

        state = copy.deepcopy(state() if callable(state) else state)  # what would be written at this step
        self.reports.append({"step": step, "metrics": metrics, "state": state, "meta": meta})


def test_loop_checkpoints_reports_and_resumes(monkeypatch):
    from trainers.launch import TrainSession

    tables = {"train": fe.generate_tables("overlay", 64, seed=0, size=32),
              "val": fe.generate_tables("overlay", 16, seed=1, size=32)}
    config = {"domain": "overlay", "size": "S", "num_classes": 16, "epochs": 2, "batch_size": 16, "lr": 3e-3,
              "warmup_frac": 0.05, "weight_decay": 0.0, "checkpoint_every": 3, "steps_per_epoch": 4,
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

    # resume from the mid-epoch checkpoint at step 6 (epoch 1, 2 batches done): steps 7, 8 remain and end where
    # the uninterrupted run ended (the epoch's batch order comes from (seed, rank, epoch) only)
    ckpt = first.reports[2]
    second = _FakeSession(tables, restored=(ckpt["state"], {"step": 6, **ckpt["meta"]}))
    monkeypatch.setattr(TrainSession, "_current", second)
    fe.loop(config)
    assert [r["step"] for r in second.reports] == [8]
    assert second.reports[0]["meta"] == {"epoch": 1, "batch_in_epoch": 4, "epoch_done": True, "domain": "overlay"}
    for key, value in first.reports[-1]["state"]["model"].items():
        torch.testing.assert_close(second.reports[0]["state"]["model"][key], value, msg=key)

    # resuming a finished run trains nothing more
    done = first.reports[-1]
    third = _FakeSession(tables, restored=(done["state"], {"step": 8, **done["meta"]}))
    monkeypatch.setattr(TrainSession, "_current", third)
    fe.loop(config)
    assert third.reports == []


def test_train_in_process_generates_data_and_writes_weights(tmp_path):
    """train(cfg) end to end with run.num_workers=0: data, checkpoints, metrics and the calibrated weights file."""
    from trainers.launch import RunSection, read_metrics

    cfg = fe.Config(trainer=fe.TrainerSection(domain="wafer", epochs=1, batch_size=16, checkpoint_every=100),
                    data=fe.DataSection(n=64, n_val=16, size=32),
                    run=RunSection(name="fe_test", storage_path=str(tmp_path / "runs"), num_workers=0))
    outcome = fe.train(cfg)
    assert [r["step"] for r in read_metrics(outcome.run_dir)] == [64 // 16]
    assert 0.0 <= outcome.metrics["val_acc"] <= 1.0
    assert (Path(outcome.run_dir) / "data" / "val").is_dir() and Path(outcome.checkpoint_dir).is_dir()
    net, meta = load_feature_net(Path(outcome.run_dir) / "feature_extractor.pt", "wafer")
    assert meta["class_names"][0] == "Center" and meta["num_classes"] == 9 and float(net.feat_std.min()) > 0
    assert not torch.equal(net.feat_mean, torch.zeros_like(net.feat_mean))  # calibrated on the training rows
    assert 0.0 <= meta["extra"]["heldout_accuracy"] <= 1.0 and meta["extra"]["n_val"] == 16

    table = fe.METHOD.get("evaluate")({"model": outcome.run_dir}, fe.EvalSettings(n=32), str(tmp_path / "eval"))
    row = table.row("model")
    assert row["domain"] == "wafer" and row["n"] == 32 and 0.0 <= row["accuracy"] <= 1.0
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(table.report_path)
    assert [Path(p).name for p in pictures] == ["confusion_model.png", "examples_model.png", "training_curves.png",
                                                "accuracy_curves.png"]
    assert all(Path(p).stat().st_size > 0 for p in pictures)

    bad = fe.Config(trainer=fe.TrainerSection(domain="wafer", batch_size=64), data=fe.DataSection(n=64),
                    run=RunSection(name="fe_small", storage_path=str(tmp_path / "runs"), num_workers=2))
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        fe.train(bad)
