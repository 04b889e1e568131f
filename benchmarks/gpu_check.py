"""GPU readiness: every method's tiny config trains a few steps through the shared Ray Train glue on the device
there is, with its throughput, and the DiT teacher's model FLOP utilisation (MFU).

    python benchmarks/gpu_check.py                            # CUDA: writes benchmarks/results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --precision bf16 --compile # the run.* GPU knobs (docs/operations.md "GPU")
    python benchmarks/gpu_check.py --methods ikddit,dmd2 --steps 50
    python benchmarks/gpu_check.py --smoke                    # CPU, in-process, tiny sizes, 3 steps (the test suite)

On CUDA every phase runs with run.use_gpu=true: on 2 Ray Train workers (DDP over NCCL) when the machine has 2 GPUs
or more, else in-process on the one GPU (run.num_workers=0, the same loop without Ray). --smoke runs on the CPU,
in-process, writes nothing under benchmarks/results/ and is what tests/test_gpu_check.py runs.

samples/s: rank 0's metrics between the first and the last report of a phase (every step reports; the first step,
which pays start-up and compilation, is left out), × per-worker batch × workers. The interval includes what a loop
does between steps besides training (metrics lines; the epoch-based loops' checkpoints and held-out evaluation).
Fast-AD's distillation runs on Ray actors outside the glue: its row is the sequential baseline
(benchmarks/fast_ad_sequential.py), the actors' code in one process, float32, student samples/s (synthesis
included). MFU (DiT teacher only): forward FLOPs of one batch counted with torch.utils.flop_counter.FlopCounterMode,
×3 for forward + backward, ÷ the measured step time ÷ the GPU's dense peak for the precision (PEAK_TFLOPS; TF32's
with run.tf32 at fp32). "n/a" on the CPU and on GPUs the table does not know.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, per precision: bf16 and tf32 on tensor cores, fp32
# without. Matched as substrings of torch.cuda.get_device_name(), the first match wins (the specific names first).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0}),        # SXM
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0}),        # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),        # SXM and PCIe
)


def peak_tflops(device_name: str, precision: str, tf32: bool) -> Optional[float]:
    """The dense peak of a GPU for a run's precision (bf16; fp32 with TF32; plain fp32), or None if unknown."""
    key = "bf16" if precision == "bf16" else ("tf32" if tf32 else "fp32")
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peaks[key]
    return None


# --------------------------------------------------------------------------- what each method trains

@dataclasses.dataclass(frozen=True)
class Plan:
    """A method's tiny run: its config file, the overrides for `steps` steps on `workers` workers (every step
    reports; checkpoints only at the end where the loop allows), and for each phase (a key of TrainOutcome.phases;
    "" for a single-phase method) the config section that holds its per-worker batch_size."""

    config: str
    overrides: Callable[[int, int], list[str]]
    phases: dict[str, str]


def _per_step(section: str, steps: int, *extra: str) -> list[str]:
    return [f"{section}.steps={steps}", f"{section}.log_every=1", f"{section}.checkpoint_every={steps}", *extra]


PLANS: dict[str, Plan] = {
    "ikddit": Plan("configs/ikddit_tiny.yaml", lambda s, w: [
        "data.num_train=64", *_per_step("teacher", s), *_per_step("student", s)],
        {"teacher": "teacher", "student": "student"}),
    "feature_extractor": Plan("configs/feature_extractor.yaml", lambda s, w: [
        "trainer.domain=wafer", "data.size=16", f"data.n={16 * w * s}", "data.n_val=0", "trainer.epochs=1",
        "trainer.batch_size=16", "trainer.checkpoint_every=1"],  # its loop checkpoints at every report
        {"": "trainer"}),
    "classifier": Plan("configs/classifier_wafer.yaml", lambda s, w: [
        "model.arch=tiny", "data.size=16", f"data.n_train={32 * w}", "data.n_eval=0", f"optim.epochs={s}",
        "optim.batch_size=32", "optim.warmup_steps=1", f"optim.checkpoint_every_epochs={s}"],  # 1 step an epoch
        {"": "optim"}),
    "ddpm": Plan("configs/ddpm_wafer.yaml", lambda s, w: [
        "data.size=16", "data.n_train=64", *_per_step("optim", s, "optim.batch_size=16", "optim.warmup_steps=1",
                                                      "optim.sample_count=0")],
        {"": "optim"}),
    "dmd2": Plan("configs/dmd2_tiny.yaml", lambda s, w: [
        "data.num_train=64", *_per_step("teacher", s, "teacher.warmup_steps=1"),
        *_per_step("distill", s, "distill.warmup_steps=1")],
        {"teacher": "teacher", "distill": "distill"}),
    "kdcddm": Plan("configs/kdcddm_wafer_tiny.yaml", lambda s, w: [
        "data.num_train=16", "data.num_validation=8", "inference.threshold=0.5", "student.teacher_steps=2",
        *[o for p in ("vae", "icddm", "icddm_unpaired", "cdldm", "student", "baselines")
          for o in _per_step(p, s, f"{p}.batch_size=8")]],
        {p: p for p in ("vae", "icddm", "icddm_unpaired", "cdldm", "student", "baselines")}),
    "sdd_lskd": Plan("configs/sdd_lskd.yaml", lambda s, w: [
        "data.size=16", f"data.n_train={32 * w}", "data.n_eval=16", "teacher.arch=tiny", f"teacher.epochs={s}",
        "teacher.batch_size=32", "teacher.warmup_steps=1", f"teacher.checkpoint_every_epochs={s}",
        "student.arch=shufflev1_tiny", f"student.epochs={s}", "student.batch_size=32", "student.warmup=1",
        "student.scales=[1,2]", f"student.checkpoint_every_epochs={s}"],
        {"teacher": "teacher", "student": "student"}),
}
ORDER = ("ikddit", "feature_extractor", "classifier", "ddpm", "fast_ad", "dmd2", "kdcddm", "sdd_lskd")


def fast_ad_overrides(steps: int, teacher: str, prior: str, on_gpu: bool) -> list[str]:
    return [f"models.teacher_checkpoint={teacher}", f"models.diffusion_checkpoint={prior}",
            "models.student_arch=tiny", "cadr.ddim_steps=2", "synthesis.batch_size=8", "buffer.size=64",
            f"student.steps={steps}", "student.batch_size=8", "student.warmup_steps=1", "eval.n_heldout=16",
            "eval.size=16", f"synthesis.num_gpus={1 if on_gpu else 0}", f"student.num_gpus={1 if on_gpu else 0}"]


# --------------------------------------------------------------------------- measuring

def phase_throughput(run_directory: str, batch_size: int, workers: int) -> dict[str, Any]:
    """steps, step seconds and samples/s of one phase from its metrics.jsonl (first report to last)."""
    from trainers.launch import read_metrics

    rows = sorted((r for r in read_metrics(run_directory) if "step" in r and "elapsed_s" in r),
                  key=lambda r: r["step"])
    if len(rows) < 2:
        raise RuntimeError(f"{run_directory}: {len(rows)} metrics rows, need 2 to time steps")
    steps = rows[-1]["step"] - rows[0]["step"]
    seconds = max(rows[-1]["elapsed_s"] - rows[0]["elapsed_s"], 1e-9)
    return {"steps": rows[-1]["step"], "step_s": seconds / steps,
            "samples_per_s": steps * batch_size * max(1, workers) / seconds}


def dit_forward_flops(cfg: Any, batch_size: int, device: Any, precision: str) -> float:
    """FLOPs of one forward pass of the IKDDiT teacher objective (DiT teacher + contrastive embedding + losses) on
    one per-worker batch of the run's own training data, as TrainSession.autocast would run it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from data.datasets import batch_to_tensors
    from fabdistill.inference.ikddit import build_networks, make_diffusion
    from trainers.ikddit import TeacherObjective, prepare_training_data
    from trainers.launch import _LocalShard, autocast

    uri, scale_nm = prepare_training_data(cfg)  # generated by the run already: read, not written again
    batch = batch_to_tensors(next(_LocalShard(uri).iter_batches(batch_size=batch_size)), "overlay")
    model_cfg = dataclasses.asdict(cfg.model)
    nets = build_networks(model_cfg, cfg.data.map_size)
    objective = TeacherObjective(nets["teacher"], nets["embedding"]).to(device)
    diffusion = make_diffusion(model_cfg)
    x0 = (batch["overlay"] / scale_nm).to(device)
    gen = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(x0.shape[0], generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(precision == "bf16", device), counter:
        objective(x0, batch["log"].to(device), batch["equipment_id"].to(device), t, noise, diffusion,
                  model_cfg["prediction"], batch["valid"].to(device), cfg.teacher.infonce_temperature)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- running

def run_method(name: str, args: argparse.Namespace, run_args: list[str], storage: str, workers: int,
               done: dict[str, Any]) -> list[dict[str, Any]]:
    """Train `name` for args.steps steps; one row per phase."""
    from fabdistill.config import load_config
    from fabdistill.methods import get_method

    method = get_method(name)
    if name == "fast_ad":
        return [run_fast_ad(args, run_args, storage, done)]
    plan = PLANS[name]
    cfg = load_config(method.Config, plan.config, [*plan.overrides(args.steps, max(1, workers)), *run_args,
                                                   f"run.storage_path={storage}", f"run.name={name}"])
    t0 = time.time()
    outcome = method.get("train")(cfg)
    wall = time.time() - t0
    done[name] = outcome
    rows = []
    for phase, section in plan.phases.items():
        phase_outcome = outcome.phases[phase] if phase else outcome
        batch = getattr(cfg, section).batch_size
        rows.append({"method": name, "phase": phase or "train", "batch_size": batch,
                     **phase_throughput(phase_outcome.run_dir, batch, workers), "wall_s": wall})
    if name == "ikddit":
        teacher = rows[0]
        flops = 3.0 * dit_forward_flops(cfg, cfg.teacher.batch_size, _device(args), cfg.run.precision)
        teacher["model_tflops"] = flops / teacher["step_s"] / 1e12
        teacher["flops_per_step"] = flops
        peak = peak_tflops(args.device_name, cfg.run.precision, cfg.run.tf32) if args.device_name else None
        teacher["peak_tflops"] = peak
        teacher["mfu"] = teacher["model_tflops"] / peak if peak else None  # None: the CPU, or an unknown GPU
    return rows


def run_fast_ad(args: argparse.Namespace, run_args: list[str], storage: str, done: dict[str, Any]) -> dict:
    """Fast-AD's sequential baseline on the classifier and DDPM runs of this check (its teacher and prior)."""
    import torch

    from benchmarks.fast_ad_sequential import run_sequential
    from fabdistill.config import load_config
    from trainers.fast_ad import Config

    teacher, prior = done["classifier"].checkpoint_dir, done["ddpm"].checkpoint_dir
    cfg = load_config(Config, "configs/fast_ad.yaml", [
        *fast_ad_overrides(args.steps, teacher, prior, not args.smoke), f"run.storage_path={storage}",
        "run.name=fast_ad"])
    t0 = time.time()
    out = run_sequential(cfg, total_steps=args.steps, total_images=args.steps * cfg.synthesis.batch_size,
                         threads=torch.get_num_threads())
    return {"method": "fast_ad", "phase": "distill (sequential)", "batch_size": cfg.student.batch_size,
            "steps": out["steps"], "step_s": out["elapsed_s"] / out["steps"],
            "samples_per_s": out["steps_per_s"] * cfg.student.batch_size, "images_per_s": out["images_per_s"],
            "wall_s": time.time() - t0, "precision": "fp32"}


def _device(args: argparse.Namespace) -> Any:
    import torch

    return torch.device("cpu" if args.smoke else "cuda")


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    def num(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [header, "", "| method | phase | device | workers | precision | steps | samples/s | model TFLOP/s | MFU |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        tflops = num(r.get("model_tflops"), ".3g") if "model_tflops" in r else ""
        lines.append(f"| {r['method']} | {r['phase']} | {r['device']} | {r['workers']} | {r['precision']} | "
                     f"{r['steps']} | {r['samples_per_s']:.1f} | {tflops} | {mfu if 'model_tflops' in r else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU, in-process, 3 steps a phase; writes no results (the test suite runs this)")
    p.add_argument("--methods", default="", help="comma-separated methods (default: every registered method)")
    p.add_argument("--steps", type=int, default=0, help="steps per phase (default 20; 3 with --smoke); >= 2")
    p.add_argument("--workers", type=int, default=-1,
                   help="Ray Train workers on CUDA (default: 2 with 2+ GPUs, else 0 = in-process on one GPU)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="run.precision")
    p.add_argument("--compile", action="store_true", help="run.compile=true")
    p.add_argument("--no-tf32", action="store_true", help="run.tf32=false")
    p.add_argument("--no-pin-memory", action="store_true", help="run.pin_memory=false")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--storage", default="runs/gpu-check",
                   help="where the run folders go (a fresh temporary folder inside it, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 20)
    if args.steps < 2:
        p.error("--steps must be >= 2 (throughput is timed from the first report to the last)")

    import torch

    from fabdistill.methods import method_names

    known = [m for m in ORDER if m in method_names()]
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()] or known
    unknown = [m for m in wanted if m not in known]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)} (this check knows: {', '.join(known)})")
    if "fast_ad" in wanted:  # its teacher and prior come from the classifier and DDPM runs
        wanted = [m for m in ORDER if m in set(wanted) | {"classifier", "ddpm"}]
    on_gpu = not args.smoke
    if on_gpu and not torch.cuda.is_available():
        p.error("no CUDA device here; run with --smoke for the CPU check")
    gpus = torch.cuda.device_count() if on_gpu else 0
    workers = args.workers if args.workers >= 0 else (2 if gpus >= 2 else 0)
    if on_gpu and workers > gpus:
        p.error(f"--workers {workers} needs as many GPUs; this machine has {gpus}")
    args.device_name = torch.cuda.get_device_name(0) if on_gpu else ""
    device = f"cuda ({args.device_name})" if on_gpu else "cpu"
    run_args = [f"run.num_workers={workers}", f"run.use_gpu={'true' if on_gpu else 'false'}",
                f"run.precision={args.precision}", f"run.compile={'true' if args.compile else 'false'}",
                f"run.tf32={'false' if args.no_tf32 else 'true'}",
                f"run.pin_memory={'false' if args.no_pin_memory else 'true'}", "run.tensorboard=false",
                "run.num_to_keep=1"]
    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    Path(args.storage).mkdir(parents=True, exist_ok=True)
    storage = tempfile.mkdtemp(prefix="gpu-check-", dir=args.storage)
    rows: list[dict[str, Any]] = []
    done: dict[str, Any] = {}
    t0 = time.time()
    try:
        for name in wanted:
            for row in run_method(name, args, run_args, storage, workers, done):
                row.setdefault("precision", args.precision)
                rows.append({**row, "device": device, "workers": max(1, workers)})
                print(f"[gpu_check] {name} {row['phase']}: {row['samples_per_s']:.1f} samples/s "
                      f"({row['steps']} steps)", flush=True)
    finally:
        torch.set_num_threads(threads_before)
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    total = time.time() - t0
    cuda_only = (f", TF32 {'off' if args.no_tf32 else 'on'}, pinned memory {'off' if args.no_pin_memory else 'on'}"
                 if on_gpu else " (bf16, TF32 and pinned memory apply on CUDA only)")
    header = (f"# GPU check: {device}, {max(1, workers)} worker(s), precision {args.precision}, compile "
              f"{'on' if args.compile else 'off'}{cuda_only}, {args.steps} steps a phase ({total:.0f} s)")
    md = markdown(rows, header)
    print(md, flush=True)
    result = {"args": {k: v for k, v in vars(args).items()}, "rows": rows, "total_s": total}
    if not args.smoke:
        write_results("gpu_check", result, md)
    return result


if __name__ == "__main__":
    main()
