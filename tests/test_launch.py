"""The shared Ray Train glue: 2-worker DDP, metrics JSONL, checkpoints, crash and resume.

FailureConfig restarts and the in-process path are in tests/test_method_interface.py."""

import sys

from ray import cloudpickle
import pytest
import torch

from trainers.launch import RunSection, launch, load_state, read_metrics, resolve_checkpoint, save_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def counting_loop(config: dict) -> None:
    """Fits y = 3x with DDP; checkpoints every `every` steps; resumes from the latest checkpoint."""
    from trainers.launch import TrainSession

    sess = TrainSession.current()
    model = sess.prepare(torch.nn.Linear(1, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        getattr(model, "module", model).load_state_dict(state["model"])
        start = meta["step"]
    for step in range(start + 1, config["steps"] + 1):
        x = torch.randn(16, 1)
        loss = ((model(x) - 3 * x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % config["every"] == 0:
            state = {"model": getattr(model, "module", model).state_dict()}
            sess.report({"loss": loss.item(), "world_size": sess.world_size, "resumed_from": start},
                        step=step, state=state)  # every rank asks; only rank 0 writes


def test_checkpoint_files_are_weights_only(tmp_path):
    save_state(tmp_path, {"w": torch.ones(2)}, {"step": 3})
    state, meta = load_state(tmp_path)
    assert meta["step"] == 3 and torch.equal(state["w"], torch.ones(2))
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        load_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(str(tmp_path / "missing"))


def test_two_workers_report_checkpoint_crash_and_resume(ray_local, tmp_path):
    run = RunSection(name="toy", storage_path=str(tmp_path), num_workers=2, crash_after_step=4, max_failures=0)
    outcome = launch(counting_loop, {"steps": 8, "every": 2}, run, raise_on_error=False)
    # the injected crash happened right after the checkpoint of step 4
    assert outcome.error is not None
    first = read_metrics(outcome.run_dir)
    assert [m["step"] for m in first] == [2, 4] and first[0]["world_size"] == 2

    # starting again with the same name resumes from step 4, not from scratch
    outcome = launch(counting_loop, {"steps": 8, "every": 2}, run)
    assert outcome.error is None
    metrics = read_metrics(outcome.run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert all(m["resumed_from"] == 4 for m in metrics[2:])
    assert outcome.metrics["step"] == 8
    state, meta = load_state(resolve_checkpoint(outcome.run_dir))
    assert meta["step"] == 8 and abs(state["model"]["weight"].item() - 3.0) < 0.1


def test_feature_extractor_method_runs_on_two_workers_and_resumes(ray_local, tmp_path):
    """A real small method (the domain feature extractor) through the glue: Ray Data shards, 2 workers, resume."""
    from fabdistill.config import load_config
    from trainers.feature_extractor import Config, train

    overrides = [f"run.storage_path={tmp_path}", "run.name=fe", "data.n=256", "data.n_val=64", "trainer.epochs=2",
                 "trainer.batch_size=32", "trainer.checkpoint_every=2", "run.crash_after_step=2"]
    cfg = load_config(Config, "configs/feature_extractor.yaml", overrides)
    with pytest.raises(RuntimeError, match="rerun the same command to resume"):
        train(cfg)
    first = [m["step"] for m in read_metrics(str(tmp_path / "fe"))]
    assert first and first[-1] == 2
    outcome = train(cfg)  # same name: picks up the step-2 checkpoint
    steps = [m["step"] for m in read_metrics(outcome.run_dir)]
    assert steps.count(2) == first.count(2), steps  # step 2 was not trained again
    assert steps[-1] > 2 and outcome.metrics["step"] == steps[-1]
