#!/usr/bin/env bash
# Issue 21 item 4: methods none / quarot / sdcb / hadanorm x weight range minmax / mse / gptq x low rank 0 / 16 / 32
# at W4A4 and W4A8, one-call and end-of-denoising SQNR vs FP32, with onnxruntime's MatMulNBitsQuantizer (RTN, GPTQ
# mode, block 128) and quantize_dynamic W8A8 on the same graph and the same evaluation as reference rows. Runs the
# cells benchmarks/low-rank/ left open, with its evaluation settings (--formats fused --steps 20 --seed 0; PixArt 2
# samples, calibration 2 x 20 steps; the shapes DiT on its own calib.npz / eval.npz); the table of old and new runs:
# python benchmarks/weight-grid/make_table.py -> benchmarks/weight-grid/README.md.
# Usage: bash benchmarks/run_weight_grid.sh [shapes|pixart|shapes16|pixart-r16|pixart-gptq|pixart-gptq-r16|all] [SHAPES_CHECKPOINT]
#   shapes: the trained shapes DiT (benchmarks/trained_dit), the full grid in one compare run (72 points), and
#           bench_ort_weight_only.py --rows ort-rtn,ort-gptq,ort-w8a8
#   pixart: pixart-sigma-256, 4 blocks, dit-stats, seed 0: none / quarot / sdcb / hadanorm x mse x rank 0, 32 x W4A4,
#           W4A8 (16 points); none / quarot / sdcb x minmax x rank 0, 32 x W4A8 (6 points); bench_ort_weight_only.py
#           --rows ort-rtn,ort-w8a8 (its GPTQ mode row: benchmarks/weight-range-gptq/pixart-sigma-256-4blocks/ort.json,
#           the same graph and evaluation)
#   shapes16: the shapes DiT's noise check: hadanorm x w4a4,w4a8 x minmax,mse,gptq x 0,16,32 and onnxruntime W8A8
#           evaluated on 16 caption pairs (make_inputs.py --eval-pairs 16: the same calib.npz, the 4 pairs of
#           eval.npz and 12 more) instead of 4
#   pixart-r16: none / quarot / sdcb / hadanorm x minmax, mse x rank 16 x W4A4, W4A8 (16 points; hadanorm minmax
#           r16 repeats a cell of benchmarks/low-rank/, a check)
#   pixart-gptq: none / quarot / sdcb x gptq x rank 0, 32 x W4A4, W4A8 (12 points, each calibrating again)
#   pixart-gptq-r16: none / quarot / sdcb x gptq x rank 16 x W4A4, W4A8 (6 points: the grid's last PixArt rows)
#   -> benchmarks/weight-grid/<model>[-<part>]/ (table.md, results.json, sqnr.png of compare; ort.json; time*.txt)
set -euo pipefail
part=${1:-all}
checkpoint=${2:-/work/scratch/shapes-dit}
if [ -n "${WORK:-}" ]; then work=$WORK; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi  # WORK: keep the graphs
root=benchmarks/weight-grid
common=(--formats fused --steps 20 --seed 0 --no-progress)
timed() {  # timed OUT_FILE COMMAND...: the wall time and peak RSS of COMMAND into OUT_FILE
  local out=$1; shift
  /usr/bin/time -v "$@" 2> "$work/time.txt"
  grep -E "Elapsed|Maximum resident" "$work/time.txt" > "$out"
}

if [ "$part" = shapes ] || [ "$part" = all ]; then
  out=$root/shapes-dit
  mkdir -p "$out" "$work/shapes"
  hn-export export --checkpoint "$checkpoint" --with-mask -o "$work/shapes/model.onnx"
  (cd benchmarks/trained_dit && python make_inputs.py --out "$work/shapes")
  timed "$out/time-compare.txt" hn-export compare "$work/shapes/model.onnx" --methods none,quarot,sdcb,hadanorm \
    --bits w4a4,w4a8 --weight-ranges minmax,mse,gptq --low-ranks 0,16,32 --calib "$work/shapes/calib.npz" \
    --inputs "$work/shapes/eval.npz" "${common[@]}" --out "$out"
  timed "$out/time-ort.txt" python benchmarks/bench_ort_weight_only.py "$work/shapes/model.onnx" "$work/shapes/ort" \
    --calib "$work/shapes/calib.npz" --inputs "$work/shapes/eval.npz" --steps 20 --seed 0 \
    --rows ort-rtn,ort-gptq,ort-w8a8
  cp "$work/shapes/ort/ort.json" "$out/ort.json"
fi

if [ "$part" = pixart ] || [ "$part" = all ]; then
  out=$root/pixart-sigma-256-4blocks
  mkdir -p "$out-mse" "$out-w4a8" "$out" "$work/px"
  hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats -o "$work/px/fp32.onnx"
  px=(--samples 2 --calib-samples 2 --calib-steps 20 "${common[@]}")
  timed "$out-mse/time-compare.txt" hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb,hadanorm \
    --bits w4a4,w4a8 --weight-ranges mse --low-ranks 0,32 "${px[@]}" --out "$out-mse"
  timed "$out-w4a8/time-compare.txt" hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb \
    --bits w4a8 --weight-ranges minmax --low-ranks 0,32 "${px[@]}" --out "$out-w4a8"
  timed "$out/time-ort.txt" python benchmarks/bench_ort_weight_only.py "$work/px/fp32.onnx" "$work/px/ort" \
    --steps 20 --samples 2 --calib-samples 2 --calib-steps 20 --seed 0 --rows ort-rtn,ort-w8a8
  cp "$work/px/ort/ort.json" "$out/ort.json"
fi

if [ "$part" = shapes16 ] || [ "$part" = all ]; then
  out=$root/shapes-dit-16samples
  mkdir -p "$out" "$work/shapes" "$work/shapes16"
  [ -f "$work/shapes/model.onnx" ] || hn-export export --checkpoint "$checkpoint" --with-mask -o "$work/shapes/model.onnx"
  (cd benchmarks/trained_dit && python make_inputs.py --out "$work/shapes16" --eval-pairs 16)
  [ -f "$work/shapes/calib.npz" ] || (cd benchmarks/trained_dit && python make_inputs.py --out "$work/shapes")
  cmp "$work/shapes/calib.npz" "$work/shapes16/calib.npz"  # the same calibration as the 4-pair runs
  timed "$out/time-compare.txt" hn-export compare "$work/shapes/model.onnx" --methods hadanorm --bits w4a4,w4a8 \
    --weight-ranges minmax,mse,gptq --low-ranks 0,16,32 --calib "$work/shapes16/calib.npz" \
    --inputs "$work/shapes16/eval.npz" "${common[@]}" --out "$out"
  python benchmarks/bench_ort_weight_only.py "$work/shapes/model.onnx" "$work/shapes16/ort" \
    --calib "$work/shapes16/calib.npz" --inputs "$work/shapes16/eval.npz" --steps 20 --seed 0 --rows ort-w8a8
  cp "$work/shapes16/ort/ort.json" "$out/ort.json"
fi

if [ "$part" = pixart-r16 ] || [ "$part" = all ]; then  # rank 16 at min/max and mse for every method
  out=$root/pixart-sigma-256-4blocks-r16
  mkdir -p "$out" "$work/px"
  [ -f "$work/px/fp32.onnx" ] || hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats \
    -o "$work/px/fp32.onnx"
  timed "$out/time-compare.txt" hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb,hadanorm \
    --bits w4a4,w4a8 --weight-ranges minmax,mse --low-ranks 16 --samples 2 --calib-samples 2 --calib-steps 20 \
    "${common[@]}" --out "$out"
fi

if [ "$part" = pixart-gptq ] || [ "$part" = all ]; then
  out=$root/pixart-sigma-256-4blocks-gptq
  mkdir -p "$out" "$work/px"
  [ -f "$work/px/fp32.onnx" ] || hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats \
    -o "$work/px/fp32.onnx"
  timed "$out/time-compare.txt" hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb \
    --bits w4a4,w4a8 --weight-ranges gptq --low-ranks 0,32 --samples 2 --calib-samples 2 --calib-steps 20 \
    "${common[@]}" --out "$out"
fi

if [ "$part" = pixart-gptq-r16 ] || [ "$part" = all ]; then
  out=$root/pixart-sigma-256-4blocks-gptq-r16
  mkdir -p "$out" "$work/px"
  [ -f "$work/px/fp32.onnx" ] || hn-export export --preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats \
    -o "$work/px/fp32.onnx"
  timed "$out/time-compare.txt" hn-export compare "$work/px/fp32.onnx" --methods none,quarot,sdcb \
    --bits w4a4,w4a8 --weight-ranges gptq --low-ranks 16 --samples 2 --calib-samples 2 --calib-steps 20 \
    "${common[@]}" --out "$out"
fi
