"""DMD2 evaluation: the generator next to its teacher at full and at equal NFE, and a measured real floor.

Rows (all scored against the same N held-out real samples, generator seed HELD_OUT_SEEDS[domain], never a
training seed; every model is conditioned on the held-out samples' own classes and draws sample i from
row_seeds(seed, N)[i], so all models start from the same noise):

    real floor (class-matched)   N real samples of exactly the held-out class counts from another seed
                                 (FLOOR_SEEDS): what a perfect class-conditional generator scores at this N
    teacher Heun 35 NFE          the quality reference (EDM's 18-step Heun)
    teacher Euler 1 / 2 / 4 NFE  the fair baseline a one-step / few-step model must beat
    DMD2 k-step                  the generator (k = its trained chain length, or EvalSettings.generator_steps)

Scores: FID-N and KID with the domain feature extractor (metrics/fid.py), class fidelity (the share of samples
the domain classifier assigns to the requested class; the floor row shows the classifier's own accuracy on
real data), and images/s, timed in this process with the same batch for every model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch

from fabdistill import storage
from fabdistill.config import knob
from fabdistill.inference.dmd2 import (CLASS_NAMES, DMD2Pipeline, class_grid, domain_encoding, row_seeds,
                                       sample_in_batches)
from fabdistill.methods import EvalTable

# Held-out and floor seeds of the DMD2 evaluation, named in data/seeds.py.
from data import seeds
from data.seeds import WAFER_HELD_OUT

HELD_OUT_SEEDS = {"wafer": WAFER_HELD_OUT, "sem": seeds.SEM_HELD_OUT}
FLOOR_SEEDS = {"wafer": seeds.WAFER_FLOOR, "sem": seeds.SEM_FLOOR}
FLOOR_ROW = "real floor (class-matched)"
ROLES = ("generator", "teacher")


@dataclasses.dataclass
class EvalSettings:
    """`python -m apps.evaluate dmd2` settings (`--set key=value`)."""

    n: int = knob(1000, ge=2, le=1_000_000, help="held-out real samples, samples per model and floor samples (FID-N)")
    seed: int = knob(0, ge=0, help="sample i draws from row_seeds(seed, n)[i], for every model")
    batch_size: int = knob(250, ge=1, le=65536, help="samples per sampler call (the same for every model)")
    teacher_nfe: int = knob(35, ge=1, le=4001, help="the teacher's reference NFE (Heun: odd)")
    baseline_nfe: tuple[int, ...] = knob((1, 2, 4), ge=1, le=4000, help="teacher Euler NFEs (equal-NFE baselines)")
    generator_steps: tuple[int, ...] = knob((), ge=1, le=4, help="generator chain steps; empty: the trained one")
    steps: Optional[int] = knob(None, ge=1, le=4, help="shorthand for generator_steps=(steps,)")
    classifier: str = knob("", help="class-fidelity judge: a trainers.classifier checkpoint (wafer_pm1 / image_pm1 "
                                    "encoding) trained at this image size; empty: the committed domain classifier")
    auto_teacher: bool = knob(True, help="a generator given alone brings the teacher its checkpoint records")


# --------------------------------------------------------------------------- real sets

def real_set(n: int, domain: str, size: int, seed: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(samples (N, 1, H, W) native units, classes (N,) int64) from the synthetic generator (held-out seed)."""
    from data.datasets import table_to_tensors
    from fabdistill.inference.dmd2 import LABEL_KEYS

    seed = HELD_OUT_SEEDS[domain] if seed is None else seed
    table = _generate(domain, n, seed, size)
    t = table_to_tensors(table, domain_encoding(domain).kind)
    return t[domain_encoding(domain).key].numpy().astype(np.float32), t[LABEL_KEYS[domain]].numpy()


def _generate(domain: str, n: int, seed: int, size: int, only: Optional[str] = None, start: int = 0):
    if domain == "wafer":
        from data.wafer import generate_wafer

        return generate_wafer(n, seed=seed, size=size, class_weights={only: 1.0} if only else None, start=start)
    from data.sem import generate_sem

    return generate_sem(n, seed=seed, size=size, defect_weights={only: 1.0} if only else None, start=start)


def floor_set(labels: np.ndarray, domain: str, size: int) -> np.ndarray:
    """Real samples with exactly `labels`' class counts, from FLOOR_SEEDS[domain], in `labels`' order."""
    from data.datasets import table_to_tensors

    enc = domain_encoding(domain)
    out = np.zeros((labels.shape[0], 1, size, size), np.float32)
    for c, name in enumerate(CLASS_NAMES[domain]):
        rows = np.flatnonzero(labels == c)
        if rows.size:  # each class its own index range of the floor seed's stream
            table = _generate(domain, rows.size, FLOOR_SEEDS[domain], size, only=name, start=c * 10_000_000)
            out[rows] = table_to_tensors(table, enc.kind)[enc.key].numpy()
    return out


# --------------------------------------------------------------------------- scoring

class CheckpointClassifier:
    """A trainers.classifier checkpoint as a judge over native-unit samples: (N, 1, H, W) -> logits (N, K)."""

    def __init__(self, path: str):
        from data.encoding import ENCODINGS
        from fabdistill.inference.classifier import load_classifier

        self.model, self.meta = load_classifier(path)
        self.encoding = ENCODINGS[self.meta["encoding"]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from fabdistill.inference.classifier import predict_logits

        return predict_logits(self.model, self.encoding.encode(x.float()))


def load_judge(domain: str, classifier: str = "") -> Any:
    """The class-fidelity classifier: a given checkpoint, or the committed domain classifier (metrics/fid.py)."""
    if classifier:
        judge = CheckpointClassifier(classifier)
        k = judge.meta.get("num_classes")
        if k is not None and k != len(CLASS_NAMES[domain]):
            raise ValueError(f"classifier {classifier} has {k} classes; {domain} has {len(CLASS_NAMES[domain])}")
        return judge
    from metrics.fid import load_domain_classifier

    return load_domain_classifier(domain)


def class_fidelity(samples: np.ndarray, labels: np.ndarray, classifier: Any, batch_size: int = 500) -> float:
    """Share of samples the domain classifier assigns to the class they were generated for."""
    hits = 0
    for i in range(0, samples.shape[0], batch_size):
        logits = classifier(torch.from_numpy(samples[i:i + batch_size]))
        hits += int((logits.argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return hits / max(samples.shape[0], 1)


def score(samples: np.ndarray, real: np.ndarray, labels: np.ndarray, domain: str, classifier: Any) -> dict[str, Any]:
    from metrics.fid import compute_fid_kid

    fid = compute_fid_kid(torch.from_numpy(samples), torch.from_numpy(real), domain=domain)
    return {"fid": fid["fid"], "kid_mean": fid["kid_mean"], "kid_std": fid["kid_std"],
            "class_fidelity": class_fidelity(samples, labels, classifier)}


def columns(n: int) -> dict[str, tuple[str, str]]:
    return {"model": ("model", ""), "nfe": ("NFE", "d"), "fid": (f"FID-{n}", ".2f"), "kid_mean": ("KID", ".4f"),
            "class_fidelity": ("class fidelity", ".3f"), "images_per_s": ("images/s", ".1f")}


def load_pipelines(checkpoints: dict[str, str], auto_teacher: bool = True) -> dict[str, DMD2Pipeline]:
    """Role -> pipeline; a generator alone brings its teacher along (the path its checkpoint records)."""
    unknown = [r for r in checkpoints if r not in ROLES]
    if unknown:
        raise ValueError(f"DMD2 evaluates roles {', '.join(ROLES)}; got {unknown[0]!r}")
    pipes: dict[str, DMD2Pipeline] = {}
    for role in ROLES:
        if checkpoints.get(role):
            pipe = DMD2Pipeline.from_checkpoint(checkpoints[role])
            if pipe.role != role:
                raise ValueError(f"{role} checkpoint {checkpoints[role]} is a {pipe.role} checkpoint")
            pipes[role] = pipe
    if not pipes:
        raise ValueError("give a generator and/or a teacher checkpoint to evaluate")
    recorded = pipes["generator"].meta.get("teacher_checkpoint") if "generator" in pipes else None
    if auto_teacher and "teacher" not in pipes and recorded and storage.exists(storage.join(recorded, "state.pt")):
        pipes["teacher"] = DMD2Pipeline.from_checkpoint(recorded)
    shapes = {(p.domain, p.image_size) for p in pipes.values()}
    if len(shapes) > 1:
        raise ValueError(f"teacher and generator disagree on (domain, image size): {sorted(shapes)}")
    return pipes


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Evaluate {"generator": path, "teacher": path} (either may be missing) against settings.n held-out real
    samples; one row per model and sampler setting, and the class-matched real floor."""
    s = settings or EvalSettings()
    pipes = load_pipelines(checkpoints, s.auto_teacher)
    first = next(iter(pipes.values()))
    domain, size, n = first.domain, first.image_size, s.n
    real, labels = real_set(n, domain, size)
    classifier = load_judge(domain, s.classifier)
    seeds = row_seeds(s.seed, n)
    rows = [{"model": FLOOR_ROW, **score(floor_set(labels, domain, size), real, labels, domain, classifier)}]
    samples: dict[str, np.ndarray] = {"real": real}
    runs: list[tuple[str, str, int, str]] = []  # (row name, role, steps, sampler)
    if "teacher" in pipes:
        runs.append((f"teacher Heun {s.teacher_nfe} NFE", "teacher", s.teacher_nfe, "heun"))
        runs += [(f"teacher Euler {k} NFE", "teacher", k, "euler") for k in s.baseline_nfe]
    if "generator" in pipes:
        steps = (s.steps,) if s.steps else (s.generator_steps or (pipes["generator"].default_steps,))
        runs += [(f"DMD2 {k}-step", "generator", k, "generator") for k in steps]
    for name, role, steps, sampler in runs:
        pipe = pipes[role]
        x, spent = sample_in_batches(pipe, labels, seeds, steps=steps, sampler=sampler, batch_size=s.batch_size,
                                     label=name)
        samples[name] = x
        rows.append({"model": name, "role": role, "nfe": steps, "sampler": sampler,
                     **score(x, real, labels, domain, classifier), "images_per_s": n / max(spent, 1e-9),
                     "checkpoint_step": pipe.meta.get("step")})
    what = {"wafer": "wafer maps", "sem": "SEM images"}[domain]
    table = EvalTable(title=f"DMD2 on {n} held-out {what} ({size}×{size}), class-conditional",
                      columns=columns(n), rows=rows, notes=_notes(rows, n, domain),
                      extras={"n": n, "seed": s.seed, "domain": domain, "image_size": size,
                              "held_out_seed": HELD_OUT_SEEDS[domain], "floor_seed": FLOOR_SEEDS[domain],
                              "targets": targets(rows, s.teacher_nfe)})
    if out_dir:
        table.report_path = write_report(out_dir, table, samples, labels, first.class_names, domain, checkpoints)
    return table


def targets(rows: list[dict], teacher_nfe: int = 35) -> dict[str, Any]:
    """The issue's targets, for each generator row: FID ≤ 1.5× teacher(35) FID, below teacher(1 NFE),
    ≥ 25× teacher(35) images/s, class fidelity within 5 points of the teacher's."""
    by = {r["model"]: r for r in rows}
    ref = by.get(f"teacher Heun {teacher_nfe} NFE")
    one = by.get("teacher Euler 1 NFE")
    out: dict[str, Any] = {}
    for r in rows:
        if r.get("role") != "generator" or ref is None:
            continue
        out[r["model"]] = {
            "fid_ratio_to_teacher": r["fid"] / max(ref["fid"], 1e-9),
            "fid_le_1.5x_teacher": r["fid"] <= 1.5 * ref["fid"],
            "fid_below_teacher_1nfe": None if one is None else r["fid"] < one["fid"],
            "speedup": r["images_per_s"] / max(ref["images_per_s"], 1e-9),
            "speedup_ge_25x": r["images_per_s"] >= 25 * ref["images_per_s"],
            "fidelity_gap_points": 100 * (r["class_fidelity"] - ref["class_fidelity"]),
            "fidelity_within_5_points": abs(r["class_fidelity"] - ref["class_fidelity"]) <= 0.05,
        }
    return out


def _notes(rows: list[dict], n: int, domain: str) -> list[str]:
    notes = [f"- {FLOOR_ROW}: {n} real samples (seed {FLOOR_SEEDS[domain]}) with the held-out set's class counts "
             f"(held-out seed {HELD_OUT_SEEDS[domain]}): the FID of a perfect generator at this N; its class "
             "fidelity is the classifier's accuracy on real data."]
    for name, t in targets(rows).items():
        notes.append(f"- {name}: FID {t['fid_ratio_to_teacher']:.2f}× the teacher's 35-NFE FID (target ≤ 1.5×); "
                     f"{t['speedup']:.1f}× its images/s (target ≥ 25×); class fidelity "
                     f"{t['fidelity_gap_points']:+.1f} points (target within ±5)"
                     + ("" if t["fid_below_teacher_1nfe"] is None else
                        f"; {'below' if t['fid_below_teacher_1nfe'] else 'NOT below'} the teacher at 1 NFE"))
    return notes


def write_report(out_dir: str, table: EvalTable, samples: dict[str, np.ndarray], labels: np.ndarray,
                 class_names: tuple[str, ...], domain: str, checkpoints: dict[str, str] | None = None) -> str:
    """report.md with the table, one class-grid figure per model (rows = classes; wafer maps in the off / pass /
    fail palette, SEM images grey), training_curves.png from the checkpoints' metrics.jsonl, and metrics.json."""
    from fabdistill.reports import run_curves
    from fabdistill.reports import write_report as write

    figures = {}
    for name, x in samples.items():
        if name == "real" or name.startswith("teacher Heun") or name.startswith("DMD2") or "1 NFE" in name:
            figures[f"samples {name}"] = class_grid(x, labels, class_names, domain, heading=name)
    figures["training curves"] = run_curves(checkpoints or {})
    notes = ["- FID/KID: torch-fidelity with the project's domain feature extractor (metrics/weights/), lower is "
             "better; compare with the floor row, not with 0.",
             "- class fidelity: share of samples the domain classifier assigns to the requested class.",
             "- images/s: sampling only, this process, the same batch for every model."]
    return write(out_dir, "DMD2 evaluation", table, figures, notes=notes)


__all__ = ["EvalSettings", "FLOOR_ROW", "FLOOR_SEEDS", "HELD_OUT_SEEDS", "class_fidelity", "evaluate", "floor_set",
           "load_judge", "load_pipelines", "real_set", "score", "targets"]
