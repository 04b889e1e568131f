"""report.md for every method's evaluation, written one way: a title, the EvalTable, notes, then each figure
(fabdistill/viz.py) saved as a PNG next to it and linked, plus metrics.json (the table as JSON).

    write_report(out_dir, "IKDDiT evaluation", table, {"samples": fig, "training curves": curves}, notes=[...])

Training curves come from a run's metrics.jsonl: `run_folder` finds the run of a checkpoint path, `run_curves`
reads its rows (trainers.launch.read_metrics) and `curves_figure` draws the loss-like columns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fabdistill import storage

METRICS_FILE = "metrics.jsonl"
STEP_KEYS = ("step", "student_step")  # x of a metrics row: Ray Train loops log "step", Fast-AD's driver "student_step"
_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def figure_file(name: str) -> str:
    """File name of a figure: its caption lower-cased, runs of other characters → "_" ("teacher Heun 35 NFE" →
    "teacher_heun_35_nfe.png")."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise ValueError(f"figure name {name!r} has no letter or digit to name its file")
    return f"{slug}.png"


def write_report(out_dir: str, title: str, table: Any, figures: Mapping[str, Any], notes: Sequence[str] = (),
                 intro: Sequence[str] = (), metrics_json: bool = True) -> str:
    """Write out_dir/report.md: "# title", intro lines, the table (an EvalTable's markdown(), or a string), notes,
    then every figure ({caption: Figure or PIL image}; None entries are skipped) saved as figure_file(caption) and
    linked as ![caption](file). With an EvalTable and metrics_json, also metrics.json. Returns report.md's URI."""
    from fabdistill.viz import save_figure

    storage.makedirs(out_dir)
    lines = [f"# {title}", ""]
    if intro:
        lines += [*intro, ""]
    if table is not None:
        lines += [table.markdown() if hasattr(table, "markdown") else str(table), ""]
    if notes:
        lines += [*notes, ""]
    files = set()
    for caption, fig in figures.items():
        if fig is None:
            continue
        file = figure_file(caption)
        if file in files:
            raise ValueError(f"two figures would both be written to {file}; give them distinct captions")
        files.add(file)
        save_figure(fig, storage.join(out_dir, file))
        lines += [f"![{caption}]({file})", ""]
    if metrics_json and hasattr(table, "to_json"):
        storage.write_bytes(storage.join(out_dir, "metrics.json"), table.to_json().encode())
    path = storage.join(out_dir, "report.md")
    storage.write_bytes(path, "\n".join(lines).encode())
    return path


def linked_pictures(report_uri: str) -> list[str]:
    """URIs of the pictures a report.md links (relative links resolved against its folder), in order."""
    text = storage.read_bytes(report_uri).decode()
    folder = report_uri.rstrip("/").rsplit("/", 1)[0] if "/" in report_uri else "."
    out = []
    for link in _LINK.findall(text):
        out.append(link if storage.is_s3(link) or link.startswith("/") else storage.join(folder, link))
    return out


# --------------------------------------------------------------------------- training curves

def run_folder(path: str) -> str | None:
    """The run folder (the one holding metrics.jsonl) of a run folder or of a checkpoint inside one
    (<run>/model, <run>/checkpoint_*); None if neither has a metrics file."""
    path = path.rstrip("/")
    for candidate in (path, path.rsplit("/", 1)[0] if "/" in path else ""):
        if candidate and storage.exists(storage.join(candidate, METRICS_FILE)):
            return candidate
    return None


def metric_series(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Iterable[str] | None = None,
                  match: Sequence[str] = ("loss",)) -> dict[str, tuple[list[float], list[float]]]:
    """Series {"<run> <key>": (steps, values)} from metrics rows per run ({name: rows}), for the given keys or else
    every numeric key whose name contains one of `match`. Rows without a step (STEP_KEYS) or a finite value are
    skipped; a run with one row-name only ("" as its name) gives plain key names."""
    wanted = list(keys) if keys is not None else None
    series: dict[str, tuple[list[float], list[float]]] = {}
    for run, rows in runs.items():
        names = wanted if wanted is not None else sorted(
            {k for r in rows for k, v in r.items()
             if any(m in k for m in match) and isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key in names:
            xs, ys = [], []
            for r in rows:
                step = next((r[s] for s in STEP_KEYS if isinstance(r.get(s), (int, float))), None)
                value = r.get(key)
                if step is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if math.isfinite(float(value)):
                    xs.append(float(step))
                    ys.append(float(value))
            if xs:
                series[f"{run} {key}".strip()] = (xs, ys)
    return series


def curves_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Iterable[str] | None = None,
                  match: Sequence[str] = ("loss",), title: str = "training curves (rank 0, per logging interval)",
                  ylabel: str = "loss", log_y: bool | None = None) -> Any:
    """viz.training_curves of metric_series(runs, keys, match); log y when asked, or (log_y=None) when every value
    is positive; None when the runs logged nothing that matches."""
    from fabdistill.viz import training_curves

    series = metric_series(runs, keys, match)
    if not series:
        return None
    if log_y is None:
        log_y = all(v > 0 for _, ys in series.values() for v in ys)
    return training_curves(series, title=title, xlabel="step", ylabel=ylabel, log_y=log_y)


def run_curves(checkpoints: Mapping[str, str], keys: Iterable[str] | None = None,
               match: Sequence[str] = ("loss",), ylabel: str = "loss",
               title: str = "training curves (rank 0, per logging interval)", log_y: bool | None = None) -> Any:
    """curves_figure over the run folders of {role: checkpoint or run folder}: roles whose run folder is unknown are
    left out, roles sharing one run are drawn once (named "a / b"); None when no run is known or none logged a
    matching metric."""
    from trainers.launch import read_metrics  # lazily, as methods.py loads trainers: reports are trainer-side

    roles: dict[str, list[str]] = {}
    for role, path in checkpoints.items():
        folder = run_folder(path) if path else None
        if folder is not None:
            roles.setdefault(folder, []).append(role)
    runs = {" / ".join(names): read_metrics(folder) for folder, names in roles.items()}
    return curves_figure(runs, keys, match, title=title, ylabel=ylabel, log_y=log_y) if runs else None
