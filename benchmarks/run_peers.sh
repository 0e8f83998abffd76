#!/usr/bin/env bash
# Issues 17 and 18's peer tables, one run after another on an otherwise idle machine (nothing else may load the cores):
#
#   bash benchmarks/run_peers.sh [WORK_DIR]
#
# WORK_DIR keeps the graphs between runs (28 blocks: several GB; default /tmp/hn-peers). Writes
# benchmarks/peers/*.json and *.md and benchmarks/int_linear.md. The SQNR columns do not depend on AMX (the same
# integers; attention computes fp32 on every path without AMX tiles), so the runs with AMX refused skip the denoising
# loops (--steps 0) and keep the one-call SQNR. The 1024 px runs shrink onnxruntime's arena after every call, so the
# FP32 and W8A8 workers (7 and 4.6 GB peaks) fit in 24 GiB beside the others.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${1:-/tmp/hn-peers}"
cd "$ROOT"
mkdir -p benchmarks/peers
python -m runtime.kernels.build
P="python benchmarks/bench_peers.py --no-build --work-dir $W"
G28=fp32,ort-w8a8,ort-w4,openvino,hn-w4a4,hn-w4a8,hn-w4a4-all,hn-w4a8-all,hn-w4a4-noattn
G1024=fp32,ort-w8a8,openvino,hn-w4a4,hn-w4a4-fattn,fp32-attn
python benchmarks/bench_int_linear.py --runs 20 --isas amx,avx512vnni --md benchmarks/int_linear.md
$P --preset pixart-sigma-256 --layers 4 --rounds 15 --out benchmarks/peers/pixart-sigma-256-4blocks-amx.json
$P --preset pixart-sigma-256 --layers 4 --rounds 15 --steps 0 --no-amx --out benchmarks/peers/pixart-sigma-256-4blocks-noamx.json
$P --preset pixart-sigma-256 --layers 28 --rounds 7 --samples 1 --graphs $G28 \
  --out benchmarks/peers/pixart-sigma-256-28blocks-amx.json
$P --preset pixart-sigma-256 --layers 28 --rounds 7 --steps 0 --no-amx --graphs $G28 \
  --out benchmarks/peers/pixart-sigma-256-28blocks-noamx.json
$P --preset pixart-sigma-1024 --layers 2 --rounds 7 --steps 0 --ort-arena shrink --graphs $G1024 \
  --out benchmarks/peers/pixart-sigma-1024-2blocks-amx.json
$P --preset pixart-sigma-1024 --layers 2 --rounds 5 --steps 0 --no-amx --ort-arena shrink --graphs $G1024 \
  --out benchmarks/peers/pixart-sigma-1024-2blocks-noamx.json
# The full 28-block model at 1024 px: one process, peak memory of a call (issue 18). The table's graph: the attention
# fused first (hn-export optimize), then quantized (since then the plain quantize command fuses it for calibration by
# itself: the same ops, statistics within 1e-5).
D="$W/pixart-sigma-1024-28blocks-seed0"
mkdir -p "$D/fp32" "$D/fp32-attn" "$D/hn-w4a4"
[ -f "$D/fp32/model.onnx" ] || hn-export export --preset pixart-sigma-1024 --layers 28 --seed 0 -o "$D/fp32/model.onnx"
[ -f "$D/fp32-attn/model.onnx" ] || hn-export optimize "$D/fp32/model.onnx" --attention bf16 -o "$D/fp32-attn/model.onnx"
[ -f "$D/hn-w4a4/model.onnx" ] || hn-export "$D/fp32-attn/model.onnx" --w4a4 --format fused --calib-samples 1 \
  --calib-steps 2 --no-progress -o "$D/hn-w4a4/model.onnx"
for arena in keep shrink off; do
  python benchmarks/call_memory.py "$D/hn-w4a4/model.onnx" --calls 3 --arena $arena
done | tee benchmarks/peers/pixart-sigma-1024-28blocks-memory.txt
