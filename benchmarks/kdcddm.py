"""KDCDDM at a CPU budget: train every model (VAE, ICDDM, ICDDM-unpaired, CDLDM, the KDCDDM student, the AE and
supervised baselines), then evaluate them side by side on held-out SEM images with thresholds from the validation
split, and check the issue's targets.

    nice -n 5 .venv/bin/python benchmarks/kdcddm.py                       # configs/kdcddm_bench.yaml, n = 500
    .venv/bin/python benchmarks/kdcddm.py --config configs/kdcddm.yaml --n 2000 --set run.num_workers=2

Training runs in-process by default (run.num_workers=0: the same loops, checkpoints and resume as on Ray Train,
without a worker group's start-up cost on a small machine). Writes benchmarks/results/kdcddm.{json,md} and
kdcddm_examples.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import RESULTS, write_results  # noqa: E402


def cost_breakdown(run: str, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each stage of the latent pipelines (CDLDM teacher, KDCDDM student), one process.

    The student replaces the teacher's `steps` denoiser calls by one generator call; the VAE's encode and decode
    are shared. So the speed-up is bounded by (VAE + steps·denoiser) / VAE, whatever the generator costs."""
    import time as _time

    from fabdistill.inference.kdcddm import Segmenter
    from trainers.kdcddm.evaluate import resolve_roles

    found = resolve_roles({"run": run})
    student = Segmenter.from_checkpoint(found["kdcddm"], "kdcddm")
    teacher = Segmenter.from_checkpoint(found["cdldm"], "cdldm")
    x = torch.rand(batch_size, 1, student.image_size, student.image_size)

    def ms(fn) -> float:
        fn()
        t = _time.perf_counter()
        for _ in range(repeats):
            fn()
        return (_time.perf_counter() - t) / repeats * 1000.0

    with torch.no_grad():
        p = x * 2 - 1
        z = student.encode(p)
        t = torch.full((batch_size,), teacher.settings.cond_t_start, dtype=torch.long)
        out = {"encode": ms(lambda: student.encode(p)), "decode_2x": ms(lambda: student.decode(torch.cat([z, z]))),
               "generator": ms(lambda: student.nets["generator"](z)),
               "teacher_denoiser_call": ms(lambda: teacher.nets["net"](z, t, z)),
               "teacher_steps": float(min(teacher.settings.steps, teacher.settings.cond_t_start + 1))}
    vae = out["encode"] + out["decode_2x"]
    out["ceiling_speedup"] = (vae + out["teacher_steps"] * out["teacher_denoiser_call"]) / vae
    out["latent_only_speedup"] = out["teacher_steps"] * out["teacher_denoiser_call"] / out["generator"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/kdcddm_bench.yaml")
    parser.add_argument("--n", type=int, default=500, help="held-out test images")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass, every model")
    parser.add_argument("--storage", default="", help="run storage (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 threads thrash on a shared 2-core box)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="kdcddm", help="results name under benchmarks/results/ (probes: not kdcddm)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fabdistill.config import dump_yaml, load_config
    from trainers.kdcddm.config import Config
    from trainers.kdcddm.driver import train
    from trainers.kdcddm.evaluate import EvalSettings, evaluate
    from trainers.launch import read_metrics, run_dir

    storage = args.storage or tempfile.mkdtemp(prefix="kdcddm-bench-")
    overrides = ["run.num_workers=0", f"run.storage_path={storage}", "run.name=bench", *args.overrides]
    cfg = load_config(Config, args.config, overrides)
    started = time.time()
    outcome = train(cfg)
    train_s = time.time() - started
    phase_s = {p: (read_metrics(o.run_dir) or [{}])[-1].get("elapsed_s") for p, o in outcome.phases.items()}
    t0 = time.time()
    eval_dir = str(Path(storage) / "eval")
    settings = EvalSettings(n=args.n, n_validation=cfg.data.num_validation, recalibrate=False,
                            batch_size=args.batch_size)
    table = evaluate({"run": run_dir(cfg.run)}, settings, eval_dir)
    eval_s = time.time() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(eval_dir) / "examples.png", RESULTS / f"{args.out}_examples.png")
    targets = table.extras["targets"]
    cost = cost_breakdown(run_dir(cfg.run), args.batch_size)
    lines = [f"# KDCDDM benchmark ({args.config}, {args.n} held-out {cfg.data.domain} images)", "",
             table.markdown(), "",
             f"- training: {train_s / 60:.1f} min in total, per phase (s): "
             + ", ".join(f"{p} {s:.0f}" for p, s in phase_s.items() if s is not None),
             f"- evaluation: {eval_s / 60:.1f} min; thresholds chosen on {cfg.data.num_validation} validation images "
             "during training (never the test images)",
             f"- inference settings: {cfg.inference}",
             f"- cost per batch of {args.batch_size} (ms, one process): VAE encode {cost['encode']:.1f}, decode of "
             f"translation + reconstruction {cost['decode_2x']:.1f}, student generator {cost['generator']:.1f}, "
             f"teacher denoiser call {cost['teacher_denoiser_call']:.1f} × {cost['teacher_steps']:.0f} steps. "
             f"The shared VAE bounds the student's speed-up at {cost['ceiling_speedup']:.1f}× (a free generator); "
             f"the latent translation alone is {cost['latent_only_speedup']:.0f}× faster", "", f"![examples]({args.out}_examples.png)"]
    write_results(args.out, {"config": dump_yaml(cfg), "table": table.to_json(), "targets": targets,
                             "train_s": train_s, "phase_s": phase_s, "eval_s": eval_s,
                             "cost_ms": cost}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
