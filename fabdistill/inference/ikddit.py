"""IKDDiT inference: a loaded teacher or student with its contrastive embedding and noise schedule.

One sampling implementation, used by apps/sample (:func:`sample_to_files`), evaluation and sweeps
(trainers/ikddit_eval.py, trainers/ikddit_tune.py through :func:`sample_in_batches`) and serve/
(:meth:`IKDDiTPipeline.sample_many`). Training code (trainers/ikddit.py) imports from here, never the other
way round.

Randomness is per request: a request (``n`` maps, one seed) draws from its own ``torch.Generator``, first its
x_T (n, 2, H, W), then at every sampler step its token masks (n, L) (and, for DDPM, the step noise). Requests
batched together therefore get the maps each would get alone, up to float rounding of batched matrix products.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob
from fabdistill.seeding import derive_seed
from models.diffusion import GaussianDiffusion
from models.dit import NETWORKS, build_network, random_masking_many

SAMPLERS = ("ddim", "ddpm")


def make_diffusion(model: dict) -> GaussianDiffusion:
    return GaussianDiffusion(num_timesteps=model["num_timesteps"], schedule=model["schedule"],
                             beta_start=model["beta_start"], beta_end=model["beta_end"])


def _network_args(model: dict, map_size: int) -> dict:
    overrides = {"decoder_depth": model["decoder_depth"]} if model.get("decoder_depth") else {}
    return dict(input_size=map_size, in_channels=2, patch_size=model.get("patch_size") or None,
                log_dim=model["log_dim"], num_ids=model["num_ids"], **overrides)


def build_one(model: dict, map_size: int, name: str) -> nn.Module:
    """One network (teacher | student | embedding | discriminator) of a checkpoint's `model` section."""
    return build_network(name, model["size"], **_network_args(model, map_size))


def build_networks(model: dict, map_size: int) -> dict[str, nn.Module]:
    """All four networks (what training needs), built in the order of models.dit.NETWORKS."""
    return {name: build_one(model, map_size, name) for name in NETWORKS}


def eps_from_output(diffusion: GaussianDiffusion, prediction: str, x_t: torch.Tensor, t: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    return diffusion.predict_eps(x_t, t, out) if prediction == "x0" else out


def default_mask_ratio(meta: dict) -> float:
    """The mask ratio a checkpoint samples with by default: its training ratio for a student, 0 for a teacher."""
    return float(meta.get("mask_ratio", 0.5)) if meta.get("role") == "student" else 0.0


def row_seeds(seed: int, n: int) -> list[int]:
    """One seed per map (row i of n) from a run's seed, so that map i is the same whatever the batch size and
    whether it is sampled alone: derive_seed(seed, "row", i)."""
    return [derive_seed(seed, "row", i) for i in range(n)]


class IKDDiTPipeline:
    """A loaded teacher or student with its embedding and schedule. Keeps no per-call state: one instance can
    serve concurrent requests (each call builds its own generators and tensors)."""

    def __init__(self, net: nn.Module, embedding: nn.Module, meta: dict, role: str,
                 device: torch.device | str = "cpu"):
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
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
        """Load a teacher or student checkpoint (or run folder); builds only the network it runs + embedding."""
        state, meta = load_state(resolve_checkpoint(path))
        if meta.get("method") != "ikddit":
            raise ValueError(f"{path}: not an IKDDiT checkpoint (method {meta.get('method')!r})")
        role = meta.get("role")
        if role not in ("teacher", "student"):
            raise ValueError(f"{path}: IKDDiT checkpoint of unknown role {role!r} (expected teacher or student)")
        net = build_one(meta["model"], meta["map_size"], role)
        embedding = build_one(meta["model"], meta["map_size"], "embedding")
        try:
            net.load_state_dict(state[role])
            embedding.load_state_dict(state["embedding"])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: checkpoint does not match its recorded model config ({exc})") from None
        return cls(net, embedding, meta, role, device)

    @property
    def log_dim(self) -> int:
        return self.model_cfg["log_dim"]

    @property
    def num_ids(self) -> int:
        return self.model_cfg["num_ids"]

    @property
    def num_patches(self) -> int:
        return self.net.num_patches

    @property
    def default_mask_ratio(self) -> float:
        return default_mask_ratio(self.meta)

    def resolve_mask_ratio(self, mask_ratio: Optional[float]) -> float:
        """None -> the checkpoint's default; a teacher always sees every token (0). Raises ValueError naming
        mask_ratio when the ratio would keep no token."""
        if self.role == "teacher":
            return 0.0
        ratio = self.default_mask_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= ratio < 1.0 or int(self.num_patches * (1 - ratio)) < 1:
            raise ValueError(f"mask_ratio {ratio} must be in [0, 1) and keep at least one of the "
                             f"{self.num_patches} tokens")
        return ratio

    # ------------------------------------------------------------------------------------------ sampling

    def _conditions(self, log, equipment_id, rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked conditioning on the device: log (N, log_dim) float32, equipment_id (N,) long."""
        log = torch.as_tensor(log, dtype=torch.float32)
        equipment_id = torch.as_tensor(equipment_id, dtype=torch.long)
        if log.dim() != 2 or log.shape[1] != self.log_dim:
            raise ValueError(f"equipment_log must have shape (N, {self.log_dim}), got {tuple(log.shape)}")
        if equipment_id.dim() != 1 or equipment_id.shape[0] != log.shape[0]:
            raise ValueError(f"equipment_id must have shape ({log.shape[0]},) to match equipment_log, "
                             f"got {tuple(equipment_id.shape)}")
        if rows is not None and log.shape[0] != rows:
            raise ValueError(f"equipment_log has {log.shape[0]} rows; the requests' sizes sum to {rows}")
        if equipment_id.numel() and (int(equipment_id.min()) < 0 or int(equipment_id.max()) >= self.num_ids):
            raise ValueError(f"equipment_id values must lie in [0, {self.num_ids})")
        return log.to(self.device), equipment_id.to(self.device)

    def denoiser(self, log: torch.Tensor, equipment_id: torch.Tensor, mask_ratio: float,
                 generators: Sequence[Optional[torch.Generator]], sizes: Sequence[int]):
        """model_fn(x_t, t) -> ε for the samplers in models/diffusion.py, over N = sum(sizes) rows.

        Consecutive rows (``sizes[i]`` of them) draw the student's token masks from ``generators[i]`` at every
        call, so requests batched together draw the masks each would draw alone."""
        if len(sizes) != len(generators) or sum(sizes) != log.shape[0]:
            raise ValueError("need one generator per request, with `sizes` summing to the batch size")
        cond = self.embedding(log, equipment_id)
        prediction = self.model_cfg["prediction"]
        sizes, generators = list(sizes), list(generators)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.role == "teacher":
                out = self.net(x_t, t, cond["cond_tokens"], cond["cond_vec"])
            else:
                ids_keep = random_masking_many(sizes, generators, self.num_patches, mask_ratio,
                                               device=x_t.device)[0]  # (N, L_keep)
                out = self.net(x_t, t, cond["cond_tokens"], cond["cond_vec"], mask_ratio=mask_ratio,
                               ids_keep=ids_keep)["out"]
            return eps_from_output(self.diffusion, prediction, x_t, t, out)

        return model_fn

    def _draw(self, sizes: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Each request's unit Gaussian (n_i, 2, H, W) from its own generator, concatenated on the device."""
        h = w = self.map_size
        draws = [torch.randn((n, 2, h, w), generator=g) for n, g in zip(sizes, generators)]
        return torch.cat(draws).to(self.device)

    @torch.no_grad()
    def _run(self, log: torch.Tensor, equipment_id: torch.Tensor, sizes: list[int], seeds: list[int], *,
             steps: int, mask_ratio: float, sampler: str) -> torch.Tensor:
        """THE sampling loop: (N, 2, H, W) maps in nm on the device, N = sum(sizes)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        x = self._draw(sizes, gens)  # x_T: each generator's first draw
        model_fn = self.denoiser(log, equipment_id, mask_ratio, gens, sizes)
        if sampler == "ddim":
            x = self.diffusion.ddim_sample(model_fn, None, steps=steps, x_T=x)  # eta = 0: deterministic
        else:
            # Alg. 2 (DDPM), T steps; each request's step noise from its own generator, after its masks.
            n = x.shape[0]
            for t in range(self.diffusion.num_timesteps - 1, -1, -1):
                eps = model_fn(x, torch.full((n,), t, dtype=torch.long, device=x.device))
                x = self.diffusion.ddpm_step(x, t, eps, self._draw(sizes, gens) if t > 0 else None)
        return x * self.scale_nm * self.valid.to(x.device)

    def _check_requests(self, sizes: Sequence[int], seeds: Sequence[int]) -> tuple[list[int], list[int]]:
        sizes, seeds = [int(n) for n in sizes], [int(s) for s in seeds]
        if not sizes or len(sizes) != len(seeds):
            raise ValueError(f"need one seed per request: {len(sizes)} sizes, {len(seeds)} seeds")
        if min(sizes) < 1:
            raise ValueError(f"every request needs n >= 1, got sizes {sizes}")
        return sizes, seeds

    def sample_many(self, log, equipment_id, sizes: Sequence[int], seeds: Sequence[int], *, steps: int,
                    mask_ratio: Optional[float] = None, sampler: str = "ddim") -> list[np.ndarray]:
        """Requests sampled together in one loop: request i is ``sizes[i]`` maps from generator ``seeds[i]``.

        log: (sum(sizes), log_dim) per map, or (len(sizes), log_dim) per request (repeated over its maps);
        equipment_id likewise. mask_ratio None: the checkpoint's default (a teacher ignores it).
        Returns one (n_i, 2, H, W) float32 array in nm per request, equal to ``sample()`` of that request alone
        (up to float rounding of batched matrix products).
        """
        sizes, seeds = self._check_requests(sizes, seeds)
        log, equipment_id = torch.as_tensor(log, dtype=torch.float32), torch.as_tensor(equipment_id)
        total = sum(sizes)
        if log.dim() == 2 and log.shape[0] == len(sizes) != total:
            counts = torch.tensor(sizes)
            log, equipment_id = log.repeat_interleave(counts, dim=0), equipment_id.repeat_interleave(counts)
        log, equipment_id = self._conditions(log, equipment_id, total)
        ratio = self.resolve_mask_ratio(mask_ratio)
        maps = self._run(log, equipment_id, sizes, seeds, steps=steps, mask_ratio=ratio, sampler=sampler)
        return list(np.split(maps.float().cpu().numpy(), np.cumsum(sizes)[:-1]))

    def sample(self, log, equipment_id, *, steps: int = 50, mask_ratio: Optional[float] = None,
               sampler: str = "ddim", seed: Optional[int] = None) -> torch.Tensor:
        """One request: N maps in nm, (N, 2, H, W) on the pipeline's device, conditioned on log (N, log_dim) and
        equipment_id (N,), all drawn from one generator seeded with `seed` (random when None)."""
        log, equipment_id = self._conditions(log, equipment_id)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        return self._run(log, equipment_id, [log.shape[0]], [seed], steps=steps,
                         mask_ratio=self.resolve_mask_ratio(mask_ratio), sampler=sampler)


def sample_in_batches(pipe: IKDDiTPipeline, log: np.ndarray, equipment_id: np.ndarray, seeds: Sequence[int], *,
                      steps: int, mask_ratio: Optional[float] = None, sampler: str = "ddim",
                      batch_size: int = 256, label: str = "") -> tuple[np.ndarray, float]:
    """Each row its own one-map request (seed ``seeds[i]``), ``batch_size`` rows per loop, with progress lines.

    Map i therefore does not depend on the batch size, and a teacher and a student given the same seeds start
    from the same x_T. Returns (maps (N, 2, H, W) nm, seconds spent sampling after an untimed warm-up).
    """
    n = len(seeds)
    if n < 1 or log.shape[0] != n or equipment_id.shape[0] != n:
        raise ValueError(f"need one seed per row: {log.shape[0]} logs, {equipment_id.shape[0]} IDs, {n} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    # Untimed warm-up at the timed batch shape: a one-row warm-up left the first full batch to pay for its
    # allocations, which on CPU moved the measured student/teacher ratio by up to ~20 %.
    warm = min(batch_size, n)
    pipe.sample_many(log[:warm], equipment_id[:warm], [1] * warm, seeds[:warm], steps=1, mask_ratio=mask_ratio,
                     sampler="ddim")
    out, spent = [], 0.0
    for i in range(0, n, batch_size):
        rows = slice(i, min(i + batch_size, n))
        k = rows.stop - rows.start
        t0 = time.perf_counter()
        maps = pipe.sample_many(log[rows], equipment_id[rows], [1] * k, seeds[rows], steps=steps,
                                mask_ratio=mask_ratio, sampler=sampler)
        spent += time.perf_counter() - t0
        out.extend(maps)
        if label:
            print(f"[sample] {label}: {rows.stop}/{n} ({rows.stop / max(spent, 1e-9):.1f} maps/s)", flush=True)
    return np.concatenate(out), spent


# --------------------------------------------------------------------------- sampling to files (apps/sample)

@dataclasses.dataclass
class SampleSettings:
    """`python -m apps.sample ikddit` settings (`--set key=value`)."""

    n: int = knob(64, ge=1, le=1_000_000, help="maps to generate")
    steps: int = knob(50, ge=1, le=4000, help="DDIM steps (DDPM always runs the schedule's T steps)")
    mask_ratio: Optional[float] = knob(None, ge=0, lt=1,
                                       help="student token mask ratio; unset: the checkpoint's training ratio")
    sampler: str = knob("ddim", choices=SAMPLERS)
    seed: int = knob(0, ge=0, help="map i draws from row_seeds(seed, n)[i]")
    conditions: str = knob("", help="overlay Parquet whose logs/IDs condition the maps; empty: held-out contexts "
                                    "(data/seeds.py OVERLAY_CONDITIONS)")
    batch_size: int = knob(256, ge=1, le=65536, help="maps per sampler loop")


def sample_to_files(checkpoint: str, out_dir: str, settings: SampleSettings) -> str:
    """Sample a checkpoint into out_dir: `samples/` (Parquet, overlay schema: the conditioning rows with the
    generated maps in place of the real ones), `samples.png` (dx | dy heat maps) and `samples_quiver.png` (vector
    plots over the wafer and field grid). Returns a one-line message."""
    import pyarrow as pa

    from data.overlay import grid_coordinates
    from data.parquet_io import from_fixed_list, read_dataset, write_dataset
    from data.seeds import OVERLAY_CONDITIONS
    from fabdistill import storage
    from fabdistill.viz import overlay_heatmaps, overlay_quiver, save_figure

    pipe = IKDDiTPipeline.from_checkpoint(checkpoint)
    n = settings.n
    if settings.conditions:
        table = read_dataset(settings.conditions)
        if table.num_rows < n:
            raise ValueError(f"{settings.conditions}: {table.num_rows} rows, fewer than n = {n}")
        table = table.slice(0, n)
    else:
        from data.overlay import generate_overlay

        table = generate_overlay(n, seed=OVERLAY_CONDITIONS, height=pipe.map_size, width=pipe.map_size,
                                 log_dim=pipe.log_dim)
    log = from_fixed_list(table.column("log"), (pipe.log_dim,)).astype(np.float32)
    ids = table.column("equipment_id").to_numpy().astype(np.int64)
    ratio = pipe.resolve_mask_ratio(settings.mask_ratio)
    maps, _ = sample_in_batches(pipe, log, ids, row_seeds(settings.seed, n), steps=settings.steps,
                                mask_ratio=ratio, sampler=settings.sampler, batch_size=settings.batch_size,
                                label=pipe.role)
    index = table.schema.get_field_index("overlay")
    flat = pa.FixedSizeListArray.from_arrays(pa.array(maps.astype(np.float32).reshape(-1)), maps[0].size)
    generated = table.set_column(index, table.schema.field("overlay"), flat)
    parquet_uri = storage.join(out_dir, "samples")
    write_dataset(generated, parquet_uri, "overlay")
    k = min(n, 8)
    steps = settings.steps if settings.sampler == "ddim" else pipe.diffusion.num_timesteps
    titles = [f"{pipe.role} id {int(i)}" for i in ids[:k]]
    valid = grid_coordinates(pipe.map_size, pipe.map_size)["valid"]
    heading = f"IKDDiT {pipe.role}, {settings.sampler} {steps} steps, mask ratio {ratio}"
    png_uri = save_figure(overlay_heatmaps(maps[:k], titles, valid=valid, columns=4, heading=heading),
                          storage.join(out_dir, "samples.png"))
    quiver_uri = save_figure(overlay_quiver(maps[:k], titles, valid=valid, columns=4, heading=heading),
                             storage.join(out_dir, "samples_quiver.png"))
    return f"wrote {n} maps to {parquet_uri} and pictures to {png_uri} (dx | dy) and {quiver_uri} (vectors)"
