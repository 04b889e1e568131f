"""TensorBoard event files in the run folder hold what metrics.jsonl holds, also after a resume that replays
steps (TensorBoard keeps the latest value of each step; the replayed steps are purged)."""

from __future__ import annotations

import math
import shutil

import pytest

from fabdistill.config import ConfigError, load_config
from trainers.launch import read_metrics

try:  # torch-fidelity installs a top-level `tests` package: ours is reached through pytest's rootdir path
    import toy_method
except ImportError:  # pragma: no cover
    from tests import toy_method


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows it (EventAccumulator over every event file of the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _from_metrics(run_dir) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in read_metrics(str(run_dir)):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[row["step"]] = float(value)
    return out


def _assert_same(tb: dict, jsonl: dict) -> None:
    assert set(tb) == set(jsonl) and {"loss", "elapsed_s", "world_size", "resumed_from"} <= set(tb)
    for tag, points in jsonl.items():
        assert sorted(tb[tag]) == sorted(points), tag
        for step, value in points.items():  # event files store float32
            assert math.isclose(tb[tag][step], value, rel_tol=1e-6, abs_tol=1e-30), (tag, step)


def _train(tmp_path, *overrides):
    cfg = load_config(toy_method.Config, None, [f"run.storage_path={tmp_path}", "run.name=tb", "run.num_workers=0",
                                                 "trainer.steps=8", "trainer.checkpoint_every=4", *overrides])
    return toy_method.train(cfg)


def test_event_files_equal_metrics_jsonl_also_after_a_resume_that_replays_steps(tmp_path, one_torch_thread):
    run = tmp_path / "tb"
    _train(tmp_path)
    first = _scalars(run)
    _assert_same(first, _from_metrics(run))
    assert sorted(first["loss"]) == list(range(1, 9))

    # Lose the step-8 checkpoint: the rerun resumes from step 4 and replays 5..8 with another slope, so its
    # values differ from the first attempt's; metrics.jsonl drops the old rows, TensorBoard must too.
    shutil.rmtree(run / "checkpoint_step_0000008")
    _train(tmp_path, "slope=5")
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    jsonl = _from_metrics(run)
    assert [r["resumed_from"] for r in read_metrics(str(run))] == [0] * 4 + [4] * 4
    assert all(not math.isclose(jsonl["loss"][s], first["loss"][s], rel_tol=1e-3) for s in range(5, 9))
    _assert_same(_scalars(run), jsonl)


def test_tensorboard_knob_turns_event_files_off_and_is_validated(tmp_path, one_torch_thread):
    _train(tmp_path, "run.tensorboard=false")
    assert (tmp_path / "tb" / "metrics.jsonl").exists() and not list((tmp_path / "tb").glob("*tfevents*"))
    with pytest.raises(ConfigError, match="tensorboard"):
        load_config(toy_method.Config, None, ["run.tensorboard=sometimes"])
