"""DMD2 end to end: the generator sampler of the EDM core, inference (seeded per request, batched = alone, role
checks), config checks, σ_data, the distillation loop's update schedule, sampling/evaluation through the method
interface and the apps, and a 2-worker Ray Train run of teacher and distillation with a crash and a resume.
(The loss formulas against hand-computed values: tests/test_dmd2_units.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fabdistill.config import ConfigError, load_config
from trainers.launch import read_metrics

SIZE = 16


def write_tiny_checkpoint(directory: str | Path, role: str = "generator", seed: int = 0, num_steps: int = 1,
                          weight_noise: float = 0.05) -> Path:
    """A tiny DMD2 checkpoint (16×16 wafer maps) written without training. A fresh EDM UNet's output conv is
    zero (D = c_skip·x, so one step from σ = 80 gives ~0 for every seed): weights are perturbed with seeded noise
    so that samples depend on seed and class while staying reproducible."""
    from data.schema import WAFER_CLASSES
    from fabdistill.checkpoints import save_state
    from models.edm_unet import build_edm_denoiser

    torch.manual_seed(seed)
    net = build_edm_denoiser("tiny", 1, SIZE, len(WAFER_CLASSES), sigma_data=0.58)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(weight_noise * torch.randn(p.shape, generator=gen))
    meta = {"method": "dmd2", "role": role, "net": net.meta(), "domain": "wafer", "class_names": list(WAFER_CLASSES),
            "sigma_data": 0.58, "step": 0}
    if role == "generator":
        meta.update(num_steps=num_steps, conditioning_sigma=80.0)
    save_state(str(directory), {role: net.state_dict()}, meta)
    return Path(directory)


@pytest.fixture(scope="module")
def generator_ckpt(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("dmd2") / "generator"))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("dmd2") / "teacher", role="teacher", seed=3))


# --------------------------------------------------------------------------- the EDM core's generator sampler

def test_generator_chain_one_step_is_g_at_sigma_max_and_few_step_renoises():
    from models.edm import edm_generator_sample, generator_sigmas

    calls = []

    def g(x, sigma):  # a denoiser that records its inputs: D(x; σ) = x / (1 + σ)
        calls.append((x.clone(), sigma.clone()))
        return x / (1 + sigma[:, None, None, None])

    z = torch.randn(3, 1, 4, 4)
    out = edm_generator_sample(g, z, generator_sigmas(1))
    assert torch.allclose(calls[0][0], 80.0 * z) and torch.allclose(calls[0][1], torch.full((3,), 80.0))
    assert torch.allclose(out, 80.0 * z / 81.0)
    calls.clear()
    fresh = torch.ones(3, 1, 4, 4)
    sig = generator_sigmas(2)  # t = 999, 499
    out = edm_generator_sample(g, z, sig, renoise=lambda i: fresh)
    x1 = 80.0 * z / 81.0 + float(sig[1]) * fresh  # x̂_0 renoised to σ_1
    assert torch.allclose(calls[1][0], x1, atol=1e-5)
    assert torch.allclose(out, x1 / (1 + float(sig[1])), atol=1e-5)
    assert generator_sigmas(4).shape == (4,) and float(generator_sigmas(4)[0]) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="renoise"):
        edm_generator_sample(g, z, sig)


# --------------------------------------------------------------------------- inference

def test_generator_requests_batched_equal_alone_and_seeded(generator_ckpt):
    from fabdistill.inference.dmd2 import DMD2Pipeline, wafer_valid

    pipe = DMD2Pipeline.from_checkpoint(generator_ckpt)
    for steps in (1, 3):
        batched = pipe.sample_many([0, 4, 7], [2, 3, 1], [11, 12, 13], steps=steps)
        alone = [pipe.sample(c, n, seed=s, steps=steps) for c, n, s in ((0, 2, 11), (4, 3, 12), (7, 1, 13))]
        for a, b in zip(batched, alone):
            np.testing.assert_array_equal(a, b)
    x = pipe.sample(2, 4, seed=5)
    assert x.shape == (4, 1, SIZE, SIZE) and set(np.unique(x)) <= {0.0, 1.0, 2.0}
    assert (x[:, 0][:, ~wafer_valid(SIZE)] == 0).all() and (x[:, 0][:, wafer_valid(SIZE)] >= 1).all()
    assert not np.array_equal(pipe.sample(2, 4, seed=6), x)  # the seed matters
    assert not np.array_equal(pipe.sample(3, 4, seed=5), x)  # so does the class


def test_pipeline_refuses_bad_steps_labels_and_roles(generator_ckpt, teacher_ckpt, tmp_path):
    from fabdistill.inference.dmd2 import DMD2Pipeline

    gen, teacher = DMD2Pipeline.from_checkpoint(generator_ckpt), DMD2Pipeline.from_checkpoint(teacher_ckpt)
    with pytest.raises(ValueError, match="steps must be in 1..4"):
        gen.sample(0, steps=5)
    with pytest.raises(ValueError, match="class labels must lie in"):
        gen.sample(9)
    with pytest.raises(ValueError, match="sampler"):
        gen.sample(0, sampler="heun")
    with pytest.raises(ValueError, match="odd"):
        teacher.sample(0, steps=4)  # Heun: 2k − 1 NFE
    assert teacher.sample(0, steps=4, sampler="euler").shape == (1, 1, SIZE, SIZE)
    assert gen.default_steps == 1 and teacher.default_steps == 35
    (tmp_path / "bad").mkdir()
    from fabdistill.checkpoints import save_state

    save_state(str(tmp_path / "bad"), {"x": torch.zeros(1)}, {"method": "ikddit", "role": "student"})
    with pytest.raises(ValueError, match="not a DMD2 checkpoint"):
        DMD2Pipeline.from_checkpoint(str(tmp_path / "bad"))


def test_teacher_one_nfe_euler_is_the_denoiser_at_sigma_max(teacher_ckpt):
    from fabdistill.inference.dmd2 import DMD2Pipeline, decode_samples

    pipe = DMD2Pipeline.from_checkpoint(teacher_ckpt)
    z = torch.randn((2, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = decode_samples(pipe.net(80.0 * z, torch.full((2,), 80.0), torch.tensor([1, 1])), "wafer")
    np.testing.assert_array_equal(pipe.sample(1, 2, seed=7, steps=1, sampler="euler"), expected)
    # Heun 35 NFE and Euler 35 NFE are different samplers from the same noise
    assert pipe.sample(1, 2, seed=7, steps=35).shape == (2, 1, SIZE, SIZE)


# --------------------------------------------------------------------------- config, data, schedule

def test_config_rejects_inconsistent_settings():
    from trainers.dmd2 import Config

    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        load_config(Config, "configs/dmd2_tiny.yaml", ["phase=distill"])
    with pytest.raises(ConfigError, match="held-out"):
        load_config(Config, "configs/dmd2_tiny.yaml", ["data.seed=9001"])
    with pytest.raises(ConfigError, match="min_step_percent"):
        load_config(Config, "configs/dmd2_tiny.yaml", ["distill.min_step_percent=0.9", "distill.max_step_percent=0.5"])
    with pytest.raises(ConfigError, match="num_steps"):
        load_config(Config, "configs/dmd2_tiny.yaml", ["distill.num_steps=5"])
    with pytest.raises(ConfigError, match="regression_weight"):
        load_config(Config, "configs/dmd2_tiny.yaml", ["distill.regression_weight=1", "distill.num_steps=2"])
    for path in ("configs/dmd2_tiny.yaml", "configs/dmd2_wafer.yaml", "configs/dmd2_sem.yaml"):
        load_config(Config, path)


def test_sigma_data_is_measured_from_the_encoded_data():
    from data.wafer import generate_wafer
    from trainers.dmd2.teacher import measure_sigma_data

    table = generate_wafer(64, seed=5, size=SIZE)
    maps = np.asarray(table.column("wafer_map").to_pylist(), dtype=np.float64) - 1.0  # wafer_pm1: x − 1
    assert measure_sigma_data(table, "wafer") == pytest.approx(float(torch.tensor(maps).std()), rel=1e-5)


def test_distill_loop_steps_the_generator_only_on_its_turns(tmp_path, monkeypatch):
    """Which optimiser steps at which iteration, observed in the real loop (ratio 3, 7 iterations)."""
    import trainers.dmd2.distill as distill
    from trainers.dmd2 import Config, train

    cfg = load_config(Config, "configs/dmd2_tiny.yaml", [
        f"run.storage_path={tmp_path}", "run.num_workers=0", "data.num_train=32", "teacher.steps=2",
        "teacher.batch_size=4", "distill.steps=7", "distill.batch_size=4", "distill.dfake_gen_update_ratio=3",
        "distill.log_every=7", "distill.checkpoint_every=7", "phase=teacher"])
    teacher = train(cfg).checkpoint_dir
    log: list[str] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        log.append("gen" if self is spy.gen else "fake")
        return real_step(self, *a, **kw)

    real_adamw = torch.optim.AdamW

    def make(params, **kw):  # the first AdamW built in the loop is the generator's (opt_g), the second opt_f
        opt = real_adamw(params, **kw)
        if not hasattr(spy, "gen"):
            spy.gen = opt
        return opt

    monkeypatch.setattr(distill.torch.optim, "AdamW", make)
    monkeypatch.setattr(real_adamw, "step", spy)
    import dataclasses

    train(dataclasses.replace(cfg, phase="distill", teacher_checkpoint=teacher))
    # iteration i: the generator first when i % 3 == 0, then the fake score network, every iteration
    assert log == ["gen", "fake", "fake", "fake", "gen", "fake", "fake", "fake", "gen", "fake"]
    (row,) = read_metrics(str(tmp_path / "dmd2-tiny-distill"))
    assert row["generator_updates"] == 3 and row["step"] == 7


def test_regression_option_makes_teacher_pairs_and_fits_them(tmp_path):
    """distill.regression_weight > 0: the loop reports loss_reg, which falls as G fits the teacher's pairs."""
    import dataclasses

    from trainers.dmd2 import Config, train

    cfg = load_config(Config, "configs/dmd2_tiny.yaml", [
        f"run.storage_path={tmp_path}", "run.num_workers=0", "data.num_train=32", "teacher.steps=2",
        "teacher.batch_size=4", "phase=teacher"])
    teacher = train(cfg).checkpoint_dir
    cfg = dataclasses.replace(cfg, phase="distill", teacher_checkpoint=teacher, distill=dataclasses.replace(
        cfg.distill, steps=40, batch_size=8, dfake_gen_update_ratio=1, regression_weight=10.0, regression_pairs=16,
        gen_lr=2e-3, log_every=10, checkpoint_every=40, warmup_steps=0))
    train(cfg)
    rows = read_metrics(str(tmp_path / "dmd2-tiny-distill"))
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(math.isfinite(r["loss_reg"]) for r in rows)
    assert rows[-1]["loss_reg"] < rows[0]["loss_reg"]


# --------------------------------------------------------------------------- through the method interface

def test_method_declaration_and_space():
    from fabdistill.inference.dmd2 import DMD2Pipeline, SampleSettings, sample_to_files
    from fabdistill.methods import get_method
    from trainers.dmd2.evaluate import EvalSettings

    method = get_method("dmd2")
    assert method.capabilities() == ["train", "sample", "evaluate", "sweep", "serve"]
    assert method.get("sample") is sample_to_files and method.get("load") == DMD2Pipeline.from_checkpoint
    assert method.SampleSettings is SampleSettings and method.EvalSettings is EvalSettings
    assert method.eval_roles == ("generator", "teacher") and method.students == ("dmd2",)
    space = method.get("sweep")
    assert space.path_of("ratio") == "distill.dfake_gen_update_ratio"
    assert space.path_of("disc_gan_weight") == "distill.guidance_cls_loss_weight"


def test_apps_sample_and_evaluate_write_parquet_pictures_and_a_floor_row(generator_ckpt, teacher_ckpt, tmp_path,
                                                                         capsys):
    from apps.evaluate import main as evaluate_main
    from apps.sample import main as sample_main
    from data.parquet_io import read_dataset
    from trainers.dmd2.evaluate import FLOOR_ROW, EvalSettings, evaluate

    sample_main(["dmd2", "--checkpoint", generator_ckpt, "--out", str(tmp_path / "s"), "--n", "3",
                 "--set", "classes=[1, 5]"])
    table = read_dataset(str(tmp_path / "s" / "samples"))
    assert table.num_rows == 6 and table.column("label").to_pylist() == [1, 1, 1, 5, 5, 5]
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    table = evaluate({"generator": generator_ckpt, "teacher": teacher_ckpt},
                     EvalSettings(n=24, teacher_nfe=3, baseline_nfe=(1, 2), generator_steps=(1, 2)),
                     out_dir=str(tmp_path / "eval"))
    names = [r["model"] for r in table.rows]
    assert names == [FLOOR_ROW, "teacher Heun 3 NFE", "teacher Euler 1 NFE", "teacher Euler 2 NFE", "DMD2 1-step",
                     "DMD2 2-step"]
    assert all(math.isfinite(r["fid"]) and 0 <= r["class_fidelity"] <= 1 for r in table.rows)
    assert table.row(FLOOR_ROW)["fid"] < table.row("DMD2 1-step")["fid"]  # random weights are far from real maps
    assert set(table.extras["targets"]) == {"DMD2 1-step", "DMD2 2-step"}
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(str(tmp_path / "eval" / "report.md"))
    assert [Path(p).name for p in pictures] == ["samples_real.png", "samples_teacher_heun_3_nfe.png",
                                                 "samples_teacher_euler_1_nfe.png", "samples_dmd2_1_step.png",
                                                 "samples_dmd2_2_step.png"]
    assert all(Path(p).stat().st_size > 0 for p in pictures)
    capsys.readouterr()
    evaluate_main(["dmd2", "--checkpoint", f"generator={generator_ckpt}", "--n", "16",
                   "--set", "auto_teacher=false"])
    assert FLOOR_ROW in capsys.readouterr().out


# --------------------------------------------------------------------------- Ray Train: 2 workers, crash, resume

def test_two_worker_teacher_and_distillation_with_crash_and_resume(ray_local, tmp_path):
    from fabdistill.inference.dmd2 import DMD2Pipeline
    from trainers.dmd2 import Config, train

    cfg = load_config(Config, "configs/dmd2_tiny.yaml", [
        f"run.storage_path={tmp_path}", "run.name=t", "data.num_train=64", "teacher.steps=4", "distill.steps=4",
        "teacher.checkpoint_every=2", "distill.checkpoint_every=2", "teacher.log_every=2", "distill.log_every=2",
        "teacher.batch_size=4", "distill.batch_size=4", "distill.gan=true", "run.crash_after_step=2",
        "run.max_failures=1"])
    outcome = train(cfg)
    assert set(outcome.phases) == {"teacher", "distill"}
    assert outcome.checkpoint_dir == outcome.phases["distill"].checkpoint_dir  # top level: the final phase
    for phase in ("teacher", "distill"):
        steps = [m["step"] for m in read_metrics(outcome.phases[phase].run_dir)]
        # a restart from scratch would have logged step 2 twice: the workers resumed from the step-2 checkpoint
        assert steps == [2, 4], (phase, steps)
        assert outcome.phases[phase].metrics["step"] == 4
    gen = DMD2Pipeline.from_checkpoint(outcome.checkpoint_dir)
    assert gen.role == "generator" and gen.meta["teacher_checkpoint"].startswith(str(tmp_path / "t-teacher"))
    assert gen.sample(3, 2, seed=1).shape == (2, 1, SIZE, SIZE)


def test_sem_teacher_and_generator_in_process_sample_by_defect_type(tmp_path):
    """The SEM domain end to end at tiny sizes: teacher on defect types, distillation with the GAN term, samples
    written in the SEM schema."""
    from data.parquet_io import read_dataset
    from fabdistill.inference.dmd2 import DMD2Pipeline, SampleSettings, sample_to_files
    from trainers.dmd2 import Config, train

    cfg = load_config(Config, "configs/dmd2_sem.yaml", [
        f"run.storage_path={tmp_path}", "run.num_workers=0", "data.num_train=32", "data.image_size=16",
        "model.size=tiny", "teacher.steps=2", "teacher.batch_size=4", "distill.steps=2", "distill.batch_size=4",
        "distill.gan=true"])
    outcome = train(cfg)
    pipe = DMD2Pipeline.from_checkpoint(outcome.checkpoint_dir)
    assert pipe.domain == "sem" and pipe.class_names == ("bridge", "break", "line_collapse", "particle")
    assert 0.0 < pipe.meta["sigma_data"] < 1.0  # measured from the encoded images, not EDM's default 0.5
    x = pipe.sample(3, 2, seed=4)
    assert x.shape == (2, 1, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    sample_to_files(outcome.checkpoint_dir, str(tmp_path / "s"), SampleSettings(n=2))
    table = read_dataset(str(tmp_path / "s" / "samples"))
    assert table.column("defect").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
