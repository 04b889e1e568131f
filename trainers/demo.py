"""The demo's main job: data → teacher → student → samples → evaluation → a report, on the embedded local Ray."""

from __future__ import annotations

import time

from fabdistill import storage
from fabdistill.config import load_config


def _loss_plot(run_dirs: dict[str, str], path: str) -> None:
    from fabdistill.viz import save_figure, training_curves
    from trainers.launch import read_metrics

    series = {}
    for phase, run_dir in run_dirs.items():
        metrics = [m for m in read_metrics(run_dir) if "loss" in m]
        series[f"{phase} loss"] = ([m["step"] for m in metrics], [m["loss"] for m in metrics])
    positive = all(v > 0 for _, ys in series.values() for v in ys)
    save_figure(training_curves(series, title="training loss (rank 0, mean over the logging interval)",
                                xlabel="step", ylabel="loss", log_y=positive), path)


def run_demo(config_path: str = "configs/ikddit_demo.yaml", overrides: tuple[str, ...] = (), n_eval: int = 1000,
             eval_steps: int = 50) -> str:
    """Train, evaluate, report; print the commands that serve the student. Everything printed also goes to
    <run folder>/console.log (runs/demo/console.log with the default config). Returns the report's URI."""
    from fabdistill.console import log_to
    from trainers.ikddit import Config
    from trainers.launch import run_dir

    cfg = load_config(Config, config_path, overrides)
    with log_to(storage.join(run_dir(cfg.run), "console.log")):
        return _run_demo(cfg, config_path, n_eval, eval_steps)


def _run_demo(cfg, config_path: str, n_eval: int, eval_steps: int) -> str:
    from trainers.ikddit import train
    from trainers.ikddit_eval import EvalSettings, evaluate
    from trainers.launch import run_dir

    t0 = time.time()
    print(f"[demo] 1/3 training teacher and masked student ({cfg.model.size}) on "
          f"{cfg.data.num_train} synthetic overlay maps with {cfg.run.num_workers} Ray Train workers", flush=True)
    outcome = train(cfg)
    t_train = time.time() - t0
    checkpoints = {phase: run.checkpoint_dir for phase, run in outcome.phases.items()}
    out_dir = storage.join(run_dir(cfg.run), "report")
    print(f"[demo] 2/3 sampling and evaluating on {n_eval} held-out maps (DDIM {eval_steps} steps), next to "
          f"{n_eval} real maps of the same equipment contexts (the floor)", flush=True)
    table = evaluate(checkpoints, EvalSettings(n=n_eval, steps=eval_steps), out_dir=out_dir)
    print("[demo] 3/3 writing the report", flush=True)
    _loss_plot({k: v.run_dir for k, v in outcome.phases.items()}, storage.join(out_dir, "training_loss.png"))
    report_uri = storage.join(out_dir, "report.md")
    body = storage.read_bytes(report_uri).decode()
    minutes = (time.time() - t0) / 60
    header = ["# fabdistill demo: IKDDiT on synthetic overlay maps", "",
              f"Config `{config_path}` (resolved copy in the run folders); training {t_train / 60:.1f} min, "
              f"total {minutes:.1f} min.", "",
              *[f"- {phase} checkpoint: `{path}`" for phase, path in checkpoints.items()], "",
              "![training loss](training_loss.png)", ""]
    storage.write_bytes(report_uri, ("\n".join(header) + "\n" + body.split("\n", 1)[1].lstrip("\n")).encode())
    print(table.markdown())
    print(f"[demo] done in {minutes:.1f} min; report: {report_uri}", flush=True)
    print(f"[demo] training curves: tensorboard --logdir {cfg.run.storage_path}", flush=True)
    if "student" in outcome.phases:
        _print_serve_commands(outcome.phases["student"].run_dir)
    return report_uri


def _print_serve_commands(student_run: str) -> None:
    """The two lines that serve the trained student and ask it for one map (serve/commands.py builds them)."""
    import os

    from serve.commands import ConfigError, example_commands

    path = student_run
    if not storage.is_s3(path) and os.path.abspath(path).startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)  # as the checked-in serve/config.yaml names it: runs/demo-student
    try:
        commands = example_commands("ikddit", path)
    except ConfigError as exc:  # run from elsewhere than the repository root: no serve/config.yaml
        print(f"[demo] serve the student from the repository root ({exc})", flush=True)
        return
    print("[demo] serve the student (Ctrl-C stops it), then, from another shell, ask it for a map:", flush=True)
    print(f"  {commands.serve}")
    print(f"  {commands.curl}", flush=True)
