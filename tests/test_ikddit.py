"""IKDDiT: Eq. 8 loss terms against hand-computed cases, the adversarial pair, and a 2-worker Ray Train run."""

import dataclasses
import math

import pytest
import torch

from fabdistill.config import load_config
from trainers.ikddit import (Config, IKDDiTPipeline, ModelSection, adversarial_loss, build_networks,
                             discriminator_loss, dsm_loss, infonce_loss, mae_loss, token_mask_to_pixels)
from trainers.launch import read_metrics, save_state


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


def _tiny_student_checkpoint(path) -> None:
    model = dataclasses.asdict(ModelSection(size="tiny"))
    torch.manual_seed(0)
    nets = build_networks(model, 32)
    save_state(path, {"student": nets["student"].state_dict(), "embedding": nets["embedding"].state_dict()},
               {"method": "ikddit", "role": "student", "model": model, "map_size": 32, "scale_nm": 5.0,
                "mask_ratio": 0.5, "step": 0})


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


def test_two_worker_teacher_and_student_with_crash_and_resume(ray_local, tmp_path):
    from trainers.ikddit import train
    from trainers.ikddit_eval import evaluate

    cfg = load_config(Config, "configs/ikddit_tiny.yaml", overrides=[
        f"run.storage_path={tmp_path}", "run.name=t", "data.num_train=64", "teacher.steps=4", "student.steps=4",
        "teacher.checkpoint_every=2", "student.checkpoint_every=2", "teacher.log_every=2", "student.log_every=2",
        "teacher.batch_size=8", "student.batch_size=8", "run.crash_after_step=2", "run.max_failures=1"])
    outcomes = train(cfg)
    for phase in ("teacher", "student"):
        steps = [m["step"] for m in read_metrics(outcomes[phase].run_dir)]
        # a restart from scratch would have logged step 2 twice: the workers resumed from the step-2 checkpoint
        assert steps == [2, 4], (phase, steps)
        assert outcomes[phase].metrics["step"] == 4
    assert (tmp_path / "t-teacher" / "config.yaml").exists()
    result = evaluate(outcomes["student"].checkpoint_dir, outcomes["teacher"].checkpoint_dir, n=64, steps=2,
                      out_dir=str(tmp_path / "eval"))
    assert set(result.rows) == {"real (held-out)", "teacher", "student"}
    assert all(math.isfinite(result.rows[k]["fid"]) for k in ("teacher", "student"))
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "samples.png").exists()
