"""Benchmark the full-size export: `hn-export export --preset pixart-sigma-512` (28 blocks, 1152 wide, 64x64 latent).

Runs the real command in a child process, measures its wall time and peak RSS (``resource.getrusage(RUSAGE_CHILDREN)
.ru_maxrss`` after the child exits), optionally checks the file against torch (``--verify``, a second child, not
counted in the numbers), and writes ``benchmarks/export_full_512.md``.

    python benchmarks/bench_export.py [--verify] [--keep DIR] [--md benchmarks/export_full_512.md]

Needs ~3.5 GB of memory and ~2.5 GB of free disk (in a temporary folder, removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
PRESET = "pixart-sigma-512"

VERIFY_SNIPPET = r"""
import sys, time, numpy as np, onnxruntime as ort, torch
from models.build import ModelSource, build_transformer, make_inputs
path = sys.argv[1]
model = build_transformer(ModelSource(preset="%s"))
inputs = make_inputs(model, batch=1, caption_length=16, seed=3)
with torch.no_grad():
    ref = model(**inputs, return_dict=False)[0].numpy()
del model
opts = ort.SessionOptions(); opts.log_severity_level = 3
t = time.perf_counter()
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t
t = time.perf_counter()
out = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
run_s = time.perf_counter() - t
print(f"max_abs={np.abs(out - ref).max():.3g} ref_absmax={np.abs(ref).max():.3g} load_s={load_s:.1f} run_s={run_s:.1f}")
""" % PRESET


def export_command(output: Path) -> list[str]:
    exe = shutil.which("hn-export")
    if exe:
        return [exe, "export", "--preset", PRESET, "-o", str(output)]
    return [sys.executable, "-c", "from hn_export.cli import main; main()", "export", "--preset", PRESET,
            "-o", str(output)]


def versions() -> str:
    out = subprocess.run(
        [sys.executable, "-c",
         "import torch, diffusers, onnx, onnxscript, onnx_ir, onnxruntime as o; "
         "print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, onnx {onnx.__version__}, "
         "onnxscript {onnxscript.__version__}, onnx-ir {onnx_ir.__version__}, onnxruntime {o.__version__}')"],
        capture_output=True, text=True, cwd=ROOT,
    )
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with torch (batch 1, 1024 tokens)")
    parser.add_argument("--keep", type=Path, help="write the model here and keep it")
    parser.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "export_full_512.md")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    output = work / "pixart512.onnx"
    cmd = export_command(output)
    display = " ".join(["hn-export", *cmd[cmd.index("export"):]]).replace(str(output), "pixart512.onnx")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        if proc.returncode != 0:
            sys.exit(f"export failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        stages = re.findall(r"stage (\d)/4(?:, ([a-z/]+))? \[(\d\d:\d\d)\]", proc.stderr)
        files = sorted(p for p in work.iterdir() if p.name.startswith(output.name))
        sizes = {p.name: p.stat().st_size for p in files}
        verify_line = None
        if args.verify:
            v = subprocess.run([sys.executable, "-c", VERIFY_SNIPPET, str(output)], capture_output=True, text=True,
                               cwd=ROOT)
            verify_line = v.stdout.strip() if v.returncode == 0 else f"verify failed: {v.stderr.strip()[-500:]}"
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    # elapsed time at the end of each stage, from the tqdm bar
    ends: dict[str, str] = {}
    for n, _name, elapsed in stages:
        if int(n) >= 1:  # the first line showing count n is printed when stage n ends
            ends.setdefault(["trace", "decompose/translate", "fix", "save"][int(n) - 1], elapsed)

    lines = [
        "# Full-size export benchmark: PixArt-Sigma XL-2 at 512 px",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python benchmarks/bench_export.py"
        f"{' --verify' if args.verify else ''}`.",
        "",
        "Command (28 blocks, 16 heads x 72 = 1152 wide, 64x64 latent = 1024 tokens, seeded dit-stats weights, fp32):",
        "",
        "```",
        display,
        "```",
        "",
        f"- Machine: {machine()}",
        f"- Versions: Python {platform.python_version()}, {versions()}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall time (whole command: imports, build 611 M parameters, export, save) | {wall:.1f} s |",
        f"| peak RSS of the child (ru_maxrss) | {peak_rss / 2**30:.2f} GiB |",
    ]
    for stage in ("trace", "decompose/translate", "fix", "save"):
        if ends.get(stage):
            lines.append(f"| tqdm elapsed at the end of stage `{stage}` (mm:ss) | {ends[stage]} |")
    for name, size in sizes.items():
        lines.append(f"| file `{name}` | {size / 1e9:.3f} GB ({size:,} bytes) |")
    if verify_line:
        lines.append(f"| onnxruntime vs torch, batch 1, caption 16 (separate process) | {verify_line} |")
    lines += [
        "",
        "The weights (2.44 GB) are above the 1.8 GB threshold of `save_model`, so they go to `pixart512.onnx.data`",
        "beside the graph (keep the two files together). Height and width are fixed at export (one file per",
        "resolution); batch and caption length are dynamic.",
        "",
    ]
    args.md.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
