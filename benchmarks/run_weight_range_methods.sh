#!/usr/bin/env bash
# Issue 12: what the MSE weight range adds end to end. End-of-denoising SQNR vs the FP16 graph (20 steps, 2 samples)
# at W4A4 and W4A3 for none, QuaRot, HadaNorm and HQ-DM with min/max and with MSE weight ranges; then QuaRot and
# HQ-DM with HQ-DM's own weight quantizer (per output channel, asymmetric, MSE range), per token and per timestep
# (-> <out>/hqdm-quantizers/).
# Usage: bash benchmarks/run_weight_range_methods.sh PRESET LAYERS [INIT]
#   -> benchmarks/weight-range-methods/<PRESET>-<LAYERS>blocks[-<INIT>]/ (table.md, results.json, sqnr.png, time.txt)
set -euo pipefail
source "$(dirname "$0")/export_pair.sh"
preset=${1:?preset, e.g. pixart-sigma-256}
layers=${2:?number of blocks}
init=${3:-dit-stats}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=benchmarks/weight-range-methods/${preset}-${layers}blocks
[ "$init" = dit-stats ] || out=$out-$init
mkdir -p "$out"
export_pair "$preset" "$layers" "$init" "$work"
/usr/bin/time -v hn-export compare "$work/fp32.onnx" --reference "$work/fp16.onnx" \
  --methods none,quarot,hadanorm,hqdm --bits w4a4,w4a3 --weight-ranges minmax,mse \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out" --no-progress 2> "$work/time.txt"
record_run "$work/time.txt" "$out"
mkdir -p "$out/hqdm-quantizers"
/usr/bin/time -v hn-export compare "$work/fp32.onnx" --reference "$work/fp16.onnx" \
  --methods quarot,hqdm --bits w4a4,w4a3 --weight-ranges mse --weight-block 100000 --asymmetric-weights \
  --act-granularities token,timestep \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out/hqdm-quantizers" --no-progress \
  2> "$work/time2.txt"
record_run "$work/time2.txt" "$out/hqdm-quantizers"
