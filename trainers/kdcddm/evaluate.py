"""KDCDDM evaluation: every model side by side on held-out masks, thresholds chosen on the validation split.

For each model (ICDDM, ICDDM-unpaired, CDLDM, KDCDDM, the AE-reconstruction baseline, the supervised UNet):
    threshold  chosen with metrics.segmentation.choose_threshold on `n_validation` validation images (seed
               SEM_VALIDATION / WAFER_VALIDATION; the checkpoint's stored threshold with recalibrate=false)
    metrics    pixel AUROC, AP, PRO (FPR ≤ 0.3), pooled IoU and Dice at that threshold, on `n` test images
               (seed SEM_HELD_OUT / data.seeds.WAFER_HELD_OUT), never seen by training or by the threshold
    images/s   scoring throughput (translation + score map) at the same batch size, one process

Two reference rows need no model (`references`, on by default): "real clean twin" scores |defect − its real clean
twin| (real vs real: what a perfect translation would give, so the ceiling of every translation model) and
"random score" scores uniform noise (the chance floor); both are smoothed like the models and thresholded on the
same validation split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch

from fabdistill.config import knob
from fabdistill.inference.kdcddm import MODELS, Segmenter, gaussian_smooth, held_out_pairs
from fabdistill.methods import EvalTable

ROLES = ("run",) + MODELS
LABELS = {"icddm": "ICDDM (pixel)", "icddm_unpaired": "ICDDM-unpaired (t₀)", "cdldm": "CDLDM (teacher)",
          "kdcddm": "KDCDDM (student)", "ae": "AE reconstruction (baseline)",
          "supervised": "supervised UNet (upper bound)"}
REFERENCE_LABELS = {"real_twin": "real clean twin (translation ceiling)", "random": "random score (floor)"}


@dataclasses.dataclass
class EvalSettings:
    """`python -m apps.evaluate kdcddm` settings (`--set key=value`)."""

    n: int = knob(500, ge=8, le=1_000_000, help="held-out test images")
    n_validation: int = knob(128, ge=8, le=100_000, help="validation images the thresholds are chosen on")
    domain: str = knob("", help="sem | wafer; empty: the checkpoints' domain")
    steps: Optional[int] = knob(None, ge=1, le=1000, help="DDIM steps; unset: each checkpoint's")
    t0: Optional[int] = knob(None, ge=1, le=999, help="ICDDM-unpaired noise level; unset: the checkpoint's")
    smooth_sigma: Optional[float] = knob(None, ge=0, le=16, help="score smoothing (px); unset: the checkpoint's")
    recalibrate: bool = knob(True, help="choose thresholds on the validation split now (with these settings)")
    batch_size: int = knob(64, ge=1, le=65536, help="images per forward pass, the same for every model")
    seed: int = knob(0, ge=0, help="sampling seed")
    references: bool = knob(True, help="add the real-clean-twin ceiling and the random-score floor rows")


def columns() -> dict[str, tuple[str, str]]:
    return {"label": ("model", ""), "auroc": ("pixel AUROC", ".4f"), "ap": ("AP", ".4f"), "pro": ("PRO", ".4f"),
            "iou": ("IoU", ".4f"), "dice": ("Dice", ".4f"), "images_per_s": ("images/s", ".1f"),
            "threshold": ("threshold", ".4f")}


def resolve_roles(checkpoints: dict[str, str]) -> dict[str, str]:
    """{model: checkpoint}: the "run" role expands to every phase folder `<run>-<phase>` it finds."""
    from trainers.kdcddm.driver import phase_checkpoints

    unknown = [r for r in checkpoints if r not in ROLES]
    if unknown:
        raise ValueError(f"KDCDDM evaluates roles {', '.join(ROLES)}; got {unknown[0]!r}")
    found: dict[str, str] = {}
    if checkpoints.get("run"):
        found.update(phase_checkpoints(checkpoints["run"]))
    found.update({k: v for k, v in checkpoints.items() if k != "run" and v})
    if not found:
        raise ValueError("give at least one checkpoint (a model role, or run=<run folder base>)")
    return {m: found[m] for m in MODELS if m in found}


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    from metrics.segmentation import choose_threshold, segmentation_metrics

    settings = settings or EvalSettings()
    models = resolve_roles(checkpoints)
    pipes = {m: Segmenter.from_checkpoint(path, m) for m, path in models.items()}
    domains = {p.domain for p in pipes.values()} | ({settings.domain} if settings.domain else set())
    sizes = {p.image_size for p in pipes.values()}
    if len(domains) > 1 or len(sizes) > 1:
        raise ValueError(f"the checkpoints disagree on domain/image size: {sorted(domains)}, {sorted(sizes)}")
    domain, size = domains.pop(), sizes.pop()
    test = held_out_pairs(domain, settings.n, size, "test")
    val = held_out_pairs(domain, settings.n_validation, size, "validation")
    true = test["mask"][:, 0].numpy() > 0.5
    score_args = {"steps": settings.steps, "t0": settings.t0, "smooth_sigma": settings.smooth_sigma}
    rows: list[dict[str, Any]] = []
    pictures: dict[str, dict[str, np.ndarray]] = {}
    for model, pipe in pipes.items():
        args = {k: v for k, v in score_args.items() if v is not None}
        if settings.recalibrate:
            vs, _, _ = pipe.score_many(val["defect"], settings.batch_size, settings.seed, **args)
            threshold = choose_threshold(vs, val["mask"][:, 0].numpy() > 0.5)
        elif pipe.threshold is not None:
            threshold = pipe.threshold
        else:
            raise ValueError(f"{models[model]}: model {model} has no stored threshold; use recalibrate=true")
        scores, cleans, spent = pipe.score_many(test["defect"], settings.batch_size, settings.seed, **args)
        row = {"model": model, "label": LABELS[model], **segmentation_metrics(scores, true, threshold),
               "images_per_s": settings.n / max(spent, 1e-9), "threshold": threshold,
               "steps": pipe._settings(**args).steps if model in ("icddm", "icddm_unpaired", "cdldm") else 1,
               "checkpoint": models[model], "checkpoint_step": pipe.meta.get("step")}
        rows.append(row)
        print(f"[kdcddm eval] {model}: AUROC {row['auroc']:.4f} IoU {row['iou']:.4f} "
              f"{row['images_per_s']:.1f} images/s", flush=True)
        pictures[model] = {"score": scores[:6], "pred": scores[:6] >= threshold}
        if cleans is not None:
            pictures[model]["translation"] = cleans[:6, 0]
    if settings.references:
        sigma = settings.smooth_sigma if settings.smooth_sigma is not None else \
            next(iter(pipes.values())).settings.smooth_sigma
        rows += reference_rows(test, val, sigma, settings.seed)
    table = EvalTable(title=f"KDCDDM on {settings.n} held-out {domain} images ({size}×{size}), thresholds from "
                            f"{settings.n_validation} validation images", columns=columns(), rows=rows,
                      notes=notes(rows, settings), extras={"n": settings.n, "domain": domain, "targets": targets(rows),
                                                           "batch_size": settings.batch_size})
    if out_dir:
        table.report_path = write_report(out_dir, table, test, pictures, models)
    return table


def reference_rows(test: dict[str, torch.Tensor], val: dict[str, torch.Tensor], smooth_sigma: float,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The model-free rows (module doc): real clean twin and random score, thresholds chosen on `val`."""
    from metrics.segmentation import choose_threshold, segmentation_metrics

    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for key, label in REFERENCE_LABELS.items():
        def score(split: dict[str, torch.Tensor]) -> np.ndarray:
            raw = (split["defect"] - split["clean"]).abs() if key == "real_twin" else \
                torch.rand(split["defect"].shape, generator=gen)
            return gaussian_smooth(raw.float(), smooth_sigma)[:, 0].numpy()  # (N, H, W)

        threshold = choose_threshold(score(val), val["mask"][:, 0].numpy() > 0.5)
        rows.append({"model": key, "label": label, "threshold": threshold, "images_per_s": None,
                     **segmentation_metrics(score(test), test["mask"][:, 0].numpy() > 0.5, threshold)})
    return rows


def _by(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def targets(rows: list[dict]) -> dict[str, Any]:
    """The issue's targets, each {"value", "met"} where its rows exist."""
    by, out = _by(rows), {}
    if "ae" in by:
        for m in ("icddm", "cdldm"):
            if m in by:
                out[f"{m}_beats_ae"] = {"auroc": [by[m]["auroc"], by["ae"]["auroc"]],
                                        "iou": [by[m]["iou"], by["ae"]["iou"]],
                                        "met": by[m]["auroc"] > by["ae"]["auroc"] and by[m]["iou"] > by["ae"]["iou"]}
    if "kdcddm" in by and "cdldm" in by:
        rel = (by["cdldm"]["iou"] - by["kdcddm"]["iou"]) / max(by["cdldm"]["iou"], 1e-9)
        out["kdcddm_iou_within_10pct"] = {"value": rel, "met": rel <= 0.10}
        speed = by["kdcddm"]["images_per_s"] / max(by["cdldm"]["images_per_s"], 1e-9)
        out["kdcddm_speedup_20x"] = {"value": speed, "met": speed >= 20.0}
    if "cdldm" in by and "icddm" in by:
        ratio = by["cdldm"]["images_per_s"] / max(by["icddm"]["images_per_s"], 1e-9)
        out["cdldm_faster_than_icddm"] = {"value": ratio, "met": ratio > 1.0}
    return out


def notes(rows: list[dict], settings: EvalSettings) -> list[str]:
    lines = [f"- images/s: translation + score map at batch {settings.batch_size}, one process; diffusion models "
             "at the steps column of table.json (DDIM)."]
    for key, t in targets(rows).items():
        value = t.get("value")
        shown = f" ({value:.3g})" if isinstance(value, float) else ""
        lines.append(f"- target {key}{shown}: {'met' if t['met'] else 'NOT met'}")
    return lines


def write_report(out_dir: str, table: EvalTable, test: dict, pictures: dict[str, dict[str, np.ndarray]],
                 checkpoints: dict[str, str] | None = None) -> str:
    """report.md with the table and figures (examples.png: the first k held-out inputs with the true mask outlined,
    their clean twins, then per model the input with true and predicted outlines; translations.png; score_maps.png,
    one colour range per model; training_curves.png from the phases' metrics.jsonl) and metrics.json."""
    from fabdistill.inference.kdcddm import display_images
    from fabdistill.reports import run_curves
    from fabdistill.reports import write_report as write
    from fabdistill.viz import score_maps, sem_images

    domain = table.extras["domain"]
    k = min(6, test["defect"].shape[0])
    defect, palette = display_images(test["defect"][:k, 0].numpy(), domain)
    clean, _ = display_images(test["clean"][:k, 0].numpy(), domain)
    true = test["mask"][:k, 0].numpy() > 0.5
    none = np.zeros_like(true)
    models = list(pictures)
    examples = sem_images(np.concatenate([defect, clean] + [defect] * len(models)),
                          np.concatenate([true, none] + [true] * len(models)),
                          np.concatenate([none, none] + [pictures[m]["pred"][:k] for m in models]),
                          columns=k, row_labels=["input", "clean twin"] + [LABELS[m].split(" (")[0] for m in models],
                          heading="held-out inputs: true defect mask and each model's predicted mask (at its "
                                  "threshold)", palette=palette)
    translating = [m for m in models if "translation" in pictures[m]]
    translations = None
    if translating:
        shown = np.concatenate([display_images(pictures[m]["translation"][:k], domain)[0] for m in translating])
        translations = sem_images(shown, columns=k, row_labels=[LABELS[m].split(" (")[0] for m in translating],
                                  heading="translations (defect → clean) of the same inputs", palette=palette)
    thresholds = {r["model"]: r["threshold"] for r in table.rows}
    scores = score_maps(np.concatenate([pictures[m]["score"][:k] for m in models]), columns=k, per_row=True,
                        row_labels=[f"{m} (thr {thresholds[m]:.3g})" for m in models],
                        heading="defect score maps (one colour range per model)")
    figures = {"examples": examples, "translations": translations, "score maps": scores,
               "training curves": run_curves(checkpoints or {})}
    return write(out_dir, "KDCDDM evaluation", table, figures)
