#!/usr/bin/env bash
# Issue 17's peer tables, one run after another on an otherwise idle machine (nothing else may load the cores):
#
#   bash benchmarks/run_peers.sh [WORK_DIR]
#
# WORK_DIR keeps the graphs between runs (28 blocks: several GB; default /tmp/hn-peers). Writes
# benchmarks/peers/*.json and *.md and benchmarks/int_linear.md. The SQNR columns do not depend on AMX (the same
# integers), so the runs with AMX refused skip the denoising loops (--steps 0) and keep the one-call SQNR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${1:-/tmp/hn-peers}"
cd "$ROOT"
mkdir -p benchmarks/peers
python -m runtime.kernels.build
P="python benchmarks/bench_peers.py --no-build --work-dir $W"
python benchmarks/bench_int_linear.py --runs 20 --isas amx,avx512vnni --md benchmarks/int_linear.md
$P --preset pixart-sigma-256 --layers 4 --rounds 15 --out benchmarks/peers/pixart-sigma-256-4blocks-amx.json
$P --preset pixart-sigma-256 --layers 4 --rounds 15 --steps 0 --no-amx --out benchmarks/peers/pixart-sigma-256-4blocks-noamx.json
$P --preset pixart-sigma-256 --layers 28 --rounds 7 --samples 1 --out benchmarks/peers/pixart-sigma-256-28blocks-amx.json
$P --preset pixart-sigma-256 --layers 28 --rounds 7 --steps 0 --no-amx --out benchmarks/peers/pixart-sigma-256-28blocks-noamx.json
$P --preset pixart-sigma-1024 --layers 2 --rounds 5 --steps 0 --ort-arena shrink \
  --graphs fp32,ort-w8a8,openvino,hn-w4a4,hn-w4a4-all --out benchmarks/peers/pixart-sigma-1024-2blocks-amx.json
