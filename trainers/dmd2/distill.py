"""Phase 2: DMD2 distillation of the EDM teacher into a one-step (or few-step) generator.

Networks: the frozen teacher D_real; the generator G and the fake score network D_fake, both initialised from
the teacher; optionally a GAN head on D_fake's bottleneck. Per iteration i (0-based; schedule.update_plan):

    generator turn (i % dfake_gen_update_ratio == 0):
        x = G(80·z; 80, y)                                  one step (few-step: G at backward-simulated x_k)
        (+ w_reg · ‖G(80·z_p; 80, y_p) − x_p‖², distill.regression_weight > 0: DMD's paired-set regression, on
        pairs the teacher's Heun sampler made once from (z_p, y_p) at the start)
        grad = (p_real − p_fake) / mean|p_real|,  p_• = x − D_•(x + σn),  σ = grid[t], t ~ U[20, 980]
        L_G = ½‖x − sg(x − grad)‖²_mean (+ w_G · softplus(−head(D_fake.bottleneck(x))))   fake + head frozen
    every iteration (fake turn), on sg(x):
        L_fake = λ(σ)‖D_fake(x + σn; σ) − x‖²,  t ~ U[0, 1000)   (+ w_D · [softplus(f) + softplus(−r)])

AdamW (0.9, 0.999, wd 0.01) on both, grad-norm clip 10, warm-up then constant lr, bf16 autocast on GPU only
(distill.bf16, default on as in the reference, or run.precision=bf16; trainers/launch.py autocast).
All ranks draw their own z, y, t (generator(seed, "dmd2", rank, start)); the backward-simulation step comes from
derive_seed(seed, "backsim", i), shared, so every rank makes the same number of generator calls (DDP).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
from torch import Tensor, nn

from models.edm import karras_sigma_grid
from models.edm_unet import EDMDenoiser, GANHead, edm_denoiser_from_meta
from trainers.common import Cadence, RunningMeans, derive_seed, ema_update, generator, infinite_batches, lr_at, set_lr
from trainers.dmd2.losses import (backward_simulation, distribution_matching, dm_surrogate_loss, dmd_timestep_range,
                                  fake_objective, fake_score_loss, few_step_sigmas, gan_discriminator_loss,
                                  gan_generator_loss, gan_logits, generator_objective, regression_loss,
                                  sample_grid_sigma, teacher_pairs)
from trainers.dmd2.schedule import generator_updates_before, update_plan
from trainers.dmd2.teacher import encoded_shard
from trainers.launch import TrainSession, autocast  # noqa: F401  (autocast: the shared helper, re-exported)

__all__ = ["FakeObjective", "distill_loop", "needs_real_data", "autocast"]


class FakeObjective(nn.Module):
    """D_fake and its GAN head as one module, so that DDP syncs both from one forward; returns the loss terms."""

    def __init__(self, fake: EDMDenoiser, head: Optional[GANHead]):
        super().__init__()
        self.fake, self.head = fake, head

    def forward(self, x_gen: Tensor, y: Tensor, sigma: Tensor, noise: Tensor, grid: Tensor,
                real_x: Optional[Tensor] = None, real_y: Optional[Tensor] = None, gan_max_timestep: int = 0,
                gen: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        terms = {"loss_fake": fake_score_loss(self.fake, x_gen, y, sigma, noise=noise).mean()}  # Eq. 6 (DMD)
        if self.head is not None:
            n = x_gen.shape[0]
            logits = gan_logits(self.fake, self.head, torch.cat([real_x, x_gen.detach()]), torch.cat([real_y, y]),
                                grid, max_timestep=gan_max_timestep, generator=gen)  # (2N,) real first
            terms["loss_cls"] = gan_discriminator_loss(logits[:n], logits[n:])  # Eq. 2 (DMD2), D side
        return terms


def needs_real_data(dc: dict) -> bool:
    """Real samples are read only by the GAN (its 'real' side) and by few-step training without backsim."""
    return bool(dc["gan"]) or (dc["num_steps"] > 1 and not dc["backward_simulation"])


def _frozen(*modules: Optional[nn.Module]):
    """Context: no gradient into these modules (the fake network and head during the generator's GAN term)."""
    @contextlib.contextmanager
    def ctx():
        live = [m for m in modules if m is not None]
        for m in live:
            m.requires_grad_(False)
        try:
            yield
        finally:
            for m in live:
                m.requires_grad_(True)
    return ctx()


def distill_loop(config: dict) -> None:
    sess = TrainSession.current()
    dc, dev = config["distill"], sess.device
    if "teacher_state_ref" in config:  # Ray workers fetch the frozen teacher from the object store once
        import ray

        teacher_state = ray.get(config["teacher_state_ref"])
    else:
        teacher_state = config["teacher_state"]
    real = edm_denoiser_from_meta(config["net"])
    real.load_state_dict(teacher_state)
    real.eval().requires_grad_(False).to(dev)
    # G and D_fake start as the teacher (generator = copy of the fake = copy of the teacher); eval(): no label
    # dropout while distilling.
    gen_net = copy.deepcopy(real).requires_grad_(True)
    fake = copy.deepcopy(real).requires_grad_(True)
    torch.manual_seed(sess.run.seed)  # the GAN head's init, identical on every rank
    head = GANHead.for_backbone(fake.backbone).to(dev) if dc["gan"] else None
    fake_obj = FakeObjective(fake, head)
    ema = copy.deepcopy(gen_net).requires_grad_(False) if dc["ema_decay"] > 0 else None
    adamw = dict(betas=(0.9, 0.999), weight_decay=dc["weight_decay"])
    opt_g = torch.optim.AdamW(gen_net.parameters(), lr=dc["gen_lr"], **adamw)
    opt_f = torch.optim.AdamW(fake_obj.parameters(), lr=dc["fake_lr"], **adamw)
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        gen_net.load_state_dict(state["generator_raw"])
        fake_obj.load_state_dict(state["fake_objective"])
        opt_g.load_state_dict(state["opt_g"])
        opt_f.load_state_dict(state["opt_f"])
        if ema is not None:
            ema.load_state_dict(state["generator"])
        start = meta["step"]
    gen_ddp = sess.prepare(gen_net)
    fake_ddp = sess.prepare(fake_obj)
    if ema is not None:
        ema.to(dev)

    ratio, total, k = dc["dfake_gen_update_ratio"], dc["steps"], dc["num_steps"]
    grid = karras_sigma_grid(1000)  # (1000,) ascending; σ = grid[t]
    lo, hi = dmd_timestep_range(1000, dc["min_step_percent"], dc["max_step_percent"])
    chain = few_step_sigmas(k, grid).float()  # (k,) descending, chain[0] = 80
    if k == 1:
        chain = torch.tensor([dc["conditioning_sigma"]])
    gen = generator(sess.run.seed, "dmd2", "distill", sess.rank, start)
    real_batches = (infinite_batches(encoded_shard(sess, config["domain"]), dc["batch_size"], gen)
                    if needs_real_data(dc) else None)
    b, shape, num_classes = dc["batch_size"], (1, config["net"]["image_size"], config["net"]["image_size"]), \
        config["net"]["num_classes"]
    pairs = _regression_pairs(sess, real, dc, shape, num_classes, float(chain[0])) \
        if dc.get("regression_weight", 0.0) > 0 else None
    cadence = Cadence(dc["log_every"], dc["checkpoint_every"], total)
    running = RunningMeans()
    amp = dc["bf16"] or sess.run.precision == "bf16"  # distill.bf16 (the reference's bf16) or the run's precision
    for step in range(start + 1, total + 1):
        plan = update_plan(step - 1, ratio)
        set_lr(opt_g, lr_at(step, total, dc["gen_lr"], warmup_steps=dc["warmup_steps"], schedule="constant"))
        set_lr(opt_f, lr_at(step, total, dc["fake_lr"], warmup_steps=dc["warmup_steps"], schedule="constant"))
        z = torch.randn((b, *shape), generator=gen).to(dev)
        y = torch.randint(0, num_classes, (b,), generator=gen).to(dev)
        real_x = real_y = None
        if real_batches is not None:
            batch = next(real_batches)
            real_x, real_y = sess.to_device((batch["x"][:b], batch["y"][:b]))
        # The generator's input: σ_0·z (one step), or its own chain state at a shared random step (backsim).
        if k == 1:
            x_in, sig_in = z * chain[0], torch.full((b,), float(chain[0]), device=dev)
        else:
            j = derive_seed(sess.run.seed, "backsim", step - 1) % k
            if dc["backward_simulation"]:
                with autocast(amp, dev):
                    x_in, sig_in = backward_simulation(gen_net, z, chain.to(dev), y, j, generator=gen)
                x_in, sig_in = x_in.float(), sig_in.float()
            else:  # DMD2 without backsim: noised real samples at the chain's level j
                x_in = real_x + float(chain[j]) * z[: real_x.shape[0]]
                y = real_y
                sig_in = torch.full((x_in.shape[0],), float(chain[j]), device=dev)
        if plan.generator:
            with autocast(amp, dev):
                x_p = None
                if pairs is None:
                    x_gen = gen_ddp(x_in, sig_in, y).float()  # (N, 1, H, W) with grad
                else:  # and a separate batch of the paired set, as DMD; one forward (DDP: one per backward)
                    idx = torch.randint(0, pairs["z"].shape[0], (b,), generator=gen)
                    y_p, x_target = pairs["y"][idx].to(dev), pairs["x"][idx].to(dev)
                    x_both = gen_ddp(torch.cat([x_in, pairs["z"][idx].to(dev) * chain[0]]),
                                     torch.cat([sig_in, torch.full((b,), float(chain[0]), device=dev)]),
                                     torch.cat([y, y_p])).float()
                    x_gen, x_p = x_both[:b], x_both[b:]
                _, sigma_dm = sample_grid_sigma(x_gen.shape[0], grid, lo, hi, gen, dev)
                dm = distribution_matching(real, fake, x_gen, y, sigma_dm, generator=gen)
                loss_dm = dm_surrogate_loss(x_gen, dm.grad.float())  # Eq. 1 (DMD2)
                loss_gan = None
                if head is not None:
                    with _frozen(fake, head):
                        loss_gan = gan_generator_loss(gan_logits(fake, head, x_gen, y, grid,
                                                                 max_timestep=dc["diffusion_gan_max_timestep"],
                                                                 generator=gen))
                loss_g = generator_objective(loss_dm, loss_gan, dc["gen_cls_loss_weight"])
                loss_reg = None
                if x_p is not None:
                    loss_reg = regression_loss(x_p, x_target)  # Eq. 9 (DMD)
                    loss_g = loss_g + dc["regression_weight"] * loss_reg
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            if dc["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(gen_net.parameters(), dc["grad_clip"])
            opt_g.step()
            if ema is not None:
                ema_update(ema, gen_net, dc["ema_decay"], step // ratio)  # warm-up counts generator updates
            running.add({"loss_dm": loss_dm, "dm_grad_abs": dm.grad.abs().mean(),
                         **({"loss_gen_gan": loss_gan} if loss_gan is not None else {}),
                         **({"loss_reg": loss_reg} if loss_reg is not None else {})})
            x_gen = x_gen.detach()
        else:
            with torch.no_grad(), autocast(amp, dev):
                x_gen = gen_net(x_in, sig_in, y).float()
        # Fake turn, every iteration, on this iteration's (detached) samples.
        _, sigma_f = sample_grid_sigma(x_gen.shape[0], grid, 0, grid.shape[0] - 1, gen, dev)
        noise_f = torch.randn(x_gen.shape, generator=gen).to(dev)
        with autocast(amp, dev):
            terms = fake_ddp(x_gen, y, sigma_f, noise_f, grid, real_x, real_y, dc["diffusion_gan_max_timestep"], gen)
            loss_f = fake_objective(terms["loss_fake"], terms.get("loss_cls"), dc["guidance_cls_loss_weight"])
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        if dc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(fake_obj.parameters(), dc["grad_clip"])
        opt_f.step()
        running.add({k_: v for k_, v in terms.items()})
        if cadence.report(step):
            checkpoint = cadence.checkpoint(step)
            metrics = {**running.pop(), "generator_updates": generator_updates_before(step, ratio)}
            sess.report(metrics, step=step, state=(lambda: _state(gen_net, ema, fake_obj, opt_g, opt_f))
                        if checkpoint else None, meta=_meta(config, step) if checkpoint else None)


def _regression_pairs(sess: TrainSession, real: nn.Module, dc: dict, shape: tuple, num_classes: int,
                      sigma_max: float) -> dict[str, Tensor]:
    """DMD's paired set, made once per worker from its own seed (so a resumed run makes the same pairs): unit
    noises z, labels y and the teacher's Heun 35-NFE samples x from σ_max·z, on the CPU."""
    import time

    n = dc["regression_pairs"]
    gen = generator(sess.run.seed, "dmd2", "regression_pairs", sess.rank)
    z = torch.randn((n, *shape), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    t0 = time.perf_counter()
    if sess.rank == 0:  # a pause of tens of seconds before the first step: say why on the console too
        print(f"[{sess.run.name}] regression pairs: teacher Heun 35 NFE on {n} noises", flush=True)
    # The generator sees σ_in·z; the Heun sampler starts from 80·(its latents): hand it z·σ_in/80.
    with torch.no_grad():
        x = teacher_pairs(real, (z * (sigma_max / 80.0)).to(sess.device), y.to(sess.device)).float().cpu()
    if sess.rank == 0:
        print(f"[{sess.run.name}] regression pairs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"z": z, "y": y, "x": x}


def _state(gen_net: nn.Module, ema: Optional[nn.Module], fake_obj: nn.Module, opt_g, opt_f) -> dict:
    exported = ema if ema is not None else gen_net
    return {"generator": exported.state_dict(), "generator_raw": gen_net.state_dict(),
            "fake_objective": fake_obj.state_dict(), "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict()}


def _meta(config: dict, step: int) -> dict:
    dc = config["distill"]
    return {"method": "dmd2", "role": "generator", "net": config["net"], "domain": config["domain"],
            "class_names": config["class_names"], "sigma_data": config["net"]["sigma_data"],
            "num_steps": dc["num_steps"], "conditioning_sigma": dc["conditioning_sigma"],
            "dfake_gen_update_ratio": dc["dfake_gen_update_ratio"], "gan": dc["gan"],
            "iteration": step, "teacher_checkpoint": config["teacher_checkpoint"],
            "teacher_step": config["teacher_step"]}
