"""`python -m apps.evaluate fast_ad --student RUN --teacher RUN [--n 1000] [--out DIR]`: held-out top-1 on REAL
data of the data-free student next to its teacher, as one EvalTable (the student never saw these maps; neither
did the teacher's training)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from data.seeds import WAFER_HELD_OUT
from fabdistill.config import knob
from fabdistill.methods import EvalTable

ROLES = ("student", "teacher")


@dataclasses.dataclass
class EvalSettings:
    n: int = knob(1000, ge=1, help="generated held-out wafer maps (when uri is empty)")
    seed: int = knob(WAFER_HELD_OUT, ge=0, help="generator seed of the held-out maps (data/seeds.py)")
    size: int = knob(32, ge=8, le=256, help="wafer map size; the size the models were trained at")
    uri: Optional[str] = knob(None, help="labelled Parquet dataset instead of generated maps (e.g. a CIFAR import)")
    split: str = knob("test", help="rows of `uri` used when it has a split column")
    batch_size: int = knob(512, ge=1, le=65536)


def evaluate(checkpoints: dict[str, str], settings: Optional[EvalSettings] = None,
             out_dir: Optional[str] = None) -> EvalTable:
    """Top-1 of each checkpoint ({"student": path, "teacher": path}, either may be missing) on the same held-out
    set, plus the student's agreement with the teacher's predictions; report.md (confusion matrices, held-out
    examples, training curves) in `out_dir` when given."""
    from fabdistill.inference.classifier import load_classifier, predict_logits
    from models.resnet_cifar import count_params
    from trainers.classifier import heldout_predictions, heldout_tensors, write_report

    settings = settings or EvalSettings()
    unknown = sorted(set(checkpoints) - set(ROLES))
    if unknown or not checkpoints:
        raise ValueError(f"fast_ad evaluates the roles {', '.join(ROLES)}; got {', '.join(unknown) or 'none'}")
    x, y = heldout_tensors(settings.uri, settings.split, settings.n, settings.seed, settings.size)
    rows, predictions, metas = [], {}, []
    for role in ROLES:
        if role not in checkpoints:
            continue
        model, meta = load_classifier(checkpoints[role])
        logits = predict_logits(model, x, settings.batch_size)  # (N, K)
        predictions[role] = logits.argmax(1)
        metas.append(meta)
        rows.append({"model": role, "arch": meta.get("arch"), "params": count_params(model),
                     "top1": float((predictions[role] == y).float().mean()), "checkpoint": checkpoints[role]})
    notes = [f"held-out set: {x.shape[0]} real maps " + (f"from {settings.uri} ({settings.split})" if settings.uri
                                                          else f"generated with seed {settings.seed}")]
    if len(predictions) == 2:
        agreement = float((predictions["student"] == predictions["teacher"]).float().mean())
        rows[0]["teacher_agreement"] = agreement
        student, teacher = rows[0]["top1"], rows[1]["top1"]
        notes.append(f"student / teacher top-1: {100 * student / max(teacher, 1e-12):.1f} %; the student agrees "
                     f"with the teacher on {100 * agreement:.1f} % of the maps")
    table = EvalTable(title=f"Fast-AD: held-out top-1 on {x.shape[0]} real maps",
                      columns={"model": ("model", ""), "arch": ("arch", ""), "params": ("params", ","),
                               "top1": ("top-1", ".4f"), "teacher_agreement": ("agrees with teacher", ".4f"),
                               "checkpoint": ("checkpoint", "")},
                      rows=rows, notes=notes)
    if out_dir:
        table.report_path = write_report(out_dir, "Fast-AD evaluation", table,
                                         heldout_predictions(x, y, predictions, metas), checkpoints)
    return table
