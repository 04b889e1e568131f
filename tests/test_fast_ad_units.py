"""Fast-AD pieces without Ray: each CADR equation against hand-computed values, the guided step's sign, the BN and
KD losses, the replay buffer (plain class and its asyncio back-pressure), synthesis, learner checkpoints, the
held-out evaluation table, and the method's declaration (registry, sweep space)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from torch import nn

from models.diffusion import GaussianDiffusion
from models.resnet_cifar import build_resnet
from models.unet import build_unet
from trainers.fast_ad import (BNStatHooks, BufferFull, CADRSection, FifoReplay, LearnerCore, ReplayBuffer,
                              balanced_labels, bn_stat_loss, cadr_eps_transform, entropy_gate, guidance_loss,
                              kd_loss, prediction_entropy, rectified_eps, rectify_gradient, synthesize, tweedie_x0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ CADR equations


def test_tweedie_x0_hand_values_and_clamp():
    ab = torch.tensor(0.64)
    x0 = tweedie_x0(torch.tensor([1.0]), torch.tensor([0.5]), ab, clip=None)
    assert x0.item() == pytest.approx((1.0 - 0.6 * 0.5) / 0.8)  # 0.875
    assert tweedie_x0(torch.tensor([2.0]), torch.tensor([0.0]), ab).item() == 1.0  # 2.5 clamped to 1
    assert tweedie_x0(torch.tensor([-2.0]), torch.tensor([0.0]), ab).item() == -1.0


def test_prediction_entropy_uniform_and_confident():
    h = prediction_entropy(torch.tensor([[0.0] * 9, [50.0] + [0.0] * 8]))
    assert h[0].item() == pytest.approx(math.log(9), rel=1e-6)
    assert h[1].item() < 1e-15 + 1e-18 or h[1].item() == pytest.approx(0.0, abs=1e-15)
    p = torch.tensor([0.75, 0.25])
    assert prediction_entropy(p.log()[None]).item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_entropy_gate_half_at_threshold_zero_below_cap_above():
    lam_max, tau, k = 1.5, 0.4, 10.0
    h = torch.tensor([tau, tau - 1.0, tau + 1.0, tau + 100.0])
    lam = entropy_gate(h, lam_max, tau, k)
    assert lam[0].item() == pytest.approx(lam_max / 2)
    assert lam[1].item() == pytest.approx(lam_max / (1 + math.exp(10.0)))  # ≈ 6.8e-5: practically off
    assert lam[1].item() < 1e-3
    assert lam[2].item() == pytest.approx(lam_max / (1 + math.exp(-10.0)))
    assert lam[2].item() > 0.999 * lam_max
    assert (lam <= lam_max).all() and lam[3].item() == pytest.approx(lam_max)


def test_rectify_gradient_norm_is_lambda_eta_signal_norm():
    torch.manual_seed(0)
    g = torch.randn(3, 1, 4, 4) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1, 1)  # wildly different scales
    x_t = torch.randn(3, 1, 4, 4)
    lam = torch.tensor([0.5, 1.0, 1.5])
    eta, xi = 0.1, 1e-6
    out = rectify_gradient(g, x_t, lam, eta, xi)
    g_norm = g.flatten(1).norm(dim=1)
    expected = lam * eta * x_t.flatten(1).norm(dim=1) * g_norm / (g_norm + xi)
    assert torch.allclose(out.flatten(1).norm(dim=1), expected, rtol=1e-6)
    assert torch.allclose(out.flatten(1).norm(dim=1), lam * eta * x_t.flatten(1).norm(dim=1), rtol=1e-3)
    cos = nn.functional.cosine_similarity(out.flatten(1), g.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)  # direction kept
    zero = rectify_gradient(torch.zeros(1, 1, 4, 4), x_t[:1], lam[:1], eta, xi)
    assert torch.isfinite(zero).all() and zero.abs().max() == 0  # ξ keeps a zero gradient finite


def test_rectified_eps_moves_x0_against_the_gradient():
    ab = torch.tensor(0.36)
    eps, g_rect, x_t = torch.zeros(1, 4), torch.tensor([[1.0, -2.0, 0.0, 0.5]]), torch.ones(1, 4)
    eps_t = rectified_eps(eps, g_rect, ab)
    assert torch.allclose(eps_t, 0.8 * g_rect)  # ε̃ = ε + √(1−ᾱ)·g_rect
    dx0 = tweedie_x0(x_t, eps_t, ab, None) - tweedie_x0(x_t, eps, ab, None)
    assert torch.allclose(dx0, -(1 - 0.36) / 0.6 * g_rect)  # x̂0 moves by −((1−ᾱ)/√ᾱ)·g_rect


# ------------------------------------------------------------------------------------------------ losses


def test_bn_stat_loss_hand_computed():
    ones, zeros = torch.ones(2), torch.zeros(2)
    same = [(torch.tensor([1.0, 2.0]), ones, torch.tensor([1.0, 2.0]), ones)]
    assert bn_stat_loss(same).item() == 0.0
    diff = [(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), zeros, ones)]  # ‖(1,2)‖ + ‖(1,0)‖
    assert bn_stat_loss(diff).item() == pytest.approx(math.sqrt(5) + 1.0)
    assert bn_stat_loss(diff + same).item() == pytest.approx(math.sqrt(5) + 1.0)  # sum over layers
    with pytest.raises(ValueError):
        bn_stat_loss([])


def test_bn_hooks_zero_when_running_stats_match_the_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()
    x = torch.randn(8, 1, 6, 6)
    feats = net[0](x)
    net[1].running_mean.copy_(feats.mean(dim=(0, 2, 3)).detach())
    net[1].running_var.copy_(feats.var(dim=(0, 2, 3), unbiased=False).detach())
    hooks = BNStatHooks(net)
    net(x)
    assert bn_stat_loss(hooks.stats).item() == pytest.approx(0.0, abs=1e-5)
    hooks.clear()
    net(x + 1.0)  # every channel's mean shifts by Σ conv weights
    assert bn_stat_loss(hooks.stats).item() > 0.1
    hooks.remove()
    hooks.clear()
    net(x)
    assert hooks.stats == []
    with pytest.raises(ValueError):
        BNStatHooks(nn.Linear(2, 2))


def test_kd_loss_hand_computed():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    # T = 2: p_t = (√3, 1)/(√3 + 1), times T² = 4
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    # batchmean: two identical rows give the same value as one
    assert kd_loss(s.repeat(2, 1), t.repeat(2, 1), 1.0).item() == pytest.approx(kd_loss(s, t, 1.0).item())


def test_balanced_labels():
    y = balanced_labels(20, 9, torch.Generator().manual_seed(0))
    counts = torch.bincount(y, minlength=9)
    assert counts.sum() == 20 and counts.max() - counts.min() <= 1


# ------------------------------------------------------------------------------------------------ guided step


def _teacher_with_stats(seed: int = 0) -> nn.Module:
    """A tiny ResNet whose BN running statistics come from wafer-like data (so L_BN means something)."""
    from trainers.classifier import wafer_tensors

    torch.manual_seed(seed)
    teacher = build_resnet("tiny", 9, 1)
    x, _ = wafer_tensors(64, seed=3, size=16)
    teacher.train()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        teacher(x)
    return teacher.eval().requires_grad_(False)


@pytest.mark.parametrize("t", [100, 400, 800])
def test_one_guided_step_lowers_the_guidance_loss(t):
    from trainers.classifier import wafer_tensors

    teacher = _teacher_with_stats()
    hooks = BNStatHooks(teacher)
    diffusion = GaussianDiffusion(1000)
    x0, _ = wafer_tensors(8, seed=11, size=16)
    gen = torch.Generator().manual_seed(t)
    noise = torch.randn(x0.shape, generator=gen)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=gen)  # an imperfect denoiser's prediction
    x_t = diffusion.q_sample(x0, t, noise)
    y = balanced_labels(8, 9, gen)
    cadr = CADRSection()
    t_vec = torch.full((8,), t, dtype=torch.long)

    def loss_after(e: torch.Tensor) -> float:  # one DDIM step to the clean sample, then L_BN + γ·CE there
        x_prev = diffusion.ddim_step(x_t, t, -1, e, clip_x0=1.0)
        with torch.no_grad():
            return float(guidance_loss(teacher, hooks, x_prev, y, cadr.gamma, cadr.bn_weight)[0])

    with torch.enable_grad():
        eps_guided = cadr_eps_transform(teacher, hooks, diffusion, y, cadr)(x_t, t_vec, eps)
    unguided, guided = loss_after(eps), loss_after(eps_guided)
    assert guided < unguided - 1e-3
    # the reference implementation's sign (ε − √(1−ᾱ)·g_rect) goes the other way
    assert loss_after(2 * eps - eps_guided) > unguided


def test_synthesize_shapes_labels_and_unguided_mode():
    torch.manual_seed(0)
    teacher = _teacher_with_stats()
    unet = build_unet("tiny", 1, 16).eval()
    diffusion = GaussianDiffusion(1000)
    cadr = CADRSection(ddim_steps=3)
    out = synthesize(unet, teacher, diffusion, 9, cadr, torch.Generator().manual_seed(0))
    assert out["x"].shape == (9, 1, 16, 16) and out["logits"].shape == (9, 9)
    assert out["x"].abs().max() <= 1.0
    assert sorted(out["y"].tolist()) == list(range(9))  # balanced targets
    assert {"guide_bn", "guide_ce", "guide_lambda", "teacher_conf"} <= set(out["stats"])
    plain = synthesize(unet, teacher, diffusion, 4, CADRSection(ddim_steps=3, gate="off", quantize=True),
                       torch.Generator().manual_seed(0))
    assert torch.equal(plain["y"], plain["logits"].argmax(1))  # unguided: the teacher labels the images
    assert set(plain["x"].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert "guide_bn" not in plain["stats"]


# ------------------------------------------------------------------------------------------------ replay buffer


def _batch(n: int, start: float = 0.0):
    x = torch.arange(start, start + n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return x, torch.arange(n) % 3, torch.zeros(n, 3)


def test_fifo_replay_order_capacity_and_back_pressure():
    buf = FifoReplay(capacity=5, min_uses=1)
    buf.put(*_batch(3, 0))
    buf.put(*_batch(2, 3))
    assert len(buf) == 5 and buf.ids_in_order() == [0, 1, 2, 3, 4]
    assert not buf.can_put(1)
    with pytest.raises(BufferFull):  # the oldest items were never sampled
        buf.put(*_batch(1, 5))
    buf.sample(5, torch.Generator().manual_seed(0))  # every item used once (no replacement within a call)
    assert buf.can_put(2)
    assert buf.put(*_batch(2, 5)) == 2  # evicts the two oldest
    assert buf.ids_in_order() == [2, 3, 4, 5, 6]
    assert len(buf) == 5 and buf.stats()["max_fill"] == 5 and buf.stats()["evicted"] == 2
    s = buf.sample(4, torch.Generator().manual_seed(1))
    assert set(s["ids"].tolist()) <= {2, 3, 4, 5, 6}
    assert torch.equal(s["x"][:, 0, 0, 0], s["ids"].float())  # rows stay aligned with their images
    with pytest.raises(ValueError):
        buf.put(*_batch(6))  # larger than the capacity
    with pytest.raises(ValueError):
        FifoReplay(capacity=0)


def test_fifo_replay_ring_mode_and_force():
    ring = FifoReplay(capacity=3, min_uses=0)
    for i in range(4):
        ring.put(*_batch(2, 2 * i))
        assert len(ring) <= 3
    assert ring.ids_in_order() == [5, 6, 7]
    assert ring.stats()["evicted_unused"] == 5
    strict = FifoReplay(capacity=2, min_uses=1)
    strict.put(*_batch(2))
    strict.put(*_batch(1, 2), force=True)
    assert strict.ids_in_order() == [1, 2]


def test_replay_buffer_actor_logic_waits_when_full_and_stops_cleanly():
    async def scenario() -> None:
        rb = ReplayBuffer(capacity=4, min_uses=1, record_timeline=True)
        x, y, lg = (a.numpy() for a in _batch(4))
        assert await rb.put(x, y, lg, {"worker": 0}) == "ok"
        assert await rb.put(x[:2], y[:2], lg[:2], {"worker": 0}, timeout=0.05) == "timeout"  # full, unused
        waiting = asyncio.ensure_future(rb.put(x[:2], y[:2], lg[:2], {"worker": 1}))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        batch = await rb.sample(4, min_fill=1)
        assert batch["x"].shape == (4, 1, 2, 2)
        assert await asyncio.wait_for(waiting, 1.0) == "ok"  # sampling freed room
        stats = await rb.stats()
        assert stats["max_fill"] <= 4 and stats["total_put"] == 6 and stats["puts_waited"] == 2
        assert stats["per_worker"] == {0: 4, 1: 2}
        blocked = asyncio.ensure_future(rb.put(x, y, lg))
        await asyncio.sleep(0.05)
        await rb.stop()
        assert await asyncio.wait_for(blocked, 1.0) == "stopped"
        assert await rb.sample(2) is None
        assert len(await rb.timeline()) == 2

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ learner checkpoints


def _save_classifier(path, model: nn.Module) -> str:
    from fabdistill.checkpoints import save_state
    from fabdistill.inference.classifier import classifier_meta

    save_state(str(path), {"model": model.state_dict()}, classifier_meta(model, "wafer_pm1"))
    return str(path)


def test_learner_checkpoint_restore_and_export(tmp_path):
    from fabdistill.inference.classifier import load_classifier

    _save_classifier(tmp_path / "teacher", _teacher_with_stats())
    spec = {"teacher_checkpoint": str(tmp_path / "teacher"), "diffusion_checkpoint": "unused", "seed": 0,
            "student_arch": "tiny", "steps": 10, "batch_size": 4, "optimizer": "sgd", "lr": 0.05,
            "weight_decay": 0.0, "warmup_steps": 0, "kd_temperature": 4.0, "augment": True, "num_gpus": 0,
            "torch_threads": 1, "checkpoint_every": 2, "num_to_keep": 2,
            "eval": {"uri": None, "n_heldout": 16, "seed": 5, "size": 16}, "run_dir": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    core = LearnerCore(spec)
    batch = {"x": torch.rand(4, 1, 16, 16) * 2 - 1, "logits": torch.randn(4, 9)}
    for _ in range(3):
        core.train_step(batch)
        core.save_checkpoint()
    core.save_checkpoint(export=True)
    ckpts = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint_step_"))
    assert ckpts == ["checkpoint_step_0000002", "checkpoint_step_0000003"]  # num_to_keep
    again = LearnerCore(spec)
    assert again.step == 3 and again.restored_step == 3
    for a, b in zip(again.student.state_dict().values(), core.student.state_dict().values()):
        assert torch.equal(a, b)
    model, meta = load_classifier(str(tmp_path / "run"))
    assert meta["arch"] == "tiny" and meta["method"] == "fast_ad" and meta["step"] == 3
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 9)
    ev = again.evaluate()
    assert 0.0 <= ev["heldout_top1"] <= 1.0 and ev["heldout_kd"] >= 0.0


def test_synthesis_streams_are_per_batch_and_reproducible():
    from trainers.fast_ad.actors import synthesis_generator

    a = torch.randn(4, generator=synthesis_generator(0, 3))
    assert torch.equal(a, torch.randn(4, generator=synthesis_generator(0, 3)))  # any worker, same batch
    assert not torch.equal(a, torch.randn(4, generator=synthesis_generator(0, 4)))
    assert not torch.equal(a, torch.randn(4, generator=synthesis_generator(1, 3)))


def test_evaluate_table_student_next_to_teacher(tmp_path):
    from trainers.fast_ad.evaluate import EvalSettings, evaluate

    teacher = _save_classifier(tmp_path / "teacher", _teacher_with_stats())
    torch.manual_seed(1)
    student = _save_classifier(tmp_path / "student", build_resnet("tiny", 9, 1).eval())
    settings = EvalSettings(n=24, size=16)
    table = evaluate({"student": student, "teacher": teacher}, settings, str(tmp_path / "out"))
    assert [r["model"] for r in table.rows] == ["student", "teacher"]
    for row in table.rows:
        assert 0.0 <= row["top1"] <= 1.0 and row["arch"] == "tiny" and row["params"] > 0
    assert 0.0 <= table.row("student")["teacher_agreement"] <= 1.0
    same = evaluate({"student": teacher, "teacher": teacher}, settings)
    assert same.row("student")["teacher_agreement"] == 1.0  # a model agrees with itself
    assert same.row("student")["top1"] == same.row("teacher")["top1"]
    assert "| student |" in (tmp_path / "out" / "report.md").read_text()
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(str(tmp_path / "out" / "report.md"))  # no metrics.jsonl here: no curves
    assert [p.rsplit("/", 1)[-1] for p in pictures] == ["confusion_student.png", "examples_student.png",
                                                         "confusion_teacher.png", "examples_teacher.png"]
    with pytest.raises(ValueError, match="roles"):
        evaluate({"prior": teacher}, settings)


def test_method_declaration_and_sweep_space():
    from fabdistill.methods import get_method
    from trainers.fast_ad import METHOD, Config
    from tune.spaces import check_path

    assert get_method("fast_ad") is METHOD
    assert METHOD.capabilities() == ["train", "evaluate", "sweep", "serve"]
    assert METHOD.eval_roles == ("student", "teacher") and METHOD.students == ("classifier",)
    space = METHOD.get("sweep")
    assert space.score_name == "heldout_top1" and space.score_mode == "max"
    assert space.early_stop_metric == "kd_loss"
    for path in [*space.knobs.values(), space.steps_path]:
        check_path(Config, path, path)  # every knob is a real config leaf
    assert {"eta", "lambda_max", "tau_ent", "bn_weight", "kd_temperature", "lr"} <= set(space.knobs)


def test_train_refuses_ray_train_callbacks_outside_a_tune_trial():
    from trainers.fast_ad import Config, train

    with pytest.raises(ValueError, match="Tune trial"):
        train(Config(), callbacks=[object()])


# ------------------------------------------------------------------------------------------------ teacher / prior helpers


def test_wafer_encoding_round_trip_and_dihedral_keeps_values():
    from fabdistill.inference.classifier import decode_wafer, encode_wafer
    from trainers.classifier import random_dihedral

    maps = torch.randint(0, 3, (5, 8, 8), dtype=torch.uint8)
    x = encode_wafer(maps)
    assert x.shape == (5, 1, 8, 8) and set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(decode_wafer(x), maps)
    with pytest.raises(ValueError):
        encode_wafer(torch.full((1, 4, 4), 3))
    y = random_dihedral(x, torch.Generator().manual_seed(0))
    assert torch.equal(y.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)  # a permutation


def test_select_split_filters_cifar_style_tables():
    import pyarrow as pa

    from trainers.classifier import select_split

    t = pa.table({"label": [0, 1, 2], "split": ["train", "test", "train"]})
    assert select_split(t, "train")["label"].to_pylist() == [0, 2]
    assert select_split(t, None) is t
    unsplit = pa.table({"label": [0, 1], "split": ["", ""]})
    assert select_split(unsplit, "test") is unsplit
    with pytest.raises(ValueError, match="no rows"):
        select_split(t, "val")


def test_ddpm_save_load_round_trip(tmp_path):
    from trainers.ddpm import load_ddpm, save_ddpm

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(100, "cosine")
    ema = build_unet("tiny", 1, 8).eval()  # a round trip needs weights, not trained ones
    save_ddpm(str(tmp_path / "ddpm"), ema, diffusion)
    unet, diff2, meta = load_ddpm(str(tmp_path / "ddpm"))
    assert meta["kind"] == "ddpm" and diff2.num_timesteps == 100 and diff2.schedule == "cosine"
    t = torch.tensor([5, 50])
    probe = torch.randn(2, 1, 8, 8)
    assert torch.equal(unet(probe, t), ema(probe, t))
    _save_classifier(tmp_path / "cls", build_resnet("tiny", 9, 1))
    with pytest.raises(ValueError, match="not a DDPM"):
        load_ddpm(str(tmp_path / "cls"))
