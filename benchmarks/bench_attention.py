"""hadanorm::Attention alone, per kernel path, side by side (interleaved rounds in one process).

    python benchmarks/bench_attention.py [--tokens 1024] [--heads 16] [--dim 72] [--batch 2] [--rounds 5]
        [--paths scalar,avx2,avx512vnni,amx] [--precisions float,bf16,int8] [--threads 2]

One op, q/k/v [batch, tokens, heads, dim] (layout bnhd, as the pass writes PixArt's), scale 1/sqrt(dim), no mask;
each path (`HADANORM_KERNELS_ISA`) at float, bf16 and int8 precision (a path without AMX tiles computes float for bf16,
one without AVX512-VNNI float for int8: the report says so). Prints the median ms of each, and GFLOP/s counting 4 x tokens^2 x dim per head.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.kernels import attention_path, library_path, register_kernels  # noqa: E402
from tests.kernel_env import kernel_isa  # noqa: E402


def model(scale: float, precision: str) -> bytes:
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], domain="hadanorm", scale=scale,
                            precision=precision, layout="bnhd")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in "qkv"], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1)],
                             ir_version=10).SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=72)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default="scalar,avx2,avx512vnni,amx")
    p.add_argument("--precisions", default="float,bf16,int8", help="comma-separated: float, bf16, int8")
    args = p.parse_args()
    library = library_path()
    if library is None:
        sys.exit("error: the kernel library is not built; run `python -m runtime.kernels.build`")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((args.batch, args.tokens, args.heads, args.dim)).astype(np.float32) for n in "qkv"}
    sessions = {}
    for isa in args.paths.split(","):
        for precision in args.precisions.split(","):
            with kernel_isa(isa):
                path = attention_path(library, precision)
                if path is None or path.startswith("error"):
                    continue
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                register_kernels(options, library)
                sessions[(isa, precision, path)] = ort.InferenceSession(model(args.dim ** -0.5, precision), options,
                                                                        providers=["CPUExecutionProvider"])
    times = {key: [] for key in sessions}
    for _ in range(args.rounds + 1):  # the first round warms up
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    flops = 4.0 * args.tokens ** 2 * args.dim * args.heads * args.batch
    print(f"hadanorm::Attention, q/k/v [{args.batch}, {args.tokens}, {args.heads}, {args.dim}], {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    print("| HADANORM_KERNELS_ISA | precision | path | ms | GFLOP/s |\n|---|---|---|---:|---:|")
    for (isa, precision, path), t in times.items():
        ms = statistics.median(t[1:]) * 1e3
        print(f"| {isa} | {precision} | {path} | {ms:.1f} | {flops / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
