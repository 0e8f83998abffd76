"""One hadanorm op alone under two or more builds of the kernel library, interleaved in one process: before / after
of a kernel change (build the old commit's library with ``python -m runtime.kernels.build --output-dir DIR``).

    python benchmarks/bench_ops_ab.py quantize --width 4608 --tokens 256 --mode block LIB [LIB ...]
    python benchmarks/bench_ops_ab.py float-matmul --k 1152 --n 1152 --count 8 LIB [LIB ...]
    python benchmarks/bench_ops_ab.py residual --k 1152 --n 1152 LIB [LIB ...]
    python benchmarks/bench_ops_ab.py modulate --width 1152 --tokens 256 --mode block LIB [LIB ...]
    python benchmarks/bench_ops_ab.py attention --tokens 256 --keys 300 LIB [LIB ...]

``quantize``: one ``CenterScaleRotateQuantize`` (4-bit, Hadamard `--mode` full or block) on ``[2, tokens, width]``.
``float-matmul``: `--count` ``FloatMatMul4`` nodes (two-level 4-bit weights [k, n], the mean token's product) on
``[2, 1, k]``. ``residual``: ``IntMatMul4`` then ``Mul(gate)`` and ``Add(residual)`` (the unfused graph) against one
``IntMatMul4GatedResidual``, each library running both (a library without the fused op runs the unfused graph
only), on ``[2, 256, k]`` codes. ``modulate``: ``Mul(x, scale)``, ``Add(shift)`` and ``CenterScaleRotateQuantize``
against one ``ModulateCenterScaleRotateQuantize`` (scale and shift ``[2, 1, width]``), likewise. ``attention``: one
``Attention`` (bf16, layout bnhd: PixArt's 16 heads of 72, q ``[2, tokens, 16, 72]``, k and v
``[2, keys, 16, 72]``; ``--precision bf16,int8``: each precision a session of each library). Every session
runs on one intra-op thread (the numbers are the calling thread's CPU time,
less sensitive to a busy host than wall time); the outputs of all libraries (and of the two residual graphs) must be
equal bit for bit (or within `--tolerance`, relative L2, for a change that moves the last bits), else the script
stops. Prints the median and minimum of `--rounds` interleaved calls per library
(and graph).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graph_passes.hadamard import HadamardMode, hadamard_factors  # noqa: E402
from graph_passes.int_packing import repack  # noqa: E402
from graph_passes.quantization import QuantConfig, WeightScales, quantize_weight  # noqa: E402


def _model(nodes, inputs, outputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1)],
                             ir_version=10).SerializeToString()


def _value(name: str, elem: int, shape) -> object:
    return helper.make_tensor_value_info(name, elem, shape)


def quantize_case(args) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    h = hadamard_factors(args.width, HadamardMode(args.mode), seed=0)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n)
             for n, v in (("mul", np.ones(args.width) * h.signs), ("hl", h.left), ("hr", h.right))]
    node = helper.make_node("CenterScaleRotateQuantize", ["x", "mul", "hl", "hr"], ["c", "s", "z", "m"],
                            domain="hadanorm", bits=4)
    outs = [_value(n, t, None) for n, t in (("c", TensorProto.UINT8), ("s", TensorProto.FLOAT),
                                             ("z", TensorProto.UINT8), ("m", TensorProto.FLOAT))]
    x = np.random.default_rng(0).standard_normal((2, args.tokens, args.width)).astype(np.float32)
    return {"": _model([node], [_value("x", TensorProto.FLOAT, None)], outs, inits)}, {"x": x}


def _two_level_weight(k: int, n: int, seed: int):
    """A packed 4-bit weight [k, n] quantized with `--weight-scales two-level` (block scales = a column unit times an
    integer 1..16), as hn-export writes it."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * np.exp(0.5 * rng.standard_normal((k, 1))) / np.sqrt(k)
    config = QuantConfig(weight_bits=4, weight_scales=WeightScales.TWO_LEVEL)
    return repack(quantize_weight(w, config, np.dtype(np.float32)))


def float_matmul_case(args) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    nodes, inits, outs = [], [], []
    for i in range(args.count):
        p = _two_level_weight(args.k, args.n, seed=i)
        for name, value in (("b", p.b), ("scales", p.scales), ("zero_points", p.zero_points)):
            inits.append(numpy_helper.from_array(value, f"{name}{i}"))
        nodes.append(helper.make_node("FloatMatMul4", ["x", f"b{i}", f"scales{i}", f"zero_points{i}"], [f"y{i}"],
                                      domain="hadanorm", block_size=p.block_size))
        outs.append(_value(f"y{i}", TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((2, 1, args.k)).astype(np.float32)
    return {"": _model(nodes, [_value("x", TensorProto.FLOAT, [2, 1, args.k])], outs, inits)}, {"x": x}


def residual_case(args) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    k, n, m = args.k, args.n, 256
    p = _two_level_weight(k, n, seed=0)
    inits = [numpy_helper.from_array(p.b, "b"), numpy_helper.from_array(p.scales, "scales"),
             numpy_helper.from_array(p.zero_points, "zero_points")]
    shapes = {"codes": (TensorProto.UINT8, [2, m, k]), "a_scale": (TensorProto.FLOAT, [2, m, 1]),
              "a_zero_point": (TensorProto.UINT8, [2, m, 1]), "bias": (TensorProto.FLOAT, [2, 1, n]),
              "gate": (TensorProto.FLOAT, [2, 1, n]), "residual": (TensorProto.FLOAT, [2, m, n])}
    inputs = [_value(name, *spec) for name, spec in shapes.items()]
    out = [_value("y", TensorProto.FLOAT, [2, m, n])]
    matmul_inputs = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias"]
    unfused = [helper.make_node("IntMatMul4", matmul_inputs, ["p"], domain="hadanorm", block_size=128),
               helper.make_node("Mul", ["gate", "p"], ["g"]), helper.make_node("Add", ["g", "residual"], ["y"])]
    fused = [helper.make_node("IntMatMul4GatedResidual", [*matmul_inputs, "gate", "residual"], ["y"],
                              domain="hadanorm", block_size=128)]
    rng = np.random.default_rng(1)
    feeds = {"codes": rng.integers(0, 16, (2, m, k), dtype=np.uint8),
             "a_scale": rng.uniform(0.05, 0.1, (2, m, 1)).astype(np.float32),
             "a_zero_point": rng.integers(0, 16, (2, m, 1), dtype=np.uint8),
             "bias": rng.standard_normal((2, 1, n)).astype(np.float32),
             "gate": rng.standard_normal((2, 1, n)).astype(np.float32),
             "residual": rng.standard_normal((2, m, n)).astype(np.float32)}
    return {" unfused": _model(unfused, inputs, out, inits), " fused": _model(fused, inputs, out, inits)}, feeds


def modulate_case(args) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    h = hadamard_factors(args.width, HadamardMode(args.mode), seed=0)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n)
             for n, v in (("mul", np.ones(args.width) * h.signs), ("hl", h.left), ("hr", h.right))]
    outs = [_value(n, t, None) for n, t in (("c", TensorProto.UINT8), ("s", TensorProto.FLOAT),
                                             ("z", TensorProto.UINT8), ("m", TensorProto.FLOAT))]
    row = [2, 1, args.width]
    inputs = [_value("x", TensorProto.FLOAT, [2, args.tokens, args.width]), _value("scale", TensorProto.FLOAT, row),
              _value("shift", TensorProto.FLOAT, row)]
    unfused = [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "shift"], ["xm"]),
               helper.make_node("CenterScaleRotateQuantize", ["xm", "mul", "hl", "hr"], ["c", "s", "z", "m"],
                                domain="hadanorm", bits=4)]
    fused = [helper.make_node("ModulateCenterScaleRotateQuantize", ["x", "mul", "hl", "hr", "scale", "shift"],
                              ["c", "s", "z", "m"], domain="hadanorm", bits=4)]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, args.tokens, args.width)).astype(np.float32),
             "scale": (1.0 + 0.3 * rng.standard_normal(row)).astype(np.float32),
             "shift": rng.standard_normal(row).astype(np.float32)}
    return {" unfused": _model(unfused, inputs, outs, inits), " fused": _model(fused, inputs, outs, inits)}, feeds


def attention_case(args) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((2, n, 16, 72)).astype(np.float32)
             for name, n in (("q", args.tokens), ("k", args.keys), ("v", args.keys))}
    inputs = [_value(n, TensorProto.FLOAT, None) for n in "qkv"]
    precisions = args.precision.split(",")
    models = {}
    for precision in precisions:
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], domain="hadanorm", scale=72 ** -0.5,
                                precision=precision, layout="bnhd")
        label = f" {precision}" if len(precisions) > 1 else ""
        models[label] = _model([node], inputs, [_value("y", TensorProto.FLOAT, None)], [])
    return models, feeds


CASES = {"quantize": quantize_case, "float-matmul": float_matmul_case, "residual": residual_case,
         "modulate": modulate_case, "attention": attention_case}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("libraries", nargs="+", type=Path)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--mode", choices=[m.value for m in HadamardMode], default=HadamardMode.BLOCK.value)
    p.add_argument("--k", type=int, default=1152)
    p.add_argument("--n", type=int, default=1152)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--keys", type=int, default=256)
    p.add_argument("--precision", default="bf16",
                   help="attention: the op's precision, or a comma list (float, bf16, int8) run side by side")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="relative L2 the outputs may differ by from the first library's (default 0: bit for bit)")
    args = p.parse_args()
    models, feeds = CASES[args.case](args)
    sessions = {}
    for lib in args.libraries:
        for label, model in models.items():
            options = ort.SessionOptions()
            options.register_custom_ops_library(str(lib))
            options.intra_op_num_threads = 1
            try:
                sessions[f"{lib}{label}"] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # an older library without the op
                if "is not a registered function/op" not in str(exc):
                    raise
                print(f"  {lib}{label}: not in this library (skipped)")
    first = None
    for name, session in sessions.items():
        outputs = session.run(None, feeds)
        if first is None:
            first = outputs
        elif args.tolerance == 0.0 and not all(np.array_equal(a, b) for a, b in zip(first, outputs, strict=True)):
            sys.exit(f"error: {name} does not give the bits of {next(iter(sessions))}")
        elif args.tolerance > 0.0:
            for a, b in zip(first, outputs, strict=True):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                rel = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30))
                if not rel <= args.tolerance:
                    sys.exit(f"error: {name} is {rel:.2e} (relative L2) from {next(iter(sessions))}, over "
                             f"--tolerance {args.tolerance:g}")
                print(f"  {name}: {rel:.2e} relative L2 from the first library's output")
    times = {name: [] for name in sessions}
    for _ in range(3):
        for session in sessions.values():
            session.run(None, feeds)
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.thread_time()
            session.run(None, feeds)
            times[name].append(time.thread_time() - start)
    print(f"{args.case}: " + {"quantize": f"[2, {args.tokens}, {args.width}] {args.mode}",
                              "float-matmul": f"{args.count} x [{args.k}, {args.n}]",
                              "residual": f"[2, 256, {args.k}] x [{args.k}, {args.n}]",
                              "modulate": f"[2, {args.tokens}, {args.width}] {args.mode}",
                              "attention": f"q [2, {args.tokens}, 16, 72], k / v [2, {args.keys}, 16, 72] {args.precision}"}[
                                  args.case]
          + f", 1 thread, {args.rounds} interleaved rounds, thread CPU ms")
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values) * 1e3:.3f}  min {min(values) * 1e3:.3f}")


if __name__ == "__main__":
    main()
