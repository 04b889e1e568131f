"""benchmarks/train_scaling.py's steady-state arithmetic and trainers/profiling.py's all-reduce interval union,
against hand-computed cases (the benchmark itself runs outside the suite: it is a timing)."""

from __future__ import annotations

import pytest

from benchmarks.train_scaling import profile_means, steady_rate
from trainers.profiling import StepProfile, union_length


def test_steady_rate_skips_everything_before_the_first_report():
    rows = [{"step": 10, "elapsed_s": 30.0, "loss": 1.0},  # start-up is inside these 30 s
            {"step": 20, "elapsed_s": 32.0, "loss": 0.9},
            {"step": 30, "elapsed_s": 34.0, "loss": 0.8}]
    rate, step_s = steady_rate(rows, global_batch=64)
    assert rate == pytest.approx(64 * 20 / 4.0)  # 20 steps in 4 s
    assert step_s == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="fewer than 2"):
        steady_rate(rows[:1], 64)


def test_profile_means_drop_the_first_report_and_default_missing_sections_to_zero():
    rows = [{"prof_forward_ms": 100.0}, {"prof_forward_ms": 4.0, "prof_allreduce_ms": 1.0},
            {"prof_forward_ms": 6.0, "prof_allreduce_ms": 3.0}]
    means = profile_means(rows)
    assert means["forward"] == pytest.approx(5.0) and means["allreduce"] == pytest.approx(2.0)
    assert means["data"] == 0.0


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0.0
    assert union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)  # [0, 2] ∪ [3, 4]
    assert union_length([(0.0, 4.0), (1.0, 2.0)]) == pytest.approx(4.0)  # nested


def test_step_profile_pops_per_step_means_in_ms():
    import torch

    prof = StepProfile(torch.device("cpu"))
    prof._sums = {"forward": 0.5}  # 0.5 s over 10 steps
    prof._intervals = [(0.0, 0.2), (0.1, 0.3)]
    out = prof.pop(10)
    assert out["prof_forward_ms"] == pytest.approx(50.0)
    assert out["prof_allreduce_ms"] == pytest.approx(30.0) and out["prof_allreduce_calls"] == pytest.approx(0.2)
    assert prof.pop(1) == {}  # cleared


def test_the_allreduce_hook_registers_on_ddp_and_times_every_bucket(tmp_path):
    """A real DDP model (gloo, one rank, in a subprocess so this process keeps no process group): DDP checks a
    hook's annotations when it registers it, and the hook must keep the default all-reduce's gradients."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from trainers.profiling import StepProfile
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        ref = torch.nn.Linear(4, 2); ref.load_state_dict(net.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        prof = StepProfile(torch.device("cpu")); prof.attach(ddp)
        x = torch.randn(8, 4)
        ddp(x).square().sum().backward(); ref(x).square().sum().backward()
        assert torch.allclose(net.weight.grad, ref.weight.grad), "the hook changed the gradients"
        out = prof.pop(1)
        assert out["prof_allreduce_calls"] >= 1 and out["prof_allreduce_ms"] >= 0, out
        dist.destroy_process_group()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_growth_table_lists_tokens_and_sorts_by_map_then_batch():
    import argparse

    from benchmarks.train_scaling import growth_markdown

    rows = [{"map_size": 32, "batch": 256, "step_ms": 20.0, "samples_per_s": 12800.0},
            {"map_size": 16, "batch": 128, "step_ms": 5.0, "samples_per_s": 25600.0},
            {"map_size": 32, "batch": 128, "step_ms": 10.0, "samples_per_s": 12800.0}]
    lines = growth_markdown(rows, argparse.Namespace(size="tiny"))
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert table == ["| 16 | 16 | 128 | 5.0 | 25600.0 |", "| 32 | 64 | 128 | 10.0 | 12800.0 |",
                     "| 32 | 64 | 256 | 20.0 | 12800.0 |"]
