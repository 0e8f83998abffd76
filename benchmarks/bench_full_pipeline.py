"""Full 28-block PixArt-Sigma (256 px, FP32 over 2 GB, external data): export -> calibrate -> quantize.

Measures wall time and peak RSS of each step (separate processes under /usr/bin/time -v), the same for
`onnxruntime.quantization.quantize_static` (QDQ, MinMax, same FP graph and the same calibration inputs), and the file
sizes with bits per weight. Writes benchmarks/full_pipeline_256_<layers>blocks.md.

    python benchmarks/bench_full_pipeline.py [--layers 28] [--calib-samples 2] [--calib-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run under /usr/bin/time -v; returns (wall seconds, peak RSS GiB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return hours * 3600 + minutes * 60 + seconds, rss / 2**20


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


RECORD_CALIB = """
import sys, numpy as np
from pathlib import Path
from hn_export.denoise import DenoiseConfig, ModelSignature, trajectory
from hn_export.model_files import load_model
from runtime.denoiser import Denoiser
path, out, samples, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sig = ModelSignature.of(load_model(path))
den = Denoiser(path)
calls = []
def run(feeds):
    calls.append(feeds)
    return den(feeds)
config = DenoiseConfig(samples=samples, steps=steps, seed=0)
for i in range(samples):
    for _ in trajectory(run, sig, config, i):
        pass
np.savez(out, **{k: np.concatenate([c[k] for c in calls]) for k in calls[0]})
"""

QUANTIZE_STATIC = """
import sys, numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static, CalibrationMethod
model, calib, out = sys.argv[1:4]
data = np.load(calib)
class Reader(CalibrationDataReader):
    def __init__(self):
        n = data["hidden_states"].shape[0]
        self.it = iter([{k: data[k][i:i + 2] for k in data.files} for i in range(0, n, 2)])
    def get_next(self):
        return next(self.it, None)
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                use_external_data_format=True, per_channel=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="Folder for the large files (default: a temp dir).")
    parser.add_argument("--skip-static", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32, fp16, w4 = work / "p256.onnx", work / "p256.fp16.onnx", work / "p256.w4a4.onnx"
    calib = work / "calib.npz"
    hn = [sys.executable, "-c", "from hn_export.cli import main; main()"]
    rows = []
    layers = ["--layers", str(args.layers)]
    rows.append(("export FP32", *timed(hn + ["export", "--preset", "pixart-sigma-256", *layers, "-o", str(fp32)],
                                       work / "export.log")))
    rows.append(("export FP16", *timed(hn + ["export", "--preset", "pixart-sigma-256", *layers, "--fp16", "-o",
                                             str(fp16)], work / "export16.log")))
    rows.append(("record calibration inputs (FP32 trajectories)",
                 *timed([sys.executable, "-c", RECORD_CALIB, str(fp32), str(calib), str(args.calib_samples),
                         str(args.calib_steps)], work / "record.log")))
    rows.append(("hn-export calibrate + quantize W4A4 (HadaNorm)",
                 *timed(hn + [str(fp32), "--w4a4", "-o", str(w4), "--calib", str(calib), "--no-progress"],
                        work / "quantize.log")))
    if not args.skip_static:
        static = work / "p256.static_qdq.onnx"
        rows.append(("onnxruntime quantize_static (QDQ, MinMax, W8A8)",
                     *timed([sys.executable, "-c", QUANTIZE_STATIC, str(fp32), str(calib), str(static)],
                            work / "static.log")))
    params = json.loads(subprocess.run(
        [sys.executable, "-c", "import json,sys; from hn_export.model_files import load_model; "
         "from graph_passes.linears import find_activation_sites; m = load_model(sys.argv[1]); "
         "s = find_activation_sites(m); print(json.dumps({'site_weights': sum(l.in_features*l.out_features for x in s "
         "for l in x.linears), 'all': sum(v.const_value.size for v in m.graph.initializers.values())}))", str(fp32)],
        capture_output=True, text=True, check=True).stdout)
    sizes = {"FP32": size(fp32), "FP16": size(fp16), "W4A4 HadaNorm": size(w4)}
    if not args.skip_static:
        sizes["quantize_static W8A8 QDQ"] = size(work / "p256.static_qdq.onnx")
    lines = [
        f"# Full pipeline, PixArt-Sigma 256 px, {args.layers} blocks (dit-stats, seed 0)",
        "",
        f"Command: `python benchmarks/bench_full_pipeline.py --layers {args.layers} --calib-samples "
        f"{args.calib_samples} --calib-steps {args.calib_steps}`",
        f"Machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB, "
        f"{platform.machine()}, Python {platform.python_version()}; each step a separate process under /usr/bin/time -v.",
        f"Calibration inputs: {args.calib_samples} trajectories x {args.calib_steps} steps (CFG batch 2) of the FP32 graph, "
        "recorded once and given to both tools (`hn-export --calib`, a `CalibrationDataReader`).",
        "",
        "| step | wall time (s) | peak RSS (GiB) |",
        "|---|---:|---:|",
        *[f"| {name} | {wall:.1f} | {rss:.2f} |" for name, wall, rss in rows],
        "",
    ]
    quant = {name: wall for name, wall, _ in rows}
    if not args.skip_static:
        ratio = quant["onnxruntime quantize_static (QDQ, MinMax, W8A8)"] / quant["hn-export calibrate + quantize W4A4 (HadaNorm)"]
        lines += [f"quantize_static / hn-export wall time: {ratio:.2f} (same run; quantize_static makes W8A8 per-tensor "
                  "QDQ, it has no W4A4 per-token path).", ""]
    lines += ["| file | bytes | bits per weight |", "|---|---:|---:|"]
    for name, nbytes in sizes.items():
        lines.append(f"| {name} | {nbytes:,} | {8 * nbytes / params['all']:.2f} |")
    lines += ["", f"Parameters: {params['all']:,} in all, {params['site_weights']:,} in the quantized block linears "
              "(bits per weight = file bytes x 8 / all parameters; embeddings, adaLN and caption projection stay FP32)."]
    out = ROOT / "benchmarks" / f"full_pipeline_256_{args.layers}blocks.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
