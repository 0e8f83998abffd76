// The panel driver of the IntMatMul paths avx2, avxvnni (int_avx2_micro.h), avx512vnni (int_avx512.cc) and neondot
// (int_neon.cc): one template over the path's micro-kernel, included after the path's `#pragma GCC target` (each
// source instantiates it for its own instruction set; everything here has internal linkage).
//
// Per task (rows m0..m1 x column tiles t0..t1) in chunks of up to kMaxTaskRows rows, per panel (the rows x T =
// Micro::kTiles column tiles; fewer for the last tiles), block by block:
//  - the block's weights of the T tiles are prepared once (Micro::weights: 4-bit nibbles unpacked to bytes) and shared
//    by every micro-kernel of the panel;
//  - every micro-kernel of R = Micro::kRows rows (fewer for the last rows) runs the block with its int32 sums in
//    registers, starting from the block's corrections -(zw * sum c + z * sum (u - zw)) or adding them at the end, and
//    folds them into F = fmadd(scales, float(I), F), F [rows][T][16] in L1;
//  - after the last block, y = fmadd(a_scale, F, bias) (Micro::store_tile).
// Blocks over kSubK k run in steps of <= kSubK k with the int32 sums parked in L1 (`part`) between steps.
//
// A micro-kernel type provides:
//   kRows, kTiles                          rows x column tiles of one micro-kernel call / of one panel
//   template <int Bits> kGranule           the k step granule (a multiple of the layout's k per 64-byte row)
//   template <int Bits, int R, int T> static void step(const PanelStep&, int64_t r0)
//   template <int Bits, int T> static const uint8_t* weights(const uint8_t* b, int64_t tile_stride, int64_t groups,
//                                                            uint8_t* scratch)   the step's weights (see PanelStep::w)
//   static void store_tile(const GemmArgs&, int64_t m, int64_t n0, const float* bias, const float* f)
#pragma once

#include <algorithm>
#include <cstdint>

#include "int_kernels.h"

namespace hadanorm {
namespace {

constexpr int64_t kMaxTaskRows = 96;  // rows of a panel's F and part buffers (larger tasks run in chunks)
constexpr int64_t kSubK = 128;        // k per step: a block, or a part of a block over kSubK

// The k steps of a block: `count` parts of `len` k each (len a multiple of `granule`, <= kSubK when the block allows).
struct BlockSplit {
  int64_t count, len;
};
inline BlockSplit split_block(int64_t block, int64_t granule) {
  int64_t count = (block + kSubK - 1) / kSubK;
  while (block % count || (block / count) % granule) ++count;
  return {count, block / count};
}

// Everything one k step of a panel (rows m0.. x T tiles at t) reads, as plain values: the steps write float / int32
// buffers, and with pointers into GemmArgs the compiler would reload them.
struct PanelStep {
  const uint8_t* a;       // activation codes of row m0 at this step's k0 (rows lda apart)
  int64_t lda;
  const int32_t* a_pair;  // act.pair of row m0, block blk (rows kb apart; small blocks only)
  const int32_t* a_sc;    // act.sc of row m0, block blk (rows kb apart)
  const int32_t* a_z;     // act.z of row m0
  int64_t kb;             // k_blocks
  const int32_t* w_zw;    // w.zw / sv / scales at (blk, tile t); tile i at + i * kTile
  const int32_t* w_sv;
  const float* w_scales;
  const uint8_t* w;       // this step's weights: 4-bit unpacked [groups][2 (low, high nibbles)][T][64]; 8-bit b
  int64_t w_stride;       // 8-bit: bytes between tiles in w
  int64_t groups;         // 64-byte rows of the packed layout in this step
  int64_t len;            // k in this step
  int64_t block;          // w.block
  int64_t ahead;          // offset from a row's codes to the same codes 2 micro-kernels later (prefetched)
  bool small_block;       // corrections as int16 pairs (block <= kSmallBlock)
  bool first, last;       // first / last step of the block
  float* f;               // [rows][T][16] float block sums, row m0 first
  int32_t* part;          // [rows][T][16] int32 partial sums (blocks split in several steps)
};

// The micro-kernel for the last rows - r0 (< R) rows of a panel
template <class Micro, int Bits, int R, int T>
void panel_step_rest(const PanelStep& p, int64_t r0, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R)
      Micro::template step<Bits, R, T>(p, r0);
    else
      panel_step_rest<Micro, Bits, R - 1, T>(p, r0, rows);
  }
}

// Rows m0..m1 (at most kMaxTaskRows) x T tiles at t, over the whole K, block by block.
template <class Micro, int Bits, int T>
void int_panel(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t) {
  constexpr int R = Micro::kRows;
  constexpr int64_t granule = Bits == 4 ? 8 : 4;  // k per 64-byte row of the packed layout
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  const int64_t rows = m1 - m0;
  const BlockSplit split = split_block(w.block, Micro::template kGranule<Bits>);
  alignas(64) float f[kMaxTaskRows * T * 16];
  alignas(64) int32_t part[kMaxTaskRows * T * 16];
  alignas(64) uint8_t scratch[kSubK * 16 * T];  // a step's weights: kSubK k x 16 columns x T tiles, one byte each
  std::fill(f, f + rows * T * 16, 0.0f);
  PanelStep p;
  p.lda = act.lda;
  p.ahead = 2 * R * act.lda;  // past the panel's last rows: prefetches of lines not read (harmless)
  p.a_z = act.z.data() + m0;
  p.kb = w.k_blocks;
  p.w_stride = w.tile_stride;
  p.groups = split.len / granule;
  p.len = split.len;
  p.block = w.block;
  p.small_block = w.small_block;
  p.f = f;
  p.part = part;
  const uint8_t* b = g.b + t * w.tile_stride;
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    const int64_t col = blk * w.n_pad + t * kTile;
    p.a_pair = w.small_block ? act.pair.data() + m0 * w.k_blocks + blk : nullptr;
    p.a_sc = act.sc.data() + m0 * w.k_blocks + blk;
    p.w_zw = w.zw.data() + col;
    p.w_sv = w.sv.data() + col;
    p.w_scales = w.scales.data() + col;
    for (int64_t s = 0; s < split.count; ++s) {
      const int64_t k0 = blk * w.block + s * split.len;
      p.a = act.a + m0 * act.lda + k0;
      p.first = s == 0;
      p.last = s == split.count - 1;
      p.w = Micro::template weights<Bits, T>(b + (k0 / granule) * 64, w.tile_stride, p.groups, scratch);
      int64_t r = 0;
      for (; r + R <= rows; r += R) Micro::template step<Bits, R, T>(p, r);
      panel_step_rest<Micro, Bits, R - 1, T>(p, r, rows - r);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
    for (int i = 0; i < T; ++i) Micro::store_tile(g, m, (t + i) * kTile, bias, f + (r * T + i) * 16);
  }
}

// The panel of the last tiles (< T) of a task
template <class Micro, int Bits, int T>
void int_panel_rest(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t, int64_t tiles) {
  if constexpr (T > 0) {
    if (tiles == T)
      int_panel<Micro, Bits, T>(g, m0, m1, t);
    else
      int_panel_rest<Micro, Bits, T - 1>(g, m0, m1, t, tiles);
  }
}

// IntGemmFn: rows [m0, m1) x tiles [t0, t1) in chunks of kMaxTaskRows rows and panels of Micro::kTiles tiles.
template <class Micro, int Bits>
void panel_int_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  constexpr int T = Micro::kTiles;
  for (int64_t r0 = m0; r0 < m1; r0 += kMaxTaskRows) {
    const int64_t r1 = std::min(m1, r0 + kMaxTaskRows);
    int64_t t = t0;
    for (; t + T <= t1; t += T) int_panel<Micro, Bits, T>(g, r0, r1, t);
    int_panel_rest<Micro, Bits, T - 1>(g, r0, r1, t, t1 - t);
  }
}

}  // namespace
}  // namespace hadanorm
