"""KDCDDM per-worker training: one loop (`phase_loop`) and one small class per phase that says what it trains.

The loop owns what every phase shares (resume, data shard, batches, cadence, reports and checkpoints through
trainers.launch.TrainSession); a phase builds its networks and optimizers, precomputes what it needs from its data
shard (frozen-VAE latents, teacher targets), takes one optimisation step, and says what its exported checkpoint
holds (inference weights under state["models"], their metas under meta["models"]; fabdistill/inference/kdcddm.py
reads them).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fabdistill.inference.kdcddm import LATENT_CLIP, make_diffusion, pairs_from_tensors, translate_latent
from models.gan import build_conditional_unet, build_discriminator, build_generator, conditional_unet_from_meta
from models.unet import build_unet
from models.vae import KLAutoencoder, build_vae, vae_from_meta
from trainers.common import Cadence, RunningMeans, ema_update, generator, infinite_batches
from trainers.kdcddm.losses import conditional_diffusion_loss, discriminator_loss, student_loss, vae_loss
from trainers.launch import TrainSession


# --------------------------------------------------------------------------- objectives (called through DDP)

class VAEObjective(nn.Module):
    def __init__(self, vae: KLAutoencoder, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        recon, mean, logvar = self.vae(x, sample=True, generator=gen)
        return {k: v.mean() for k, v in vae_loss(x, recon, mean, logvar, self.kl_weight).items()}


class DenoiseObjective(nn.Module):
    """ε-prediction losses of one or more denoisers: {name: (net, target key, cond key or None)}."""

    def __init__(self, nets: dict[str, nn.Module], roles: dict[str, tuple[str, Optional[str]]], diffusion_cfg: dict):
        super().__init__()
        self.nets, self.roles = nn.ModuleDict(nets), roles
        self.diffusion = make_diffusion(diffusion_cfg)

    def forward(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        terms = {}
        for name, (target, cond) in self.roles.items():
            x0 = batch[target]
            t = self.diffusion.sample_timesteps(x0.shape[0], generator=gen).to(x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            terms[f"loss_{name}"] = conditional_diffusion_loss(
                self.diffusion, self.nets[name], x0, batch[cond] if cond else None, t, noise).mean()
        terms["loss"] = sum(terms.values())
        return terms


class BaselineObjective(nn.Module):
    """AE on clean images (L1 + small KL) and the supervised UNet (BCE on masks), summed: separate parameters, so
    one optimizer over both trains each on its own loss."""

    def __init__(self, ae: KLAutoencoder, seg: nn.Module, kl_weight: float):
        super().__init__()
        self.ae, self.seg, self.kl_weight = ae, seg, kl_weight

    def forward(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        clean = batch["clean"]
        recon, mean, logvar = self.ae(clean, sample=True, generator=gen)
        ae = {k: v.mean() for k, v in vae_loss(clean, recon, mean, logvar, self.kl_weight).items()}
        t = torch.zeros(clean.shape[0], dtype=torch.long, device=clean.device)
        logits = self.seg(batch["defect"], t)  # (N, 1, H, W)
        bce = F.binary_cross_entropy_with_logits(logits, batch["mask"])
        return {"loss": ae["loss"] + bce, "loss_ae": ae["rec"], "loss_bce": bce}


# --------------------------------------------------------------------------- phases

def _pixels(pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"defect": pairs["defect"] * 2 - 1, "clean": pairs["clean"] * 2 - 1, "mask": pairs["mask"]}


def _frozen_vae(dep: dict) -> KLAutoencoder:
    vae = vae_from_meta(dep["meta"])
    vae.load_state_dict(dep["state"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _encode_all(vae: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled latent means (N, L, h, w) of (N, 1, H, W) images in [−1, 1]."""
    return torch.cat([vae.scale_latent(vae.encode(images[i:i + batch_size])[0])
                      for i in range(0, images.shape[0], batch_size)])


class Phase:
    """One objective trained by one Adam optimizer (EMA of it kept when ema_decay > 0). Subclasses set
    `objective`, `models_meta()` and `export()`; the student overrides `step` (two optimizers)."""

    betas = (0.9, 0.999)
    current_step: Optional[int] = None  # set by phase_loop before each step (the EMA warm-up reads it)
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # wrap(): TrainSession.autocast

    def __init__(self, config: dict, device: torch.device):
        self.config, self.sc, self.device = config, config["section"], device
        self.objective: nn.Module = self.build().to(device)
        self.ema = copy.deepcopy(self.objective).requires_grad_(False)
        self.opt = torch.optim.Adam(self.objective.parameters(), lr=self.sc["lr"], betas=self.betas)

    def build(self) -> nn.Module:
        raise NotImplementedError

    def wrap(self, sess: TrainSession) -> None:
        self.model = sess.prepare(self.objective)
        self.amp = sess.autocast  # run.precision

    def prepare_data(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _pixels(pairs)

    def step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        with self.amp():
            terms = self.model({k: v.to(self.device) for k, v in batch.items()}, gen)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.opt.step()
        ema_update(self.ema, self.objective, self.sc.get("ema_decay", 0.0), self.current_step)
        return terms

    def finish(self, sess: TrainSession, data: dict[str, torch.Tensor]) -> None:
        """Collective work every rank does at the last step, before the final checkpoint."""

    def train_state(self) -> dict:
        return {"objective": self.objective.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}

    def load_train_state(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])

    def export(self) -> tuple[dict, dict]:
        """({model: {net: state dict}}, {model: {net: meta}}) of the exported (EMA) networks."""
        raise NotImplementedError


class VAEPhase(Phase):
    def build(self) -> nn.Module:
        sc, over = self.sc, ({"base_channels": self.sc["base_channels"]} if self.sc["base_channels"] else {})
        over.update(subpixel=sc["subpixel"], decoder_res_blocks=sc["decoder_res_blocks"])
        vae = build_vae(sc["size"], 1, self.config["image_size"], latent_channels=sc["latent_channels"],
                        downsample=sc["downsample"], **over)
        return VAEObjective(vae, sc["kl_weight"])

    def prepare_data(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = _pixels(pairs)
        return {"x": torch.cat([p["defect"], p["clean"]])}  # both domains

    def step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        with self.amp():
            terms = self.model(batch["x"].to(self.device), gen)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.opt.step()
        return terms

    @torch.no_grad()
    def finish(self, sess: TrainSession, data: dict[str, torch.Tensor]) -> None:
        # LDM: scale latents to unit variance; s = 1 / std of the training latent means over every worker's shard.
        vae = self.objective.vae.eval()
        vae.latent_scale.fill_(1.0)
        z = _encode_all(vae, data["x"].to(self.device))
        n = float(z.numel())
        total, total_sq, count = sess.all_reduce_mean([float(z.sum()), float((z * z).sum()), n])
        mean = total / count
        std = max((total_sq / count - mean * mean) ** 0.5, 1e-6)
        vae.latent_scale.fill_(1.0 / std)
        vae.train()
        self.ema.load_state_dict(self.objective.state_dict())

    def export(self) -> tuple[dict, dict]:
        vae = self.objective.vae
        return {"vae": {"vae": vae.state_dict()}}, {"vae": {"vae": vae.meta()}}


class DenoiserPhase(Phase):
    """ICDDM (pixels, conditional), ICDDM-unpaired (pixels, clean prior) or CDLDM (latents, conditional + prior)."""

    def build(self) -> nn.Module:
        kind, size, ch = self.config["phase"], self.sc["size"], 1
        over = {"base_channels": self.sc["base_channels"]} if self.sc["base_channels"] else {}
        if kind == "cdldm":
            self.vae = _frozen_vae(self.config["deps"]["vae"]).to(self.device)
            ch, res = self.vae.latent_channels, self.vae.latent_shape(self.config["image_size"])[1]
            nets = {"net": build_conditional_unet(size, ch, ch, res, **over),
                    "prior": build_conditional_unet(self.sc["prior_size"], ch, 0, res)}
            roles = {"net": ("clean", "defect"), "prior": ("defect", None)}
        elif kind == "icddm":
            nets = {"net": build_conditional_unet(size, 1, 1, self.config["image_size"], **over)}
            roles = {"net": ("clean", "defect")}
        else:
            nets = {"net": build_conditional_unet(size, 1, 0, self.config["image_size"], **over)}
            roles = {"net": ("clean", None)}
        return DenoiseObjective(nets, roles, self.config["diffusion"])

    def prepare_data(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = _pixels(pairs)
        if self.config["phase"] != "cdldm":
            return {"defect": p["defect"], "clean": p["clean"]}
        vae = self.vae
        return {"defect": _encode_all(vae, p["defect"].to(self.device)).cpu(),
                "clean": _encode_all(vae, p["clean"].to(self.device)).cpu()}

    def export(self) -> tuple[dict, dict]:
        nets = self.ema.nets
        model = self.config["phase"]
        weights = {name: net.state_dict() for name, net in nets.items()}
        metas = {name: net.meta() for name, net in nets.items()}
        if model == "cdldm":
            weights["vae"], metas["vae"] = self.vae.state_dict(), self.vae.meta()
        return {model: weights}, {model: metas}


class BaselinePhase(Phase):
    def build(self) -> nn.Module:
        sc, size = self.sc, self.config["image_size"]
        over = {"base_channels": sc["base_channels"]} if sc["base_channels"] else {}
        ae = build_vae(sc["ae_size"], 1, size, downsample=sc["ae_downsample"], **over)
        return BaselineObjective(ae, build_unet(sc["unet_size"], in_channels=1, image_size=size, **over),
                                 self.config["kl_weight"])

    def export(self) -> tuple[dict, dict]:
        return ({"ae": {"ae": self.ema.ae.state_dict()}, "supervised": {"seg": self.ema.seg.state_dict()}},
                {"ae": {"ae": self.ema.ae.meta()}, "supervised": {"seg": self.ema.seg.meta()}})


class StudentPhase(Phase):
    """KDCDDM: G(z_d) ≈ teacher(z_d) in one step; D says teacher latents are real. Adam(0.5, 0.999) for both."""

    betas = (0.5, 0.999)

    def __init__(self, config: dict, device: torch.device):
        self.config, self.sc, self.device = config, config["section"], device
        deps = config["deps"]
        self.vae = _frozen_vae(deps["vae"]).to(device)
        self.teacher = {}
        for name in ("net", "prior"):
            net = conditional_unet_from_meta(deps["cdldm"]["meta"][name])
            net.load_state_dict(deps["cdldm"]["state"][name])
            self.teacher[name] = net.eval().requires_grad_(False).to(device)
        ch, res = self.vae.latent_shape(config["image_size"])[:2]
        self.g = build_generator(self.sc["generator"], ch, res).to(device)
        self.d = build_discriminator(self.sc["discriminator"], ch).to(device)
        self.ema = copy.deepcopy(self.g).requires_grad_(False)
        self.opt = torch.optim.Adam(self.g.parameters(), lr=self.sc["lr_g"], betas=self.betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=self.sc["lr_d"], betas=self.betas)

    def wrap(self, sess: TrainSession) -> None:
        self.g_ddp, self.d_ddp = sess.prepare(self.g), sess.prepare(self.d)
        self.amp = sess.autocast  # run.precision

    def prepare_data(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Defect latents and the frozen teacher's clean latents for them, computed once (DDIM, teacher_steps)."""
        defect = pairs["defect"][: self.sc["max_targets"] or None]
        z = _encode_all(self.vae, (defect * 2 - 1).to(self.device))
        diffusion = make_diffusion(self.config["diffusion"])
        gen = generator(self.config["seed"], "kdcddm", "teacher-targets", self.config["rank"])
        inf = self.config["inference"]
        targets = [translate_latent(self.teacher["net"], diffusion, z[i:i + 256], z[i:i + 256],
                                    self.sc["teacher_steps"], inf["cond_t_start"], gen, clip_x0=LATENT_CLIP)
                   for i in range(0, z.shape[0], 256)]
        return {"z": z.cpu(), "teacher": torch.cat(targets).cpu()}

    def step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        z, real = batch["z"].to(self.device), batch["teacher"].to(self.device)
        with self.amp():
            fake = self.g_ddp(z).float()  # (N, L, h, w); float32 for the losses (a no-op at fp32)
            # D step: teacher latents real, student latents fake (one forward through DDP).
            logits = self.d_ddp(torch.cat([real, fake.detach()]))
            d_terms = discriminator_loss(logits[: z.shape[0]], logits[z.shape[0]:])
        self.opt_d.zero_grad(set_to_none=True)
        d_terms["loss"].mean().backward()
        self.opt_d.step()
        # G step: BCE(D(G(z)), 1) + λ_L1·|G(z) − teacher(z)| (raw D: its grads are cleared before its next step).
        with self.amp():
            g_terms = student_loss(self.d(fake), fake, real, self.sc["l1_weight"])
        self.opt.zero_grad(set_to_none=True)
        g_terms["loss"].mean().backward()
        self.opt.step()
        ema_update(self.ema, self.g, self.sc.get("ema_decay", 0.0), self.current_step)
        return {"loss": g_terms["loss"].mean(), "loss_adv": g_terms["adv"].mean(), "loss_l1": g_terms["l1"].mean(),
                "loss_d": d_terms["loss"].mean()}

    def train_state(self) -> dict:
        return {"g": self.g.state_dict(), "ema": self.ema.state_dict(), "d": self.d.state_dict(),
                "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_train_state(self, state: dict) -> None:
        self.g.load_state_dict(state["g"])
        self.ema.load_state_dict(state["ema"])
        self.d.load_state_dict(state["d"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])

    def export(self) -> tuple[dict, dict]:
        return ({"kdcddm": {"generator": self.ema.state_dict(), "vae": self.vae.state_dict(),
                            "prior": self.teacher["prior"].state_dict()}},
                {"kdcddm": {"generator": self.ema.meta(), "vae": self.vae.meta(),
                            "prior": self.teacher["prior"].meta()}})


PHASE_CLASSES = {"vae": VAEPhase, "icddm": DenoiserPhase, "icddm_unpaired": DenoiserPhase, "cdldm": DenoiserPhase,
                 "student": StudentPhase, "baselines": BaselinePhase}


# --------------------------------------------------------------------------- the loop

def phase_loop(config: dict) -> None:
    """Per-worker loop of every phase: config = {"phase", "section", "kind", "image_size", "diffusion", "deps",
    "meta", ...} (trainers/kdcddm/driver.py builds it)."""
    sess = TrainSession.current()
    if "deps_ref" in config:  # Ray workers fetch frozen networks from the object store
        import ray

        config = {**config, "deps": ray.get(config["deps_ref"])}
    config = {**config, "rank": sess.rank, "seed": sess.run.seed}
    sc, name = config["section"], config["phase"]
    torch.manual_seed(sess.run.seed)  # identical init on every worker (DDP also broadcasts)
    phase = PHASE_CLASSES[name](config, sess.device)
    start = 0
    restored = sess.restore()
    if restored is not None:
        state, meta = restored
        phase.load_train_state(state["train"])
        start = int(meta["step"])
    phase.wrap(sess)
    data = phase.prepare_data(pairs_from_tensors(sess.load_shard("train", config["kind"]), config["kind"]))
    gen = generator(sess.run.seed, "kdcddm", name, sess.rank, start)  # a resumed run draws anew
    batches = infinite_batches(data, sc["batch_size"], gen)
    cadence = Cadence(sc["log_every"], sc["checkpoint_every"], sc["steps"])
    running = RunningMeans()
    for step in range(start + 1, sc["steps"] + 1):
        phase.current_step = step  # the EMA's warm-up reads it
        running.add(phase.step(sess.to_device(next(batches)), gen))  # pinned, asynchronous copies on CUDA
        if cadence.report(step):
            checkpoint = cadence.checkpoint(step)
            if step == sc["steps"]:
                phase.finish(sess, data)

            def state() -> dict:
                weights, _ = phase.export()
                return {"train": phase.train_state(), "models": weights}

            meta = None
            if checkpoint:
                meta = {**config["meta"], "models": phase.export()[1]}
            sess.report({**running.pop(), "resumed_from": start, "world_size": sess.world_size}, step=step,
                        state=state if checkpoint else None, meta=meta)
