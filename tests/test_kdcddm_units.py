"""KDCDDM building blocks: VAE, student generator, PatchGAN discriminator, conditional UNet (shapes, gradients,
named sizes, errors) and the losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion import GaussianDiffusion
from models.gan import (DISCRIMINATOR_SIZES, GENERATOR_SIZES, build_conditional_unet, build_discriminator,
                        build_generator, conditional_unet_from_meta, discriminator_from_meta, generator_from_meta)
from models.vae import build_vae, count_params, vae_from_meta
from trainers.kdcddm.losses import (conditional_diffusion_loss, discriminator_loss, kl_to_standard_normal,
                                    student_loss, vae_loss)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------------------ VAE


@pytest.mark.parametrize("size, factor", [("tiny", 2), ("small", 4), ("base", 4), ("kl_f8", 8)])
def test_vae_shapes_and_gradients_for_each_size(size, factor):
    torch.manual_seed(0)
    vae = build_vae(size, in_channels=1, image_size=16)
    assert vae.downsample == factor and vae.latent_shape() == (4, 16 // factor, 16 // factor)
    x = torch.randn(2, 1, 16, 16)
    recon, mean, logvar = vae(x)
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 4, 16 // factor, 16 // factor)
    (recon.square().mean() + mean.square().mean() + logvar.exp().mean()).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_vae_kl_f8_matches_ldm_parameter_count():
    # LDM's KL-f8 (ch 128, mults 1,2,4,4, 2 res blocks, z 4) has 83.65 M parameters at 3 channels; ours at 1 channel
    assert count_params(build_vae("kl_f8", in_channels=1, image_size=64)) / 1e6 == pytest.approx(83.65, abs=0.02)


def test_vae_encode_is_deterministic_and_sampling_reparameterises():
    torch.manual_seed(0)
    vae = build_vae("tiny", image_size=16).eval()
    x = torch.randn(3, 1, 16, 16)
    m1, l1 = vae.encode(x)
    m2, l2 = vae.encode(x)
    assert torch.equal(m1, m2) and torch.equal(l1, l2)
    recon_mean, _, _ = vae(x, sample=False)
    assert torch.equal(recon_mean, vae.decode(m1))
    # z = μ + σ ε with σ = exp(½ log σ²) = 2: sample mean ≈ μ = 1, std ≈ 2
    mean = torch.ones(1, 1, 200, 200, requires_grad=True)
    logvar = torch.full((1, 1, 200, 200), math.log(4.0), requires_grad=True)
    z = vae.sample_latent(mean, logvar, torch.Generator().manual_seed(1))
    assert z.mean().item() == pytest.approx(1.0, abs=0.03) and z.std().item() == pytest.approx(2.0, abs=0.03)
    z.sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_vae_latent_overrides_meta_and_scale_round_trip():
    vae = build_vae("small", image_size=32, latent_channels=8, downsample=8)
    mean, _ = vae.encode(torch.randn(1, 1, 32, 32))
    assert mean.shape == (1, 8, 4, 4)
    assert build_vae("base", image_size=32, downsample=2).spec.channel_mults == (1, 2)
    vae.latent_scale.fill_(0.25)
    again = vae_from_meta(vae.meta())
    again.load_state_dict(vae.state_dict())
    assert again.latent_scale.item() == 0.25 and again.spec == vae.spec
    z = torch.randn(1, 8, 4, 4)
    assert torch.allclose(again.unscale_latent(again.scale_latent(z)), z)


@pytest.mark.parametrize("factor", [2, 4])
def test_subpixel_vae_keeps_shapes_learns_and_runs_nothing_at_full_resolution(factor):
    torch.manual_seed(0)
    vae = build_vae("tiny", image_size=16, downsample=factor, subpixel=True)
    x = torch.randn(2, 1, 16, 16)
    recon, mean, _ = vae(x)
    assert recon.shape == x.shape and mean.shape == (2, 4, 16 // factor, 16 // factor)
    recon.square().mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
    # every convolution sees at most half the image's side: that is where the saving comes from
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
             for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    vae(x)
    for h in hooks:
        h.remove()
    assert max(seen) == 8 and len(seen) > 10
    plain = build_vae("tiny", image_size=16, downsample=factor)
    assert sum(1 for m in plain.modules() if isinstance(m, torch.nn.Conv2d)) \
        > sum(1 for m in vae.modules() if isinstance(m, torch.nn.Conv2d))


def test_subpixel_vae_meta_round_trip_and_old_checkpoints_load_as_plain():
    vae = build_vae("tiny", image_size=16, downsample=4, subpixel=True)
    again = vae_from_meta(vae.meta())
    again.load_state_dict(vae.state_dict())
    assert again.spec.subpixel and again.spec == vae.spec
    old = build_vae("tiny", image_size=16).meta()
    del old["spec"]["subpixel"]  # metadata written before the option existed
    assert vae_from_meta(old).spec.subpixel is False
    with pytest.raises(ValueError, match="subpixel needs a downsampling factor"):
        build_vae("tiny", image_size=16, downsample=1, subpixel=True)


def test_decoder_res_blocks_sets_the_decoder_depth_and_round_trips():
    from models.vae import ResBlock

    def blocks(net: torch.nn.Module) -> int:
        return sum(isinstance(m, ResBlock) for m in net.modules())

    default = build_vae("tiny", image_size=16, downsample=4)  # 3 levels, 1 block each in the encoder
    assert blocks(default.encoder) == 3 + 2 and blocks(default.decoder) == 2 + 3 * 2  # + the two middle blocks
    light = build_vae("tiny", image_size=16, downsample=4, decoder_res_blocks=1)
    assert blocks(light.decoder) == 2 + 3 and blocks(light.encoder) == blocks(default.encoder)
    assert light(torch.randn(2, 1, 16, 16))[0].shape == (2, 1, 16, 16)
    assert vae_from_meta(light.meta()).spec.decoder_res_blocks == 1
    with pytest.raises(ValueError, match="decoder_res_blocks must be >= 0"):
        build_vae("tiny", decoder_res_blocks=-2)


def test_vae_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown VAE size"):
        build_vae("huge")
    with pytest.raises(ValueError, match="power of two"):
        build_vae("tiny", downsample=3)
    with pytest.raises(ValueError, match="divisible by the downsampling factor"):
        build_vae("small", image_size=30)
    with pytest.raises(ValueError, match="bad VAE override"):
        build_vae("tiny", widht=3)
    vae = build_vae("tiny", image_size=16)
    with pytest.raises(ValueError, match="expected images"):
        vae.encode(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expected z"):
        vae.decode(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="lacks"):
        vae_from_meta({"size": "tiny"})


# ------------------------------------------------------------------------------------- generator / discriminator


@pytest.mark.parametrize("size", sorted(GENERATOR_SIZES))
def test_generator_is_identity_at_init_and_learns(size):
    torch.manual_seed(0)
    gen = build_generator(size, latent_channels=4, latent_size=8)
    z = torch.randn(2, 4, 8, 8)
    out = gen(z)
    assert out.shape == z.shape and torch.equal(out, z)  # zero-initialised residual: G(z) = z
    (out - torch.zeros_like(z)).square().mean().backward()
    assert gen.conv_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        gen.conv_out.weight.sub_(0.1 * gen.conv_out.weight.grad.sign())
    assert not torch.equal(gen(z), z)
    again = generator_from_meta(gen.meta())
    again.load_state_dict(gen.state_dict())
    assert torch.equal(again(z), gen(z))


@pytest.mark.parametrize("size", sorted(DISCRIMINATOR_SIZES))
def test_discriminator_patch_logits_and_gradients(size):
    torch.manual_seed(0)
    disc = build_discriminator(size, in_channels=4)
    f = 2 ** DISCRIMINATOR_SIZES[size].n_down
    x = torch.randn(3, 4, 16, 16, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (3, 1, 16 // f, 16 // f)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in disc.parameters())
    again = discriminator_from_meta(disc.meta())
    again.load_state_dict(disc.state_dict())
    assert torch.equal(again(x), logits)


def test_conditional_discriminator_and_network_errors():
    disc = build_discriminator("tiny", in_channels=4, cond_channels=4)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert disc(x, c).shape == (2, 1, 4, 4)
    assert not torch.equal(disc(x, c), disc(x, torch.zeros_like(c)))
    with pytest.raises(ValueError, match="expected cond"):
        disc(x)
    with pytest.raises(ValueError, match="unconditional"):
        build_discriminator("tiny")(x, c)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_discriminator("small")(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="unknown generator size"):
        build_generator("huge")
    with pytest.raises(ValueError, match="unknown discriminator size"):
        build_discriminator("huge")
    with pytest.raises(ValueError, match="expected z"):
        build_generator("tiny", latent_channels=4, latent_size=8)(torch.randn(1, 3, 8, 8))


def test_conditional_unet_uses_the_condition():
    torch.manual_seed(0)
    net = build_conditional_unet("tiny", channels=1, cond_channels=1, image_size=16)
    with torch.no_grad():  # the zero-initialised output conv would hide the condition's effect
        net.unet.conv_out.weight.normal_(0, 0.1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    cond = torch.randn(2, 1, 16, 16, requires_grad=True)
    out = net(x, t, cond)
    assert out.shape == x.shape
    out.sum().backward()
    assert cond.grad.abs().sum() > 0
    assert not torch.equal(net(x, t, cond), net(x, t, torch.zeros_like(cond)))
    again = conditional_unet_from_meta(net.meta())
    again.load_state_dict(net.state_dict())
    assert torch.equal(again(x, t, cond), net(x, t, cond))
    with pytest.raises(ValueError, match="expected cond"):
        net(x, t)
    prior = build_conditional_unet("tiny", channels=1, cond_channels=0, image_size=16)
    assert prior(x, t).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        prior(x, t, cond)


# ------------------------------------------------------------------------------------------------------------ losses


def test_kl_term_hand_computed_and_against_torch_distributions():
    # KL per element = ½(μ² + σ² − 1 − log σ²): (μ=1, σ²=1) → ½(1 + 1 − 1 − 0) = 0.5;
    # (μ=2, σ²=2) → ½(4 + 2 − 1 − ln 2) = 2.153426; summed: 2.653426. N(0, 1) itself: 0.
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    assert torch.allclose(kl_to_standard_normal(mean, logvar), torch.tensor([2.653426, 0.0]), atol=1e-6)
    torch.manual_seed(0)
    m, lv = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    q = torch.distributions.Normal(m, (0.5 * lv).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).reshape(3, -1).sum(1)
    assert torch.allclose(kl_to_standard_normal(m, lv), ref, atol=1e-5)


def test_vae_loss_is_l1_plus_small_weight_kl():
    x, recon = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    out = vae_loss(x, recon, mean, logvar, kl_weight=0.1)
    # rec = mean |0 − 0.5| = 0.5; loss = 0.5 + 0.1 · KL = 0.5 + 0.2653426 for the first sample, 0.5 for the second
    assert torch.allclose(out["rec"], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out["loss"], torch.tensor([0.7653426, 0.5]), atol=1e-6)
    assert torch.allclose(vae_loss(x, recon, mean, logvar)["loss"], 0.5 + 1e-6 * out["kl"])  # default weight 1e-6
    with pytest.raises(ValueError, match="does not match image batch"):
        vae_loss(x, recon, mean[:1], logvar[:1])
    with pytest.raises(ValueError, match="but recon has"):
        vae_loss(x, recon[:, :, :2], mean, logvar)


def test_student_loss_is_adversarial_plus_ten_l1():
    teacher = torch.randn(2, 4, 8, 8, requires_grad=True)
    student = (teacher.detach() + 0.1).requires_grad_()
    zeros = torch.zeros(2, 1, 4, 4)
    out = student_loss(zeros, student, teacher)
    # D logit 0: BCE(σ(0) = ½, 1) = ln 2 = 0.693147; L1 = 0.1; loss = ln 2 + 10 · 0.1 = 1.693147
    assert torch.allclose(out["adv"], torch.full((2,), math.log(2.0)))
    assert torch.allclose(out["l1"], torch.full((2,), 0.1), atol=1e-6)
    assert torch.allclose(out["loss"], torch.full((2,), 1.693147), atol=1e-6)
    # D logit ln 3: σ = 0.75, BCE = −ln 0.75 = 0.287682; with λ_L1 = 2: 0.287682 + 0.2 = 0.487682
    out = student_loss(torch.full((2, 1, 4, 4), math.log(3.0)), student, teacher, l1_weight=2.0)
    assert torch.allclose(out["loss"], torch.full((2,), 0.487682), atol=1e-6)
    out["loss"].sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher target is detached


def test_discriminator_loss_teacher_is_real():
    # real logit ln 3 (σ = 0.75): −ln 0.75 = 0.287682; fake logit ln 3: −ln(1 − 0.75) = ln 4 = 1.386294;
    # loss = ½(0.287682 + 1.386294) = 0.836988
    real, fake = torch.full((3, 1, 2, 2), math.log(3.0)), torch.full((3, 1, 2, 2), math.log(3.0))
    out = discriminator_loss(real, fake)
    assert torch.allclose(out["real"], torch.full((3,), 0.287682), atol=1e-6)
    assert torch.allclose(out["fake"], torch.full((3,), 1.386294), atol=1e-6)
    assert torch.allclose(out["loss"], torch.full((3,), 0.836988), atol=1e-6)
    # a perfect D (real → +∞, fake → −∞) has loss → 0, a fooled one (reversed) grows
    assert discriminator_loss(torch.full((1, 1, 1, 1), 20.0), torch.full((1, 1, 1, 1), -20.0))["loss"] < 1e-8
    assert discriminator_loss(torch.full((1, 1, 1, 1), -20.0), torch.full((1, 1, 1, 1), 20.0))["loss"] > 19
    with pytest.raises(ValueError, match="real_logits has shape"):
        discriminator_loss(real, fake[:2])


def test_conditional_diffusion_loss_hand_cases():
    diffusion = GaussianDiffusion(1000, "cosine")
    clean = torch.rand(2, 1, 4, 4)
    noise = torch.ones(2, 1, 4, 4)
    t = torch.tensor([10, 900])
    # a denoiser answering the condition (0.5 everywhere): loss = mean (0.5 − 1)² = 0.25
    half = torch.full((2, 1, 4, 4), 0.5)
    out = conditional_diffusion_loss(diffusion, lambda x_t, tt, c: c, clean, half, t=t, noise=noise)
    assert torch.allclose(out, torch.full((2,), 0.25))
    # an oracle that knows x0 through the condition recovers ε = (x_t − √ᾱ x0)/√(1−ᾱ) exactly: loss 0
    oracle = lambda x_t, tt, c: diffusion.predict_eps(x_t, tt, c)  # noqa: E731
    noise = torch.randn(2, 1, 4, 4)
    assert conditional_diffusion_loss(diffusion, oracle, clean, clean, t=t, noise=noise).abs().max() < 1e-5
    # a real network: the zero-initialised conditional UNet predicts ε̂ = 0, so the loss is mean ε²
    net = build_conditional_unet("tiny", channels=1, cond_channels=1, image_size=4)
    loss = conditional_diffusion_loss(diffusion, net, clean, torch.rand(2, 1, 4, 4), t=t, noise=noise)
    assert torch.allclose(loss, noise.square().reshape(2, -1).mean(1), atol=1e-6)
    prior = build_conditional_unet("tiny", channels=1, cond_channels=0, image_size=4)
    drawn = conditional_diffusion_loss(diffusion, prior, clean, None, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (2,) and torch.isfinite(drawn).all()
    with pytest.raises(ValueError, match="must match clean"):
        conditional_diffusion_loss(diffusion, net, clean, torch.rand(3, 1, 4, 4))
