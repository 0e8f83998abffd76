#!/usr/bin/env bash
# Issue 3 quality figures: end-of-denoising SQNR (20 steps, vs the FP32 graph) of W4A4 and W6A6 for all six methods
# and the three bias-correction modes, PixArt-Sigma 256 px preset with dit-stats weights, reduced depth for CPU time.
# Usage: bash benchmarks/run_methods_256.sh [LAYERS]   (writes benchmarks/methods-256px-<LAYERS>blocks/)
set -euo pipefail
layers=${1:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=benchmarks/methods-256px-${layers}blocks
hn-export export --preset pixart-sigma-256 --layers "$layers" --seed 0 -o "$work/p256.onnx"
/usr/bin/time -v hn-export compare "$work/p256.onnx" --methods all --bits w4a4,w6a6 --bias-corrections all \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out" --no-progress 2> "$work/time.txt"
grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time.txt"
