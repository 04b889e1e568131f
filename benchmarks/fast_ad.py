"""Fast-AD side by side, in one run (CPU-sized by default; every size is a flag):

  1. speed: the concurrent actor loop vs the same work done sequentially in one process (student steps/s, ratio);
  2. speed: DDIM-50 vs DDPM-1000 synthesis time for the same batch (ratio), and the cost of CADR guidance;
  3. quality: held-out top-1 on REAL wafer maps of the teacher, the data-free Fast-AD student (CADR), a student
     distilled on unguided DDIM samples (same loop, guidance off), and, for reference, the same student trained
     on the teacher's real labelled data.

It trains its own teacher (labelled maps, seed 1, uniform classes) and DDPM prior (unlabelled maps, seed 2, another
class mix) first, through the same `train(cfg)` as `apps.train` (configs/classifier_wafer.yaml and
configs/ddpm_wafer.yaml, in-process: run.num_workers=0), so it needs nothing but the repo. The sequential baseline
is benchmarks/fast_ad_sequential.py. Results: benchmarks/results/fast_ad.{json,md}.

    python -m benchmarks.fast_ad                        # ~15 min on 2 idle CPU cores
    python -m benchmarks.fast_ad --student-steps 3000 --ddpm-steps 3000   # longer, better
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_ad", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/bench_fast_ad", help="checkpoints and run folders")
    p.add_argument("--reuse", action="store_true", help="reuse teacher/DDPM checkpoints found in --work-dir")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray (and threads for sequential)")
    p.add_argument("--size", type=int, default=32, help="wafer map size")
    p.add_argument("--heldout-n", type=int, default=1000)
    p.add_argument("--teacher-arch", default="resnet8")
    p.add_argument("--teacher-n", type=int, default=3000)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-arch", default="tiny")
    p.add_argument("--ddpm-size", default="tiny")
    p.add_argument("--ddpm-n", type=int, default=3000)
    p.add_argument("--ddpm-steps", type=int, default=800)
    p.add_argument("--ddpm-batch", type=int, default=32)
    p.add_argument("--timing-batch", type=int, default=8, help="batch for the DDIM-50 vs DDPM-1000 timing")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the distillation runs")
    p.add_argument("--synth-batch", type=int, default=32)
    p.add_argument("--student-steps", type=int, default=1200)
    p.add_argument("--student-batch", type=int, default=64)
    p.add_argument("--student-lr", type=float, default=0.05)
    p.add_argument("--eta", type=float, default=0.1, help="CADR η (paper and configs/fast_ad.yaml: 0.1)")
    p.add_argument("--bn-weight", type=float, default=1.0, help="weight of L_BN (paper and configs/fast_ad.yaml: 1)")
    p.add_argument("--variant-eta", type=float, default=0.3, help="η of the extra CADR run")
    p.add_argument("--variant-bn-weight", type=float, default=0.1, help="L_BN weight of the extra CADR run")
    p.add_argument("--skip-variant", action="store_true",
                   help="skip the extra CADR run with --variant-eta / --variant-bn-weight")
    p.add_argument("--skip-sequential", action="store_true")
    p.add_argument("--skip-unguided", action="store_true")
    return p.parse_args(argv)


def _train_in_process(module: Any, config: str, work: Path, name: str, overrides: list[str]) -> str:
    """Train through the method's own train(cfg) in this process (the loop apps.train runs), from scratch (a run
    folder of the same name would otherwise be resumed); returns its exported model."""
    import shutil

    from fabdistill.config import load_config

    shutil.rmtree(work / "runs" / name, ignore_errors=True)

    cfg = load_config(module.Config, config, [*overrides, "run.num_workers=0", f"run.storage_path={work / 'runs'}",
                                              f"run.name={name}"])
    return module.train(cfg).checkpoint_dir


def _exported(work: Path, name: str) -> Path:
    return work / "runs" / name / "model"


def _fast_ad_config(a: argparse.Namespace, work: Path, name: str, **cadr: Any) -> Any:
    from fabdistill.config import from_dict
    from trainers.fast_ad import Config

    cadr = {"ddim_steps": a.ddim_steps, "eta": a.eta, "bn_weight": a.bn_weight, **cadr}
    return from_dict(Config, {
        "models": {"teacher_checkpoint": str(_exported(work, "teacher")),
                   "diffusion_checkpoint": str(_exported(work, "ddpm")), "student_arch": a.student_arch},
        "cadr": cadr,
        "synthesis": {"num_workers": 1, "batch_size": a.synth_batch},
        "buffer": {"size": 4096},
        "student": {"steps": a.student_steps, "batch_size": a.student_batch, "lr": a.student_lr,
                    "warmup_steps": 50, "checkpoint_every": 0},
        "eval": {"n_heldout": a.heldout_n, "size": a.size, "every": 0},
        "loop": {"log_every_s": 30.0},
        "run": {"name": name, "storage_path": str(work / "runs")},
    })


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    from benchmarks._common import write_results
    from benchmarks.fast_ad_sequential import run_sequential
    from data.seeds import WAFER_HELD_OUT
    from fabdistill.inference.classifier import evaluate_top1, load_classifier
    from models.resnet_cifar import count_params
    from trainers import classifier, ddpm
    from trainers.classifier import heldout_tensors
    from trainers.ddpm import load_ddpm
    from trainers.fast_ad import CADRSection, run_fast_ad, synthesize

    torch.set_num_threads(a.cpus)
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    res: dict[str, Any] = {"args": vars(a), "load_avg_1min": {}}

    def note_load(phase: str) -> None:  # the machine is shared: keep the context of every timing
        res["load_avg_1min"][phase] = round(os.getloadavg()[0], 2)

    note_load("start")
    x_eval, y_eval = heldout_tensors(None, None, a.heldout_n, WAFER_HELD_OUT, a.size)

    # --- 1. teacher and the real-data reference student (seed 1, uniform classes) ------------------------------
    labelled = [f"data.n_train={a.teacher_n}", f"data.n_eval={a.heldout_n}", f"data.size={a.size}",
                f"optim.epochs={a.teacher_epochs}", "optim.batch_size=64", "optim.lr=0.05"]
    if not (a.reuse and (_exported(work, "teacher") / "state.pt").exists()):
        t = time.time()
        _train_in_process(classifier, "configs/classifier_wafer.yaml", work, "teacher",
                          [*labelled, f"model.arch={a.teacher_arch}"])
        res["teacher_train_s"] = time.time() - t
    teacher, _ = load_classifier(str(_exported(work, "teacher")))
    res["teacher_top1"] = evaluate_top1(teacher, x_eval, y_eval)
    res["teacher_params"] = count_params(teacher)
    print(f"[bench] teacher {a.teacher_arch}: held-out top-1 {res['teacher_top1']:.4f}", flush=True)
    t = time.time()
    real_student, _ = load_classifier(_train_in_process(classifier, "configs/classifier_wafer.yaml", work,
                                                        f"student_real_{int(time.time())}",
                                                        [*labelled, f"model.arch={a.student_arch}"]))
    res["student_real_top1"] = evaluate_top1(real_student, x_eval, y_eval)
    res["student_real_train_s"] = time.time() - t
    res["student_params"] = count_params(real_student)
    print(f"[bench] student {a.student_arch} on real labelled data: {res['student_real_top1']:.4f}", flush=True)

    # --- 2. DDPM prior on unlabelled maps (seed 2, another class mix: configs/ddpm_wafer.yaml) -----------------
    if not (a.reuse and (_exported(work, "ddpm") / "state.pt").exists()):
        t = time.time()
        _train_in_process(ddpm, "configs/ddpm_wafer.yaml", work, "ddpm",
                          [f"data.n_train={a.ddpm_n}", f"data.size={a.size}", f"model.size={a.ddpm_size}",
                           f"optim.steps={a.ddpm_steps}", f"optim.batch_size={a.ddpm_batch}", "optim.lr=0.002",
                           "optim.ema_decay=0.99", "optim.log_every=200", f"optim.checkpoint_every={a.ddpm_steps}",
                           "optim.sample_count=16"])
        res["ddpm_train_s"] = time.time() - t
    unet, diffusion, _ = load_ddpm(str(_exported(work, "ddpm")))

    # --- 3. DDIM-50 vs DDPM-1000 (and CADR's cost) on the same batch --------------------------------------------
    shape = (a.timing_batch, 1, a.size, a.size)
    note_load("timing")
    t = time.time()
    diffusion.ddpm_sample(unet, shape, generator=torch.Generator().manual_seed(0), clip_x0=1.0)
    res["ddpm1000_s"] = time.time() - t
    t = time.time()
    diffusion.ddim_sample(unet, shape, steps=50, generator=torch.Generator().manual_seed(0), clip_x0=1.0)
    res["ddim50_s"] = time.time() - t
    t = time.time()
    synthesize(unet, teacher, diffusion, a.timing_batch, CADRSection(ddim_steps=50), torch.Generator().manual_seed(0))
    res["cadr_ddim50_s"] = time.time() - t
    res["ddim_speedup"] = res["ddpm1000_s"] / res["ddim50_s"]
    print(f"[bench] batch {a.timing_batch}: DDPM-1000 {res['ddpm1000_s']:.1f}s, DDIM-50 {res['ddim50_s']:.1f}s "
          f"(×{res['ddim_speedup']:.1f}), CADR-DDIM-50 {res['cadr_ddim50_s']:.1f}s", flush=True)

    # --- 4. the concurrent loop (data-free student) -------------------------------------------------------------
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=a.cpus, log_to_driver=True)  # before run_fast_ad's ensure_ray: our CPU count
    cfg = _fast_ad_config(a, work, f"cadr_{int(time.time())}")
    note_load("concurrent")
    conc = run_fast_ad(cfg)
    note_load("concurrent_end")
    res["concurrent"] = _loop_summary(conc)
    print(f"[bench] concurrent: {res['concurrent']}", flush=True)

    # --- 5. the same work, one thing at a time, in one process: with one thread (each actor's share) and with
    # every CPU (the strongest sequential baseline: torch spreads each op over the cores) --------------------------
    if not a.skip_sequential:
        for threads, key in ((1, "sequential_1thread"), (a.cpus, "sequential")):
            seq = run_sequential(cfg, total_steps=conc["step"], total_images=conc["images"], threads=threads)
            note_load(f"{key}_end")
            res[key] = {**seq, "threads": threads}
            res[key.replace("sequential", "concurrency_speedup")] = seq["elapsed_s"] / res["concurrent"]["loop_s"]
            print(f"[bench] {key} ({threads} thread(s)): {seq}; concurrent speed-up "
                  f"×{seq['elapsed_s'] / res['concurrent']['loop_s']:.2f}", flush=True)
        torch.set_num_threads(a.cpus)

    # --- 6. baseline: the same loop on unguided DDIM samples ----------------------------------------------------
    if not a.skip_unguided:
        unguided = run_fast_ad(_fast_ad_config(a, work, f"unguided_{int(time.time())}", gate="off"))
        res["unguided"] = _loop_summary(unguided)
    if not a.skip_variant:
        variant = run_fast_ad(_fast_ad_config(a, work, f"variant_{int(time.time())}", eta=a.variant_eta,
                                              bn_weight=a.variant_bn_weight))
        res["variant"] = _loop_summary(variant)
    if ray.is_initialized():
        ray.shutdown()
    res["total_s"] = time.time() - t_all
    write_results("fast_ad", res, _markdown(res))
    return res


def _loop_summary(s: dict[str, Any]) -> dict[str, Any]:
    final = s["history"][-1]
    loop_s = s.get("loop_s") or s["elapsed_s"]
    return {"steps": s["step"], "images": s["images"], "loop_s": loop_s, "elapsed_s": s["elapsed_s"],
            "steps_per_s": s["step"] / loop_s, "images_per_s": s["images"] / loop_s,
            "heldout_top1": final["heldout_top1"], "teacher_agreement": final["teacher_agreement"],
            "buffer_max_fill": s["buffer"]["max_fill"], "run_dir": s["run_dir"]}


def _markdown(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [
        "# Fast-AD benchmark (wafer maps, 9 WM-811K classes)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, shared; local Ray with {a['cpus']} CPUs. Teacher {a['teacher_arch']} "
        f"({r['teacher_params']:,} params), student {a['student_arch']} ({r['student_params']:,} params), DDPM "
        f"UNet `{a['ddpm_size']}` ({a['ddpm_steps']} steps on {a['ddpm_n']} unlabelled maps), CADR-DDIM-"
        f"{a['ddim_steps']}, {a['student_steps']} student steps of batch {a['student_batch']}. Total "
        f"{r['total_s'] / 60:.1f} min. 1-minute load average during the phases (other jobs share the machine): "
        + ", ".join(f"{k} {v}" for k, v in r["load_avg_1min"].items()) + ".",
        "",
        "## Speed",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    c = r["concurrent"]
    if "sequential" in r:
        s = r["sequential"]
        s1 = r["sequential_1thread"]
        lines += [
            f"| concurrent actors (1 synthesis + 1 learner, 1 thread each): student steps/s | {c['steps_per_s']:.2f} "
            f"({c['steps']} steps, {c['images']} images in {c['loop_s']:.0f} s) |",
            f"| sequential, same work, 1 thread: student steps/s | {s1['steps_per_s']:.2f} ({s1['elapsed_s']:.0f} s: "
            f"synthesis {s1['synthesis_s']:.0f} s + student {s1['learner_s']:.0f} s) |",
            f"| sequential, same work, {s['threads']} threads: student steps/s | {s['steps_per_s']:.2f} "
            f"({s['elapsed_s']:.0f} s: synthesis {s['synthesis_s']:.0f} s + student {s['learner_s']:.0f} s) |",
            f"| **concurrent / sequential (1 thread)** | **×{r['concurrency_speedup_1thread']:.2f}** (target ≥ 1.5) |",
            f"| **concurrent / sequential ({s['threads']} threads)** | **×{r['concurrency_speedup']:.2f}** "
            f"(target ≥ 1.5) |",
        ]
    lines += [
        f"| DDPM-1000, batch {a['timing_batch']} | {r['ddpm1000_s']:.1f} s |",
        f"| DDIM-50, batch {a['timing_batch']} | {r['ddim50_s']:.1f} s |",
        f"| **DDIM-50 speed-up** | **×{r['ddim_speedup']:.1f}** |",
        f"| CADR-guided DDIM-50, batch {a['timing_batch']} | {r['cadr_ddim50_s']:.1f} s |",
        "",
        f"## Held-out top-1 on real wafer maps ({a['heldout_n']} maps the students never see)",
        "",
        "| model | data it learned from | top-1 | of teacher |",
        "|---|---|---|---|",
        f"| teacher {a['teacher_arch']} | {a['teacher_n']} labelled real maps | {r['teacher_top1']:.4f} | 100 % |",
        f"| student {a['student_arch']}, **Fast-AD** (CADR, η {a['eta']}, L_BN weight {a['bn_weight']}) | synthetic "
        f"only ({c['images']} images) | {c['heldout_top1']:.4f} | {100 * c['heldout_top1'] / r['teacher_top1']:.1f} % |",
    ]
    if "variant" in r:
        q = r["variant"]
        lines.append(f"| student {a['student_arch']}, Fast-AD (CADR, η {a['variant_eta']}, L_BN weight "
                     f"{a['variant_bn_weight']}) | synthetic only "
                     f"({q['images']} images) | {q['heldout_top1']:.4f} | "
                     f"{100 * q['heldout_top1'] / r['teacher_top1']:.1f} % |")
    if "unguided" in r:
        u = r["unguided"]
        lines.append(f"| student {a['student_arch']}, unguided DDIM samples | synthetic only ({u['images']} images) "
                     f"| {u['heldout_top1']:.4f} | {100 * u['heldout_top1'] / r['teacher_top1']:.1f} % |")
    if "sequential" in r:
        s = r["sequential"]
        lines.append(f"| student {a['student_arch']}, Fast-AD run sequentially ({s['threads']} threads) | synthetic "
                     f"only ({s['images']} images) | {s['heldout_top1']:.4f} | "
                     f"{100 * s['heldout_top1'] / r['teacher_top1']:.1f} % |")
    lines.append(f"| student {a['student_arch']} (reference) | the teacher's {a['teacher_n']} labelled real maps | "
                 f"{r['student_real_top1']:.4f} | {100 * r['student_real_top1'] / r['teacher_top1']:.1f} % |")
    lines += ["", "Target: data-free student ≥ 90 % of the teacher's top-1; CADR above unguided."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
