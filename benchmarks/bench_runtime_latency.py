"""onnxruntime CPU latency of one denoiser call: FP32, plain W4A4 (method none), HadaNorm W4A4 with kernels and with
function bodies, and HadaNorm W4A4 under the opt-in numerics modes (with their SQNR cost vs the as-written graph).

PixArt-Sigma 256 px, full width (1152), `--layers` blocks, batch 2 (CFG), caption length 120. Configurations are
timed interleaved (round-robin) so background load affects all alike; ratios come from one run.

    python benchmarks/bench_runtime_latency.py [--layers 4] [--runs 7] [--threads 2]
"""

from __future__ import annotations

import argparse
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

from hn_export.metrics import sqnr_db  # noqa: E402
from runtime.denoiser import Denoiser  # noqa: E402
from runtime.kernels.build import build  # noqa: E402
from runtime.session import NumericsMode  # noqa: E402


def hn(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from hn_export.cli import main; main()", *args], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    library = build()
    with tempfile.TemporaryDirectory(prefix="hn-latency-") as tmp:
        fp32, none, hada = (Path(tmp) / n for n in ("fp32.onnx", "none.onnx", "hadanorm.onnx"))
        hn("export", "--preset", "pixart-sigma-256", "--layers", str(args.layers), "-o", str(fp32))
        hn(str(fp32), "--w4a4", "--method", "none", "-o", str(none), "--no-progress")
        hn(str(fp32), "--w4a4", "--method", "hadanorm", "-o", str(hada), "--no-progress", "--calib-samples", "1",
           "--calib-steps", "5")
        configs = {
            "FP32": Denoiser(fp32, threads=args.threads, kernel_library=False),
            "W4A4 none": Denoiser(none, threads=args.threads, kernel_library=False),
            "W4A4 HadaNorm, kernels": Denoiser(hada, threads=args.threads, kernel_library=library),
            "W4A4 HadaNorm, function bodies": Denoiser(hada, threads=args.threads, kernel_library=False),
            "W4A4 HadaNorm, kernels, fp32 MatMulNBits (opt-in)": Denoiser(hada, None, NumericsMode.FP32,
                                                                          args.threads, library),
            "W4A4 HadaNorm, kernels, onnxruntime defaults (opt-in fast)": Denoiser(hada, None, NumericsMode.FAST,
                                                                                   args.threads, library),
        }
        rng = np.random.default_rng(0)
        feeds = {"hidden_states": rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
                 "timestep": np.array([500.0, 500.0], np.float32),
                 "encoder_hidden_states": (rng.standard_normal((2, 120, 4096)) * 0.2).astype(np.float32)}
        outputs = {name: den(feeds) for name, den in configs.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, den in configs.items():
                start = time.perf_counter()
                den(feeds)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    exact = outputs["W4A4 HadaNorm, kernels"]
    lines = [
        f"# Denoiser-call latency, PixArt-Sigma 256 px, 1152 wide, {args.layers} blocks (onnxruntime CPU)",
        "",
        f"Command: `python benchmarks/bench_runtime_latency.py --layers {args.layers} --runs {args.runs} "
        f"--threads {args.threads}`",
        f"Machine: {os.cpu_count()} cores, {args.threads} onnxruntime threads; batch 2 (CFG), 256 tokens, caption 120; "
        f"median of {args.runs} interleaved runs after one warm-up. Load average at the end: {os.getloadavg()[0]:.1f}.",
        "",
        "| graph | ms | vs W4A4 none | SQNR vs as-written HadaNorm (dB) |",
        "|---|---:|---:|---:|",
    ]
    for name in configs:
        sq = sqnr_db(exact, outputs[name]) if "HadaNorm" in name else float("nan")
        lines.append(f"| {name} | {med[name]:.1f} | {med[name] / med['W4A4 none']:.3f} | "
                     f"{'' if np.isnan(sq) else ('exact' if np.isinf(sq) else f'{sq:.1f}')} |")
    overhead = med["W4A4 HadaNorm, kernels"] / med["W4A4 none"] - 1
    lines += ["", f"HadaNorm's online transform with kernels costs {100 * overhead:+.1f}% over plain W4A4 "
              "(target: <= 10%)."]
    out = ROOT / "benchmarks" / "runtime_latency.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
