"""IKDDiT: Eq. 8 loss terms against hand-computed cases, the adversarial pair, the pipeline's one sampling loop
(solo = batched), sampling to files, the evaluation table with its measured floor, and a 2-worker Ray Train run."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fabdistill.checkpoints import save_state
from fabdistill.config import from_dict, load_config
from fabdistill.inference.ikddit import (IKDDiTPipeline, SampleSettings, build_networks, default_mask_ratio,
                                         row_seeds, sample_to_files)
from trainers.ikddit import (Config, ModelSection, adversarial_loss, discriminator_loss, dsm_loss, infonce_loss,
                             mae_loss, token_mask_to_pixels)
from trainers.launch import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ikddit_fixture import equipment_logs, write_tiny_student  # noqa: E402


def test_dsm_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    assert dsm_loss(pred, target).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    weight = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # only the first row counts
    assert dsm_loss(pred, target, weight).item() == pytest.approx(0.5)


def test_mae_loss_only_on_masked_pixels():
    student = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    masked = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert mae_loss(student, teacher, masked).item() == pytest.approx((1 + 2) / 2)


def test_discriminator_and_adversarial_losses_hand_computed():
    real, fake = torch.tensor([0.0]), torch.tensor([0.0])
    assert discriminator_loss(real, fake).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert adversarial_loss(torch.tensor([-1.0])).item() == pytest.approx(math.log1p(math.exp(1.0)), rel=1e-6)


def test_discriminator_and_student_pull_in_opposite_directions():
    fake = torch.tensor([0.3], requires_grad=True)
    (g_disc,) = torch.autograd.grad(discriminator_loss(torch.tensor([0.3]), fake), fake)
    fake2 = torch.tensor([0.3], requires_grad=True)
    (g_student,) = torch.autograd.grad(adversarial_loss(fake2), fake2)
    assert g_disc.item() > 0 > g_student.item()  # D lowers the student's logit, the student raises it


def test_infonce_hand_computed():
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: identical to z_a
    t = 0.5
    # each row: logits [1/t, 0] -> CE = log(1 + e^{-2})
    assert infonce_loss(z_a, z_b, t).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    swapped = infonce_loss(z_a, z_b.flip(0), t).item()
    assert swapped == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6) and swapped > infonce_loss(z_a, z_b, t)


def test_token_mask_to_pixels():
    mask = torch.tensor([[True, False, False, True]])  # 2x2 grid of 2x2 patches
    pixels = token_mask_to_pixels(mask, patch_size=2, channels=2, height=4, width=4)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert pixels.shape == (1, 1, 4, 4) and torch.equal(pixels[0, 0], expected)


def test_config_rejects_bad_mask_ratio(tmp_path):
    from fabdistill.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("student: {mask_ratio: 1.2}\n")
    with pytest.raises(ConfigError, match=r"student.mask_ratio.*out of range"):
        load_config(Config, path)
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        load_config(Config, overrides=["phase=student"])
    with pytest.raises(ConfigError, match="held-out"):
        load_config(Config, overrides=["data.seed=90001"])  # data/seeds.OVERLAY_HELD_OUT


def _tiny_student_checkpoint(path) -> None:
    model = dataclasses.asdict(ModelSection(size="tiny"))
    torch.manual_seed(0)
    nets = build_networks(model, 32)
    save_state(path, {"student": nets["student"].state_dict(), "embedding": nets["embedding"].state_dict()},
               {"method": "ikddit", "role": "student", "model": model, "map_size": 32, "scale_nm": 5.0,
                "mask_ratio": 0.5, "step": 0})


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    """A tiny student with perturbed weights (maps depend on seed, mask and condition), T = 20 for fast DDPM."""
    return str(write_tiny_student(tmp_path_factory.mktemp("ikddit") / "student", num_timesteps=20))


def test_pipeline_is_deterministic_under_a_seed_and_validates(tmp_path):
    _tiny_student_checkpoint(tmp_path)
    pipe = IKDDiTPipeline.from_checkpoint(str(tmp_path))
    log, ids = torch.randn(3, 128), torch.tensor([0, 5, 999])
    a = pipe.sample(log, ids, steps=4, mask_ratio=0.5, seed=7)
    b = pipe.sample(log, ids, steps=4, mask_ratio=0.5, seed=7)
    c = pipe.sample(log, ids, steps=4, mask_ratio=0.5, seed=8)
    assert a.shape == (3, 2, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, :, 0, 0] == 0)  # off-wafer corner
    with pytest.raises(ValueError, match="equipment_log"):
        pipe.sample(torch.randn(3, 64), ids, steps=2)
    with pytest.raises(ValueError, match="mask_ratio"):
        pipe.sample(log, ids, steps=2, mask_ratio=1.0)
    with pytest.raises(ValueError, match="equipment_id"):
        pipe.sample(log, torch.tensor([0, 5, 1000]), steps=2)


def test_from_checkpoint_builds_only_the_networks_it_runs(student, monkeypatch):
    import fabdistill.inference.ikddit as inference

    built = []
    real_build = inference.build_network

    def counting(name, *args, **kwargs):
        built.append(name)
        return real_build(name, *args, **kwargs)

    monkeypatch.setattr(inference, "build_network", counting)
    pipe = IKDDiTPipeline.from_checkpoint(student)
    assert sorted(built) == ["embedding", "student"] and pipe.role == "student"


def test_default_mask_ratio_is_the_students_training_ratio_and_zero_for_a_teacher():
    assert default_mask_ratio({"role": "student", "mask_ratio": 0.3}) == 0.3
    assert default_mask_ratio({"role": "teacher", "mask_ratio": 0.3}) == 0.0


def test_sample_many_equals_each_request_sampled_alone(student):
    pipe = IKDDiTPipeline.from_checkpoint(student)
    log, ids = equipment_logs(3)
    sizes, seeds = [1, 3, 2], [11, 12, 13]
    per_request = pipe.sample_many(log, ids, sizes, seeds, steps=4, mask_ratio=0.5)
    per_map = pipe.sample_many(np.repeat(log, sizes, 0), np.repeat(ids, sizes), sizes, seeds, steps=4, mask_ratio=0.5)
    for i, (n, seed) in enumerate(zip(sizes, seeds)):
        alone = pipe.sample(np.repeat(log[i:i + 1], n, 0), np.repeat(ids[i:i + 1], n), steps=4, mask_ratio=0.5,
                            seed=seed).numpy()
        assert per_request[i].shape == (n, 2, 32, 32) and np.array_equal(per_request[i], per_map[i])
        np.testing.assert_allclose(per_request[i], alone, rtol=0, atol=1e-4)
    # the masks follow the ratio and the seed: another ratio or another seed gives other maps
    other_ratio = pipe.sample_many(log, ids, sizes, seeds, steps=4, mask_ratio=0.25)
    assert not np.allclose(other_ratio[1], per_request[1], atol=1e-3)
    with pytest.raises(ValueError, match="one seed per request"):
        pipe.sample_many(log, ids, sizes, seeds[:2], steps=4)


def test_sample_to_files_honours_the_mask_ratio_with_ddpm(student, tmp_path):
    from data.parquet_io import from_fixed_list, read_dataset
    from data.seeds import OVERLAY_CONDITIONS

    pipe = IKDDiTPipeline.from_checkpoint(student)
    settings = from_dict(SampleSettings, {"n": 3, "sampler": "ddpm", "mask_ratio": 0.25, "seed": 4})
    message = sample_to_files(student, str(tmp_path / "out"), settings)
    assert "wrote 3 maps" in message and (tmp_path / "out" / "samples.png").is_file()
    maps = from_fixed_list(read_dataset(str(tmp_path / "out" / "samples")).column("overlay"), (2, 32, 32))
    log, ids = equipment_logs(3, seed=OVERLAY_CONDITIONS)
    seeds = row_seeds(4, 3)
    for ratio, same in ((0.25, True), (0.5, False)):  # 0.5 is the checkpoint's default: it must not be used
        ref = np.concatenate([pipe.sample(log[i:i + 1], ids[i:i + 1], sampler="ddpm", mask_ratio=ratio,
                                          seed=seeds[i]).numpy() for i in range(3)])
        assert np.allclose(maps, ref, rtol=0, atol=1e-4) == same, ratio


def test_evaluate_prints_a_measured_context_matched_floor(student, tmp_path):
    from trainers.ikddit_eval import FLOOR_ROW, EvalSettings, evaluate

    table = evaluate({"student": student}, from_dict(EvalSettings, {"n": 32, "steps": 2, "batch_size": 16}),
                     str(tmp_path / "eval"))
    assert [r["model"] for r in table.rows] == [FLOOR_ROW, "student"]
    floor, model = table.row(FLOOR_ROW), table.row("student")
    assert math.isfinite(floor["fid"]) and floor["fid"] > 0 and floor["kid_mean"] is not None
    assert floor["fid"] < model["fid"]  # untrained weights are far from real maps of the same contexts
    assert FLOOR_ROW in table.markdown() and "FID-32" in table.markdown()
    assert (tmp_path / "eval" / "report.md").read_text().count(FLOOR_ROW) >= 1
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(str(tmp_path / "eval" / "report.md"))
    assert [Path(p).name for p in pictures] == ["samples.png", "samples_quiver.png"]
    assert all(Path(p).stat().st_size > 0 for p in pictures)
    with pytest.raises(ValueError, match="student and/or a teacher"):
        evaluate({}, EvalSettings(n=8))
    with pytest.raises(ValueError, match="is a student checkpoint"):
        evaluate({"teacher": student}, EvalSettings(n=8))


def test_method_declaration():
    from fabdistill.methods import get_method
    from trainers.ikddit_eval import EvalSettings

    method = get_method("ikddit")
    assert method.capabilities() == ["train", "sample", "evaluate", "sweep", "serve"]
    assert method.get("sample") is sample_to_files and method.get("load") == IKDDiTPipeline.from_checkpoint
    assert method.get("sweep").method == "ikddit" and method.eval_roles == ("student", "teacher")
    assert method.EvalSettings is EvalSettings and method.SampleSettings is SampleSettings
    from fabdistill.config import ConfigError

    with pytest.raises(ConfigError, match="sampler"):
        from_dict(SampleSettings, {"sampler": "euler"})


def test_two_worker_teacher_and_student_with_crash_and_resume(ray_local, tmp_path):
    from trainers.ikddit import train
    from trainers.ikddit_eval import FLOOR_ROW, EvalSettings, evaluate

    cfg = load_config(Config, "configs/ikddit_tiny.yaml", overrides=[
        f"run.storage_path={tmp_path}", "run.name=t", "data.num_train=64", "teacher.steps=4", "student.steps=4",
        "teacher.checkpoint_every=2", "student.checkpoint_every=2", "teacher.log_every=2", "student.log_every=2",
        "teacher.batch_size=8", "student.batch_size=8", "run.crash_after_step=2", "run.max_failures=1"])
    outcome = train(cfg)
    assert set(outcome.phases) == {"teacher", "student"}
    assert outcome.checkpoint_dir == outcome.phases["student"].checkpoint_dir  # top level: the final phase
    for phase in ("teacher", "student"):
        steps = [m["step"] for m in read_metrics(outcome.phases[phase].run_dir)]
        # a restart from scratch would have logged step 2 twice: the workers resumed from the step-2 checkpoint
        assert steps == [2, 4], (phase, steps)
        assert outcome.phases[phase].metrics["step"] == 4
    assert (tmp_path / "t-teacher" / "config.yaml").exists()
    checkpoints = {phase: outcome.phases[phase].checkpoint_dir for phase in ("student", "teacher")}
    table = evaluate(checkpoints, EvalSettings(n=64, steps=2), out_dir=str(tmp_path / "eval"))
    assert [r["model"] for r in table.rows] == [FLOOR_ROW, "teacher", "student"]
    assert all(math.isfinite(table.row(k)["fid"]) for k in ("teacher", "student", FLOOR_ROW))
    assert table.extras["speedup"] > 0
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "samples.png").exists()
    from fabdistill.reports import linked_pictures

    pictures = [Path(p).name for p in linked_pictures(str(tmp_path / "eval" / "report.md"))]
    assert pictures == ["samples.png", "samples_quiver.png", "training_curves.png"]  # curves: the runs' metrics
