#!/usr/bin/env bash
# Cross-build check of the hadanorm kernel library for aarch64 (Linux), run under qemu.
#
#   bash benchmarks/check_aarch64_build.sh
#
# Needs g++-aarch64-linux-gnu and qemu-user (Debian: apt-get install g++-aarch64-linux-gnu qemu-user) and the
# onnxruntime headers (fetched by runtime.kernels.build on first use). It
#  1. cross-compiles every source of the library (runtime/kernels/*.cc, the build flags of runtime/kernels/build.py)
#     into an aarch64 libhadanorm_kernels.so (not loaded: that would need an aarch64 onnxruntime);
#  2. builds a static test binary from the onnxruntime-free maths sources and a small main (below): on random
#     shapes, the neondot path (sdot) of IntMatMul4 / IntMatMul8 must equal the scalar reference bit for bit;
#  3. runs it under qemu-aarch64 with -cpu max (dotprod: the neondot path) and -cpu cortex-a53 (no dotprod: the
#     run-time check must pick scalar), and prints the results.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CXX="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
for tool in "$CXX" "$QEMU"; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install g++-aarch64-linux-gnu qemu-user"; exit 2; }
done
cd "$ROOT"
INCLUDE="$(python -c 'from runtime.kernels.build import ensure_headers; print(ensure_headers(log=lambda m: None))')"
FLAGS="$(python -c 'from runtime.kernels.build import CXX_FLAGS; print(" ".join(CXX_FLAGS))')"
OUT="$(mktemp -d /tmp/hn-aarch64.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
K=runtime/kernels

echo "== 1. library: $CXX $FLAGS"
# shellcheck disable=SC2086
"$CXX" $FLAGS -I"$INCLUDE" -I"$K" $K/*.cc -o "$OUT/libhadanorm_kernels.so"
file "$OUT/libhadanorm_kernels.so" | sed "s|$OUT/||"

echo "== 2. test binary (onnxruntime-free sources + main)"
cat > "$OUT/check.cc" <<'EOF'
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <cstring>
#include <random>
#include <vector>

#include "int_kernels.h"

using namespace hadanorm;

// IntMatMul of random codes / packed weights / scales on one path; returns y (float).
static std::vector<float> run(const IsaKernels& ks, int bits, int64_t m, int64_t k, int64_t n, int64_t block,
                              unsigned seed) {
  std::mt19937 rng(seed);
  const int64_t kb = (k + block - 1) / block;
  WeightInfo w = weight_geometry(bits, n, kb, block);
  std::vector<uint8_t> b(static_cast<size_t>(w.tiles * w.tile_stride));
  for (auto& v : b) v = static_cast<uint8_t>(rng());
  std::vector<float> scales(static_cast<size_t>(kb * n));
  for (auto& s : scales) s = 0.001f * static_cast<float>(rng() % 1000 + 1);
  std::vector<uint8_t> zp(static_cast<size_t>(kb * n));
  for (auto& z : zp) z = static_cast<uint8_t>(bits == 4 ? rng() % 16 : rng());
  fill_weight_info(w, b.data(), scales.data(), zp.data());
  std::vector<uint8_t> codes(static_cast<size_t>(m * k)), az(static_cast<size_t>(m));
  for (auto& c : codes) c = static_cast<uint8_t>(rng());
  for (auto& z : az) z = static_cast<uint8_t>(rng());
  std::vector<float> as(static_cast<size_t>(m), 0.01f), bias(static_cast<size_t>(n), 0.5f), y(static_cast<size_t>(m * n));
  ActInfo act;
  act_init(act, codes.data(), m, k, w);
  act_prepare_rows(act, codes.data(), az.data(), as.data(), k, w, 0, m);
  GemmArgs g;
  g.act = &act;
  g.b = b.data();
  g.w = &w;
  g.bias = bias.data();
  g.y = y.data();
  g.n = n;
  (bits == 4 ? ks.int_gemm4 : ks.int_gemm8)(g, 0, m, 0, w.tiles);
  return y;
}

int main() {
  Isa isa;
  try {
    isa = select_isa();
  } catch (const std::exception& e) {
    std::printf("refused: %s\n", e.what());
    return 3;
  }
  std::printf("path picked on this CPU: %s\n", isa_name(isa));
  const IsaKernels& path = isa_kernels(isa);
  const IsaKernels& scalar = *scalar_kernels();
  struct Case { int bits; int64_t m, k, n, block; } cases[] = {
      {4, 37, 1152, 100, 128}, {4, 9, 200, 48, 128}, {4, 5, 512, 32, 256}, {8, 37, 1152, 100, 128},
      {8, 6, 304, 40, 304}, {8, 13, 4608, 72, 128}};
  int failures = 0;
  for (const Case& c : cases) {
    const std::vector<float> a = run(scalar, c.bits, c.m, c.k, c.n, c.block, 7);
    const std::vector<float> b = run(path, c.bits, c.m, c.k, c.n, c.block, 7);
    const bool same = std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    failures += !same;
    std::printf("IntMatMul%d M=%ld K=%ld N=%ld block=%ld: %s vs scalar %s\n", c.bits, static_cast<long>(c.m),
                static_cast<long>(c.k), static_cast<long>(c.n), static_cast<long>(c.block), isa_name(isa),
                same ? "bit-identical" : "DIFFERENT");
  }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
EOF
"$CXX" -O2 -std=c++17 -static -I"$K" "$OUT/check.cc" $K/half.cc $K/isa.cc $K/int_common.cc $K/int_scalar.cc \
  $K/int_neon.cc $K/int_two_level.cc -o "$OUT/check"
file "$OUT/check" | sed "s|$OUT/||"

echo "== 3a. qemu-aarch64 -cpu max (has dotprod)"
"$QEMU" -cpu max "$OUT/check"
echo "== 3b. qemu-aarch64 -cpu cortex-a53 (no dotprod)"
"$QEMU" -cpu cortex-a53 "$OUT/check"
echo "== 3c. HADANORM_KERNELS_ISA=neondot on cortex-a53 (must be refused)"
HADANORM_KERNELS_ISA=neondot "$QEMU" -cpu cortex-a53 "$OUT/check" || echo "(exit $?)"
