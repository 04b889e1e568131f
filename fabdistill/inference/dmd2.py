"""DMD2 inference: a loaded EDM teacher or a distilled one-step / few-step generator, by class.

One sampling implementation, used by apps/sample (:func:`sample_to_files`), evaluation and sweeps
(trainers/dmd2/evaluate.py, trainers/dmd2/tune.py through :func:`sample_in_batches`) and serve/
(:meth:`DMD2Pipeline.sample_many`). Training code imports from here, never the other way round.

Roles and what `steps` means:
    generator   the distilled G: `steps` ∈ {1, …, 4} chain steps (models.edm.edm_generator_sample at
                models.edm.generator_sigmas(steps)); one step is G(80·n; 80). Default: the trained chain length.
    teacher     the EDM denoiser: `steps` is the NFE. sampler "heun" (EDM Alg. 1; an odd NFE = 2·k − 1, 35 = the
                18-step reference) or "euler" (any NFE; the fair equal-NFE baseline of a few-step generator).

Randomness is per request: request i (``sizes[i]`` samples of one class, seed ``seeds[i]``) draws from its own
``torch.Generator``: first its unit noise (n_i, C, H, W), then, for a few-step chain, the fresh noise of each
renoising step. Requests batched together therefore get the samples each would get alone.

Samples come back in the data's native units (data/encoding.py): wafer maps rounded to the dies' value set
(0 off-wafer by the fixed wafer geometry, 1 pass, 2 fail), SEM grey levels clipped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Optional, Sequence

import numpy as np
import torch

from data.encoding import Encoding, encoding_for
from data.schema import SEM_DEFECTS, WAFER_CLASSES
from fabdistill.checkpoints import load_state, resolve_checkpoint
from fabdistill.config import knob
from fabdistill.seeding import derive_seed
from models.edm import edm_euler_sample, edm_generator_sample, edm_heun_sample, generator_sigmas
from models.edm_unet import EDMDenoiser, edm_denoiser_from_meta

ROLES = ("teacher", "generator")
DOMAINS = ("wafer", "sem")
TEACHER_SAMPLERS = ("heun", "euler")
MAX_GENERATOR_STEPS = 4
CLASS_NAMES: dict[str, tuple[str, ...]] = {"wafer": WAFER_CLASSES, "sem": SEM_DEFECTS}
LABEL_KEYS: dict[str, str] = {"wafer": "label", "sem": "defect"}  # class column of each kind (data/datasets.py)


def domain_encoding(domain: str) -> Encoding:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return encoding_for(domain)


def wafer_valid(size: int) -> np.ndarray:
    """(S, S) bool on-wafer mask of the generator's geometry (data/wafer.py)."""
    from data.wafer import wafer_geometry

    return wafer_geometry(size)[0]


def decode_samples(x: torch.Tensor, domain: str) -> np.ndarray:
    """Network-range samples (N, 1, H, W) → native units (N, 1, H, W) float32 in the data's value set.

    wafer: (x·scale + offset) rounded to {1 pass, 2 fail} on the wafer and 0 off it (the geometry is fixed);
    sem: grey levels clipped to [0, 1]."""
    enc = domain_encoding(domain)
    native = enc.decode(x.detach().float().cpu())
    if domain == "wafer":
        valid = torch.from_numpy(wafer_valid(x.shape[-1]))
        dies = native.round().clamp(1, 2)
        return torch.where(valid, dies, torch.zeros_like(dies)).numpy().astype(np.float32)
    return native.clamp(0, 1).numpy().astype(np.float32)


def row_seeds(seed: int, n: int) -> list[int]:
    """One seed per sample i of n, so sample i does not depend on the batch size: derive_seed(seed, "row", i)."""
    return [derive_seed(seed, "row", i) for i in range(n)]


class DMD2Pipeline:
    """A loaded teacher or generator. Keeps no per-call state: one instance serves concurrent requests."""

    def __init__(self, net: EDMDenoiser, meta: dict, role: str, device: torch.device | str = "cpu"):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.net = net.eval().requires_grad_(False).to(device)
        self.meta, self.role, self.device = meta, role, torch.device(device)
        self.domain: str = meta["domain"]
        self.image_size: int = int(meta["net"]["image_size"])
        self.channels: int = int(meta["net"]["in_channels"])
        self.class_names: tuple[str, ...] = tuple(meta.get("class_names") or CLASS_NAMES[self.domain])

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str = "cpu") -> "DMD2Pipeline":
        """A DMD2 teacher or generator checkpoint folder (or its run folder)."""
        state, meta = load_state(resolve_checkpoint(path))
        if meta.get("method") != "dmd2":
            raise ValueError(f"{path}: not a DMD2 checkpoint (method {meta.get('method')!r})")
        role = meta.get("role")
        if role not in ROLES:
            raise ValueError(f"{path}: DMD2 checkpoint of unknown role {role!r} (expected one of {ROLES})")
        net = edm_denoiser_from_meta(meta["net"])
        try:
            net.load_state_dict(state[role])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: checkpoint does not match its recorded network ({exc})") from None
        return cls(net, meta, role, device)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def default_steps(self) -> int:
        """Generator: its trained chain length; teacher: 35 NFE (Heun, 18 steps)."""
        return int(self.meta.get("num_steps", 1)) if self.role == "generator" else 35

    def resolve(self, steps: Optional[int], sampler: str = "auto") -> tuple[int, str]:
        """(steps, sampler) checked for this role; ValueError naming `steps` or `sampler` otherwise."""
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        steps = int(steps)
        if self.role == "generator":
            if sampler not in ("auto", "generator"):
                raise ValueError(f"sampler {sampler!r}: a generator runs its own chain (sampler 'generator')")
            if steps > MAX_GENERATOR_STEPS:
                raise ValueError(f"steps must be in 1..{MAX_GENERATOR_STEPS} for a generator, got {steps}")
            return steps, "generator"
        sampler = "heun" if sampler == "auto" else sampler
        if sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"sampler must be one of {TEACHER_SAMPLERS} for a teacher, got {sampler!r}")
        if sampler == "heun" and steps % 2 == 0:
            raise ValueError(f"steps={steps}: Heun makes 2·k − 1 denoiser calls, so its NFE is odd; use "
                             "sampler 'euler' for an even NFE")
        return steps, sampler

    def check_labels(self, labels: Sequence[int]) -> torch.Tensor:
        out = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if out.ndim != 1:
            raise ValueError(f"labels must be a 1-d sequence of class indices, got shape {tuple(out.shape)}")
        if out.numel() and (int(out.min()) < 0 or int(out.max()) >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) ({', '.join(self.class_names)})")
        return out

    @torch.no_grad()
    def _run(self, labels: torch.Tensor, sizes: list[int], seeds: list[int], steps: int, sampler: str) -> torch.Tensor:
        """THE sampling loop: (N, C, H, W) in the network's range on the device, N = sum(sizes)."""
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (self.channels, self.image_size, self.image_size)

        def draw(_: int = 0) -> torch.Tensor:  # each request's next unit Gaussian, from its own generator
            return torch.cat([torch.randn((n, *shape), generator=g) for n, g in zip(sizes, gens)]).to(self.device)

        latents = draw()
        y = labels.repeat_interleave(torch.tensor(sizes)).to(self.device)  # (N,) class per sample
        if sampler == "generator":
            sigmas = generator_sigmas(steps)  # (k,) σ_max = 80 first; one step at the trained conditioning σ
            if steps == 1:
                sigmas = torch.tensor([float(self.meta.get("conditioning_sigma", 80.0))])
            return edm_generator_sample(self.net, latents, sigmas, renoise=draw, class_labels=y)
        if sampler == "heun":
            return edm_heun_sample(self.net, latents, num_steps=(steps + 1) // 2, class_labels=y)
        return edm_euler_sample(self.net, latents, num_steps=steps, class_labels=y)

    def sample_many(self, labels: Sequence[int], sizes: Sequence[int], seeds: Sequence[int], *,
                    steps: Optional[int] = None, sampler: str = "auto") -> list[np.ndarray]:
        """Requests sampled together: request i is ``sizes[i]`` samples of class ``labels[i]`` from generator
        ``seeds[i]``. Returns one (n_i, C, H, W) float32 array in native units per request, equal to that
        request sampled alone (up to float rounding of batched convolutions)."""
        sizes, seeds = [int(n) for n in sizes], [int(s) for s in seeds]
        y = self.check_labels(labels)
        if not sizes or not len(sizes) == len(seeds) == y.numel():
            raise ValueError(f"need one label and one seed per request: {len(sizes)} sizes, {y.numel()} labels, "
                             f"{len(seeds)} seeds")
        if min(sizes) < 1:
            raise ValueError(f"every request needs n >= 1, got sizes {sizes}")
        steps, sampler = self.resolve(steps, sampler)
        out = decode_samples(self._run(y, sizes, seeds, steps, sampler), self.domain)
        return list(np.split(out, np.cumsum(sizes)[:-1]))

    def sample(self, label: int, n: int = 1, *, seed: Optional[int] = None, steps: Optional[int] = None,
               sampler: str = "auto") -> np.ndarray:
        """One request: n samples (n, C, H, W) of one class, native units; a random seed when None."""
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        return self.sample_many([label], [n], [seed], steps=steps, sampler=sampler)[0]


def sample_in_batches(pipe: DMD2Pipeline, labels: np.ndarray, seeds: Sequence[int], *, steps: Optional[int] = None,
                      sampler: str = "auto", batch_size: int = 250, label: str = "") -> tuple[np.ndarray, float]:
    """Each row its own one-sample request (class labels[i], seed seeds[i]), batch_size rows per call.

    Sample i therefore does not depend on the batch size, and a teacher and a generator given the same seeds
    start from the same noise. Returns (samples (N, C, H, W) native units, seconds after an untimed warm-up)."""
    n = len(seeds)
    if n < 1 or len(labels) != n:
        raise ValueError(f"need one seed per label: {len(labels)} labels, {n} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    warm = min(16, batch_size, n)
    pipe.sample_many(labels[:warm], [1] * warm, seeds[:warm], steps=steps, sampler=sampler)  # untimed warm-up
    out, spent = [], 0.0
    for i in range(0, n, batch_size):
        rows = slice(i, min(i + batch_size, n))
        t0 = time.perf_counter()
        out.extend(pipe.sample_many(labels[rows], [1] * (rows.stop - rows.start), seeds[rows], steps=steps,
                                    sampler=sampler))
        spent += time.perf_counter() - t0
    if label:
        print(f"[sample] {label}: {n} samples, {n / max(spent, 1e-9):.1f} samples/s", flush=True)
    return np.concatenate(out), spent


# --------------------------------------------------------------------------- pictures

def class_grid(samples: np.ndarray, labels: np.ndarray, class_names: Sequence[str], domain: str, heading: str = "",
               per_row: int = 8):
    """Native-unit samples (N, 1, H, W) as a matplotlib Figure with one row per class present in `labels` (its name
    at the left), up to per_row samples each: wafer maps in the off / pass / fail palette, SEM images in grey
    (fabdistill.viz.class_grid)."""
    from fabdistill.viz import class_grid as draw

    domain_encoding(domain)  # a clear error for an unknown domain
    images = samples[:, 0] if domain == "sem" else np.clip(np.rint(samples[:, 0]), 0, 2)
    return draw(images, labels, class_names, kind="wafer" if domain == "wafer" else "grey", per_row=per_row,
                heading=heading)


# --------------------------------------------------------------------------- sampling to files (apps/sample)

@dataclasses.dataclass
class SampleSettings:
    """`python -m apps.sample dmd2` settings (`--set key=value`)."""

    n: int = knob(8, ge=1, le=100_000, help="samples per class")
    classes: tuple[int, ...] = knob((), ge=0, help="class indices to sample; empty: every class")
    steps: Optional[int] = knob(None, ge=1, le=4000,
                                help="generator: chain steps 1..4 (default: trained); teacher: NFE (default 35)")
    sampler: str = knob("auto", choices=("auto", "generator") + TEACHER_SAMPLERS,
                        help="teacher: heun (odd NFE) or euler; a generator runs its own chain")
    seed: int = knob(0, ge=0, help="sample i draws from row_seeds(seed, N)[i]")
    batch_size: int = knob(250, ge=1, le=65536, help="samples per sampler call")


def samples_table(samples: np.ndarray, labels: np.ndarray, domain: str, tag: str):
    """Samples (N, 1, H, W) native units → an Arrow table of the domain's dataset kind (wafer | sem)."""
    n = samples.shape[0]
    if domain == "wafer":
        from data.wafer import wafer_table

        maps = samples[:, 0].astype(np.uint8)
        return wafer_table(maps, None, labels, [f"{tag}-L0"] * n, [f"{tag}-{i:06d}" for i in range(n)],
                           die_size=np.full(n, float(wafer_valid(maps.shape[-1]).sum())))
    import pyarrow as pa

    from data.schema import to_fixed_list

    images = samples[:, 0].astype(np.float32)
    nan = pa.array(np.full(n, np.nan, np.float32), type=pa.float32())
    return pa.table({"image": to_fixed_list(images), "clean": to_fixed_list(images),  # no clean twin: itself
                     "mask": to_fixed_list(np.zeros_like(images, dtype=np.uint8)),
                     "defect": pa.array(labels.astype(np.int16), type=pa.int16()),
                     "defect_name": pa.array([SEM_DEFECTS[d] for d in labels], type=pa.string()),
                     "sample_id": pa.array([f"{tag}-{i:08d}" for i in range(n)], type=pa.string()),
                     "pitch": nan, "line_width": nan, "roughness": nan, "noise": nan,
                     "height": pa.array(np.full(n, images.shape[1]), type=pa.int32()),
                     "width": pa.array(np.full(n, images.shape[2]), type=pa.int32())})


def sample_to_files(checkpoint: str, out_dir: str, settings: SampleSettings) -> str:
    """Sample a checkpoint into out_dir: `samples/` (Parquet, the domain's schema, one row per sample with its
    class) and `samples.png` (rows = classes). Returns a one-line message."""
    from data.parquet_io import write_dataset
    from fabdistill import storage
    from fabdistill.viz import save_figure

    pipe = DMD2Pipeline.from_checkpoint(checkpoint)
    classes = list(settings.classes) or list(range(pipe.num_classes))
    pipe.check_labels(classes)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), settings.n)
    steps, sampler = pipe.resolve(settings.steps, settings.sampler)
    samples, spent = sample_in_batches(pipe, labels, row_seeds(settings.seed, labels.size), steps=steps,
                                       sampler=sampler, batch_size=settings.batch_size, label=pipe.role)
    parquet_uri = storage.join(out_dir, "samples")
    write_dataset(samples_table(samples, labels, pipe.domain, f"dmd2-{pipe.role}"), parquet_uri, pipe.domain)
    what = f"{steps}-step generator" if sampler == "generator" else f"teacher {sampler} {steps} NFE"
    png_uri = storage.join(out_dir, "samples.png")
    save_figure(class_grid(samples, labels, pipe.class_names, pipe.domain,
                           heading=f"DMD2 {what}, seed {settings.seed}"), png_uri)
    return (f"wrote {labels.size} samples ({len(classes)} classes × {settings.n}, {what}, "
            f"{labels.size / max(spent, 1e-9):.1f}/s) to {parquet_uri} and a picture to {png_uri}")
