#!/usr/bin/env bash
# Issue 12 quality figures: end-of-denoising SQNR vs the FP16 graph (20 steps, 2 samples, the family's own
# denoising loop) at W4A4 and W4A3 for none, QuaRot, SDCB, HadaNorm and HQ-DM, each with per-token dynamic and with
# static per-timestep activations, one family preset at reduced depth.
# Usage: bash benchmarks/run_hqdm_methods.sh PRESET LAYERS [INIT] [EXTRA compare ARGS...]
#   -> benchmarks/hqdm-methods/<PRESET>-<LAYERS>blocks[-<INIT>]/ (table.md, results.json, sqnr.png, time.txt)
set -euo pipefail
source "$(dirname "$0")/export_pair.sh"
preset=${1:?preset, e.g. pixart-sigma-256}
layers=${2:?number of blocks, or the --layers unit of the family}
init=${3:-dit-stats}
shift $(( $# < 3 ? $# : 3 ))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=benchmarks/hqdm-methods/${preset}-${layers}blocks
[ "$init" = dit-stats ] || out=$out-$init
mkdir -p "$out"
export_pair "$preset" "$layers" "$init" "$work"
/usr/bin/time -v hn-export compare "$work/fp32.onnx" --reference "$work/fp16.onnx" \
  --methods none,quarot,sdcb,hadanorm,hqdm --bits w4a4,w4a3 --act-granularities token,timestep \
  --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --out "$out" --no-progress "$@" \
  2> "$work/time.txt"
record_run "$work/time.txt" "$out"
