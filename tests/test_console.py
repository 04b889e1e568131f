"""The console: quiet by default (milestones and one progress bar per phase), Ray's output with --verbose, and
everything in <run folder>/console.log either way."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fabdistill import console
from trainers.launch import RunSection, progress_plan

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def bars_on(monkeypatch):
    """Progress output on (tests/conftest.py sets TQDM_DISABLE=1), quiet mode."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)


def _rows(steps, dt=0.5, loss=1.0):
    return [{"loss": loss / s, "step": s, "elapsed_s": 2.0 + dt * s} for s in steps]


# --------------------------------------------------------------------------- units

def test_progress_off_a_terminal_is_one_plain_line_per_tenth(bars_on, capsys):
    progress = console.PhaseProgress("run-teacher", total=40, samples_per_step=64, stream=io.StringIO())
    for row in _rows(range(2, 41, 2)):  # a report every 2 steps: 20 reports
        progress.update(row)
    progress.close()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 10, out  # 10 %, 20 % ... 100 %: not one per report
    # rank 0's clock: 2 steps/s (elapsed_s, not the driver's), × 64 samples a step; 36 steps left
    assert lines[0] == "[run-teacher]  10% step 4/40 | loss 0.25 | 128 samples/s | ETA 0:18"
    assert lines[-1].startswith("[run-teacher] 100% step 40/40") and "ETA 0:00" in lines[-1]


def test_progress_on_a_terminal_is_a_tqdm_bar_and_tqdm_disable_silences_both(bars_on, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    progress = console.PhaseProgress("run-student", total=10, initial=4, stream=tty)
    for row in _rows(range(6, 11, 2)):
        progress.update(row)
    progress.close()
    drawn = tty.getvalue()
    assert "\r" in drawn and "run-student 100%|" in drawn and "10/10" in drawn and "steps/s" in drawn
    assert capsys.readouterr().out == ""  # the bar is not printed as lines

    monkeypatch.setenv("TQDM_DISABLE", "1")
    for stream in (Tty(), io.StringIO()):
        progress = console.PhaseProgress("quiet", total=10, stream=stream)
        for row in _rows(range(1, 11)):
            progress.update(row)
        progress.close()
        assert stream.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_progress_plan_reads_each_methods_convention():
    run = RunSection(name="x-teacher", num_workers=2)
    ikddit = {"teacher": {"steps": 400, "batch_size": 32}, "student": {"steps": 300, "batch_size": 16}}
    assert progress_plan(ikddit, run) == (400, 64)
    assert progress_plan(ikddit, RunSection(name="x-student", num_workers=0)) == (300, 16)
    assert progress_plan(ikddit, RunSection(name="plain")) == (None, None)  # two phases, neither named
    assert progress_plan({"trainer": {"steps": 8, "batch_size": 4}, "slope": 3.0}, RunSection(name="t")) == (8, 8)
    assert progress_plan({"epochs": 3, "steps_per_epoch": 50, "batch_size": 8}, RunSection(name="c")) == (150, 16)
    sdd = {"student": {"epochs": 4, "batch_size": 8}, "steps_per_epoch": 10}
    assert progress_plan(sdd, RunSection(name="s-student", num_workers=1)) == (40, 8)
    kdcddm = {"section": {"steps": 150, "batch_size": 8}, "inference": {"steps": 50}}
    assert progress_plan(kdcddm, RunSection(name="k-vae", num_workers=1)) == (150, 8)


def test_log_to_copies_printed_lines_and_restores_the_streams(tmp_path, capsys):
    before = sys.stdout
    log = tmp_path / "run" / "console.log"
    with console.log_to(str(log)):
        print("\x1b[36mmilestone\x1b[0m one")
        sys.stderr.write("bar 10%\rbar 50%\rbar 100%\n")
        console.log_only("for the log only")
        with console.log_to(str(log)):  # the same file twice: written once
            print("nested")
    print("after")
    assert sys.stdout is before
    assert log.read_text().splitlines() == ["milestone one", "bar 100%", "for the log only", "nested"]
    out = capsys.readouterr()
    assert "for the log only" not in out.out and "after" in out.out


# --------------------------------------------------------------------------- through python -m apps.train

def _train(tmp_path, *extra, verbose=False, bars=True, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "FABDISTILL_METHODS": "toy_method:TOY",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(console.VERBOSE_ENV, None)
    env.pop("RAY_ADDRESS", None)
    if bars:
        env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-m", "apps.train", "toy", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=t",
           "--set", "trainer.log_every=2", "--set", "trainer.checkpoint_every=4", *extra]
    done = subprocess.run(cmd + (["--verbose"] if verbose else []), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def _assert_quiet(out: str, run: Path) -> list[str]:
    lines = out.splitlines()
    assert "\r" not in out  # not a terminal: progress as plain lines
    assert "TrainingReport(" not in out and "(RayTrainWorker" not in out and "(TrainController" not in out
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, repeated
    assert f"checkpoint saved: step 4 -> {run}/checkpoint_step_0000004" in out
    assert f"run {run}, checkpoint {run}/model" in out
    assert any(line.startswith("[t] 100% step 8/8 | loss ") for line in lines), out
    return lines


def test_in_process_training_prints_the_same_short_console(tmp_path):
    out = _train(tmp_path, "--set", "run.num_workers=0", "--set", "trainer.steps=8")
    run = tmp_path / "t"
    lines = _assert_quiet(out, run)
    assert len(lines) <= 12, out
    assert "loss=" not in out  # the per-report lines are in the log, not on the console
    log = (run / "console.log").read_text()
    assert "[t] loss=" in log and "checkpoint saved: step 8" in log

    verbose = _train(tmp_path, "--set", "run.num_workers=0", "--set", "trainer.steps=12", verbose=True)
    assert f"[t] resuming from step 8 ({run}/checkpoint_step_0000008)" in verbose
    assert "[t] loss=" in verbose and "step=10 " in verbose and len(verbose.splitlines()) > len(lines)


@pytest.mark.slow
def test_ray_training_console_is_short_and_verbose_brings_rays_logs_back(tmp_path):
    """One Ray Train worker: Ray's chatter stays in console.log unless --verbose, and no line comes twice."""
    run = tmp_path / "t"
    out = _train(tmp_path, "--set", "run.num_workers=1", "--set", "trainer.steps=8")
    lines = _assert_quiet(out, run)
    assert len(lines) <= 20, out
    assert "[ray] started a local Ray" in out and "loss=" not in out
    log = (run / "console.log").read_text()
    assert "TrainingReport(" in log and "(RayTrainWorker pid=" in log and "[t] loss=" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert list(run.glob("events.out.tfevents.*"))  # rank 0 wrote TensorBoard too (values: test_tensorboard.py)

    # the same command again, verbose: it resumes at its last step, so the run is only Ray starting and stopping
    verbose = _train(tmp_path, "--set", "run.num_workers=1", "--set", "trainer.steps=8", verbose=True, bars=False)
    assert "[t] resuming from step 8" in verbose and "[ray] started" not in verbose
    assert "(TrainController pid=" in verbose and "Started training worker group" in verbose
    restored = [line for line in verbose.splitlines() if "rank 0 restored the checkpoint of step 8" in line]
    assert len(restored) == 1, restored  # a worker's print() arrived twice before RAY_TRAIN_ENABLE_PRINT_PATCH=0
