"""Student (masked) vs teacher sampling throughput at equal steps and batch, side by side in one process.

    python benchmarks/ikddit_speed.py --size deep --batch 256 --steps 10 --repeats 5   # target ≥ 2x
    python benchmarks/ikddit_speed.py --size S --batch 16 --steps 10 --mask-ratio 0.5

Both networks are built at the same named size (random weights: the compute is what is measured). Runs alternate
teacher/student `--repeats` times and report the median, so a noisy neighbour hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402
from fabdistill.inference.ikddit import IKDDiTPipeline, build_networks  # noqa: E402
from trainers.ikddit import ModelSection  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="S")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = dataclasses.asdict(ModelSection(size=args.size))
    nets = build_networks(model, 32)
    meta = {"model": model, "map_size": 32, "scale_nm": 5.0, "mask_ratio": args.mask_ratio}
    pipes = {"teacher": IKDDiTPipeline(nets["teacher"], nets["embedding"], {**meta, "role": "teacher"}, "teacher",
                                       args.device),
             "student": IKDDiTPipeline(nets["student"], nets["embedding"], {**meta, "role": "student"}, "student",
                                       args.device)}
    log, ids = torch.randn(args.batch, 128), torch.randint(0, 16, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for name, pipe in pipes.items():  # warm-up
        pipe.sample(log[:2], ids[:2], steps=2, mask_ratio=args.mask_ratio, seed=0)
    for r in range(args.repeats):
        for name, pipe in pipes.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            pipe.sample(log, ids, steps=args.steps, mask_ratio=args.mask_ratio, seed=r)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{args.repeats} {name}: {args.batch / times[name][-1]:.2f} maps/s", flush=True)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = rate["student"] / rate["teacher"]
    params = {k: sum(p.numel() for p in nets[k].parameters()) / 1e6 for k in ("teacher", "student")}
    tokens = nets["teacher"].num_patches
    target = "≥ 2× at deep on CPU" if args.size == "deep" else "≥ 1.6× at S on CPU"
    md = "\n".join([
        f"IKDDiT-{args.size} sampling on {args.device}, batch {args.batch}, DDIM {args.steps} steps, "
        f"median of {args.repeats}",
        "", "| model | params (M) | maps/s | s per batch |", "|---|---|---|---|",
        f"| teacher (all {tokens} tokens) | {params['teacher']:.2f} | {rate['teacher']:.2f} | "
        f"{statistics.median(times['teacher']):.2f} |",
        f"| student (mask {args.mask_ratio}) | {params['student']:.2f} | {rate['student']:.2f} | "
        f"{statistics.median(times['student']):.2f} |",
        "", f"**student / teacher throughput: {ratio:.2f}×** (target {target})"])
    print(md)
    write_results(f"ikddit_speed_{args.size}_{args.device.split(':')[0]}",
                  {"args": vars(args), "maps_per_s": rate, "ratio": ratio, "times_s": times}, md)
    return {"ratio": ratio, **rate}


if __name__ == "__main__":
    main()
