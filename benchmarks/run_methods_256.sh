#!/usr/bin/env bash
# Issue 3 quality figures: end-of-denoising SQNR (20 steps, vs the FP32 graph) of W4A4 and W6A6 for all six methods,
# PixArt-Sigma 256 px preset, reduced depth for CPU time.
# Usage: bash benchmarks/run_methods_256.sh [LAYERS] [INIT]
#   INIT dit-stats (default; all three bias-correction modes) -> benchmarks/methods-256px-<LAYERS>blocks/
#   INIT outliers (dit-stats without planted channel-mean offsets; float-token only)
#        -> benchmarks/methods-256px-<LAYERS>blocks-outliers/
set -euo pipefail
layers=${1:-4}
init=${2:-dit-stats}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=benchmarks/methods-256px-${layers}blocks
bias=all
if [ "$init" != dit-stats ]; then
  out=$out-$init
  bias=float-token
fi
hn-export export --preset pixart-sigma-256 --layers "$layers" --seed 0 --init "$init" -o "$work/p256.onnx"
/usr/bin/time -v hn-export compare "$work/p256.onnx" --methods all --bits w4a4,w6a6 --bias-corrections "$bias" \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out" --no-progress 2> "$work/time.txt"
grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time.txt"
