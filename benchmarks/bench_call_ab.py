"""One whole denoiser call under two or more builds of the kernel library, each in its own process, the processes
alternated: before / after of a kernel change measured on the whole graph (build the old commit's library with
``python -m runtime.kernels.build --output-dir DIR``).

    python benchmarks/bench_call_ab.py MODEL.onnx OLD.so NEW.so [--pairs 5] [--calls 40] [--threads 2] [--no-spinning]

Each process loads MODEL (a split graph's step graph too: the prompt graph runs once, in the warm-up) with
``runtime.denoiser.Denoiser(kernel_library=LIB)`` (onnxruntime's arena kept, as the
product runs it), makes `benchmarks/profile_ops.py`'s seeded feeds (batch 2), runs two warm-up calls, then `--calls`
timed calls, and reports their median and minimum wall time and the minor page faults and system CPU time per timed
call (a kernel that maps fresh memory every call shows there). Prints one line per process, then each library's
medians over the `--pairs` alternations. ``--no-spinning``: onnxruntime's intra-op threads sleep between parallel
sections (``session.intra_op.allow_spinning=0``), as `benchmarks/bench_peers.py` runs every graph: then each
parallel section of an op pays for waking the pool's threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(model: str, library: str, calls: int, threads: int, spinning: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from profile_ops import call_for, feeds_for
    from runtime.denoiser import Denoiser

    denoiser = Denoiser(model, threads=threads, kernel_library=library, spinning=spinning)
    call = call_for(denoiser, feeds_for(denoiser))
    for _ in range(2):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "faults_per_call": (after.ru_minflt - before.ru_minflt) / calls,
            "sys_s_per_call": (after.ru_stime - before.ru_stime) / calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("libraries", nargs="+")
    p.add_argument("--pairs", type=int, default=5, help="alternations of the libraries (one process each)")
    p.add_argument("--calls", type=int, default=40, help="timed calls per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-spinning", action="store_true", help="intra-op threads sleep between parallel sections")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.libraries[0], args.calls, args.threads, not args.no_spinning)))
        return
    medians: dict[str, list[float]] = {lib: [] for lib in args.libraries}
    for _ in range(args.pairs):
        for lib in args.libraries:
            out = subprocess.run([sys.executable, __file__, args.model, lib, "--worker", "--calls", str(args.calls),
                                  "--threads", str(args.threads)] + (["--no-spinning"] if args.no_spinning else []),
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            medians[lib].append(r["median_ms"])
            print(f"{lib}: median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f}, minor faults / call "
                  f"{r['faults_per_call']:.0f}, system CPU / call {r['sys_s_per_call'] * 1e3:.1f} ms", flush=True)
    for lib, values in medians.items():
        print(f"{lib}: medians {' '.join(f'{v:.1f}' for v in values)} (median {statistics.median(values):.1f} ms)")


if __name__ == "__main__":
    main()
