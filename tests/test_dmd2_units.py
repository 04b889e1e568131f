"""DMD2 building blocks without Ray: the EDM loss weighting, the DM gradient and its per-sample normalisation,
the surrogate loss's autograd gradient, the GAN losses and their weights, the generator/fake update schedule,
few-step σ levels and backward simulation (against hand-computed values), and the class-conditional EDM UNet
(every named size: shapes, gradients, bottleneck, labels, preconditioning reused from the core, metadata round
trip)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models.edm import EDMPrecond, karras_sigma_grid
from models.edm_unet import (EDM_UNET_SIZES, EDMDenoiser, GANHead, build_edm_denoiser, build_edm_unet,
                             edm_denoiser_from_meta)
from trainers.dmd2 import (REFERENCE_GEN_CLS_LOSS_WEIGHT, REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT,
                           backward_simulation, distribution_matching, dm_gradient, dm_surrogate_loss,
                           dmd_timestep_range, edm_denoising_loss, edm_loss_weight, fake_objective,
                           fake_score_loss, few_step_sigmas,
                           gan_discriminator_loss, gan_generator_loss, gan_logits, generator_objective,
                           generator_turn, generator_updates_before, regression_loss, sample_grid_sigma,
                           teacher_pairs, update_plan)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_zero_inits(net: nn.Module, seed: int = 0) -> None:
    """Zero-initialised output layers make inner gradients exactly 0 at init; give them small weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ----------------------------------------------------------------------------------------- EDM loss weighting


def test_edm_loss_weight_hand_values():
    # λ(σ) = (σ² + σ_d²)/(σ σ_d)² = σ⁻² + σ_d⁻², σ_d = 0.5:
    #   σ = 0.5: 0.5 / 0.0625 = 8;   σ = 1: 1.25 / 0.25 = 5;   σ = 2: 4.25 / 1 = 4.25 (= 1/4 + 4)
    w = edm_loss_weight(torch.tensor([0.5, 1.0, 2.0]), 0.5)
    assert torch.allclose(w, torch.tensor([8.0, 5.0, 4.25]))
    assert edm_loss_weight(torch.tensor([1.0]), 1.0).item() == pytest.approx(2.0)  # σ_d = 1: (1 + 1)/1


def test_edm_denoising_loss_hand_values_and_labels_reach_the_denoiser():
    seen = {}

    def zero_denoiser(x, sigma, class_labels=None):
        seen["labels"] = class_labels
        return torch.zeros_like(x)

    x0 = torch.tensor([1.0, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2)
    labels = torch.tensor([3])
    # D = 0: λ(1)·mean(x0²) = 5 · (1 + 1 + 4 + 0)/4 = 7.5
    loss = edm_denoising_loss(zero_denoiser, x0, labels, sigma=torch.tensor([1.0]),
                              noise=torch.zeros_like(x0))
    assert loss.shape == (1,) and loss.item() == pytest.approx(7.5)
    assert seen["labels"] is labels
    # D(x) = x: the error is σn; noise = 1, σ = 2: λ(2)·σ² = 4.25 · 4 = 17
    ident = edm_denoising_loss(lambda x, s, class_labels=None: x, x0, None, sigma=torch.tensor([2.0]),
                               noise=torch.ones_like(x0))
    assert ident.item() == pytest.approx(17.0)


def test_edm_denoising_loss_draws_lognormal_sigma_reproducibly():
    x0 = torch.randn(4, 1, 2, 2)
    den = lambda x, s, class_labels=None: torch.zeros_like(x)
    a = edm_denoising_loss(den, x0, generator=torch.Generator().manual_seed(3))
    b = edm_denoising_loss(den, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4,)


def test_fake_score_loss_weighting_and_no_gradient_to_the_generator():
    scale = nn.Parameter(torch.tensor(0.0))
    fake = lambda x, s, class_labels=None: scale * x
    x_gen = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)  # (1, 1, 1, 2)
    # scale = 0: D = 0, loss = λ(σ)·mean(x²) at σ = grid-drawn 1.0 → 5 · (1 + 9)/2 = 25
    loss = fake_score_loss(fake, x_gen, None, torch.tensor([1.0]), noise=torch.zeros_like(x_gen))
    assert loss.item() == pytest.approx(25.0)
    loss.sum().backward()
    assert x_gen.grad is None  # x_gen is detached inside
    # d/dscale 5·mean((scale·x − x)²) at 0 = 5·mean(−2x²) = 5 · (−2 · 5) = −50
    assert scale.grad.item() == pytest.approx(-50.0)


# ------------------------------------------------------------------------------------------------ σ / t draws


def test_dmd_timestep_range_reference_defaults_and_errors():
    assert dmd_timestep_range() == (20, 980)  # int(0.02·1000), int(0.98·1000)
    assert dmd_timestep_range(1000, 0.29, 0.5) == (290, 500)  # int(0.29·1000) would give 289
    assert dmd_timestep_range(1000, 0.0, 1.0) == (0, 999)  # clipped to the last index
    with pytest.raises(ValueError, match="min_step_percent"):
        dmd_timestep_range(1000, 0.5, 0.2)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        dmd_timestep_range(1)


def test_sample_grid_sigma_covers_the_inclusive_range_and_indexes_the_grid():
    grid = karras_sigma_grid(1000)
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    t, sig = sample_grid_sigma(20000, grid, 20, 980, torch.Generator().manual_seed(0))
    assert t.min().item() == 20 and t.max().item() == 980  # both ends drawn: P(miss) ≈ e^-20.8
    assert torch.allclose(sig, grid[t].float())
    # Eq. 5 (EDM) by hand at t = 20: i = 979 of the descending ramp
    r = 979 / 999
    expect = (80 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[20].item() == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="lo <= hi"):
        sample_grid_sigma(4, grid, 10, 1000)


# ------------------------------------------------------------------------------------------------ DM gradient


def _dm_case():
    # two samples of shape (1, 1, 2)
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    pred_real = torch.tensor([[[[0.0, 0.0]]], [[[2.0, -2.0]]]])
    pred_fake = torch.tensor([[[[1.0, 1.0]]], [[[-1.0, 1.0]]]])
    # sample 0: p_real = [1, 2], mean|p_real| = 1.5, p_fake = [0, 1]   → grad = [1, 1]/1.5 = [2/3, 2/3]
    # sample 1: p_real = [−2, 2], mean|p_real| = 2, p_fake = [1, −1]   → grad = [−3, 3]/2 = [−1.5, 1.5]
    expect = torch.tensor([[[[2 / 3, 2 / 3]]], [[[-1.5, 1.5]]]])
    return x, pred_real, pred_fake, expect


def test_dm_gradient_hand_values():
    x, pr, pf, expect = _dm_case()
    assert torch.allclose(dm_gradient(x, pr, pf), expect)


def test_dm_gradient_normalisation_is_per_sample_and_scale_free():
    x, pr, pf, expect = _dm_case()
    # scaling one sample's p_real and p_fake by 10 (x fixed) leaves its grad unchanged and the other's too
    pr2, pf2 = pr.clone(), pf.clone()
    pr2[1] = x[1] - 10 * (x[1] - pr[1])
    pf2[1] = x[1] - 10 * (x[1] - pf[1])
    assert torch.allclose(dm_gradient(x, pr2, pf2), expect)


def test_dm_gradient_zero_weight_is_finite():
    x = torch.ones(1, 1, 1, 2)
    g = dm_gradient(x, x.clone(), x.clone())  # 0/0 → nan → 0, as the reference's nan_to_num
    assert torch.equal(g, torch.zeros_like(x))
    g = dm_gradient(x, x.clone(), torch.zeros_like(x))  # (0 − 1)/0 = −inf → the most negative float
    assert torch.isfinite(g).all() and (g < -1e30).all()


def test_dm_surrogate_loss_autograd_gradient_equals_the_dm_gradient():
    x0, pr, pf, _ = _dm_case()
    grad = dm_gradient(x0, pr, pf)
    x = x0.clone().requires_grad_(True)
    loss = dm_surrogate_loss(x, grad, reduction="sum")
    # 0.5·Σ grad² = 0.5 · (4/9 + 4/9 + 2.25 + 2.25) = 2.69444…
    assert loss.item() == pytest.approx(0.5 * (8 / 9 + 4.5))
    (g_sum,) = torch.autograd.grad(loss, x)
    assert torch.allclose(g_sum, grad)
    x = x0.clone().requires_grad_(True)
    loss = dm_surrogate_loss(x, grad)  # the reference's mean over all 4 elements
    assert loss.item() == pytest.approx(0.5 * (8 / 9 + 4.5) / 4)
    (g_mean,) = torch.autograd.grad(loss, x)
    assert torch.allclose(g_mean, grad / x.numel())
    with pytest.raises(ValueError, match="reduction"):
        dm_surrogate_loss(x, grad, reduction="none")


def test_distribution_matching_noises_x_and_measures_p_from_the_clean_sample():
    real = lambda x, s, class_labels=None: torch.zeros_like(x)
    fake = lambda x, s, class_labels=None: 0.5 * x
    x = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)
    # σ = 2, noise = 1: x_t = [3, 5]; p_real = x − 0 = [1, 3] (mean 2); p_fake = x − x_t/2 = [−0.5, 0.5]
    # grad = ([1, 3] − [−0.5, 0.5]) / 2 = [0.75, 1.25]
    out = distribution_matching(real, fake, x, None, torch.tensor([2.0]), noise=torch.ones_like(x))
    assert torch.allclose(out.x_noisy, torch.tensor([[[[3.0, 5.0]]]]))
    assert torch.allclose(out.grad, torch.tensor([[[[0.75, 1.25]]]]))
    assert out.grad.grad_fn is None and not out.grad.requires_grad  # no graph through the score networks
    with pytest.raises(ValueError, match="one value per sample"):
        distribution_matching(real, fake, x, None, torch.tensor([1.0, 2.0]))


# -------------------------------------------------------------------------------------------------------- GAN


def test_gan_losses_hand_values():
    ln3 = math.log(3.0)
    # generator: mean softplus(−f), f = [0, ln 3]: (ln 2 + ln(4/3))/2 = ln(8/3)/2
    assert gan_generator_loss(torch.tensor([0.0, ln3])).item() == pytest.approx(math.log(8 / 3) / 2)
    # classifier: softplus(f) + softplus(−r), r = [ln 3, 0], f = [0, −ln 3]:
    #   [ln 2 + ln(4/3), ln(4/3) + ln 2] → mean ln(8/3)
    d = gan_discriminator_loss(torch.tensor([ln3, 0.0]), torch.tensor([0.0, -ln3]))
    assert d.item() == pytest.approx(math.log(8 / 3))
    # stable for large logits: a confident, correct classifier pays ~0; the generator pays ~|f|
    assert gan_discriminator_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0)
    assert gan_generator_loss(torch.tensor([-100.0])).item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="must match"):
        gan_discriminator_loss(torch.zeros(2), torch.zeros(3))


def test_loss_combinations_use_the_reference_weights():
    assert REFERENCE_GEN_CLS_LOSS_WEIGHT == 3e-3 and REFERENCE_GUIDANCE_CLS_LOSS_WEIGHT == 1e-2
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    assert generator_objective(one, two).item() == pytest.approx(1.006)  # 1 + 3e-3 · 2
    assert fake_objective(one, two).item() == pytest.approx(1.02)  # 1 + 1e-2 · 2
    assert generator_objective(one) is one and fake_objective(one) is one  # no GAN term
    assert generator_objective(one, two, gen_cls_loss_weight=0.5).item() == pytest.approx(2.0)


class _StubFake(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def bottleneck(self, x, sigma, class_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), class_labels))
        return x.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)


def test_gan_logits_clean_at_sigma_min_or_diffusion_noised():
    grid = karras_sigma_grid(1000)
    fake, head = _StubFake(), (lambda f: f.reshape(f.shape[0], -1).sum(1))
    x = torch.ones(3, 1, 2, 2)
    labels = torch.tensor([0, 1, 2])
    logits = gan_logits(fake, head, x, labels, grid)
    assert logits.shape == (3,) and torch.allclose(logits, torch.ones(3))
    x_seen, sig_seen, lab_seen = fake.calls[-1]
    assert torch.equal(x_seen, x) and lab_seen is labels
    assert torch.allclose(sig_seen, torch.full((3,), 0.002))  # grid[0] = σ_min, no noise
    gan_logits(fake, head, x, labels, grid, max_timestep=1000, generator=torch.Generator().manual_seed(0))
    x_seen, sig_seen, _ = fake.calls[-1]
    assert not torch.equal(x_seen, x)  # noised
    assert all(float(s) in set(grid.float().tolist()) for s in sig_seen)
    with pytest.raises(ValueError, match="max_timestep"):
        gan_logits(fake, head, x, labels, grid, max_timestep=1001)


# --------------------------------------------------------------------------------------------------- schedule


def test_update_schedule_ratio_1_and_5_over_10_iterations():
    plans1 = [update_plan(i, 1) for i in range(10)]
    assert [p.generator for p in plans1] == [True] * 10
    plans5 = [update_plan(i, 5) for i in range(10)]
    assert [p.generator for p in plans5] == [True, False, False, False, False] * 2
    assert all(p.fake for p in plans1 + plans5)  # the fake score network steps every iteration
    assert [p.iteration for p in plans5] == list(range(10))
    # generator steps so far = count of generator turns before the iteration
    for ratio in (1, 5):
        for i in range(11):
            assert generator_updates_before(i, ratio) == sum(generator_turn(j, ratio) for j in range(i))
    assert generator_updates_before(10, 5) == 2 and generator_updates_before(11, 5) == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "5"])
def test_update_schedule_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match="dfake_gen_update_ratio"):
        generator_turn(0, bad)


def test_update_schedule_rejects_bad_iteration_and_accepts_float_ratio():
    with pytest.raises(ValueError, match="iteration"):
        update_plan(-1, 5)
    assert generator_turn(10, 5.0)


# --------------------------------------------------------------------------------------------- few-step chain


def test_few_step_sigmas_follow_the_reference_step_list():
    grid = karras_sigma_grid(1000)
    assert torch.equal(few_step_sigmas(4, grid), grid[[999, 749, 499, 249]])
    assert torch.equal(few_step_sigmas(2, grid), grid[[999, 499]])
    assert torch.equal(few_step_sigmas(3, grid), grid[[999, 666, 333]])
    one = few_step_sigmas(1)
    assert one.shape == (1,) and one.item() == pytest.approx(80.0)  # the one-step generator's σ
    with pytest.raises(ValueError, match="num_steps"):
        few_step_sigmas(0, grid)


def test_backward_simulation_runs_the_generators_own_chain():
    sigmas = torch.tensor([80.0, 10.0, 1.0])
    calls = []

    def gen(x, sigma, class_labels):
        calls.append((sigma.clone(), class_labels))
        return torch.ones_like(x)  # x̂ = 1 whatever the input

    noise = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([4, 5])
    x, sig = backward_simulation(gen, noise, sigmas, labels, 0)
    assert not calls and torch.allclose(x, 80.0 * noise) and torch.equal(sig, torch.full((2,), 80.0))
    g = torch.Generator().manual_seed(7)
    x, sig = backward_simulation(gen, noise, sigmas, labels, 2, generator=g)
    ref = torch.Generator().manual_seed(7)
    torch.randn(noise.shape, generator=ref)  # the renoise of step 0 → 1
    n2 = torch.randn(noise.shape, generator=ref)  # the renoise of step 1 → 2
    assert torch.allclose(x, 1.0 + 1.0 * n2)  # x_2 = x̂_1 + σ_2·n'
    assert torch.equal(sig, torch.full((2,), 1.0))
    assert [c[0][0].item() for c in calls] == [80.0, 10.0] and all(c[1] is labels for c in calls)
    with pytest.raises(ValueError, match="step"):
        backward_simulation(gen, noise, sigmas, labels, 3)


# --------------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size", list(EDM_UNET_SIZES))
def test_every_named_size_shapes_bottleneck_and_gradients(size):
    torch.manual_seed(0)
    den = build_edm_denoiser(size, in_channels=1, image_size=32, num_classes=9)
    _randomise_zero_inits(den)
    x = torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.05, 20.0])
    labels = torch.rand(2, 9)  # soft labels: every column of the label embedding gets a gradient
    out = den(x, sigma, labels)
    assert out.shape == x.shape
    feats = den.bottleneck(x, sigma, labels)
    levels = len(EDM_UNET_SIZES[size].channel_mults)
    c_max = EDM_UNET_SIZES[size].base_channels * EDM_UNET_SIZES[size].channel_mults[-1]
    r = 32 >> (levels - 1)
    assert tuple(feats.shape[1:]) == den.backbone.bottleneck_shape == (c_max, r, r)
    head = GANHead.for_backbone(den.backbone)
    logits = head(feats)
    assert logits.shape == (2,)
    (out.square().mean() + logits.sum()).backward()
    for name, p in list(den.named_parameters()) + list(head.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_sem_sized_network_and_integer_labels():
    den = build_edm_denoiser("tiny", in_channels=1, image_size=64, num_classes=4)
    _randomise_zero_inits(den)
    x = torch.randn(3, 1, 64, 64)
    labels = torch.tensor([0, 3, 1])
    out = den(x, 1.0, labels)
    assert out.shape == x.shape
    assert torch.allclose(out, den(x, 1.0, nn.functional.one_hot(labels, 4).float()), atol=1e-6)
    assert den.bottleneck(x, 1.0, labels).shape == (3, 32, 32, 32)


def test_fresh_denoiser_is_c_skip_times_x_through_the_core_preconditioning():
    den = build_edm_denoiser("tiny", image_size=16, num_classes=9, sigma_data=0.5)
    assert isinstance(den, EDMPrecond)  # the core's Eq. 7 (EDM) wrapper, not a copy
    x = torch.randn(2, 1, 16, 16)
    # zero-initialised output: D = c_skip·x, c_skip(0.5) = 0.25 / (0.25 + 0.25) = 0.5
    assert torch.allclose(den(x, 0.5, torch.tensor([0, 1])), 0.5 * x)
    # c_skip(2) = 0.25 / 4.25
    assert torch.allclose(den(x, torch.tensor([2.0, 2.0]), None), x * 0.25 / 4.25)


def test_label_checks_null_class_and_dropout():
    torch.manual_seed(0)
    den = build_edm_denoiser("tiny", image_size=16, num_classes=9, label_dropout=0.5)
    _randomise_zero_inits(den)
    x = torch.randn(1, 1, 16, 16).expand(64, 1, 16, 16).contiguous()
    labels = torch.full((64,), 2)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        den(x[:2], 1.0, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"\(2, 9\) float, got \(2, 8\)"):
        den(x[:2], 1.0, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="unconditional"):
        build_edm_denoiser("tiny", image_size=16)(x[:2], 1.0, torch.tensor([0, 1]))
    den.eval()
    null = den(x[:1], 1.0, None)
    assert torch.allclose(null, den(x[:1], 1.0, torch.zeros(1, 9)))  # None = zero row = null class
    cond = den(x[:1], 1.0, labels[:1])
    assert not torch.allclose(null, cond)
    assert torch.allclose(den(x, 1.0, labels), cond.expand(64, -1, -1, -1), atol=1e-5)  # eval: no dropout
    den.train()
    out = den(x, 1.0, labels)
    is_null = torch.isclose(out, null.expand_as(out), atol=1e-5).flatten(1).all(1)
    is_cond = torch.isclose(out, cond.expand_as(out), atol=1e-5).flatten(1).all(1)
    assert (is_null | is_cond).all() and is_null.any() and is_cond.any()  # each row dropped or kept


def test_gan_head_layout_and_any_bottleneck_size():
    convs = [m for m in GANHead(64, 8).net if isinstance(m, nn.Conv2d)]
    # the reference's 8×8 branch: conv4×4/s2/p1 → conv4×4/s4 → conv1×1 → 1 logit
    assert [(c.kernel_size, c.stride, c.padding, c.out_channels) for c in convs] == [
        ((4, 4), (2, 2), (1, 1), 64), ((4, 4), (4, 4), (0, 0), 64), ((1, 1), (1, 1), (0, 0), 1)]
    for r in (1, 2, 4, 13, 16, 32):
        assert GANHead(8, r)(torch.randn(2, 8, r, r)).shape == (2,)
    with pytest.raises(ValueError, match="GANHead expects"):
        GANHead(8, 4)(torch.randn(2, 8, 8, 8))


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_meta_round_trip_rebuilds_the_same_function(embedding):
    torch.manual_seed(0)
    den = build_edm_denoiser("tiny", image_size=16, num_classes=9, sigma_data=0.4, noise_embedding=embedding)
    _randomise_zero_inits(den)
    again = edm_denoiser_from_meta(den.meta())
    again.load_state_dict(den.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert again.sigma_data == 0.4 and again.num_classes == 9
    assert torch.equal(again(x, 3.0, torch.tensor([1, 2])), den(x, 3.0, torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="lacks"):
        edm_denoiser_from_meta({"spec": {}})


def test_builder_rejects_unknown_size_and_bad_image_size():
    with pytest.raises(ValueError, match="unknown EDM UNet size"):
        build_edm_unet("XL")
    with pytest.raises(ValueError, match="divisible"):
        build_edm_unet("B", image_size=20)
    with pytest.raises(TypeError, match="EDMUNet"):
        EDMDenoiser(nn.Identity())


# ---------------------------------------------------------------------------------------------- one iteration


def test_one_dmd2_iteration_composes_and_routes_gradients():
    """Generator turn then fake turn with tiny networks: gradients reach exactly the intended parameters."""
    torch.manual_seed(0)
    grid = karras_sigma_grid(1000)
    teacher = build_edm_denoiser("tiny", image_size=8, num_classes=9)
    _randomise_zero_inits(teacher)
    teacher.requires_grad_(False)
    fake, gen = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():  # at init fake = real gives grad = 0; move the fake network a little
        for p in fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head = GANHead.for_backbone(fake.backbone)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 9, (4,), generator=g)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    x_in, sig_in = backward_simulation(gen, noise, few_step_sigmas(1, grid), labels, 0)

    # generator turn: DM + GAN (the fake network and head must not accumulate gradients here)
    fake.requires_grad_(False), head.requires_grad_(False)
    x = gen(x_in, sig_in, labels)
    _, sig = sample_grid_sigma(4, grid, *dmd_timestep_range(), generator=g)
    dm = distribution_matching(teacher, fake, x, labels, sig, generator=g)
    loss_g = generator_objective(dm_surrogate_loss(x, dm.grad), gan_generator_loss(gan_logits(fake, head, x,
                                                                                              labels, grid)))
    loss_g.backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert gen.backbone.conv_in.weight.grad.abs().sum() > 0
    others = list(fake.parameters()) + list(head.parameters()) + list(teacher.parameters())
    assert all(p.grad is None for p in others)

    # fake turn: denoising loss on the detached samples + classifier loss on real vs generated
    fake.requires_grad_(True), head.requires_grad_(True)
    gen.zero_grad(set_to_none=True)
    _, sig_f = sample_grid_sigma(4, grid, 0, 999, generator=g)
    real = torch.randn(4, 1, 8, 8, generator=g) * 0.5
    loss_f = fake_objective(fake_score_loss(fake, x, labels, sig_f, generator=g).mean(),
                            gan_discriminator_loss(gan_logits(fake, head, real, labels, grid),
                                                   gan_logits(fake, head, x.detach(), labels, grid)))
    loss_f.backward()
    assert all(p.grad is None for p in gen.parameters())  # x detached in both fake-side terms
    assert all(p.grad is not None for p in head.parameters())
    assert fake.backbone.conv_in.weight.grad.abs().sum() > 0


def test_bf16_autocast_keeps_the_preconditioning_in_float32():
    torch.manual_seed(0)
    den = build_edm_denoiser("tiny", image_size=8, num_classes=9)
    _randomise_zero_inits(den)
    x = torch.randn(2, 1, 8, 8)
    ref = den(x, 1.0, torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = den(x, 1.0, torch.tensor([0, 1]))
        feats = den.bottleneck(x, 1.0, torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and feats.dtype == torch.bfloat16  # D in x's dtype, features as computed
    assert torch.allclose(out, ref, atol=0.05)  # bf16 backbone, float32 c_skip·x + c_out·F


# ----------------------------------------------------------------------------------------- DMD's regression loss

def test_regression_loss_hand_values_and_shape_errors():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 2.0]]], [[[2.0, -1.0]]]])
    # squared errors 1, 0, 4, 0 → mean 1.25
    assert regression_loss(x, target).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="must match"):
        regression_loss(x, target[:1])
    with pytest.raises(ValueError, match="x_gen"):
        regression_loss(torch.tensor([1.0]), torch.tensor([1.0]))


def test_teacher_pairs_are_the_heun_sample_in_batches_with_their_labels():
    from models.edm import edm_heun_sample

    seen: list[list[int]] = []

    def denoiser(x, sigma, class_labels=None):  # D(x; σ) = x/(1+σ²) + label: a closed-form stand-in
        seen.append(class_labels.tolist())
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + class_labels.view(-1, 1, 1, 1).float()

    z, y = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    pairs = teacher_pairs(denoiser, z, y, num_steps=3, batch_size=2)
    assert seen[0] == [0, 1] and seen[-1] == [1]  # batches of 2, 2, 1 (5 calls each: 2·3 − 1 NFE)
    assert len(seen) == 3 * 5
    whole = edm_heun_sample(denoiser, z, num_steps=3, class_labels=y)
    assert pairs.shape == z.shape and torch.allclose(pairs, whole, atol=1e-6)
