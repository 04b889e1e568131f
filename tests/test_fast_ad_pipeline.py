"""Fast-AD's whole chain through the command-line entry point, on tiny sizes: the teacher classifier and the DDPM
prior each train on 2 Ray Train workers (DDP over gloo), then `apps.train fast_ad` distils a student from them on
the actor loop, and the student checkpoint loads as a classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SIZE = 16


@pytest.fixture(scope="module")
def chain(ray_local, tmp_path_factory):
    from apps.train import main

    root = tmp_path_factory.mktemp("fast_ad_chain")
    storage = str(root / "runs")
    main(["classifier", "--config", "configs/classifier_wafer.yaml", "--set", f"run.storage_path={storage}",
          "--set", "run.name=teacher", "--set", "model.arch=tiny", "--set", f"data.size={SIZE}",
          "--set", "data.n_train=256", "--set", "data.n_eval=64", "--set", "optim.epochs=2",
          "--set", "optim.batch_size=32", "--set", "optim.warmup_steps=2"])
    main(["ddpm", "--config", "configs/ddpm_wafer.yaml", "--set", f"run.storage_path={storage}",
          "--set", "run.name=prior", "--set", f"data.size={SIZE}", "--set", "data.n_train=128",
          "--set", "optim.steps=4", "--set", "optim.batch_size=16", "--set", "optim.log_every=2",
          "--set", "optim.checkpoint_every=2", "--set", "optim.warmup_steps=1", "--set", "optim.sample_count=4"])
    main(["fast_ad", "--config", "configs/fast_ad.yaml", "--set", f"run.storage_path={storage}",
          "--set", "run.name=student", "--set", f"models.teacher_checkpoint={storage}/teacher",
          "--set", f"models.diffusion_checkpoint={storage}/prior", "--set", "models.student_arch=tiny",
          "--set", "cadr.ddim_steps=3", "--set", "synthesis.batch_size=8", "--set", "buffer.size=64",
          "--set", "student.steps=30", "--set", "student.batch_size=16", "--set", "student.warmup_steps=2",
          "--set", "student.checkpoint_every=10", "--set", f"eval.size={SIZE}", "--set", "eval.n_heldout=64",
          "--set", "eval.every=15", "--set", "loop.log_every_s=2"])
    return Path(storage)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_teacher_trains_on_two_workers_and_exports_a_classifier(chain):
    from trainers.classifier import load_classifier

    rows = _metrics(chain / "teacher")
    assert rows[-1]["epoch"] == 1 and 0.0 <= rows[-1]["heldout_top1"] <= 1.0
    assert sorted(p.name for p in (chain / "teacher").glob("checkpoint_step_*"))  # Ray Train checkpoints
    model, meta = load_classifier(str(chain / "teacher" / "model"))
    assert meta["arch"] == "tiny" and meta["num_classes"] == 9 and meta["encoding"] == "wafer_pm1"


def test_prior_trains_on_unlabelled_maps_and_writes_samples(chain):
    import pyarrow.parquet as pq

    from trainers.ddpm import load_ddpm

    rows = _metrics(chain / "prior")
    assert rows[-1]["step"] == 4 and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
    labels = pq.read_table(chain / "prior" / "data" / "train").column("label").to_pylist()
    assert set(labels) == {-1}  # the prior never sees a label
    unet, diffusion, _ = load_ddpm(str(chain / "prior" / "model"))
    assert diffusion.num_timesteps == 1000 and (chain / "prior" / "samples.png").stat().st_size > 0


def test_apps_train_fast_ad_distils_a_loadable_student(chain):
    from trainers.classifier import load_classifier

    run = chain / "student"
    rows = _metrics(run)
    assert rows[-1]["final"] and rows[-1]["student_step"] == 30
    assert any("heldout_top1" in r and r["heldout_top1"] is not None for r in rows)
    model, meta = load_classifier(str(run / "model"))
    assert meta["method"] == "fast_ad" and meta["step"] == 30 and meta["arch"] == "tiny"
    assert (run / "config.yaml").is_file()
