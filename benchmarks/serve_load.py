"""Ray Serve load test: the IKDDiT student with dynamic batching vs without, side by side.

    python -m benchmarks.serve_load                       # tiny student, 32 clients, 20 s per mode
    python -m benchmarks.serve_load --checkpoint runs/demo-student --duration 60 --clients 64

Starts a local Ray and Serve (HTTP on 127.0.0.1 only), deploys the IKDDiT student (serve/students/ikddit.py)
twice — batched (`max_batch_size`, `batch_wait_timeout_s`) and unbatched (`max_batch_size=1`) — on one replica
each, drives each with N concurrent clients over loopback for a fixed time, and prints throughput (req/s),
p50/p99 latency and the batched / unbatched ratios. Writes benchmarks/results/serve_load.json and .md. Clients
run in this process: on a small machine they compete with the replica for CPU, which the table records
(cpu_count, load average).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _client(port: int, bodies: list[bytes], start: float, deadline: float, out: list, errors: list) -> None:
    """One client: a keep-alive connection, requests back to back until the deadline; records latencies (s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while time.perf_counter() < deadline:
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/ikddit/generate", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        t1 = time.perf_counter()
        if status != 200:
            errors.append(f"HTTP {status}")
        elif start <= t1 <= deadline:  # completions inside the measured window (closed loop, steady state)
            out.append((t0, t1))
    conn.close()


def drive(port: int, bodies: list[list[bytes]], duration: float, warmup: float) -> dict:
    """Run len(bodies) clients for warmup + duration seconds; throughput = completions inside the measured
    window / its length (the server is saturated throughout), latency over those completions (queueing
    included)."""
    now = time.perf_counter()
    start, deadline = now + warmup, now + warmup + duration
    results: list[list] = [[] for _ in bodies]
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(port, b, start, deadline, results[k], errors), daemon=True)
               for k, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = [s for r in results for s in r]
    if not spans:
        raise RuntimeError(f"no request completed; errors: {errors[:5]}")
    lat = np.array([t1 - t0 for t0, t1 in spans])
    window = duration
    return {"requests": len(spans), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "window_s": round(window, 2), "throughput_rps": round(len(spans) / window, 3),
            "latency_p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
            "latency_p99_ms": round(1000 * float(np.percentile(lat, 99)), 1),
            "latency_mean_ms": round(1000 * float(lat.mean()), 1)}


def drive_handle(handle, payloads: list[list[dict]], duration: float, warmup: float) -> dict:
    """As `drive`, with asyncio clients calling the student deployment's handle (no HTTP proxy or ingress): what
    the replica's batching gives when the HTTP layer does not share its CPUs."""
    import asyncio

    async def client(mine: list[dict], start: float, deadline: float, out: list, errors: list) -> None:
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            reply = await handle.run.remote("generate", mine[i % len(mine)])
            i += 1
            t1 = time.perf_counter()
            if getattr(reply, "status", 200) != 200:
                errors.append(f"status {reply.status}")
            elif start <= t1 <= deadline:
                out.append((t0, t1))

    async def run_all() -> tuple[list, list]:
        now = time.perf_counter()
        start, deadline = now + warmup, now + warmup + duration
        results: list[list] = [[] for _ in payloads]
        errors: list[str] = []
        await asyncio.gather(*[client(p, start, deadline, results[k], errors) for k, p in enumerate(payloads)])
        return results, errors

    results, errors = asyncio.run(run_all())
    spans = [s for r in results for s in r]
    if not spans:
        raise RuntimeError(f"no request completed; errors: {errors[:5]}")
    lat = np.array([t1 - t0 for t0, t1 in spans])
    return {"requests": len(spans), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "window_s": round(duration, 2), "throughput_rps": round(len(spans) / duration, 3),
            "latency_p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
            "latency_p99_ms": round(1000 * float(np.percentile(lat, 99)), 1),
            "latency_mean_ms": round(1000 * float(lat.mean()), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="student checkpoint/run folder; default: a tiny one")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per request (the API's default)")
    parser.add_argument("--n", type=int, default=1, help="maps per request")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    parser.add_argument("--via", choices=("http", "handle"), default="http",
                        help="http: clients on the HTTP proxy (the deployment as users reach it); handle: asyncio "
                             "clients on the student's deployment handle, no proxy or ingress on the shared CPUs")
    parser.add_argument("--replica-cpus", type=float, default=1.0,
                        help="ray_actor_options.num_cpus of the student replica")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for JSON + Markdown")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.path.insert(0, str(REPO / "tests"))
    import ray
    from ray import serve

    from ikddit_fixture import equipment_logs, free_port, write_tiny_student
    from serve.framework import Ingress, student_deployment
    from serve.students.ikddit import IKDDiTStudent

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    checkpoint = args.checkpoint or str(write_tiny_student(Path(tmp.name) / "student"))
    logs, ids = equipment_logs(64, seed=7)
    # Each client cycles through 16 requests of its own (real equipment logs, distinct seeds).
    payloads = [[{"equipment_log": logs[(c * 7 + j) % 64].tolist(), "equipment_id": int(ids[(c * 7 + j) % 64]),
                  "n": args.n, "steps": args.steps, "seed": c * 1000 + j} for j in range(16)]
                for c in range(args.clients)]
    bodies = [[json.dumps(p).encode() for p in mine] for mine in payloads]

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    modes = {"batched": (args.max_batch_size, args.batch_wait_timeout_s), "unbatched": (1, 0.0)}
    rows: dict[str, dict] = {}
    try:
        for mode, (max_batch_size, wait) in modes.items():
            student = student_deployment(IKDDiTStudent, num_replicas=1,
                                         ray_actor_options={"num_cpus": args.replica_cpus},
                                         max_ongoing_requests=max(2 * args.clients, 8))
            student_args = {"checkpoint": checkpoint, "max_batch_size": max_batch_size, "batch_wait_timeout_s": wait,
                            "max_n": max(args.n, 1), "max_steps": max(args.steps, 1)}
            app = Ingress.bind({IKDDiTStudent.kind: student.bind(IKDDiTStudent, student_args)},
                               {IKDDiTStudent.kind: list(IKDDiTStudent.actions)}, request_timeout_s=300.0)
            serve.run(app, name="serve-load", route_prefix="/")
            load_before = os.getloadavg()[0]
            print(f"[serve_load] {mode}: max_batch_size={max_batch_size}, {args.clients} clients, "
                  f"{args.duration:.0f} s (+{args.warmup:.0f} s warm-up) ...", flush=True)
            if args.via == "handle":
                handle = serve.get_deployment_handle(IKDDiTStudent.__name__, app_name="serve-load")
                row = drive_handle(handle, payloads, args.duration, args.warmup)
                described = handle.describe.remote().result()["stats"]
            else:
                row = drive(port, bodies, args.duration, args.warmup)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30) as resp:
                    described = json.loads(resp.read())["students"]["ikddit"]["stats"]
            row.update({"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait,
                        "mean_requests_per_batch": described["mean_batch_requests"],
                        "load_avg_1m_before": round(load_before, 2)})
            rows[mode] = row
            print(f"[serve_load] {mode}: {row['throughput_rps']} req/s, p50 {row['latency_p50_ms']} ms, "
                  f"p99 {row['latency_p99_ms']} ms, {row['mean_requests_per_batch']} req/batch, "
                  f"{row['errors']} errors", flush=True)
            serve.delete("serve-load")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    b, u = rows["batched"], rows["unbatched"]
    result = {
        "benchmark": "serve_load",
        "checkpoint": args.checkpoint or "tiny IKDDiT student (tests/ikddit_fixture.py)",
        "via": args.via, "clients": args.clients, "duration_s": args.duration, "steps": args.steps, "n": args.n,
        "replica_cpus": args.replica_cpus, "rows": rows,
        "throughput_ratio_batched_over_unbatched": round(b["throughput_rps"] / u["throughput_rps"], 2),
        "p50_latency_ratio_unbatched_over_batched": round(u["latency_p50_ms"] / b["latency_p50_ms"], 2),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "ray": ray.__version__,
                    "torch": __import__("torch").__version__, "device": "cpu"},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "serve_load" if args.via == "http" else "serve_load_handle"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    b, u = result["rows"]["batched"], result["rows"]["unbatched"]
    lines = [
        "# Serve load: IKDDiT student, batched vs unbatched",
        "",
        f"{result['clients']} concurrent clients "
        f"{'on 127.0.0.1' if result.get('via', 'http') == 'http' else 'on the deployment handle (no HTTP)'}, {result['duration_s']:.0f} s per mode, "
        f"{result['steps']} DDIM steps, {result['n']} map(s) per request, one replica with "
        f"{result['replica_cpus']} CPU; {result['checkpoint']}. "
        f"Machine: {result['machine']['cpu_count']} CPUs, Ray {result['machine']['ray']}, "
        f"torch {result['machine']['torch']}, {result['machine']['device']}.",
        "",
        "| mode | max_batch_size | req/s | p50 ms | p99 ms | req/batch | errors | load avg before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("batched", b), ("unbatched", u)):
        lines.append(f"| {name} | {r['max_batch_size']} | {r['throughput_rps']:.2f} | {r['latency_p50_ms']:.0f} | "
                     f"{r['latency_p99_ms']:.0f} | {r['mean_requests_per_batch']:.1f} | {r['errors']} | "
                     f"{r['load_avg_1m_before']:.1f} |")
    lines += ["",
              f"Throughput batched / unbatched: **{result['throughput_ratio_batched_over_unbatched']}x**; "
              f"p50 latency unbatched / batched: {result['p50_latency_ratio_unbatched_over_batched']}x.",
              "", "Reproduce: `python -m benchmarks.serve_load"
              f"{'' if result.get('via', 'http') == 'http' else ' --via handle'}` (see --help).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
