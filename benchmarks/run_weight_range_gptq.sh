#!/usr/bin/env bash
# Issue 21 items 1 and 4 (the GPTQ rows): hn-export's weight ranges minmax / mse / gptq against onnxruntime's own
# 4-bit weight-only quantizers (MatMulNBitsQuantizer RTN and GPTQ), one-call and end-of-denoising SQNR vs FP32.
# Usage: bash benchmarks/run_weight_range_gptq.sh [pixart|shapes|all] [SHAPES_CHECKPOINT]
#   pixart: pixart-sigma-256, 4 blocks, dit-stats, seed 0; hadanorm W4A4 / W4A8 x minmax, mse, gptq
#   shapes: the trained shapes DiT (benchmarks/trained_dit/train_shapes.py; default /work/scratch/shapes-dit),
#           exported with its mask; none / quarot / sdcb / hadanorm W4A4 x minmax, gptq, on its own inputs
#           (benchmarks/trained_dit/make_inputs.py, as benchmarks/trained_dit/README.md)
#   -> benchmarks/weight-range-gptq/<model>/ (table.md, results.json, sqnr.png of compare; ort.json; time*.txt)
set -euo pipefail
part=${1:-all}
checkpoint=${2:-/work/scratch/shapes-dit}
if [ -n "${WORK:-}" ]; then work=$WORK; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi  # WORK: keep the graphs
root=benchmarks/weight-range-gptq

if [ "$part" = pixart ] || [ "$part" = all ]; then
  out=$root/pixart-sigma-256-4blocks
  mkdir -p "$out" "$work/px"
  hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats -o "$work/px/fp32.onnx"
  /usr/bin/time -v hn-export compare "$work/px/fp32.onnx" --methods hadanorm --bits w4a4,w4a8 \
    --weight-ranges minmax,mse,gptq --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 \
    --out "$out" --no-progress 2> "$work/time.txt"
  grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time-compare.txt"
  /usr/bin/time -v python benchmarks/bench_ort_weight_only.py "$work/px/fp32.onnx" "$work/px/ort" \
    --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 2> "$work/time-ort.txt"
  cp "$work/px/ort/ort.json" "$out/ort.json"
  grep -E "Elapsed|Maximum resident" "$work/time-ort.txt" > "$out/time-ort.txt"
fi

if [ "$part" = shapes ] || [ "$part" = all ]; then
  out=$root/shapes-dit
  mkdir -p "$out" "$work/shapes"
  hn-export export --checkpoint "$checkpoint" --with-mask -o "$work/shapes/model.onnx"
  (cd benchmarks/trained_dit && python make_inputs.py --out "$work/shapes")  # its captions, calib.npz / eval.npz
  /usr/bin/time -v hn-export compare "$work/shapes/model.onnx" --methods none,quarot,sdcb,hadanorm --bits w4a4 \
    --weight-ranges minmax,gptq --calib "$work/shapes/calib.npz" --inputs "$work/shapes/eval.npz" --steps 20 \
    --seed 0 --out "$out" --no-progress 2> "$work/time.txt"
  grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out/time-compare.txt"
  hn-export compare "$work/shapes/model.onnx" --methods none,hadanorm --bits w4a8 --weight-ranges minmax,gptq \
    --calib "$work/shapes/calib.npz" --inputs "$work/shapes/eval.npz" --steps 20 --seed 0 --out "$out-w4a8" --no-progress
  python benchmarks/bench_ort_weight_only.py "$work/shapes/model.onnx" "$work/shapes/ort" \
    --calib "$work/shapes/calib.npz" --inputs "$work/shapes/eval.npz" --steps 20 --seed 0
  cp "$work/shapes/ort/ort.json" "$out/ort.json"
fi
