#!/usr/bin/env bash
# Per-quantizer sensitivity study (A4, none / QuaRot / SDCB / HadaNorm) on the 2-block 256 px model (CPU time),
# the runtime latency benchmark, and the comparison table of the full 28-block 256 px model (W4A4, W6A6; FP16
# reference). dit-stats weights, seed 0.
# Usage: bash benchmarks/run_issue5_benchmarks.sh WORKDIR   (WORKDIR may already hold p256.onnx / p256.fp16.onnx
# of 28 blocks from bench_full_pipeline.py; they are exported when missing)
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work"
hn-export export --preset pixart-sigma-256 --layers 2 -o "$work/p256_2.onnx"
/usr/bin/time -v hn-export sensitivity "$work/p256_2.onnx" --methods none,quarot,sdcb,hadanorm --abits 4 \
  --steps 20 --samples 1 --seed 0 --out benchmarks/sensitivity-256px-2blocks --no-progress 2> "$work/sens_time.txt"
grep -E "Elapsed|Maximum resident" "$work/sens_time.txt" > benchmarks/sensitivity-256px-2blocks/time.txt
python benchmarks/bench_runtime_latency.py --layers 4 --runs 7 --threads 2
[ -f "$work/p256.onnx" ] || hn-export export --preset pixart-sigma-256 -o "$work/p256.onnx"
[ -f "$work/p256.fp16.onnx" ] || hn-export export --preset pixart-sigma-256 --fp16 -o "$work/p256.fp16.onnx"
/usr/bin/time -v hn-export compare "$work/p256.onnx" --reference "$work/p256.fp16.onnx" --methods all \
  --bits w4a4,w6a6 --steps 20 --samples 1 --calib-samples 2 --calib-steps 10 --seed 0 \
  --out benchmarks/compare-256px-28blocks --no-progress 2> "$work/compare_time.txt"
grep -E "Elapsed|Maximum resident" "$work/compare_time.txt" > benchmarks/compare-256px-28blocks/time.txt
