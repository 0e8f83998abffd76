#!/usr/bin/env bash
# Issue 10 quality figures: end-of-denoising SQNR vs the FP16 graph (20 steps, 2 samples, the family's own
# denoising loop) of W4A4 and W6A6 for all six methods, one family preset at reduced depth, dit-stats weights.
# Usage: bash benchmarks/run_family_methods.sh PRESET LAYERS [INIT]
#   -> benchmarks/family-methods/<PRESET>-<LAYERS>blocks[-<INIT>]/ (table.md, results.json, sqnr.png, time.txt)
set -euo pipefail
source "$(dirname "$0")/export_pair.sh"
preset=${1:?preset, e.g. sd3-medium-256}
layers=${2:?number of blocks}
init=${3:-dit-stats}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=benchmarks/family-methods/${preset}-${layers}blocks
[ "$init" = dit-stats ] || out=$out-$init
mkdir -p "$out"
export_pair "$preset" "$layers" "$init" "$work"
/usr/bin/time -v hn-export compare "$work/fp32.onnx" --reference "$work/fp16.onnx" --methods all --bits w4a4,w6a6 \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out" --no-progress 2> "$work/time.txt"
record_run "$work/time.txt" "$out"
