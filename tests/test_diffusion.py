"""Fast CPU tests for models/diffusion.py (schedules, DDPM/DDIM identities) and models/edm.py (EDM preconditioning,
Karras noise levels, samplers)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from models.diffusion import GaussianDiffusion
from models.edm import (
    EDMPrecond,
    edm_euler_sample,
    edm_heun_sample,
    edm_loss_weight,
    edm_precond_coeffs,
    edm_sample_sigma,
    edm_training_loss,
    karras_sigma_grid,
    karras_sigmas,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def lin() -> GaussianDiffusion:
    return GaussianDiffusion(1000, "linear")


@pytest.fixture(scope="module")
def cos() -> GaussianDiffusion:
    return GaussianDiffusion(1000, "cosine")


def _x0(n: int = 2, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=dtype) * 2 - 1  # (N, 1, 4, 4) in [-1, 1]


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A tiny deterministic 'network': depends on x and on t (per sample)."""
    return 0.3 * torch.tanh(x) + 0.1 * torch.cos(t.to(x.dtype) / 100.0).view(-1, *([1] * (x.ndim - 1)))


# ------------------------------------------------------------------------------------------ schedules


def test_linear_alpha_bar_endpoints(lin: GaussianDiffusion) -> None:
    ac = lin.alphas_cumprod
    assert ac.dtype == F64 and ac.shape == (1000,)
    assert ac[0].item() == pytest.approx(1 - 1e-4, abs=1e-12)
    assert 3.5e-5 < ac[-1].item() < 4.5e-5  # DDPM's ᾱ_T ≈ 4.04e-5
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)


def test_cosine_alpha_bar_endpoints(cos: GaussianDiffusion) -> None:
    ac = cos.alphas_cumprod
    assert ac[0].item() > 0.9999 and ac[0].item() < 1.0
    assert ac[-1].item() < 1e-8  # ᾱ_T ≈ 0
    assert cos.betas.max().item() == pytest.approx(0.999)  # clipped
    # Eq. 17 (iDDPM) in the middle: ᾱ_t = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s))·π/2)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ac[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_monotone_and_consistent(schedule: str) -> None:
    d = GaussianDiffusion(1000, schedule)
    assert bool((d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all())
    assert bool(((d.betas > 0) & (d.betas < 1)).all())
    total = d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2
    assert torch.allclose(total, torch.ones(1000, dtype=F64))
    assert torch.allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1]) and d.alphas_cumprod_prev[0] == 1
    assert d.posterior_variance[0] == 0 and bool((d.posterior_variance[1:] <= d.betas[1:]).all())


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'"):
        GaussianDiffusion(10, "sigmoid")
    with pytest.raises(ValueError, match="num_timesteps"):
        GaussianDiffusion(0)
    with pytest.raises(ValueError, match="beta_start"):
        GaussianDiffusion(10, beta_start=0.1, beta_end=0.01)


# ------------------------------------------------------------------------------------------ forward process


def test_q_sample_statistics(lin: GaussianDiffusion) -> None:
    m = 40_000
    x0 = torch.tensor([0.9, -0.4, 0.0], dtype=F64).expand(m, 3)  # (M, 3): the same x0 many times
    g = torch.Generator().manual_seed(0)
    for t in (10, 500, 900):
        xt = lin.q_sample(x0, t, torch.randn(m, 3, generator=g, dtype=F64))
        ab = lin.alphas_cumprod[t].item()
        se = math.sqrt((1 - ab) / m)  # standard error of the mean
        assert torch.allclose(xt.mean(0), math.sqrt(ab) * x0[0], atol=5 * se)
        assert torch.allclose(xt.var(0), torch.full((3,), 1 - ab, dtype=F64), rtol=0.05)


def test_predict_x0_and_eps_invert_q_sample(cos: GaussianDiffusion) -> None:
    x0 = _x0(4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([0, 17, 500, 999])  # per-sample t
    xt = cos.q_sample(x0, t, noise)
    assert torch.allclose(cos.predict_x0(xt, t, noise), x0, atol=1e-8)
    assert torch.allclose(cos.predict_eps(xt, t, x0), noise, atol=1e-8)


def test_alpha_bar_lookup(lin: GaussianDiffusion) -> None:
    like = torch.zeros(3, 2, 5)
    ab = lin.alpha_bar(torch.tensor([-1, 0, 999]), like)
    assert ab.shape == (3, 1, 1)
    assert ab.flatten().tolist() == pytest.approx([1.0, 1 - 1e-4, lin.alphas_cumprod[-1].item()], rel=1e-6)


def test_input_validation(lin: GaussianDiffusion) -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="out of range"):
        lin.q_sample(x, 1000, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="values must lie in"):
        lin.q_sample(x, torch.tensor([0, -1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        lin.q_sample(x, 5, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        lin.q_sample(x, torch.tensor([1, 2, 3]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="integer timesteps"):
        lin.q_sample(x, torch.tensor([0.5, 1.0]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        lin.ddim_step(x, 5, 5, x)
    with pytest.raises(ValueError, match="needs `noise`"):
        lin.ddim_step(x, 5, 4, x, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        lin.ddim_step(x, 5, 4, x, eta=1.5)
    with pytest.raises(ValueError, match="model_fn must return a tensor shaped like"):
        lin.ddim_sample(lambda xx, t: xx[:, :1], (2, 3), steps=2)
    with pytest.raises(ValueError, match="clip_x0"):
        lin.ddim_sample(_toy_model, (2, 3), steps=2, clip_x0=0.0)


def test_sample_timesteps(lin: GaussianDiffusion) -> None:
    t = lin.sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (5000,)
    assert int(t.min()) >= 0 and int(t.max()) <= 999 and int(t.max()) > 900 and int(t.min()) < 100


def test_training_loss_per_sample(lin: GaussianDiffusion) -> None:
    x0 = _x0(3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([3, 300, 900])
    oracle = lin.training_loss(lambda xt, tt: lin.predict_eps(xt, tt, x0), x0, t=t, noise=noise)
    assert oracle.shape == (3,) and torch.allclose(oracle, torch.zeros(3, dtype=F64), atol=1e-12)
    zero = lin.training_loss(lambda xt, tt: torch.zeros_like(xt), x0, t=t, noise=noise)
    assert torch.allclose(zero, (noise**2).reshape(3, -1).mean(1))  # Eq. 14 (DDPM), per sample
    seen: list[torch.Tensor] = []
    lin.training_loss(lambda xt, tt: seen.append(tt) or torch.zeros_like(xt), x0, generator=torch.Generator())
    assert seen[0].shape == (3,) and seen[0].dtype == torch.long


# ------------------------------------------------------------------------------------------ DDPM


def test_ddpm_step_adds_no_noise_at_t0(lin: GaussianDiffusion) -> None:
    x, eps = _x0(2), _x0(2).flip(0)
    a = lin.ddpm_step(x, 0, eps, torch.randn(x.shape, dtype=F64))
    b = lin.ddpm_step(x, 0, eps, None)
    assert torch.equal(a, b)
    assert torch.allclose(a, lin.predict_x0(x, 0, eps))  # μ̃_0 = x̂0
    mixed_t = torch.tensor([0, 10])
    big = torch.full(x.shape, 100.0, dtype=F64)
    out = lin.ddpm_step(x, mixed_t, eps, big)
    assert torch.allclose(out[0], a[0]) and not torch.allclose(out[1], lin.ddpm_step(x, 10, eps, None)[1])


def test_ddpm_sample_with_oracle_lands_on_x0() -> None:
    d = GaussianDiffusion(50, "cosine")
    x0 = _x0(2)
    g = torch.Generator().manual_seed(0)
    out = d.ddpm_sample(lambda x, t: d.predict_eps(x, t, x0), x0.shape, generator=g, dtype=F64)
    assert torch.allclose(out, x0, atol=1e-9)


# ------------------------------------------------------------------------------------------ DDIM


def test_ddim_timesteps(lin: GaussianDiffusion) -> None:
    assert lin.ddim_timesteps(1).tolist() == [999]
    assert torch.equal(lin.ddim_timesteps(1000), torch.arange(999, -1, -1))
    for steps in (2, 3, 7, 50, 333, 999):
        ts = lin.ddim_timesteps(steps)
        assert ts.dtype == torch.long and len(ts) == steps and ts[0] == 999 and ts[-1] == 0
        assert bool((ts[1:] < ts[:-1]).all())
    assert lin.ddim_timesteps(4, t_start=300).tolist() == [300, 200, 100, 0]
    assert lin.ddim_timesteps(50)[:3].tolist() == [999, 979, 958]  # round(999 − k·999/49)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be an int in"):
            lin.ddim_timesteps(bad)
    with pytest.raises(ValueError, match="steps must be an int in"):
        lin.ddim_timesteps(302, t_start=300)


def test_ddim_eta0_is_deterministic(lin: GaussianDiffusion) -> None:
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    a = lin.ddim_sample(_toy_model, None, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = lin.ddim_sample(_toy_model, x_T.shape, steps=20, x_T=x_T.clone(),
                        generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # the input is left untouched
    assert torch.equal(x_T, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
def test_ddim_oracle_recovers_x0(schedule: str, steps: int) -> None:
    d = GaussianDiffusion(1000, schedule)
    x0 = _x0(2)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = d.ddim_sample(lambda x, t: d.predict_eps(x, t, x0), None, steps=steps, x_T=x_T)
    assert torch.allclose(out, x0, atol=1e-8)


def test_ddim_eta1_full_steps_matches_ddpm(lin: GaussianDiffusion) -> None:
    x, eps = _x0(2), _x0(2).flip(0) * 0.7
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    for t in (0, 1, 10, 500, 999):
        ddim = lin.ddim_step(x, t, t - 1, eps, eta=1.0, noise=noise)
        ddpm = lin.ddpm_step(x, t, eps, noise)
        assert torch.allclose(ddim, ddpm, atol=1e-10), t
    # σ_t(η=1)² of Eq. 16 (DDIM) for consecutive steps is the DDPM posterior variance β̃_t.
    ab, abp = lin.alphas_cumprod[1:], lin.alphas_cumprod[:-1]
    sigma2 = (1 - abp) / (1 - ab) * (1 - ab / abp)
    assert torch.allclose(sigma2, lin.posterior_variance[1:], rtol=1e-10)
    # η = 1 over all T steps: DDIM and DDPM samplers agree draw for draw given the same generator stream.
    d = GaussianDiffusion(30, "cosine")
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ddim = d.ddim_sample(_toy_model, None, steps=30, eta=1.0, x_T=x_T, generator=g1)
    ddpm_x = x_T
    for t in range(29, -1, -1):  # the DDPM loop written out, fed the same noise stream as ddim_sample
        tt = torch.full((2,), t)
        z = torch.randn(2, 3, generator=g2, dtype=F64) if t > 0 else None
        ddpm_x = d.ddpm_step(ddpm_x, t, _toy_model(ddpm_x, tt), z)
    assert torch.allclose(ddim, ddpm_x, atol=1e-10)


def test_ddim_eta_uses_generator(lin: GaussianDiffusion) -> None:
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    run = lambda seed: lin.ddim_sample(_toy_model, None, steps=10, eta=0.8, x_T=x_T,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))


def test_eps_transform_is_applied_with_grad(lin: GaussianDiffusion) -> None:
    x0 = _x0(2)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    calls: list[tuple[int, bool]] = []

    def oracle_hook(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        calls.append((int(t[0]), torch.is_grad_enabled()))
        x = x_t.requires_grad_()  # guidance takes ∇_{x_t}; must be allowed here
        (g,) = torch.autograd.grad((x**2).sum(), x)
        assert torch.allclose(g, 2 * x_t)
        return lin.predict_eps(x_t.detach(), t, x0)  # replace the (garbage) model ε by the oracle

    out = lin.ddim_sample(lambda x, t: torch.zeros_like(x), None, steps=5, x_T=x_T, eps_transform=oracle_hook)
    assert [c[0] for c in calls] == lin.ddim_timesteps(5).tolist() and all(c[1] for c in calls)
    assert torch.allclose(out, x0, atol=1e-8) and not out.requires_grad
    plain = lin.ddim_sample(lambda x, t: torch.zeros_like(x), None, steps=5, x_T=x_T)
    assert not torch.allclose(plain, x0, atol=1e-2)


def test_ddim_sample_from_translates(lin: GaussianDiffusion) -> None:
    clean = _x0(2)
    defect = clean.clone()
    defect[:, :, 1, 1] += 1.5  # a "defect" pixel
    # Target-domain oracle: predicts ε as if the clean image were x0.
    out = lin.ddim_sample_from(defect, 400, lambda x, t: lin.predict_eps(x, t, clean), steps=8,
                               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, clean, atol=1e-8)
    # t_start = 0, one step and an identity-consistent model: returns x̂0 of the lightly noised input.
    noise = torch.zeros_like(defect)
    same = lin.ddim_sample_from(defect, 0, lambda x, t: torch.zeros_like(x), steps=1, noise=noise)
    assert torch.allclose(same, defect, atol=1e-8)
    with pytest.raises(ValueError, match="t_start"):
        lin.ddim_sample_from(defect, 1000, _toy_model, steps=1)


def test_ddim_regression_value(lin: GaussianDiffusion) -> None:
    # As diffusers' scheduler tests do: a full small loop against fixed numbers. The constants were obtained
    # once by running exactly this call (torch 2.15 CPU, float32) and printing out.sum() / out.abs().sum();
    # they guard against silent changes to the timestep spacing, Eq. 9/12/16 (DDIM), x̂0 clipping or the
    # noise stream.
    out = lin.ddim_sample(_toy_model, (2, 1, 4, 4), steps=10, eta=0.5, clip_x0=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 4, 4) and out.dtype == torch.float32
    assert out.sum().item() == pytest.approx(2.674428701400757, abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(25.810054779052734, abs=1e-4)


def test_shared_object_is_stateless_under_threads(lin: GaussianDiffusion) -> None:
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(lin).items()}
    run = lambda seed, steps: lin.ddim_sample(_toy_model, (2, 3), steps=steps, eta=0.3,  # noqa: E731
                                              generator=torch.Generator().manual_seed(seed))
    jobs = [(s, st) for s, st in zip(range(6), (3, 5, 7, 11, 13, 17))]
    serial = [run(*j) for j in jobs]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i, j=j: results.__setitem__(i, run(*j)))
               for i, j in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(results[i], serial[i]) for i in range(len(jobs)))
    after = vars(lin)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k


# ------------------------------------------------------------------------------------------ EDM / Karras


def test_karras_sigmas() -> None:
    s = karras_sigmas(18)
    assert s.shape == (19,) and s.dtype == F64
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # Eq. 5 (EDM) at i = 9 of N = 18
    expect = (80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[9].item() == pytest.approx(expect, rel=1e-12)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)


def test_karras_sigma_grid_is_ascending() -> None:
    g = karras_sigma_grid(1000)
    assert g.shape == (1000,)
    assert g[0].item() == pytest.approx(0.002) and g[-1].item() == pytest.approx(80.0)
    assert bool((g[1:] > g[:-1]).all())
    assert torch.allclose(karras_sigma_grid(19), karras_sigmas(19)[:-1].flip(0))


def test_edm_preconditioning_identities() -> None:
    sd = 0.5
    sigma = torch.logspace(-3, 2, 50, dtype=F64)
    c = edm_precond_coeffs(sigma, sd)
    assert torch.allclose(c.c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma))  # unit-variance input
    assert torch.allclose(c.c_noise, sigma.log() / 4)
    tiny = edm_precond_coeffs(torch.tensor([1e-6], dtype=F64), sd)
    assert tiny.c_skip.item() == pytest.approx(1.0, abs=1e-10)  # c_skip → 1 as σ → 0
    assert edm_precond_coeffs(torch.tensor([1e4], dtype=F64), sd).c_skip.item() < 1e-8  # c_skip → 0 as σ → ∞
    # Effective training target (y − c_skip (y + n)) / c_out has unit variance for Var y = σ_d², Var n = σ².
    var_target = ((1 - c.c_skip) ** 2 * sd**2 + c.c_skip**2 * sigma**2) / c.c_out**2
    assert torch.allclose(var_target, torch.ones_like(sigma))
    assert torch.allclose(edm_loss_weight(sigma, sd), 1 / c.c_out**2)  # λ(σ) = 1 / c_out²
    g = torch.Generator().manual_seed(0)
    for s in (0.01, 0.5, 20.0):
        y = torch.randn(200_000, generator=g, dtype=F64) * sd
        n = torch.randn(200_000, generator=g, dtype=F64) * s
        cs = edm_precond_coeffs(torch.tensor(s, dtype=F64), sd)
        target = (y - cs.c_skip * (y + n)) / cs.c_out
        assert target.var().item() == pytest.approx(1.0, rel=0.02)


def test_edm_precond_wrapper() -> None:
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 1.0, 50.0])
    zero = EDMPrecond(lambda x_in, c_noise: torch.zeros_like(x_in))
    c = edm_precond_coeffs(sigma, 0.5)
    assert torch.allclose(zero(x, sigma), c.c_skip.view(3, 1, 1, 1) * x)
    assert torch.allclose(zero(x, sigma.view(3, 1, 1, 1)), zero(x, sigma))  # EDM-style (N, 1, 1, 1) σ
    seen = {}

    def record(x_in: torch.Tensor, c_noise: torch.Tensor, label: int = 0) -> torch.Tensor:
        seen.update(x_in=x_in, c_noise=c_noise, label=label)
        return torch.ones_like(x_in)

    net = EDMPrecond(record)
    out = net(x, 2.0, label=7)
    c2 = edm_precond_coeffs(torch.tensor(2.0), 0.5)
    assert torch.allclose(seen["x_in"], c2.c_in * x) and seen["label"] == 7
    assert seen["c_noise"].shape == (3,)
    assert torch.allclose(seen["c_noise"], torch.full((3,), math.log(2.0) / 4))
    assert torch.allclose(out, c2.c_skip * x + c2.c_out)
    with pytest.raises(ValueError, match="one value per sample"):
        zero(x, torch.ones(2))
    with pytest.raises(ValueError, match="backbone must return"):
        EDMPrecond(lambda x_in, c_noise: x_in[:, :1])(x, 1.0)
    lin_backbone = torch.nn.Conv2d(2, 2, 1)
    wrapped = EDMPrecond(lin_backbone)
    assert sum(p.numel() for p in wrapped.parameters()) == 6  # backbone registered as a submodule


def test_edm_training_loss() -> None:
    x0 = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    oracle = edm_training_loss(lambda x, s: x0, x0, sigma=sigma, noise=noise)
    assert oracle.shape == (4,) and torch.allclose(oracle, torch.zeros(4, dtype=F64))
    zero = EDMPrecond(lambda x_in, c_noise: torch.zeros_like(x_in))
    got = edm_training_loss(zero, x0, sigma=sigma, noise=noise)
    c_skip = edm_precond_coeffs(sigma).c_skip.view(4, 1, 1, 1)
    manual = ((c_skip * (x0 + sigma.view(4, 1, 1, 1) * noise) - x0) ** 2).reshape(4, -1).mean(1)
    assert torch.allclose(got, edm_loss_weight(sigma) * manual)
    drawn = edm_training_loss(zero, x0, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (4,) and bool(torch.isfinite(drawn).all())
    with pytest.raises(ValueError, match="positive"):
        edm_training_loss(zero, x0, sigma=torch.zeros(4))


def test_edm_sample_sigma_lognormal() -> None:
    s = edm_sample_sigma(50_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert s.shape == (50_000,) and bool((s > 0).all())
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.03)


@pytest.mark.parametrize("sampler", [edm_heun_sample, edm_euler_sample])
def test_edm_samplers_with_oracle_land_on_x0(sampler) -> None:
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    calls = []

    def oracle(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(sigma)
        assert sigma.shape == (2,)
        return x0

    latents = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = sampler(oracle, latents, num_steps=18)
    assert torch.allclose(out, x0, atol=1e-10)
    assert len(calls) == (35 if sampler is edm_heun_sample else 18)  # Heun: 2N − 1 NFE
    assert calls[0][0].item() == pytest.approx(80.0)


def test_edm_heun_is_second_order_on_gaussian_data() -> None:
    # For y ~ N(0, s²) the exact denoiser is D(x; σ) = s²/(s² + σ²)·x and the ODE maps σ_max·n to
    # n·σ_max·s/√(s² + σ_max²). Doubling the steps should cut Heun's error ~4× and Euler's ~2×.
    s = 0.5
    denoiser = lambda x, sig: (s**2 / (s**2 + sig**2)).view(-1, 1) * x  # noqa: E731
    latents = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = latents * 80.0 * s / math.sqrt(s**2 + 80.0**2)
    err = lambda f, n: (f(denoiser, latents, num_steps=n) - exact).abs().max().item()  # noqa: E731
    heun_ratio = err(edm_heun_sample, 20) / err(edm_heun_sample, 40)
    euler_ratio = err(edm_euler_sample, 20) / err(edm_euler_sample, 40)
    assert 3.0 < heun_ratio < 6.0 and 1.6 < euler_ratio < 2.6
    assert err(edm_heun_sample, 40) < err(edm_euler_sample, 40)


def test_edm_heun_float32_and_churn() -> None:
    latents = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    denoiser = lambda x, sig: 0.5 * x  # noqa: E731
    a = edm_heun_sample(denoiser, latents, num_steps=6)
    assert a.dtype == torch.float32 and torch.equal(a, edm_heun_sample(denoiser, latents, num_steps=6))
    churn = lambda seed: edm_heun_sample(denoiser, latents, num_steps=6, S_churn=5.0,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    b1, b2 = churn(1), churn(1)
    assert torch.equal(b1, b2) and not torch.allclose(a, b1)
