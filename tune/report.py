"""Sweep results as files people read: a CSV/Parquet of every trial, Markdown tables in the shape of the papers'
ablations, score-vs-knob plots (matplotlib, fabdistill/viz.py) and the best trial's config as a ready-to-use YAML.

A row (one per trial):
    trial_id, <each knob of the space>, status (finished | stopped early | error), steps (last training step
    reported), <score> (e.g. fid), the space's extra scores (IKDDiT: kid_mean, kid_std, maps_per_s), <early-stop metric> (last training value), maps_per_s,
    run_dir, checkpoint_dir, error
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

from fabdistill import storage
from fabdistill.config import dump_yaml
from tune.spaces import Axis, MethodSpace, ScoreSettings, varying

STATUS_FINISHED, STATUS_STOPPED, STATUS_ERROR, STATUS_UNFINISHED = "finished", "stopped early", "error", "unfinished"
STATUSES = (STATUS_FINISHED, STATUS_STOPPED, STATUS_ERROR, STATUS_UNFINISHED)


# --------------------------------------------------------------------------- rows

def collect_rows(analysis: Any, space: MethodSpace, knobs: list[str]) -> list[dict]:
    """One row per trial of a Tune experiment (a `ray.tune.ExperimentAnalysis`), sorted by knob values.

    Status: finished (trained and scored), stopped early (by the scheduler), error, or unfinished (the sweep was
    interrupted before the trial ended: `--resume` continues it).
    """
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        metrics = dict(trial.last_result or {})
        df = frames.get(trial.trial_id)
        steps = metrics.get("step", 0) or 0
        if df is not None and "step" in df and len(df):
            steps = max(int(df["step"].max()), int(steps))
        error = trial.get_error() if trial.status == "ERROR" else None
        if trial.status == "ERROR":
            status = STATUS_ERROR
        elif trial.status != "TERMINATED":
            status = STATUS_UNFINISHED
        else:
            status = STATUS_FINISHED if metrics.get("scored") else STATUS_STOPPED
        finished = status == STATUS_FINISHED
        row = {"trial_id": trial.trial_id, **{k: trial.config.get(k) for k in knobs}, "status": status,
               "steps": int(steps),
               space.score_name: float(metrics.get(space.score_name, math.nan)) if finished else math.nan,
               **{k: float(metrics.get(k, math.nan)) if finished else math.nan for k in space.extra_scores},
               space.early_stop_metric: float(metrics.get(space.early_stop_metric, math.nan)),
               "run_dir": metrics.get("run_dir", ""), "checkpoint_dir": metrics.get("checkpoint_dir", ""),
               "error": _short_error(error)}
        rows.append(row)
    rows.sort(key=lambda r: tuple(_sort_key(r[k]) for k in knobs))
    return rows


def _short_error(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def best_row(rows: list[dict], space: MethodSpace) -> Optional[dict]:
    scored = [r for r in rows if r["status"] == STATUS_FINISHED and math.isfinite(r[space.score_name])]
    if not scored:
        return None
    sign = 1.0 if space.score_mode == "min" else -1.0
    return min(scored, key=lambda r: sign * r[space.score_name])


# --------------------------------------------------------------------------- Markdown

def format_knob(name: str, value: Any) -> str:
    if name == "mask_ratio" and isinstance(value, (int, float)):
        return f"{100 * value:g}%"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(row: dict, space: MethodSpace) -> str:
    if row["status"] == STATUS_FINISHED:
        return f"{row[space.score_name]:.2f}"
    if row["status"] == STATUS_STOPPED:
        return f"stopped at step {row['steps']}"
    return row["status"]


def floor_value(rows: list[dict], space: MethodSpace) -> Optional[float]:
    """The real-data floor of the score (space.floor_score, the same in every finished trial), or None."""
    if not space.floor_score:
        return None
    values = [r.get(space.floor_score, math.nan) for r in rows if r["status"] == STATUS_FINISHED]
    return next((float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)), None)


def paper_table(rows: list[dict], knob: str, space: MethodSpace, settings: ScoreSettings) -> str:
    """`| Mask Ratio | FID-N |`: one row per trial, in knob order (the shape of the paper's ablation), and the
    real-data floor's row when the method measures one."""
    label = space.label(knob)
    score = space.score_label.format(n=settings.n)
    lines = [f"| {label} | {score} |", f"| {'-' * len(label)} | {'-' * len(score)} |"]
    lines += [f"| {format_knob(knob, r[knob])} | {_cell(r, space)} |" for r in rows]
    floor = floor_value(rows, space)
    if floor is not None:
        lines.append(f"| {space.floor_label} | {floor:.2f} |")
    return "\n".join(lines)


def grid_table(rows: list[dict], row_knob: str, col_knob: str, space: MethodSpace, settings: ScoreSettings) -> str:
    """λ1 × λ2: rows one knob, columns the other, cells the score (mean if a point ran more than once)."""
    row_values = sorted({r[row_knob] for r in rows}, key=_sort_key)
    col_values = sorted({r[col_knob] for r in rows}, key=_sort_key)
    score = space.score_label.format(n=settings.n)
    head = f"| {space.label(row_knob)} \\ {space.label(col_knob)} ({score}) | " + " | ".join(
        format_knob(col_knob, c) for c in col_values) + " |"
    lines = [head, "|---" * (len(col_values) + 1) + "|"]
    for rv in row_values:
        cells = []
        for cv in col_values:
            hits = [r for r in rows if r[row_knob] == rv and r[col_knob] == cv]
            done = [r[space.score_name] for r in hits if r["status"] == STATUS_FINISHED]
            cells.append(f"{sum(done) / len(done):.2f}" if done else (_cell(hits[0], space) if hits else "—"))
        lines.append(f"| {format_knob(row_knob, rv)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(rows: list[dict], knobs: list[str], space: MethodSpace, settings: ScoreSettings) -> str:
    score = space.score_label.format(n=settings.n)
    # The table shows the score and the first extra score (IKDDiT: KID; its spread over subsets is in the CSV);
    # every extra score is in the CSV/Parquet.
    shown = list(space.table_scores or space.extra_scores[:1])
    head = ["trial"] + [space.label(k) for k in knobs] + [score] + [space.label(k) for k in shown] + \
        [space.early_stop_metric, "steps", "status"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def num(value: float, spec: str) -> str:
        return "—" if not math.isfinite(value) else format(value, spec)

    for r in rows:
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        lines.append("| " + " | ".join([r["trial_id"]] + [format_knob(k, r[k]) for k in knobs]
                                       + [num(r[space.score_name], ".4g" if space.score_mode == "max" else ".2f")]
                                       + [num(r[k], ".4g") for k in shown]
                                       + [num(r[space.early_stop_metric], ".4g"), str(r["steps"]), status]) + " |")
    return "\n".join(lines)


def reference_table(rows: list[dict], knob: str, space: MethodSpace, settings: ScoreSettings) -> Optional[str]:
    """Ours next to the published numbers for the same knob values, when the method has them."""
    ref = space.reference.get(knob)
    if not ref:
        return None
    score = space.score_label.format(n=settings.n)
    lines = [f"| {space.label(knob)} | {score} (this sweep) | {space.reference_label} |", "|---|---|---|"]
    for r in rows:
        value = next((v for k, v in ref.items() if isinstance(r[knob], (int, float)) and abs(k - r[knob]) < 1e-9),
                     None)
        lines.append(f"| {format_knob(knob, r[knob])} | {_cell(r, space)} | "
                     f"{'—' if value is None else f'{value:.2f}'} |")
    floor = floor_value(rows, space)
    if floor is not None:
        lines.append(f"| {space.floor_label} | {floor:.2f} | — |")
    return "\n".join(lines)


def markdown(rows: list[dict], space: MethodSpace, axes: dict[str, Axis], settings: ScoreSettings, *,
             name: str, header: str, best: Optional[dict], plots: list[str]) -> str:
    knobs = list(axes)
    moving = varying(axes)
    text = [f"# Sweep `{name}`", "", f"Command: `{header}`", "",
            f"Score: {space.score_label.format(n=settings.n)} ({space.score_mode}imised), {settings.steps} "
            f"sampler steps, sampling seed {settings.seed}. {len(rows)} trials: "
            + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                        for s in STATUSES if any(r["status"] == s for r in rows)) + ".", ""]
    if len(moving) == 1:
        text += [paper_table(rows, moving[0], space, settings), ""]
        ref = reference_table(rows, moving[0], space, settings)
        if ref:
            text += ["Next to the published ablation (different data, model size and budget: compare the trend, "
                     "not the values):", "", ref, ""]
    if len(moving) == 2:
        text += [grid_table(rows, moving[0], moving[1], space, settings), ""]
    text += ["All trials:", "", full_table(rows, knobs, space, settings), ""]
    if best is not None:
        point = ", ".join(f"{space.label(k)} = {format_knob(k, best[k])}" for k in knobs)
        text += [f"Best: {point} → {space.score_label.format(n=settings.n)} {best[space.score_name]:.2f} "
                 f"(trial {best['trial_id']}, checkpoint `{best['checkpoint_dir']}`); its config: "
                 "[best_config.yaml](best_config.yaml).", ""]
    text += [f"![{p}]({p})" for p in plots]
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- plots

def score_plot(rows: list[dict], knob: str, space: MethodSpace, axes: dict[str, Axis],
               settings: ScoreSettings) -> Optional[Any]:
    """Score against one knob (a matplotlib Figure): one line per combination of the other varying knobs, and the
    published values for this knob (space.reference) on their own axis beside ours. None if nothing to draw."""
    from fabdistill.viz import sweep_plot

    others = [k for k in varying(axes) if k != knob]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        if r["status"] != STATUS_FINISHED or not isinstance(r[knob], (int, float)):
            continue
        label = ", ".join(f"{space.label(k)}={format_knob(k, r[k])}" for k in others) or "this sweep"
        xs, ys = series.setdefault(label, ([], []))
        xs.append(float(r[knob]))
        ys.append(r[space.score_name])
    if not series:
        return None
    for label, (xs, ys) in series.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        series[label] = ([xs[i] for i in order], [ys[i] for i in order])
    score = space.score_label.format(n=settings.n)
    return sweep_plot(series, xlabel=space.label(knob), ylabel=score,
                      title=f"{score} vs {space.label(knob)} ({space.score_mode} is best)",
                      paper=space.reference.get(knob) or None, paper_label=space.reference_label or "paper")


# --------------------------------------------------------------------------- files

def write_results(folder: str, rows: list[dict], space: MethodSpace, axes: dict[str, Axis],
                  settings: ScoreSettings, *, best: Optional[dict], best_cfg: Any, header: str) -> dict[str, str]:
    """results.csv/.parquet/.md, <score>_vs_<knob>.png and best_config.yaml into the sweep folder."""
    import pandas as pd

    from fabdistill.viz import save_figure

    files: dict[str, str] = {}
    df = pd.DataFrame(rows)
    files["results_csv"] = storage.join(folder, "results.csv")
    storage.write_bytes(files["results_csv"], df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    files["results_parquet"] = storage.join(folder, "results.parquet")
    storage.write_bytes(files["results_parquet"], buf.getvalue())

    plots = []
    for knob in varying(axes):
        fig = score_plot(rows, knob, space, axes, settings)
        if fig is not None:
            name = f"{space.score_name}_vs_{knob}.png"
            save_figure(fig, storage.join(folder, name))
            files[f"plot_{knob}"] = storage.join(folder, name)
            plots.append(name)

    if best_cfg is not None:
        point = ", ".join(f"{k}={best[k]!r}" for k in axes)
        text = (f"# Best trial of sweep {folder.rstrip('/').rsplit('/', 1)[-1]}: {point}; "
                f"{space.score_name} {best[space.score_name]:.4g}\n"
                f"# Trial {best['trial_id']}, its checkpoint (sample/serve it directly): {best['checkpoint_dir']}\n"
                f"# Retrain with: python -m apps.train {space.method} --config <this file>\n" + dump_yaml(best_cfg))
        files["best_config"] = storage.join(folder, "best_config.yaml")
        storage.write_bytes(files["best_config"], text.encode())

    files["results_md"] = storage.join(folder, "results.md")
    storage.write_bytes(files["results_md"], markdown(rows, space, axes, settings,
                                                      name=folder.rstrip("/").rsplit("/", 1)[-1], header=header,
                                                      best=best, plots=plots).encode())
    return files


def export_results(prefix: str, outcome: Any, sweep: Any, *, command: str, wall_s: float,
                   resumed: bool = False) -> list[str]:
    """PREFIX.json (rows, sweep spec, command, wall time, machine) and PREFIX.md (the sweep's results.md with
    the command and machine on top): the form benchmarks/results/ keeps."""
    import json
    import os
    import platform
    import time
    from pathlib import Path

    import torch

    from fabdistill.config import to_dict

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "load_average_at_end": load, "date": time.strftime("%Y-%m-%d %H:%M")}
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
             for r in outcome.rows]
    payload = {"command": command, "wall_s": round(wall_s, 1), "resumed": resumed, "sweep": to_dict(sweep),
               "sweep_dir": outcome.sweep_dir, "rows": clean, "best": clean[outcome.rows.index(outcome.best)]
               if outcome.best is not None else None, "machine": machine}
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = f"{prefix}.json", f"{prefix}.md"
    Path(json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    body = storage.read_bytes(outcome.files["results_md"]).decode()
    # Copy the plots next to the exported files so they travel with them; the best config stays in the sweep.
    written = [json_path, md_path]
    for key, uri in outcome.files.items():
        if key.startswith("plot_"):
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            target = f"{prefix}_{name}"
            Path(target).write_bytes(storage.read_bytes(uri))
            body = body.replace(f"]({name})", f"]({Path(target).name})")
            written.append(target)
    body = body.replace("](best_config.yaml)", f"]({storage.join(outcome.sweep_dir, 'best_config.yaml')})")
    note = (f"Reproduce: `{command}`  \nWall time {wall_s / 60:.1f} min on {machine['cpu_count']} CPU cores "
            f"({machine['platform']}, torch {machine['torch']}; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in load) if load else 'n/a'}), {machine['date']}.\n\n")
    # Paths under the working directory (the repo, for a run from it) are written relative, so the exported file
    # reads the same on another machine.
    body = body.replace(os.getcwd().rstrip(os.sep) + os.sep, "")
    Path(md_path).write_text(note + body)
    return written
