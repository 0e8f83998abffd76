#!/usr/bin/env bash
# Issue 21 items 2, 4, 6: the low-rank branch (--low-rank R) in compare's grid, one-call and end-of-denoising SQNR vs
# FP32 (20 steps, 2 samples), graphs written --format fused (the kernels' epilogue runs the branch).
# Usage: bash benchmarks/run_low_rank.sh [pixart|shapes|all] [SHAPES_CHECKPOINT]
#   pixart: pixart-sigma-256, 4 blocks, dit-stats, seed 0: hadanorm W4A4 / W4A8 x minmax, gptq x rank 0, 16, 32;
#           none / quarot / sdcb W4A4 minmax x rank 0, 32
#   shapes: the trained shapes DiT (benchmarks/trained_dit), on its own inputs: hadanorm W4A4 / W4A8 x minmax, gptq
#           x rank 0, 16, 32
#   -> benchmarks/low-rank/<model>[-<part>]/ (table.md, results.json, sqnr.png of compare; time-compare.txt)
set -euo pipefail
part=${1:-all}
checkpoint=${2:-/work/scratch/shapes-dit}
if [ -n "${WORK:-}" ]; then work=$WORK; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
root=benchmarks/low-rank
common=(--formats fused --steps 20 --seed 0 --no-progress)

if [ "$part" = pixart ] || [ "$part" = all ]; then
  out=$root/pixart-sigma-256-4blocks
  mkdir -p "$out" "$out-methods" "$work/px"
  hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats -o "$work/px/fp32.onnx"
  /usr/bin/time -v hn-export compare "$work/px/fp32.onnx" --methods hadanorm --bits w4a4,w4a8 \
    --weight-ranges minmax,gptq --low-ranks 0,16,32 --samples 2 --calib-samples 2 --calib-steps 20 "${common[@]}" \
    --out "$out" 2> "$work/time.txt"
  grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time-compare.txt"
  hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb --bits w4a4 --low-ranks 0,32 --samples 2 \
    --calib-samples 2 --calib-steps 20 "${common[@]}" --out "$out-methods"
fi

if [ "$part" = shapes ] || [ "$part" = all ]; then
  out=$root/shapes-dit
  mkdir -p "$out" "$work/shapes"
  hn-export export --checkpoint "$checkpoint" --with-mask -o "$work/shapes/model.onnx"
  (cd benchmarks/trained_dit && python make_inputs.py --out "$work/shapes")
  /usr/bin/time -v hn-export compare "$work/shapes/model.onnx" --methods hadanorm --bits w4a4,w4a8 \
    --weight-ranges minmax,gptq --low-ranks 0,16,32 --calib "$work/shapes/calib.npz" \
    --inputs "$work/shapes/eval.npz" "${common[@]}" --out "$out" 2> "$work/time.txt"
  grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time-compare.txt"
fi
