"""Calibration as a Ray map-reduce (`hn_export.cluster`) on 1, 2 and 4 worker processes of this machine, against the
local run; the per-task overhead; and the arithmetic for the 28-block 1024 px calibration on N nodes.

    python benchmarks/bench_cluster_calibration.py [--preset pixart-sigma-256] [--layers 2] [--samples 8]
                                                   [--steps 10] [--workers 1,2,4] [--json benchmarks/cluster_calibration.json]
    python benchmarks/bench_cluster_calibration.py --from-json benchmarks/cluster_calibration.json   # the report again

For each run the same calibration (`hn_export.calibration.calibrate`, seeded trajectories, one shard per trajectory
on the cluster) is timed from the call to the reduced statistics: ``local`` (this process, one onnxruntime session
of 2 threads, and of 1 thread), then ``ray N`` (``--ray local`` with N CPUs: N tasks at a time, each its own worker
process with a 1-thread session; the cluster's start is timed apart). Every run's statistics must equal the local
run's bit for bit (checked). The per-task overhead is measured on the ``tiny`` preset with 1-step trajectories (a
task that does almost nothing): (ray 1 wall - local 1-thread wall) / tasks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from machine_info import machine

from hn_export.calibration import calibrate
from hn_export.cli import main as hn_export
from hn_export.cluster.address import parse_address
from hn_export.cluster.ray_session import Cluster
from hn_export.denoise import DenoiseConfig

CALL_1024_S = 90.0  # one FP32 call of the 28-block PixArt-Sigma at 1024 px on this machine (issue 22)
MODEL_1024_BYTES = 2.44e9  # its FP32 weights: about 610 M parameters (28 blocks of 1152 wide, caption projection)
TINY_TASKS = 16


def export(preset: str, layers: int | None, folder: Path) -> Path:
    path = folder / f"{preset}.onnx"
    args = ["export", "--preset", preset, "--seed", "0", "-o", str(path)] + (["--layers", str(layers)] if layers else [])
    try:
        hn_export(args)
    except SystemExit as exc:
        assert exc.code == 0, exc.code
    return path


def same(a, b) -> bool:
    return a.sites.keys() == b.sites.keys() and all(
        np.array_equal(a.sites[n].absmax, b.sites[n].absmax)
        and np.array_equal(a.sites[n].centered_absmax, b.sites[n].centered_absmax) for n in a.sites)


def runs(model: Path, config: DenoiseConfig, workers: list[int]) -> list[dict]:
    out = []
    reference = None
    for threads in (None, 1):
        start = time.perf_counter()
        stats = calibrate(model, config, progress=False, threads=threads)
        out.append({"run": f"local, {threads or 2} thread(s)", "wall_s": time.perf_counter() - start})
        reference = reference or stats
        assert same(reference, stats)
    for n in workers:
        start = time.perf_counter()
        with Cluster(parse_address("local"), local_cpus=n) as cluster:
            up = time.perf_counter() - start
            start = time.perf_counter()
            stats = calibrate(model, config, progress=False, cluster=cluster)
            wall = time.perf_counter() - start
        assert same(reference, stats), f"ray {n}: statistics differ from the local run"
        out.append({"run": f"ray local, {n} worker(s)", "wall_s": wall, "cluster_start_s": up})
    return out


def table(rows: list[dict], calls: int, base: float) -> str:
    lines = ["| run | wall (s) | per call (s) | speed-up vs local 2 threads | cluster start (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        start = f"{r['cluster_start_s']:.1f}" if "cluster_start_s" in r else "-"
        lines.append(f"| {r['run']} | {r['wall_s']:.2f} | {r['wall_s'] / calls:.3f} | {base / r['wall_s']:.2f}x | "
                     f"{start} |")
    return "\n".join(lines)


def arithmetic(task_s: float) -> str:
    """The 28-block 1024 px calibration (64 trajectories x 20 steps) on N nodes, one task (trajectory) at a time
    per node using all its cores: ceil(64 / N) x (20 x CALL_1024_S + task_s)."""
    traj_s = 20 * CALL_1024_S
    lines = ["| nodes | trajectories per node | wall | speed-up |", "|---:|---:|---:|---:|"]
    one = 64 * (traj_s + task_s)
    for n in (1, 2, 4, 8, 16, 32, 64):
        per = -(-64 // n)
        wall = per * (traj_s + task_s)
        lines.append(f"| {n} | {per} | {wall / 3600:.2f} h | {one / wall:.1f}x |")
    return "\n".join(lines)


def report(data: dict, command: str) -> str:
    main_rows, tiny_rows, meta = data["main"], data["tiny"], data["meta"]
    calls = meta["samples"] * meta["steps"]
    fixed = (tiny_rows[2]["wall_s"] - tiny_rows[1]["wall_s"]) / meta["tiny_tasks"]
    per_task = (main_rows[2]["wall_s"] - main_rows[1]["wall_s"]) / meta["samples"]
    per_gb = per_task / (meta["model_bytes"] / 1e9)
    task_1024 = per_gb * MODEL_1024_BYTES / 1e9
    return "\n\n".join([
        f"Measured {meta['date']} on {meta['machine']} with `{command}`.",
        f"**{meta['preset']}, {meta['layers']} blocks ({meta['model_bytes'] / 1e6:.1f} MB FP32): {meta['samples']} "
        f"trajectories x {meta['steps']} steps = {calls} calls** (statistics bit-identical in every run)",
        table(main_rows, calls, main_rows[0]["wall_s"]),
        f"**Per-task overhead**: {fixed:.2f} s fixed (tiny preset, {meta['tiny_tasks']} one-call trajectories: "
        f"(ray 1 worker - local 1 thread) / tasks), {per_task:.2f} s with this {meta['model_bytes'] / 1e6:.0f} MB "
        f"model (each task loads the graph and opens its session: {per_gb:.1f} s per GB)",
        table(tiny_rows, meta["tiny_tasks"], tiny_rows[0]["wall_s"]),
        f"**28-block PixArt-Sigma at 1024 px, 64 trajectories x 20 steps** ({CALL_1024_S:.0f} s per FP32 call on "
        f"this machine; per task {task_1024:.0f} s = {per_gb:.1f} s/GB x {MODEL_1024_BYTES / 1e9:.1f} GB):",
        arithmetic(task_1024),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pixart-sigma-256")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--json", type=Path, help="Write the measurements here.")
    parser.add_argument("--from-json", type=Path, help="Print the report of saved measurements (no timing).")
    args = parser.parse_args()
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        print(report(data, data["meta"]["command"]))
        return
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        model = export(args.preset, args.layers, Path(tmp))
        config = DenoiseConfig(samples=args.samples, steps=args.steps, seed=0)
        main_rows = runs(model, config, workers)
        tiny = export("tiny", None, Path(tmp))
        tiny_rows = runs(tiny, DenoiseConfig(samples=TINY_TASKS, steps=1, seed=0), [1])
        size = sum(f.stat().st_size for f in Path(tmp).glob(f"{model.name}*"))
    command = " ".join(["python", "benchmarks/bench_cluster_calibration.py", *sys.argv[1:]])
    data = {"main": main_rows, "tiny": tiny_rows,
            "meta": {"date": str(datetime.date.today()), "machine": machine(), "command": command,
                     "preset": args.preset, "layers": args.layers, "samples": args.samples, "steps": args.steps,
                     "tiny_tasks": TINY_TASKS, "model_bytes": size}}
    print(report(data, command))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
