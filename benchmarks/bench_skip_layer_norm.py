"""onnxruntime's fused SkipLayerNormalization against the Add + LayerNormalization it replaces (why
runtime/session.py turns SkipLayerNormFusion off): one two-node graph, two sessions, interleaved runs.

    python benchmarks/bench_skip_layer_norm.py [--width 1152] [--tokens 256] [--runs 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    shape = [2, args.tokens, args.width]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("LayerNormalization", ["s", "gamma"], ["y"], axis=-1, epsilon=1e-6)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(args.width, np.float32), "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in "ab"}
    sessions = {}
    for name, disabled in (("SkipLayerNormalization (onnxruntime's default)", []),
                           ("Add + LayerNormalization (SkipLayerNormFusion off)", ["SkipLayerNormFusion"])):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=disabled)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(5):
        for s in sessions.values():
            s.run(None, feeds)
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    outs = [s.run(None, feeds)[0] for s in sessions.values()]
    print(f"x {shape}, {args.threads} threads, {args.runs} interleaved runs (onnxruntime {ort.__version__})")
    for name, t in times.items():
        print(f"  {name}: median {statistics.median(t) * 1e3:.3f} ms, min {min(t) * 1e3:.3f} ms")
    print(f"  max abs difference {float(np.abs(outs[0] - outs[1]).max()):.2e}")


if __name__ == "__main__":
    main()
