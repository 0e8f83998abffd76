"""Memory and time of one denoiser call of one graph, in this process alone (issue 18's 28-block 1024 px check).

    python benchmarks/call_memory.py MODEL.onnx [--calls 3] [--threads 2] [--arena keep|shrink]

Loads MODEL with `runtime.Denoiser` (hadanorm kernel library registered when built; onnxruntime's default arena),
prints RSS after load, then runs --calls calls on seeded feeds (benchmarks/profile_ops.py's) and prints each call's
time, the median, and the peak RSS (VmHWM) of the process: what a device needs to make one call (batch 2, caption
length 300 where the graph leaves them dynamic). --arena shrink: onnxruntime returns its arena's memory after every
call (`Denoiser(shrink_arena=True)`: run option memory.enable_memory_arena_shrinkage=cpu:0); --arena off: no arena (`Denoiser(cpu_arena=False)`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_ops import feeds_for  # noqa: E402
from runtime.denoiser import Denoiser  # noqa: E402


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arena", choices=("keep", "shrink", "off"), default="keep")
    args = p.parse_args()
    denoiser = Denoiser(args.model, threads=args.threads, cpu_arena=args.arena != "off",
                        shrink_arena=args.arena == "shrink")
    feeds = feeds_for(denoiser)
    print(f"{args.model}: {denoiser.implementation}; arena {args.arena}")
    print(f"RSS after load {status_mb('VmRSS'):.0f} MB")
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        denoiser.session.run(None, feeds, denoiser.run_options)
        times.append((time.perf_counter() - start) * 1e3)
        print(f"call {times[-1]:.0f} ms, peak RSS so far {status_mb('VmHWM'):.0f} MB", flush=True)
    print(f"median call {statistics.median(times):.0f} ms; peak RSS {status_mb('VmHWM'):.0f} MB")


if __name__ == "__main__":
    main()
