"""IKDDiT inference: a loaded teacher or student with its contrastive embedding and noise schedule.

One sampling implementation, used by apps/sample, apps/evaluate, tune (scoring) and serve/. Training code
(trainers/ikddit.py) imports from here, never the other way round.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fabdistill.checkpoints import load_state, resolve_checkpoint
from models.diffusion import GaussianDiffusion
from models.dit import build_dit


def make_diffusion(model: dict) -> GaussianDiffusion:
    return GaussianDiffusion(num_timesteps=model["num_timesteps"], schedule=model["schedule"],
                             beta_start=model["beta_start"], beta_end=model["beta_end"])


def build_networks(model: dict, map_size: int) -> dict[str, nn.Module]:
    overrides = {}
    if model.get("decoder_depth"):
        overrides["decoder_depth"] = model["decoder_depth"]
    return build_dit(model["size"], input_size=map_size, in_channels=2, patch_size=model.get("patch_size") or None,
                     log_dim=model["log_dim"], num_ids=model["num_ids"], **overrides)


def eps_from_output(diffusion: GaussianDiffusion, prediction: str, x_t: torch.Tensor, t: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    return diffusion.predict_eps(x_t, t, out) if prediction == "x0" else out


def default_mask_ratio(meta: dict) -> float:
    """The mask ratio a checkpoint samples with by default: its training ratio for a student, 0 for a teacher."""
    return float(meta.get("mask_ratio", 0.5)) if meta.get("role") == "student" else 0.0


class IKDDiTPipeline:
    """A loaded teacher or student with its embedding and schedule. Keeps no per-call state: one instance can
    serve concurrent requests (each call builds its own generator and tensors)."""

    def __init__(self, net: nn.Module, embedding: nn.Module, meta: dict, role: str,
                 device: torch.device | str = "cpu"):
        self.net = net.eval().requires_grad_(False).to(device)
        self.embedding = embedding.eval().requires_grad_(False).to(device)
        self.meta, self.role, self.device = meta, role, torch.device(device)
        self.model_cfg = meta["model"]
        self.map_size: int = meta["map_size"]
        self.scale_nm: float = meta["scale_nm"]
        self.diffusion = make_diffusion(self.model_cfg)
        from data.overlay import grid_coordinates

        self.valid = torch.from_numpy(grid_coordinates(self.map_size, self.map_size)["valid"].astype(np.float32))

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str = "cpu") -> "IKDDiTPipeline":
        state, meta = load_state(resolve_checkpoint(path))
        if meta.get("method") != "ikddit":
            raise ValueError(f"{path}: not an IKDDiT checkpoint (method {meta.get('method')!r})")
        nets = build_networks(meta["model"], meta["map_size"])
        role = meta["role"]
        try:
            if role == "teacher":
                nets["teacher"].load_state_dict(state["teacher"])
                net = nets["teacher"]
            else:
                nets["student"].load_state_dict(state["student"])
                net = nets["student"]
            nets["embedding"].load_state_dict(state["embedding"])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: checkpoint does not match its recorded model config ({exc})") from None
        return cls(net, nets["embedding"], meta, role, device)

    @property
    def log_dim(self) -> int:
        return self.model_cfg["log_dim"]

    @property
    def num_ids(self) -> int:
        return self.model_cfg["num_ids"]

    def denoiser(self, log: torch.Tensor, equipment_id: torch.Tensor, mask_ratio: float,
                 generator: Optional[torch.Generator] | list[torch.Generator],
                 sizes: Optional[list[int]] = None):
        """model_fn(x_t, t) -> ε for the samplers in models/diffusion.py.

        `generator` draws the student's token masks. A list of generators with `sizes` (summing to N) gives
        consecutive rows their own generators, so requests batched together (serve/) draw the masks each would
        draw alone."""
        from models.dit import random_masking

        cond = self.embedding(log, equipment_id)
        prediction = self.model_cfg["prediction"]
        if isinstance(generator, list) and (sizes is None or len(sizes) != len(generator)
                                            or sum(sizes) != log.shape[0]):
            raise ValueError("a list of generators needs `sizes`, one per generator, summing to the batch size")

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.role == "teacher":
                out = self.net(x_t, t, cond["cond_tokens"], cond["cond_vec"])
            elif isinstance(generator, list):
                ids_keep = torch.cat([random_masking(n, self.net.num_patches, mask_ratio, generator=g)[0]
                                      for n, g in zip(sizes, generator)]).to(x_t.device)  # (N, L_keep)
                out = self.net(x_t, t, cond["cond_tokens"], cond["cond_vec"], mask_ratio=mask_ratio,
                               ids_keep=ids_keep)["out"]
            else:
                out = self.net(x_t, t, cond["cond_tokens"], cond["cond_vec"], mask_ratio=mask_ratio,
                               generator=generator)["out"]
            return eps_from_output(self.diffusion, prediction, x_t, t, out)

        return model_fn

    @torch.no_grad()
    def sample(self, log: torch.Tensor, equipment_id: torch.Tensor, *, steps: int = 50, mask_ratio: float = 0.5,
               sampler: str = "ddim", eta: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
        """Generate maps in nm, (N, 2, H, W), conditioned on log (N, log_dim) and equipment_id (N,)."""
        log = torch.as_tensor(log, dtype=torch.float32, device=self.device)
        equipment_id = torch.as_tensor(equipment_id, dtype=torch.long, device=self.device)
        if log.dim() != 2 or log.shape[1] != self.log_dim:
            raise ValueError(f"equipment_log must have shape (N, {self.log_dim}), got {tuple(log.shape)}")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**31)))
        model_fn = self.denoiser(log, equipment_id, mask_ratio if self.role == "student" else 0.0, generator)
        shape = (log.shape[0], 2, self.map_size, self.map_size)
        if sampler == "ddim":
            x = self.diffusion.ddim_sample(model_fn, shape, steps=steps, eta=eta, generator=generator,
                                           device=self.device)
        elif sampler == "ddpm":
            x = self.diffusion.ddpm_sample(model_fn, shape, generator=generator, device=self.device)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        return x * self.scale_nm * self.valid.to(x.device)
