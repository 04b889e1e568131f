"""IKDDiT evaluation: sample teacher and/or student on held-out equipment contexts, score them next to a measured
real-data floor, write a report.

Scores (all against N held-out real maps, generator seed data/seeds.OVERLAY_HELD_OUT, never a training seed):
- FID-N and KID through torch-fidelity with the project's overlay feature extractor (metrics/fid.py);
- overlay model-fit statistics: fitted 10-term distributions and residual |mean|+3σ (metrics/overlay.py);
- conditional fidelity: the overlay domain classifier recognises the equipment a map was conditioned on;
- sampling throughput of each, measured in the same process, at the same steps and batch.

The floor row. Samples are conditioned on the held-out maps' own equipment contexts, so they share those maps'
scanner/chuck/reticle fingerprints and drift; real maps of other contexts would score worse than a good model
and say nothing. The floor is N real maps with exactly the held-out contexts but independent wafer terms and
measurement noise (data/overlay.generate_overlay(context_seed=...), seed OVERLAY_FLOOR), scored with the same
N and code: what a perfect conditional generator would score.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch

from data.seeds import OVERLAY_FLOOR, OVERLAY_HELD_OUT
from fabdistill.config import knob
from fabdistill.inference.ikddit import IKDDiTPipeline, row_seeds, sample_in_batches
from fabdistill.methods import EvalTable

ROLES = ("teacher", "student")
FLOOR_ROW = "real floor (context-matched)"


@dataclasses.dataclass
class EvalSettings:
    """`python -m apps.evaluate ikddit` settings (`--set key=value`)."""

    n: int = knob(1000, ge=2, le=1_000_000, help="held-out maps, samples per model and floor maps (FID-N)")
    steps: int = knob(50, ge=1, le=4000, help="DDIM steps")
    mask_ratio: Optional[float] = knob(None, ge=0, lt=1,
                                       help="student mask ratio; unset: the checkpoint's training ratio")
    batch_size: int = knob(256, ge=1, le=65536, help="maps per sampler loop")
    seed: int = knob(0, ge=0, help="sampling seed (map i draws from row_seeds(seed, n)[i], for every model)")
    feature_extractor_weights_path: Optional[str] = knob(
        None, help="torch-fidelity InceptionV3 weights file: FID/KID on Inception features instead of the "
                   "project's overlay feature extractor")


# --------------------------------------------------------------------------- real sets

def held_out_set(n: int, map_size: int = 32, log_dim: int = 128, seed: int = OVERLAY_HELD_OUT,
                 context_seed: Optional[int] = None) -> dict[str, np.ndarray]:
    """Real maps (N, 2, H, W) nm with their equipment logs (N, log_dim) and IDs (N,), from the synthetic
    generator; `context_seed`: another set's equipment contexts with this seed's noise."""
    from data.overlay import generate_overlay, grid_coordinates
    from data.parquet_io import from_fixed_list

    table = generate_overlay(n, seed=seed, height=map_size, width=map_size, log_dim=log_dim,
                             context_seed=context_seed)
    return {"maps": from_fixed_list(table.column("overlay"), (2, map_size, map_size)).astype(np.float32),
            "log": from_fixed_list(table.column("log"), (log_dim,)).astype(np.float32),
            "equipment_id": table.column("equipment_id").to_numpy().astype(np.int64),
            "valid": grid_coordinates(map_size, map_size)["valid"]}


def floor_set(n: int, map_size: int = 32, log_dim: int = 128) -> dict[str, np.ndarray]:
    """The context-matched floor: the held-out set's contexts, independent wafer terms and measurement noise."""
    return held_out_set(n, map_size, log_dim, seed=OVERLAY_FLOOR, context_seed=OVERLAY_HELD_OUT)


# --------------------------------------------------------------------------- sampling and scoring

def sample_held_out(pipe: IKDDiTPipeline, real: dict[str, np.ndarray], *, steps: int, mask_ratio: Optional[float],
                    seed: int, batch_size: int, label: str = "") -> tuple[np.ndarray, float]:
    """Maps conditioned on the real set's contexts, map i from row_seeds(seed, N)[i] (the pipeline's one
    sampling loop). Returns (maps (N, 2, H, W) nm, seconds)."""
    seeds = row_seeds(seed, real["log"].shape[0])
    return sample_in_batches(pipe, real["log"], real["equipment_id"], seeds, steps=steps, mask_ratio=mask_ratio,
                             batch_size=batch_size, label=label)


def fid_kid(maps: np.ndarray, real: dict[str, np.ndarray],
            feature_extractor_weights_path: Optional[str] = None) -> dict[str, Any]:
    from metrics.fid import compute_fid_kid

    return compute_fid_kid(torch.from_numpy(maps), torch.from_numpy(real["maps"]), domain="overlay",
                           feature_extractor_weights_path=feature_extractor_weights_path)


def score_maps(maps: np.ndarray, real: dict[str, np.ndarray], real_stats: dict, classifier: Any,
               feature_extractor_weights_path: Optional[str] = None) -> dict[str, Any]:
    """One table row's scores of maps (N, 2, H, W) nm conditioned on (or drawn with) real's contexts."""
    from metrics.overlay import compare_overlay_stats, conditional_fidelity, overlay_stats

    fid = fid_kid(maps, real, feature_extractor_weights_path)
    stats = overlay_stats(maps)
    return {"fid": fid["fid"], "kid_mean": fid["kid_mean"], "kid_std": fid["kid_std"],
            "cond_fidelity": conditional_fidelity(maps, real["equipment_id"], classifier),
            "resid_3s_x": stats["residual_m3s_mean"]["x"], "resid_3s_y": stats["residual_m3s_mean"]["y"],
            "term_w1": compare_overlay_stats(real_stats, stats)["mean_w1_norm"]}


def columns(n: int) -> dict[str, tuple[str, str]]:
    return {"model": ("model", ""), "fid": (f"FID-{n}", ".2f"), "kid_mean": ("KID", ".3f"),
            "cond_fidelity": ("cond. fidelity", ".3f"), "resid_3s_x": ("resid. \\|m\\|+3σ x (nm)", ".2f"),
            "resid_3s_y": ("resid. \\|m\\|+3σ y (nm)", ".2f"), "term_w1": ("term W1", ".3f"),
            "maps_per_s": ("maps/s", ".1f")}


def load_pipelines(checkpoints: dict[str, str]) -> dict[str, IKDDiTPipeline]:
    """Role -> pipeline, teacher first; each checkpoint must be of the role it is given as."""
    unknown = [r for r in checkpoints if r not in ROLES]
    if unknown:
        raise ValueError(f"IKDDiT evaluates roles {', '.join(ROLES)}; got {unknown[0]!r}")
    given = {r: checkpoints[r] for r in ROLES if checkpoints.get(r)}
    if not given:
        raise ValueError("give a student and/or a teacher checkpoint to evaluate")
    pipelines = {}
    for role, path in given.items():
        pipe = IKDDiTPipeline.from_checkpoint(path)
        if pipe.role != role:
            raise ValueError(f"{role} checkpoint {path} is a {pipe.role} checkpoint")
        pipelines[role] = pipe
    shapes = {(p.map_size, p.log_dim) for p in pipelines.values()}
    if len(shapes) > 1:
        raise ValueError(f"teacher and student disagree on (map size, log dim): {sorted(shapes)}")
    return pipelines


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Evaluate the given roles ({"student": path, "teacher": path}, either may be missing) against
    settings.n held-out real maps, with the context-matched real floor as a row of its own."""
    from metrics.fid import load_domain_classifier
    from metrics.overlay import overlay_stats

    settings = settings or EvalSettings()
    pipelines = load_pipelines(checkpoints)
    first = next(iter(pipelines.values()))
    n, fe_path = settings.n, settings.feature_extractor_weights_path
    real = held_out_set(n, first.map_size, first.log_dim)
    classifier = load_domain_classifier("overlay")
    real_stats = overlay_stats(real["maps"])
    floor = floor_set(n, first.map_size, first.log_dim)
    rows = [{"model": FLOOR_ROW, **score_maps(floor["maps"], real, real_stats, classifier, fe_path)}]
    samples: dict[str, np.ndarray] = {}
    for role, pipe in pipelines.items():
        ratio = pipe.resolve_mask_ratio(settings.mask_ratio)
        maps, spent = sample_held_out(pipe, real, steps=settings.steps, mask_ratio=ratio, seed=settings.seed,
                                      batch_size=settings.batch_size, label=role)
        samples[role] = maps
        rows.append({"model": role, **score_maps(maps, real, real_stats, classifier, fe_path),
                     "maps_per_s": n / max(spent, 1e-9), "mask_ratio": ratio, "steps": settings.steps,
                     "checkpoint_step": pipe.meta.get("step")})
    table = EvalTable(title=f"IKDDiT on {n} held-out overlay maps, DDIM {settings.steps} steps",
                      columns=columns(n), rows=rows, notes=_notes(rows, n),
                      extras={"n": n, "steps": settings.steps, "seed": settings.seed, "speedup": _speedup(rows),
                              "held_out_seed": OVERLAY_HELD_OUT, "floor_seed": OVERLAY_FLOOR})
    if out_dir:
        table.report_path = write_report(out_dir, table, real, samples, checkpoints)
    return table


def _by_model(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def _speedup(rows: list[dict]) -> Optional[float]:
    by = _by_model(rows)
    if "teacher" in by and "student" in by:
        return by["student"]["maps_per_s"] / by["teacher"]["maps_per_s"]
    return None


def _notes(rows: list[dict], n: int) -> list[str]:
    by = _by_model(rows)
    notes = [f"- {FLOOR_ROW}: {n} real maps (seed {OVERLAY_FLOOR}) with the held-out maps' equipment contexts "
             f"(seed {OVERLAY_HELD_OUT}) and independent wafer terms and measurement noise, scored like the models: "
             "the score of a perfect conditional generator at this N."]
    if "teacher" in by and "student" in by:
        ratio = by["student"]["fid"] / max(by["teacher"]["fid"], 1e-9)
        notes.append(f"- student FID / teacher FID: {ratio:.3f}; student sampling speed-up over the teacher "
                     f"(same steps and batch, one process): {_speedup(rows):.2f}×")
    return notes


def write_report(out_dir: str, table: EvalTable, real: dict, samples: dict[str, np.ndarray],
                 checkpoints: dict[str, str] | None = None) -> str:
    """report.md with the table and figures (samples.png: dx | dy heat maps, real | each model in rows, the same
    equipment context per column; samples_quiver.png: the same maps as vectors over the wafer and field grid;
    training_curves.png from the checkpoints' metrics.jsonl) and metrics.json into out_dir."""
    from fabdistill.reports import run_curves
    from fabdistill.reports import write_report as write
    from fabdistill.viz import overlay_heatmaps, overlay_quiver

    k = min(4, real["maps"].shape[0])
    shown = np.concatenate([real["maps"][:k]] + [samples[name][:k] for name in samples])
    titles = [f"real id {int(i)}" for i in real["equipment_id"][:k]]
    for name in samples:
        titles += [f"{name} id {int(i)}" for i in real["equipment_id"][:k]]
    heading = "same equipment context per column; rows: real | " + " | ".join(samples)
    figures = {"samples": overlay_heatmaps(shown, titles, valid=real["valid"], columns=k, heading=heading),
               "samples quiver": overlay_quiver(shown, titles, valid=real["valid"], columns=k, heading=heading),
               "training curves": run_curves(checkpoints or {})}
    n, steps = table.extras["n"], table.extras["steps"]
    intro = [f"{n} held-out real maps (generator seed {OVERLAY_HELD_OUT}); DDIM {steps} steps; samples conditioned "
             "on the held-out maps' equipment logs and IDs."]
    notes = ["- FID/KID: torch-fidelity with the project's overlay feature extractor (metrics/weights/), lower is "
             "better; compare the models with the floor row, not with 0.",
             "- cond. fidelity: share of maps whose equipment (scanner × chuck) the overlay classifier recognises "
             "as the one conditioned on (chance ≈ 1/16).",
             "- resid. |m|+3σ: residual after the 10-term linear fit; term W1: mean normalised Wasserstein-1 "
             "distance of fitted terms to the real distribution."]
    return write(out_dir, "IKDDiT evaluation", table, figures, notes=notes, intro=intro)
