"""Output formats on the device: one denoiser call and resident memory, FP32 / FP16 / W4A4 qdq / nbits / fused.

PixArt-Sigma 256 px (1152 wide, `--layers` blocks, dit-stats, seed 0), HadaNorm W4A4 (float-token bias correction),
batch 2 (CFG), 256 tokens, caption length 120, onnxruntime CPU with `--threads` threads.

* latency: every graph loaded in one process (``runtime.Denoiser``, kernels registered where they run, thread
  spinning off so idle sessions do not steal cores), one warm-up, then `--runs` rounds in which each graph runs once
  (interleaved, so background load hits all alike); medians;
* memory: each graph in a fresh process: RSS after imports, after session creation, and the peak after one call;
* profile: onnxruntime's profiler over one call of the nbits and fused graphs: time per op type;
* quality (`--quality`): `hn-export diff` of each W4A4 format against the FP16 graph, 20 steps x 2 samples.

    python benchmarks/bench_formats.py --layers 4 [--runs 5] [--threads 2] [--quality] [--work DIR]

Writes benchmarks/formats-256px-<layers>blocks.md (and .json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from runtime.denoiser import Denoiser  # noqa: E402
from runtime.kernels.build import build  # noqa: E402

FORMATS = ("qdq", "nbits", "fused")

MEMORY_PROBE = """
import json, sys
import numpy as np
from runtime.denoiser import Denoiser

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

path, threads, library = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
base = rss()[0]
den = Denoiser(path, threads=threads, kernel_library=library)
loaded = rss()[0]
dtype = np.float16 if den.inputs["hidden_states"].type == "tensor(float16)" else np.float32
rng = np.random.default_rng(0)
den({"hidden_states": rng.standard_normal((2, 4, 32, 32)).astype(dtype),
     "timestep": np.array([500.0, 500.0], dtype),
     "encoder_hidden_states": (rng.standard_normal((2, 120, 4096)) * 0.2).astype(dtype)})
print(json.dumps({"base_mb": base, "loaded_mb": loaded, "peak_mb": rss()[1]}))
"""


def hn(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from hn_export.cli import main; main()", *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def feeds(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((2, 4, 32, 32)).astype(dtype),
            "timestep": np.array([500.0, 500.0], dtype),
            "encoder_hidden_states": (rng.standard_normal((2, 120, 4096)) * 0.2).astype(dtype)}


def make_graphs(work: Path, layers: int) -> dict[str, Path]:
    graphs = {"FP32": work / "fp32.onnx", "FP16": work / "fp16.onnx"}
    if not graphs["FP32"].exists():
        hn("export", "--preset", "pixart-sigma-256", "--layers", str(layers), "-o", str(graphs["FP32"]))
    if not graphs["FP16"].exists():
        hn("export", "--preset", "pixart-sigma-256", "--layers", str(layers), "--fp16", "-o", str(graphs["FP16"]))
    stats = work / "stats.npz"
    for fmt in FORMATS:
        out = graphs[f"W4A4 {fmt}"] = work / f"w4a4.{fmt}.onnx"
        if out.exists():
            continue
        calib = ["--stats", str(stats)] if stats.exists() else ["--save-stats", str(stats), "--calib-samples", "1",
                                                                 "--calib-steps", "10"]
        hn(str(graphs["FP32"]), "--w4a4", "--format", fmt, "-o", str(out), "--no-progress", *calib)
    return graphs


def latency(graphs: dict[str, Path], runs: int, threads: int) -> tuple[dict[str, float], dict[str, str]]:
    # no spinning: a session's idle threads would otherwise steal the cores of the next one timed
    dens = {name: Denoiser(path, threads=threads, spinning=False) for name, path in graphs.items()}
    inputs = {name: feeds(np.float16 if name == "FP16" else np.float32) for name in dens}
    for name, den in dens.items():
        den(inputs[name])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in dens}
    for _ in range(runs):
        for name, den in dens.items():
            start = time.perf_counter()
            den(inputs[name])
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(t) * 1000 for name, t in times.items()},
            {name: den.implementation for name, den in dens.items()})


def memory(path: Path, threads: int, library: bool) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(threads), "1" if library else "0"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile(path: Path, threads: int, work: Path) -> list[tuple[str, float, int]]:
    """(op type, ms, node count) of one profiled call, largest first."""
    den = Denoiser(path, threads=threads, profile_prefix=str(work / f"profile_{path.stem}"))
    den(feeds(np.float32))  # warm-up inside the profile is dropped below: only the second run counts
    den(feeds(np.float32))
    trace = json.loads(Path(den.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    per_op: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    for event in trace:
        if event.get("cat") != "Node" or event["ts"] < start or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_op[op] += event["dur"] / 1000
        nodes[op].add(event["name"])
    return sorted(((op, ms, len(nodes[op])) for op, ms in per_op.items()), key=lambda r: -r[1])


def quality(graphs: dict[str, Path], work: Path) -> dict[str, float]:
    out = {}
    for fmt in FORMATS:
        js = work / f"diff_{fmt}.json"
        if js.exists() and js.stat().st_mtime > graphs[f"W4A4 {fmt}"].stat().st_mtime:
            out[fmt] = json.loads(js.read_text())["outputs"]["end_of_denoising"]["sqnr_db"]
            continue  # measured on these very graphs in an earlier run with the same --work
        hn("diff", str(graphs[f"W4A4 {fmt}"]), str(graphs["FP16"]), "--steps", "20", "--samples", "2",
           "--json", str(js))
        out[fmt] = json.loads(js.read_text())["outputs"]["end_of_denoising"]["sqnr_db"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="also end-of-denoising SQNR vs FP16 (slow)")
    parser.add_argument("--work", type=Path, help="keep (and reuse) the graphs here")
    args = parser.parse_args()
    build()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hn-formats-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        graphs = make_graphs(work, args.layers)
        sizes = {name: sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) for name, path in graphs.items()}
        med, impl = latency(graphs, args.runs, args.threads)
        load = os.getloadavg()[0]
        mem = {name: memory(path, args.threads, True) for name, path in graphs.items()}
        prof = {fmt: profile(graphs[f"W4A4 {fmt}"], args.threads, work) for fmt in ("nbits", "fused")}
        sqnr = quality(graphs, work) if args.quality else {}
    cmd = (f"python benchmarks/bench_formats.py --layers {args.layers} --runs {args.runs} --threads {args.threads}"
           + (" --quality" if args.quality else ""))
    fp32 = med["FP32"]
    lines = [f"# Output formats on onnxruntime CPU: PixArt-Sigma 256 px, {args.layers} blocks, HadaNorm W4A4", "",
             f"Command: `{cmd}` ({time.time() - started:.0f} s)", f"Machine: {machine()}; onnxruntime threads "
             f"{args.threads}; load average after the latency runs {load:.2f}.",
             f"One denoiser call, batch 2 (CFG), 256 tokens, caption 120: median of {args.runs} interleaved rounds "
             "after a warm-up. Memory: each graph in a fresh process (RSS after imports subtracted).", "",
             "| graph | runs as | ms | speed-up vs FP32 | RSS after load (MB) | peak after a call (MB) | file (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in graphs:
        m = mem[name]
        lines.append(f"| {name} | {impl[name]} | {med[name]:.0f} | {fp32 / med[name]:.2f}x | "
                     f"{m['loaded_mb'] - m['base_mb']:.0f} | {m['peak_mb'] - m['base_mb']:.0f} | {sizes[name] / 1e6:.0f} |")
    fused, nbits = med["W4A4 fused"], med["W4A4 nbits"]
    mem_ratio = ((mem["W4A4 fused"]["loaded_mb"] - mem["W4A4 fused"]["base_mb"])
                 / (mem["FP32"]["loaded_mb"] - mem["FP32"]["base_mb"]))
    lines += ["", f"Targets: fused >= 2x faster than FP32: **{fp32 / fused:.2f}x**; fused >= 1.3x faster than nbits: "
              f"**{nbits / fused:.2f}x**; fused resident memory after load <= 0.25x FP32: **{mem_ratio:.2f}x**."]
    if sqnr:
        lines += ["", "End-of-denoising SQNR vs the FP16 graph (20 steps, 2 samples, `hn-export diff`):", "",
                  "| format | SQNR (dB) | vs qdq (dB) |", "|---|---:|---:|"]
        lines += [f"| {fmt} | {v:.2f} | {v - sqnr['qdq']:+.2f} |" for fmt, v in sqnr.items()]
    for fmt, rows in prof.items():
        total = sum(ms for _, ms, _ in rows)
        lines += ["", f"Profile of one call, W4A4 {fmt} (onnxruntime profiler, kernel time {total:.0f} ms):", "",
                  "| op type | nodes | ms | share |", "|---|---:|---:|---:|"]
        lines += [f"| {op} | {n} | {ms:.1f} | {100 * ms / total:.1f}% |" for op, ms, n in rows[:12]]
    stem = ROOT / "benchmarks" / f"formats-256px-{args.layers}blocks"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": cmd, "machine": machine(), "latency_ms": med, "implementation": impl, "memory": mem,
         "file_bytes": sizes, "sqnr_db": sqnr, "profile": prof, "load_average": load}, indent=2) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
