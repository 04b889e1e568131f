"""Ray Tune sweeps: axes and tables offline, then small sweeps on local Ray (grid, interrupt + resume, ASHA)."""

import math
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from fabdistill.config import ConfigError, from_dict, load_config
from tune.launcher import SweepConfig, run_sweep
from tune.report import STATUS_FINISHED, STATUS_STOPPED, STATUS_UNFINISHED, grid_table, paper_table
from tune.spaces import ScoreSettings, get_space, parse_axis, parse_space_arg, validate_space

# Tiny trials: 1 worker at 0.5 CPU, a few steps, FID-32 with 3 DDIM steps. Seconds of compute each; most of a
# trial's time is Ray Train's start-up.
TINY = ["data.num_train=64", "teacher.steps=4", "teacher.batch_size=16", "teacher.log_every=2",
        "teacher.checkpoint_every=4", "student.batch_size=16", "student.log_every=2", "run.num_workers=1",
        "run.cpus_per_worker=0.5"]
SCORE = {"n": 32, "steps": 3, "batch_size": 32}


# --------------------------------------------------------------------------- offline

def test_axes_parse_lists_and_distributions():
    name, axis = parse_space_arg("mask_ratio=0,0.25,0.5,0.7")
    assert name == "mask_ratio" and axis.values == (0, 0.25, 0.5, 0.7) and not axis.is_distribution
    axis = parse_axis("lr", "loguniform:1e-5:1e-3")
    assert axis.kind == "loguniform" and axis.low == 1e-5 and axis.high == 1e-3
    assert parse_axis("lambda1", [0.5, 1]).values == (0.5, 1)
    with pytest.raises(ConfigError, match="LOW must be below HIGH"):
        parse_axis("lr", "uniform:1:0.5")
    with pytest.raises(ConfigError, match="repeated"):
        parse_axis("lambda1", "1,1")
    with pytest.raises(ConfigError, match="expected KNOB="):
        parse_space_arg("mask_ratio")


def test_space_values_are_validated_before_any_compute():
    space = get_space("ikddit")
    assert space.path_of("mask_ratio") == "student.mask_ratio" and space.path_of("student.ema_decay")
    base = {"phase": "student", "teacher_checkpoint": "/t"}
    validate_space(space, base, {"mask_ratio": parse_axis("mask_ratio", [0, 0.5])})
    with pytest.raises(ConfigError, match="out of range"):
        validate_space(space, base, {"mask_ratio": parse_axis("mask_ratio", [0.5, 1.0])})  # must be < 1
    with pytest.raises(ConfigError, match="unknown knob"):
        space.path_of("mask_rato")
    with pytest.raises(ConfigError, match="not a config knob"):
        space.path_of("student.nope")


def test_tables_have_the_papers_shape():
    space = get_space("ikddit")
    rows = [{"mask_ratio": m, "lambda1": l1, "status": STATUS_FINISHED, "steps": 10, "fid": f}
            for (m, l1), f in zip([(0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 1.0)], [30.0, 28.0, 25.0, 24.5])]
    rows.append({"mask_ratio": 0.7, "lambda1": 0.5, "status": STATUS_STOPPED, "steps": 4, "fid": math.nan})
    table = paper_table(rows[:1] + rows[2:3] + rows[4:], "mask_ratio", space, ScoreSettings(n=500)).splitlines()
    assert table[0] == "| Mask Ratio | FID-500 |"
    assert table[2:] == ["| 0% | 30.00 |", "| 50% | 25.00 |", "| 70% | stopped at step 4 |"]
    grid = grid_table(rows, "mask_ratio", "lambda1", space, ScoreSettings(n=64)).splitlines()
    assert grid[0] == "| Mask Ratio \\ λ1 (FID-64) | 0.5 | 1 |"
    assert grid[2:] == ["| 0% | 30.00 | 28.00 |", "| 50% | 25.00 | 24.50 |", "| 70% | stopped at step 4 | — |"]


def test_tables_end_with_the_measured_floor():
    from tune.report import reference_table

    space = get_space("ikddit")
    rows = [{"mask_ratio": m, "status": STATUS_FINISHED, "steps": 10, "fid": f, "floor_fid": 0.123}
            for m, f in [(0.0, 3.0), (0.5, 2.5)]]
    rows.append({"mask_ratio": 0.7, "status": STATUS_STOPPED, "steps": 4, "fid": math.nan, "floor_fid": math.nan})
    table = paper_table(rows, "mask_ratio", space, ScoreSettings(n=1000)).splitlines()
    assert table[-1] == "| real floor (context-matched) | 0.12 |"
    ref = reference_table(rows, "mask_ratio", space, ScoreSettings(n=1000)).splitlines()
    assert ref[2] == "| 0% | 3.00 | 27.46 |" and ref[-1] == "| real floor (context-matched) | 0.12 | — |"


def test_cli_dry_run_prints_the_grid(capsys):
    from apps.sweep import main

    main(["ikddit", "--config", "configs/ikddit_tiny.yaml", "--space", "mask_ratio=0,0.5",
          "--space", "lambda1=0.5,1,2", "--dry-run"])
    out = capsys.readouterr().out
    assert "# 6 grid points" in out and "mask_ratio=0.5, lambda1=2" in out
    with pytest.raises(SystemExit):  # a distribution without --trials
        main(["ikddit", "--space", "lr=loguniform:1e-4:1e-3", "--dry-run"])
    assert "needs --trials" in capsys.readouterr().err


# --------------------------------------------------------------------------- on local Ray

@pytest.fixture(scope="module")
def shared(ray_local, tmp_path_factory):
    """Training set and teacher, made once for every sweep here (what a sweep's prepare step does)."""
    from trainers.ikddit import Config

    folder = str(tmp_path_factory.mktemp("shared"))
    cfg = get_space("ikddit").prepare(load_config(Config, "configs/ikddit_tiny.yaml", TINY), folder)
    return [f"teacher_checkpoint={cfg.teacher_checkpoint}", f"data.train_uri={cfg.data.train_uri}"]


def make_sweep(shared, tmp_path, name, space, student, **kwargs) -> SweepConfig:
    return from_dict(SweepConfig, {
        "method": "ikddit", "config": "configs/ikddit_tiny.yaml", "overrides": TINY + shared + student,
        "space": space, "name": name, "storage": str(tmp_path), "score": SCORE, **kwargs})


def test_grid_2x2_reports_every_trial_and_writes_a_reloadable_best_config(shared, tmp_path):
    from trainers.ikddit import Config

    sweep = make_sweep(shared, tmp_path, "grid", {"mask_ratio": [0.25, 0.5], "lambda1": [0.5, 1.0]},
                       ["student.steps=4", "student.checkpoint_every=4"], max_concurrent=4)
    out = run_sweep(sweep)
    assert out.complete and len(out.rows) == 4
    assert {(r["mask_ratio"], r["lambda1"]) for r in out.rows} == {(0.25, 0.5), (0.25, 1.0), (0.5, 0.5), (0.5, 1.0)}
    for r in out.rows:
        assert r["status"] == STATUS_FINISHED and math.isfinite(r["fid"]) and r["steps"] == 4
        # each trial trained in its own run folder named after its trial id, with a servable checkpoint
        assert Path(r["run_dir"]).name == f"{r['trial_id']}-student"
        assert (Path(r["checkpoint_dir"]) / "state.pt").is_file()
        trial_cfg = load_config(Config, Path(r["run_dir"]) / "config.yaml")
        assert (trial_cfg.student.mask_ratio, trial_cfg.student.lambda1) == (r["mask_ratio"], r["lambda1"])

    import pandas as pd

    assert len(pd.read_csv(out.files["results_csv"])) == 4 and len(pd.read_parquet(out.files["results_parquet"])) == 4
    md = Path(out.files["results_md"]).read_text()
    assert "| Mask Ratio \\ λ1 (FID-32) | 0.5 | 1 |" in md
    assert sum(line.startswith(f"| {r['trial_id']} |") for r in out.rows for line in md.splitlines()) == 4
    for knob in ("mask_ratio", "lambda1"):
        assert Image.open(out.files[f"plot_{knob}"]).size[0] > 100

    best = load_config(Config, out.files["best_config"])
    assert best.phase == "student" and best.teacher_checkpoint == shared[0].split("=", 1)[1]
    assert (best.student.mask_ratio, best.student.lambda1) == (out.best["mask_ratio"], out.best["lambda1"])
    assert out.best["fid"] == min(r["fid"] for r in out.rows)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(shared, tmp_path):
    from ray import tune as ray_tune

    marker = tmp_path / "interrupted"

    class InterruptOnce(ray_tune.Callback):
        """Stop the driver (as Ctrl-C would) once the first trial finished and the second reported a checkpointed
        step. Tune restores its callbacks on resume, hence the marker file: it fires once."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            done = [t for t in trials if t.status == "TERMINATED"]
            if done and trial not in done and result.get("step", 0) >= 2 and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: save state, stop trials, return

    sweep = make_sweep(shared, tmp_path, "resume", {"mask_ratio": [0.25, 0.5]},
                       ["student.steps=6", "student.checkpoint_every=2"], max_concurrent=1)
    first = run_sweep(sweep, callbacks=[InterruptOnce()])
    assert marker.exists() and not first.complete
    done, cut = first.rows
    assert done["status"] == STATUS_FINISHED and cut["status"] == STATUS_UNFINISHED
    done_state = Path(done["checkpoint_dir"]) / "state.pt"
    done_mtime, done_metrics = done_state.stat().st_mtime_ns, (Path(done["run_dir"]) / "metrics.jsonl").read_text()
    cut_run = tmp_path / "resume" / "trials" / f"{cut['trial_id']}-student"
    assert (cut_run / "metrics.jsonl").is_file()

    second = run_sweep(sweep, resume=True)
    assert second.complete and [r["status"] for r in second.rows] == [STATUS_FINISHED, STATUS_FINISHED]
    assert [r["trial_id"] for r in second.rows] == [done["trial_id"], cut["trial_id"]]
    # the finished trial was not retrained
    assert done_state.stat().st_mtime_ns == done_mtime
    assert (Path(done["run_dir"]) / "metrics.jsonl").read_text() == done_metrics
    # the interrupted one resumed its own run from a checkpoint (step 2 was checkpointed before the interrupt,
    # so it is never trained twice), and finished
    import json

    steps = [json.loads(line)["step"] for line in (cut_run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(2) == 1 and steps[-1] == 6 and set(steps) == {2, 4, 6} and second.rows[1]["steps"] == 6


def test_asha_stops_a_diverging_trial_early(shared, tmp_path):
    # lr = 1 (the knob's upper bound) throws the student far off after one Adam step; lr 3e-4 trains normally.
    # One trial at a time, the good one first: the bad one then meets its record at the first rung.
    sweep = make_sweep(shared, tmp_path, "asha", {"lr": [3e-4, 1.0]}, ["student.steps=8",
                       "student.checkpoint_every=8"], scheduler="asha", max_concurrent=1,
                       asha={"max_t": 8, "grace_period": 2})
    out = run_sweep(sweep)
    good, bad = out.rows
    assert good["lr"] == 3e-4 and good["status"] == STATUS_FINISHED and good["steps"] == 8
    assert bad["lr"] == 1.0 and bad["status"] == STATUS_STOPPED and bad["steps"] < 8
    assert out.best["trial_id"] == good["trial_id"]
    assert "stopped at step" in Path(out.files["results_md"]).read_text()
