"""GPU readiness (issue 13, item 4): the run.* GPU knobs are validated config and safe on the CPU, and
benchmarks/gpu_check.py --smoke trains every registered method a few steps through the glue (~8 s on 2 cores)."""

import dataclasses

import pytest
import torch

from fabdistill.config import ConfigError, load_config
from trainers.launch import RunSection, TrainSession, autocast, to_device

# --------------------------------------------------------------------------- the knobs

def test_gpu_knobs_have_safe_defaults():
    run = RunSection()
    assert (run.precision, run.tf32, run.compile, run.pin_memory) == ("fp32", True, False, True)


@pytest.mark.parametrize("override, key", [("run.precision=fp8", "run.precision"),
                                           ("run.precision=16", "run.precision"),
                                           ("run.compile=maybe", "run.compile"),
                                           ("run.tf32=2", "run.tf32"),
                                           ("run.pin_memory=sometimes", "run.pin_memory")])
def test_bad_gpu_knob_values_are_refused_naming_the_key(override, key):
    from trainers.ikddit import Config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Config, "configs/ikddit_tiny.yaml", [override])


def test_every_method_config_takes_the_gpu_knobs():
    from fabdistill.methods import METHODS, get_method

    for name in METHODS:
        cfg = load_config(get_method(name).Config, None, ["run.precision=bf16", "run.compile=true",
                                                          "run.tf32=false", "run.pin_memory=false"])
        assert (cfg.run.precision, cfg.run.compile, cfg.run.tf32, cfg.run.pin_memory) == ("bf16", True, False, False)


def _session(tmp_path, **run) -> TrainSession:
    cfg = {"run": dataclasses.asdict(RunSection(storage_path=str(tmp_path), **run)), "run_dir": str(tmp_path)}
    return TrainSession(cfg, local=True)


def test_on_cpu_bf16_autocast_and_pinning_change_nothing(tmp_path):
    sess = _session(tmp_path, precision="bf16", pin_memory=True)
    assert sess.device.type == "cpu" and sess._tf32_before is None  # TF32 is set on CUDA only
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with sess.autocast():
        assert not torch.is_autocast_enabled("cpu")
        out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, layer(x))
    batch = {"x": x, "pair": (x, x[:1]), "n": 3}
    moved = sess.to_device(batch)
    assert moved["x"] is x and moved["pair"][0] is x and isinstance(moved["pair"], tuple) and moved["n"] == 3
    assert not moved["x"].is_pinned()
    with autocast(True, torch.device("cpu")):  # the helper DMD2's distill.bf16 goes through
        assert not torch.is_autocast_enabled("cpu")
    assert to_device(x, torch.device("cpu"), pin_memory=True) is x
    sess.close()


def test_prepare_compiles_in_place_only_when_asked(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(self))
    net = torch.nn.Linear(2, 2)
    assert _session(tmp_path / "a").prepare(net) is net and compiled == []
    prepared = _session(tmp_path / "b", compile=True).prepare(net)
    assert prepared is net and compiled == [net]  # the same module: state-dict keys and `.module` unchanged
    assert list(prepared.state_dict()) == ["weight", "bias"]


def test_peak_table_matches_device_names():
    from benchmarks.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", True) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "fp32", True) == 378.0  # TF32 tensor cores
    assert peak_tflops("NVIDIA H200", "fp32", False) == 67.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", False) == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16", True) is None


# --------------------------------------------------------------------------- the check itself

def test_gpu_check_smoke_trains_every_method(tmp_path, monkeypatch, capsys):
    import benchmarks.gpu_check as gpu_check
    from fabdistill.methods import METHODS

    def no_writes(*_a, **_kw):
        raise AssertionError("--smoke must not write benchmarks/results/")

    monkeypatch.setattr(gpu_check, "write_results", no_writes)
    result = gpu_check.main(["--smoke", "--storage", str(tmp_path), "--threads", "1"])
    rows = result["rows"]
    assert {r["method"] for r in rows} == set(METHODS)  # a new method needs its tiny plan in gpu_check.PLANS
    assert all(r["samples_per_s"] > 0 and r["device"] == "cpu" and r["steps"] >= 3 for r in rows)
    teacher = next(r for r in rows if (r["method"], r["phase"]) == ("ikddit", "teacher"))
    assert teacher["flops_per_step"] > 0 and teacher["model_tflops"] > 0 and teacher["mfu"] is None
    out = capsys.readouterr().out
    assert "| ikddit | teacher | cpu |" in out and "| n/a |" in out
    assert list(tmp_path.iterdir()) == []  # the run folders are removed
