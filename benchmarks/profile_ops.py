"""Per-op time of one denoiser graph with onnxruntime's profiler: where a call's time goes.

    python benchmarks/profile_ops.py MODEL.onnx [--calls 8] [--threads 2] [--top 15] [--nodes OP] [--no-spinning]

Runs MODEL (hadanorm kernel library registered when built) on seeded one-call feeds of the graph's inputs (batch 2,
caption 300 where the length is dynamic), 2 warm-up calls, then --calls profiled calls, and prints each op type's
share of the summed kernel time, its ms per call and node count; --nodes OP adds the OP nodes that take longest.
A split graph (`hn-export split-prompt`): its step graph, the prompt's values cached after the first warm-up call.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime.denoiser import Denoiser  # noqa: E402


def feeds_for(denoiser: Denoiser, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in denoiser.inputs.items():
        shape = [d if isinstance(d, int) else (2 if i == 0 else 300) for i, d in enumerate(spec.shape)]
        if "int" in spec.type:
            feeds[name] = np.full(shape, 500, np.int64)
        elif name == "timestep":
            feeds[name] = np.full(shape, 500.0, np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def call_for(denoiser: Denoiser, feeds: dict[str, np.ndarray]):
    """One timed call: the session on `feeds`; for a split graph (hn-export split-prompt) the Denoiser's call, which
    runs the prompt graph at the first call only (the same feeds: the prompt's values are cached), then the step graph
    alone."""
    if denoiser.prompt_session is None:
        return lambda: denoiser.session.run(None, feeds)
    return lambda: denoiser(feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--nodes", help="also list the slowest nodes of this op type")
    parser.add_argument("--no-spinning", action="store_true",
                        help="onnxruntime's intra-op threads sleep between parallel sections (allow_spinning=0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        denoiser = Denoiser(args.model, threads=args.threads, profile_prefix=os.path.join(tmp, "profile"),
                            spinning=not args.no_spinning)
        feeds = feeds_for(denoiser)
        call = call_for(denoiser, feeds)
        times = []
        for i in range(2 + args.calls):
            start = time.perf_counter()
            call()
            if i >= 2:
                times.append(time.perf_counter() - start)
        events = json.loads(Path(denoiser.session.end_profiling()).read_text())
    calls = 2 + args.calls
    per_op, count, per_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
            if op == args.nodes:
                per_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    total = sum(per_op.values())
    print(f"{args.model}: {denoiser.implementation}; median call {1e3 * float(np.median(times)):.1f} ms "
          f"({args.calls} profiled calls, {args.threads} threads); the nodes' kernel time {total / 1e3 / calls:.1f} ms "
          "a call")
    print(f"{'op':32s} {'share':>6s} {'ms/call':>8s} {'nodes':>6s}")
    for op, us in per_op.most_common(args.top):
        print(f"{op:32s} {100 * us / total:5.1f}% {us / 1e3 / calls:8.2f} {count[op] // calls:6d}")
    for node, us in per_node.most_common(args.top):
        print(f"  {node:60s} {us / 1e3 / calls:8.2f} ms/call")


if __name__ == "__main__":
    main()
