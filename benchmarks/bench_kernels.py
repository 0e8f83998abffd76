"""Micro benchmark: the hadanorm ops as ONNX function bodies vs the C++ kernel library (runtime/kernels).

    python benchmarks/bench_kernels.py [--runs 20] [--threads 2] [--md benchmarks/kernels.md]

For x of shape [1, 1024, 1152] and [1, 1024, 4608] and each op (rotations: full Kronecker Hadamard K x 2^n with
seeded signs folded into mul, and block-diagonal 128 Hadamard), builds a one-node model with the op's function
body, runs it in a plain onnxruntime session (function body, inlined) and in a session with the kernel library
registered (kernel), and reports the median wall time of `session.run` over --runs runs after 3 warm-up runs.
Builds the library first if needed (`python -m runtime.kernels.build`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from graph_passes.hadamard import HadamardMode, hadamard_factors  # noqa: E402
from graph_passes.hadanorm_ops import ALL_OPS, TransformOp, ensure_function  # noqa: E402
from runtime.domain import HADANORM_DOMAIN  # noqa: E402
from runtime.kernels import register_kernels  # noqa: E402
from runtime.kernels.build import build  # noqa: E402
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPES = [(1, 1024, 1152), (1, 1024, 4608)]


def op_model(spec: TransformOp, width: int, mode: HadamardMode | None) -> bytes:
    rng = np.random.default_rng(0)
    mul = np.exp(rng.standard_normal(width) * 0.5)
    consts = {}
    if mode is not None:
        h = hadamard_factors(width, mode, seed=0)
        consts = {"h_left": h.left, "h_right": h.right}
        mul = mul * h.signs
    consts = {"mul": mul, **consts}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "N", width]))
    inits = [ir.Value(name=k, const_value=ir.tensor(np.asarray(v, dtype=np.float32))) for k, v in consts.items()]
    node = ir.Node(HADANORM_DOMAIN, spec.op_type, [x, *inits], num_outputs=spec.num_outputs)
    for value, name in zip(node.outputs, ("y", "mean_y")):
        value.name = name
    graph = ir.Graph([x], list(node.outputs), nodes=[node], initializers=inits, opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    ensure_function(model, spec)
    return ir.serde.serialize_model(model).SerializeToString()


def timings_ms(sessions: list[ort.InferenceSession], x: np.ndarray, runs: int) -> list[list[float]]:
    """Per session, `runs` wall times of `session.run`; the sessions alternate run by run (fair under load)."""
    feed = {"x": x}
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, out in zip(sessions, times):
            start = time.perf_counter()
            session.run(None, feed)
            out.append((time.perf_counter() - start) * 1e3)
    return times


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--md", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args()

    library = build()
    load_before = load_average()
    rows = []
    for shape in SHAPES:
        width = shape[-1]
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) + 1.0
        for spec in ALL_OPS:
            for mode in ([HadamardMode.FULL, HadamardMode.BLOCK] if spec.rotate else [None]):
                model = op_model(spec, width, mode)
                plain, kernel = ort.SessionOptions(), ort.SessionOptions()
                register_kernels(kernel, library)
                for options in (plain, kernel):
                    options.intra_op_num_threads = args.threads
                    options.inter_op_num_threads = 1
                providers = ["CPUExecutionProvider"]
                s_function = ort.InferenceSession(model, plain, providers=providers)
                s_kernel = ort.InferenceSession(model, kernel, providers=providers)
                f_times, k_times = timings_ms([s_function, s_kernel], x, args.runs)
                f_ms, k_ms = statistics.median(f_times), statistics.median(k_times)
                h = hadamard_factors(width, mode) if mode else None
                rotation = "-" if h is None else f"{mode.value} ({h.left.shape[0]}x{h.right.shape[0]})"
                row = (f"[{', '.join(map(str, shape))}]", spec.op_type, rotation, f_ms, k_ms, f_ms / k_ms,
                       min(f_times), min(k_times))
                rows.append(row)
                print(f"{row[0]:>16} {row[1]:>18} {row[2]:>16}  function {f_ms:8.2f} ms (min {row[6]:6.2f})"
                      f"  kernel {k_ms:8.2f} ms (min {row[7]:6.2f})  x{row[5]:.1f}", flush=True)

    if args.md:
        lines = [
            "# hadanorm ops: ONNX function body vs C++ kernel",
            "",
            f"Measured {datetime.date.today().isoformat()} with:",
            "",
            "```",
            f"python benchmarks/bench_kernels.py --runs {args.runs} --threads {args.threads} --md {args.md}",
            "```",
            "",
            f"- Machine: {machine()}",
            f"- onnxruntime {ort.__version__} CPU, intra-op threads {args.threads} (the kernels use onnxruntime's "
            "intra-op pool), numpy " + np.__version__,
            f"- Kernel library: `{library.relative_to(ROOT)}` (C API 21, `g++ -O3`, AVX2/FMA clones)",
            f"- Median (and minimum) of {args.runs} `session.run` calls after 3 warm-up runs, function body and "
            "kernel sessions alternating run by run; one-node models with constant `mul`/`h_left`/`h_right`; "
            "rotations carry seeded signs folded into `mul`",
            f"- Load average (1/5/15 min) before: {load_before}, after: {load_average()} (other work on the "
            "machine inflates medians more than minimums)",
            "",
            "| x | op | rotation (K x M) | function body ms | kernel ms | speed-up (median) | function min ms "
            "| kernel min ms |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {s} | {op} | {rot} | {f:.2f} | {k:.2f} | {r:.1f}x | {fm:.2f} | {km:.2f} |"
                  for s, op, rot, f, k, r, fm, km in rows]
        args.md.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
