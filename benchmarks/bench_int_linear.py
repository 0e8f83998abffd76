"""One W4A4 linear layer in onnxruntime: FP32 MatMul vs MatMulNBits vs hadanorm::IntMatMul4 (per kernel path).

    python benchmarks/bench_int_linear.py [--runs 30] [--threads 2] [--isas avx512vnni,avxvnni,avx2]
                                          [--md benchmarks/int_linear.md]

Shapes: x [2, 256, 1152] @ W [1152, 4608] and x [2, 1024, 4608] @ W [4608, 1152] (the FFN of PixArt-Sigma at
512 px / 1024 px token counts). Models, each one onnxruntime session (CPU, --threads intra-op threads):

* ``FP32 MatMul``: MatMul + Add (bias), float32 weight;
* ``MatMulNBits``: com.microsoft MatMulNBits, 4 bits, block 128, accuracy_level 4 (int8 activations inside) + bias;
* ``IntMatMul4 <path>``: hadanorm::IntMatMul4 on W4A4 codes (activation codes, per-token scale and zero point as
  inputs), packed int4 weight in blocks of 128, bias; one session per kernel path (HADANORM_KERNELS_ISA);
* ``Quantize + IntMatMul4``: hadanorm::Quantize (bits 4) then IntMatMul4, from the same float x as FP32 MatMul;
* ``IntMatMul8``: the same codes against an 8-bit weight (W8A8 layout), on the first path.

All sessions of a shape run interleaved (one run of each per round) after 3 warm-up runs, with
``session.intra_op.allow_spinning=0`` (otherwise each session's pool threads spin after its run and slow the next
session down on a 2-core machine); medians and minimums of
--runs rounds. GOP/s = 2 M K N / time. The peak estimate comes from a probe compiled here with g++ (inline
assembly): the core clock from a chain of dependent adds, the throughput of vpdpbusd zmm / ymm and of vfmadd zmm
per cycle with 12 independent accumulators; peak = instructions per cycle x MACs per instruction x 2 x clock x
cores (os.cpu_count()).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graph_passes.int_packing import quantize_and_pack  # noqa: E402
from runtime.kernels import register_kernels  # noqa: E402
from runtime.kernels.build import build  # noqa: E402
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPES = [(2, 256, 1152, 4608), (2, 1024, 4608, 1152)]  # batch, tokens, K, N
BLOCK = 128
NOTES_MARKER = "<!-- hand-written notes below; kept when the script rewrites the table above -->"
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1), helper.make_opsetid("com.microsoft", 1)]

PROBE = r"""
#include <chrono>
#include <cstdio>
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DP(i) "vpdpbusd %%zmm12, %%zmm13, %%zmm" #i "\n"
#define DPY(i) "vpdpbusd %%ymm12, %%ymm13, %%ymm" #i "\n"
#define FM(i) "vfmadd231ps %%zmm12, %%zmm13, %%zmm" #i "\n"
__attribute__((target("avx512f,avx512vnni"))) double dpz(long n) { double t = now();
  for (long i = 0; i < n; ++i) asm volatile(R12(DP) R12(DP) ::: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11");
  return 24.0 * n / (now() - t); }
__attribute__((target("avx512f,avx512vnni,avx512vl"))) double dpy(long n) { double t = now();
  for (long i = 0; i < n; ++i) asm volatile(R12(DPY) R12(DPY) ::: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11");
  return 24.0 * n / (now() - t); }
__attribute__((target("avx512f"))) double fmz(long n) { double t = now();
  for (long i = 0; i < n; ++i) asm volatile(R12(FM) R12(FM) ::: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11");
  return 24.0 * n / (now() - t); }
#include <sys/syscall.h>
#include <unistd.h>
#include <cstring>
#include <immintrin.h>
struct alignas(64) TileCfg { unsigned char palette, start, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; };
// tdpbusd per cycle (4 independent accumulators, operands in tiles: no loads); 0 when AMX is unavailable
__attribute__((target("amx-tile,amx-int8"))) double amx(long n) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 0;
  TileCfg cfg; std::memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  _tile_loadconfig(&cfg);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
  double t = now();
  for (long i = 0; i < n; ++i) { _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7); }
  t = now() - t;
  _tile_release();
  return 4.0 * n / t; }
double clock_hz(long n) { long x = 0, y = 1; double t = now();
  for (long i = 0; i < n; ++i) asm volatile("add %1, %0\n add %1, %0\n add %1, %0\n add %1, %0" : "+r"(x) : "r"(y));
  return 4.0 * n / (now() - t); }
int main() {
  double best[5] = {0, 0, 0, 0, 0};
  for (int rep = 0; rep < 5; ++rep) {
    double c = clock_hz(200000000), a = dpz(20000000), b = dpy(20000000), f = fmz(20000000), x = amx(2000000);
    if (x / c > best[4]) best[4] = x / c;
    if (c > best[0]) best[0] = c;
    if (a / c > best[1]) best[1] = a / c;
    if (b / c > best[2]) best[2] = b / c;
    if (f / c > best[3]) best[3] = f / c;
  }
  std::printf("%.4f %.3f %.3f %.3f %.4f\n", best[0] / 1e9, best[1], best[2], best[3], best[4]);
}
"""


def probe_peak() -> dict[str, float] | None:
    """Clock (GHz) and per-cycle throughputs measured on one core; None without g++ or AVX-512 VNNI."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" not in flags:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cc", Path(tmp) / "probe"
        src.write_text(PROBE)
        proc = subprocess.run(["g++", "-O2", str(src), "-o", str(exe)], capture_output=True, text=True)
        if proc.returncode:  # a compiler without AMX intrinsics: probe the rest
            src.write_text(PROBE.split("#include <sys/syscall.h>")[0] + "double amx(long) { return 0; }\n" +
                           "double clock_hz" + PROBE.split("double clock_hz", 1)[1])
            proc = subprocess.run(["g++", "-O2", str(src), "-o", str(exe)], capture_output=True, text=True)
        if proc.returncode:
            return None
        ghz, dpz, dpy, fmz, tdp = map(float, subprocess.run([str(exe)], capture_output=True, text=True).stdout.split())
    cores = os.cpu_count() or 1
    return {"ghz": ghz, "dpbusd_zmm": dpz, "dpbusd_ymm": dpy, "fma_zmm": fmz, "tdpbusd": tdp, "cores": cores,
            "int8_peak": dpz * 64 * 2 * ghz * cores, "fp32_peak": fmz * 16 * 2 * ghz * cores,
            "amx_peak": tdp * 16384 * 2 * ghz * cores}


def model_bytes(nodes, inputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "linear", inputs, [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()


def float_input(name: str, shape) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def fp32_model(w: np.ndarray, bias: np.ndarray, x_shape) -> bytes:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"])]
    return model_bytes(nodes, [float_input("x", x_shape)], {"w": w.astype(np.float32), "bias": bias})


def nbits_model(w: np.ndarray, bias: np.ndarray, x_shape) -> bytes:
    """MatMulNBits, symmetric int4 (default zero point 8) in blocks of BLOCK along K."""
    k, n = w.shape
    blocks = k // BLOCK
    wb = w.T.reshape(n, blocks, BLOCK).astype(np.float64)
    scale = np.abs(wb).max(axis=2) / 7.0
    scale = np.where(scale > 0, scale, 1.0)
    q = (np.clip(np.round(wb / scale[..., None]), -7, 7) + 8).astype(np.uint8)  # [n, blocks, BLOCK]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [n, blocks, BLOCK / 2]
    node = helper.make_node("MatMulNBits", ["x", "b", "scales", "", "", "bias"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4)
    return model_bytes([node], [float_input("x", x_shape)],
                       {"b": packed, "scales": scale.astype(np.float32).reshape(-1), "bias": bias})


def matmul_integer_model(w: np.ndarray, x_shape) -> bytes:
    """onnxruntime's MatMulInteger: uint8 activation codes (scalar zero point) x int8 weight (per-tensor symmetric)
    -> int32: the integer GEMM alone (MLAS QGEMM, AMX where the process may use it)."""
    q = np.clip(np.round(w / (np.abs(w).max() / 127.0)), -127, 127).astype(np.int8)
    node = helper.make_node("MatMulInteger", ["codes", "b", "a_zp"], ["y"])
    return model_bytes([node], [helper.make_tensor_value_info("codes", TensorProto.UINT8, list(x_shape))],
                       {"b": q, "a_zp": np.array(8, np.uint8)})


def dynamic_quantize_matmul_model(w: np.ndarray, bias: np.ndarray, x_shape) -> bytes:
    """com.microsoft DynamicQuantizeMatMul (what onnxruntime's quantize_dynamic W8A8 emits): float x quantized to
    uint8 per tensor inside, int8 weight per output channel, bias, float out."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "b", "b_scale", "b_zp", "bias"], ["y"],
                            domain="com.microsoft")
    return model_bytes([node], [float_input("x", x_shape)],
                       {"b": q, "b_scale": scale.astype(np.float32), "b_zp": np.zeros(w.shape[1], np.int8),
                        "bias": bias})


def int_inputs(x_shape) -> list:
    lead = list(x_shape[:-1])
    return [helper.make_tensor_value_info("codes", TensorProto.UINT8, list(x_shape)),
            float_input("a_scale", lead + [1]),
            helper.make_tensor_value_info("a_zero_point", TensorProto.UINT8, lead + [1])]


def int_model(w: np.ndarray, bias: np.ndarray, x_shape, quantize: bool, weight_bits: int = 4) -> bytes:
    p = quantize_and_pack(w, weight_bits, BLOCK, True, np.dtype(np.float32))
    inits = {"b": p.b, "scales": p.scales, "zero_points": p.zero_points, "bias": bias}
    mm = helper.make_node(f"IntMatMul{p.bits}", ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias"],
                          ["y"], domain="hadanorm", block_size=p.block_size)
    if quantize:
        q = helper.make_node("Quantize", ["x"], ["codes", "a_scale", "a_zero_point"], domain="hadanorm", bits=4)
        return model_bytes([q, mm], [float_input("x", x_shape)], inits)
    return model_bytes([mm], int_inputs(x_shape), inits)


def session(model: bytes, threads: int, library: Path | None, isa: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no spinning after a run: with several sessions interleaved on 2 cores, the previous session's spinning pool
    # threads would steal the cores from the next one
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        register_kernels(options, library)
    saved = os.environ.get("HADANORM_KERNELS_ISA")
    if isa:
        os.environ["HADANORM_KERNELS_ISA"] = isa
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    finally:
        if saved is None:
            os.environ.pop("HADANORM_KERNELS_ISA", None)
        else:
            os.environ["HADANORM_KERNELS_ISA"] = saved


def interleaved(entries: list[tuple[str, ort.InferenceSession, dict]], runs: int) -> dict[str, list[float]]:
    for _, s, feeds in entries:
        for _ in range(3):
            s.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name, _, _ in entries}
    for _ in range(runs):
        for name, s, feeds in entries:
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def supported_isas(library: Path) -> list[str]:
    import ctypes

    function = ctypes.CDLL(str(library)).HadanormKernelsIsa
    function.restype = ctypes.c_char_p
    found, saved = [], os.environ.get("HADANORM_KERNELS_ISA")
    for name in ("amx", "avx512vnni", "avxvnni", "avx2", "neondot", "scalar"):
        os.environ["HADANORM_KERNELS_ISA"] = name
        if function().decode() == name:
            found.append(name)
    if saved is None:
        os.environ.pop("HADANORM_KERNELS_ISA", None)
    else:
        os.environ["HADANORM_KERNELS_ISA"] = saved
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isas", default=None, help="comma list of kernel paths (default: all but scalar)")
    parser.add_argument("--shapes", default="0,1", help="indices into SHAPES (default 0,1)")
    parser.add_argument("--md", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args()

    library = build()
    isas = args.isas.split(",") if args.isas else [i for i in supported_isas(library) if i != "scalar"]
    peak = probe_peak()
    load_before = load_average()
    results = []
    for index in map(int, args.shapes.split(",")):
        batch, tokens, k, n = SHAPES[index]
        x_shape = (batch, tokens, k)
        rng = np.random.default_rng(index)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        x = rng.standard_normal(x_shape).astype(np.float32)
        codes = rng.integers(0, 16, x_shape, dtype=np.uint8)
        int_feeds = {"codes": codes, "a_scale": np.full((batch, tokens, 1), 0.1, np.float32),
                     "a_zero_point": np.full((batch, tokens, 1), 8, np.uint8)}
        entries = [("FP32 MatMul", session(fp32_model(w, bias, x_shape), args.threads, None), {"x": x}),
                   ("MatMulNBits (4 bit, acc. level 4)", session(nbits_model(w, bias, x_shape), args.threads, None),
                    {"x": x})]
        for isa in isas:
            entries.append((f"IntMatMul4 ({isa})", session(int_model(w, bias, x_shape, False), args.threads, library,
                                                           isa), int_feeds))
        entries.append((f"Quantize + IntMatMul4 ({isas[0]})",
                        session(int_model(w, bias, x_shape, True), args.threads, library, isas[0]), {"x": x}))
        entries.append((f"IntMatMul8 ({isas[0]}, W8A8)",
                        session(int_model(w, bias, x_shape, False, 8), args.threads, library, isas[0]), int_feeds))
        entries.append(("onnxruntime MatMulInteger (u8 x s8 -> int32)",
                        session(matmul_integer_model(w, x_shape), args.threads, None), {"codes": codes}))
        entries.append(("onnxruntime DynamicQuantizeMatMul (W8A8)",
                        session(dynamic_quantize_matmul_model(w, bias, x_shape), args.threads, None), {"x": x}))
        runs = args.runs if "scalar" not in isas else max(2, args.runs // 10)
        times = interleaved(entries, runs)
        ops = 2.0 * batch * tokens * k * n
        fp32 = statistics.median(times["FP32 MatMul"])
        nbits = statistics.median(times["MatMulNBits (4 bit, acc. level 4)"])
        for name, _, _ in entries:
            med = statistics.median(times[name])
            row = (f"[{batch}, {tokens}, {k}] x [{k}, {n}]", name, med, min(times[name]), ops / med / 1e6,
                   fp32 / med, nbits / med)
            results.append(row)
            print(f"{row[0]:>28} {name:>36} {med:8.2f} ms (min {row[3]:7.2f})  {row[4]:7.1f} GOP/s  "
                  f"x{row[5]:.2f} vs FP32  x{row[6]:.2f} vs NBits", flush=True)
    load_after = load_average()
    if peak:
        print(f"clock {peak['ghz']:.2f} GHz, vpdpbusd zmm {peak['dpbusd_zmm']:.2f}/cycle, ymm "
              f"{peak['dpbusd_ymm']:.2f}/cycle, fma zmm {peak['fma_zmm']:.2f}/cycle, tdpbusd {peak['tdpbusd']:.4f}/cycle: "
              f"int8 peak {peak['int8_peak']:.0f} GOP/s (VNNI), {peak['amx_peak']:.0f} GOP/s (AMX), fp32 peak "
              f"{peak['fp32_peak']:.0f} GFLOP/s ({peak['cores']} cores)")
    print(f"load average before {load_before}, after {load_after}")
    if args.md:
        write_md(args, results, peak, load_before, load_after)


def write_md(args, results, peak, load_before, load_after) -> None:
    command = f"python benchmarks/bench_int_linear.py --runs {args.runs} --threads {args.threads}"
    if args.isas:
        command += f" --isas {args.isas}"
    command += f" --md {args.md}"
    lines = ["# One W4A4 linear: FP32 MatMul vs MatMulNBits vs hadanorm::IntMatMul4", "",
             f"Measured {datetime.date.today().isoformat()} with:", "", "```", command, "```", "",
             f"- Machine: {machine()}",
             f"- onnxruntime {ort.__version__} CPU, intra-op threads {args.threads}; numpy {np.__version__}",
             f"- Median (and minimum) of {args.runs} rounds after 3 warm-up runs, all sessions of a shape "
             "interleaved run by run",
             f"- Load average (1/5/15 min) before: {load_before}, after: {load_after}"]
    if peak:
        lines.append(
            f"- Peak estimate (probe in the script, best of 5): clock {peak['ghz']:.2f} GHz (dependent adds), "
            f"vpdpbusd zmm {peak['dpbusd_zmm']:.2f}/cycle (64 MACs each), vfmadd231ps zmm {peak['fma_zmm']:.2f}/cycle "
            f"(16 MACs), tdpbusd {peak['tdpbusd']:.4f}/cycle (16 x 16 x 64 = 16384 MACs, 4 independent tiles, no "
            f"loads) on one core, x {peak['cores']} cores: int8 peak {peak['int8_peak']:.0f} GOP/s (AVX-512 VNNI), "
            f"{peak['amx_peak']:.0f} GOP/s (AMX), FP32 peak {peak['fp32_peak']:.0f} GFLOP/s")
    lines += ["", "| shape | model | median ms | min ms | GOP/s | % of peak | vs FP32 MatMul | vs MatMulNBits |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape, name, med, mn, gops, r32, rnb in results:
        # FP32 against the FP32 peak; amx paths and onnxruntime's integer ops (MLAS runs them on AMX) against the
        # AMX peak; the rest against the AVX-512 VNNI peak
        kind = ("fp32_peak" if name.startswith("FP32") else
                "amx_peak" if ("amx" in name or name.startswith("onnxruntime")) and peak and peak["amx_peak"] else
                "int8_peak")
        label = {"fp32_peak": " (FP32)", "amx_peak": " (AMX)", "int8_peak": " (VNNI)"}[kind]
        pct = f"{100 * gops / peak[kind]:.0f}%{label}" if peak else "-"
        lines.append(f"| {shape} | {name} | {med:.2f} | {mn:.2f} | {gops:.0f} | {pct} | {r32:.2f}x | {rnb:.2f}x |")
    notes = ""
    if args.md.is_file() and NOTES_MARKER in args.md.read_text():
        notes = args.md.read_text().split(NOTES_MARKER, 1)[1]
    args.md.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
