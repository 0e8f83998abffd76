// AMX path of IntMatMul4 / IntMatMul8 (int_kernels.h): Intel AMX int8 tiles (tdpbusd) for the integer block sums,
// AVX-512 for everything around them. Everything else is the avx512vnni path's.
//
// Tiles (palette 1): tmm0..3 the int32 sums C [16 rows x 16 columns] of row tile r and column tile i (tmm 2r + i),
// tmm4 / tmm5 the activation codes A [16 rows x kstep bytes] of row tiles 0 / 1, tmm6 / tmm7 the weights B [kstep/4
// rows x 64 bytes] of column tiles 0 / 1 in the VNNI layout (byte 4c + j of row g = w[4g + j, c]): the 2 x 2 blocking
// that loads each A and B tile once for two tdpbusd. The packed 8-bit layout (int_packing.py) is already that layout
// (a 64-byte row = 16 columns x 4 consecutive k); the 4-bit one holds k = 8g..8g+3 in the low nibbles and 8g+4..8g+7
// in the high nibbles of row g, so a column tile's codes are unpacked once per task into rows 2g (low) and 2g + 1
// (high) of a per-thread buffer, in the order the micro-tiles read them (WeightStream).
//
// Per task (rows m0..m1, column tiles t0..t1), per 32 (or 16) rows, block by block, per pair of column tiles: the C
// tiles start at zero, run the block's k in steps of kstep = gcd(block, 64) (tdpbusd adds exactly in int32: no
// saturation), are stored, and the AVX-512 epilogue adds the corrections -(zw * sum c + z * sum (u - zw)) and folds the
// block into F = fmadd(scales, float(I), F) in L1; after the last block y = fmadd(a_scale, F, bias). The integers and
// the float operations and their order are the avx512vnni path's, so the output is bit-identical to the scalar path.
// Rows that do not fill a 16-row tile (at most 15 per task) and blocks whose kstep would be under 16 run on the
// avx512vnni path.
//
// The tile configuration is loaded at the start of every task and released at its end: onnxruntime's own AMX kernels
// (MLAS) run on the same pool threads with their own configurations.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "amx_tile_config.h"
#include "int_avx512_store.h"
#include "util.h"

namespace hadanorm {

namespace {

constexpr int64_t kRowTile = 16;         // rows of an A / C tile
constexpr int64_t kMaxKStep = 64;        // bytes of an A tile row
constexpr int64_t kMinKStep = 16;        // smaller steps run on avx512vnni

void load_tile_config(int64_t kstep) {
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) cfg.set(i, kRowTile, 64);                               // C
  for (int i = 4; i < 6; ++i) cfg.set(i, kRowTile, static_cast<int>(kstep));          // A
  for (int i = 6; i < 8; ++i) cfg.set(i, static_cast<int>(kstep / 4), 64);            // B
  _tile_loadconfig(&cfg);
}

// A per-thread buffer of `bytes` bytes, 64-byte aligned (the weight stream of the task).
uint8_t* unpack_buffer(int64_t bytes) {
  thread_local std::vector<uint8_t> storage;
  if (static_cast<int64_t>(storage.size()) < bytes + 64) storage.resize(static_cast<size_t>(bytes + 64));
  const uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// The block sums of one micro-tile (RA x 16 rows x tb column tiles), stored from the C tiles, with the corrections
// -(zw * sum c + z * sum (u - zw)) added and folded into F = fmadd(scales, float(I), F), as in int_avx512.cc. First:
// the first block, F = fmadd(scales, float(I), 0) without reading F (no zero fill of F per panel: the same bits). Last:
// the last block, whose F goes straight to y = fmadd(a_scale, F, bias) (the same operations as storing F and a pass
// over it after the panel, so the same bits): the y stores of a micro-tile drain while the tiles compute the next one
// instead of all at the end of the panel. One thread, [512, 1152] x [1152, 4608], one block (two-level,
// benchmarks/int_gemm_harness.cc): 3.7 -> 3.6 ms. The stores of its 9.4 MB of y stay the largest cost after the
// tiles (about a third of the kernel with them compiled out in a local build; streaming stores: no better).
template <bool First>
HN_INLINE __m512 previous(const float* f) {
  return First ? _mm512_setzero_ps() : _mm512_load_ps(f);
}

// Where the F of row r, column tile i of a micro-tile goes: to F, or (Last) as y = fmadd(a_scale, F, bias) to y.
template <bool Last>
struct FoldOut {
  const GemmArgs& g;
  int64_t m0, n0;  // first row and column of the micro-tile
  HN_INLINE void put(float* fr, int64_t r, int i, __m512 fv) const {
    if constexpr (Last) {
      const int64_t m = m0 + r, n = n0 + i * kTile;
      const __mmask16 mask = column_mask(n, g.n);
      const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
      const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(g.act->scale[m]), fv, _mm512_maskz_loadu_ps(mask, bias + n));
      store16(g.y, g.y_half, m * g.n + n, v, mask);
    } else {
      _mm512_store_ps(fr, fv);
    }
  }
};

template <int RA, bool First, bool Last>
HN_INLINE void fold_block(const GemmArgs& g, const int32_t* c, float* f, int64_t m0, int64_t t, int tb, int64_t blk) {
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  constexpr int64_t kRows = RA * kRowTile, kCols = 32;
  const int64_t col = blk * w.n_pad + t * kTile;
  const FoldOut<Last> out{g, m0, t * kTile};
  if (w.small_block) {  // one vpmaddwd of int16 pairs; the two-tile case written out (a loop over tb: 2-3% slower)
    const int32_t* ap = act.pair.data() + m0 * w.k_blocks + blk;
    const __m512i wp0 = int16_pairs(w.zw.data() + col, w.sv.data() + col);
    const __m512 s0 = _mm512_loadu_ps(w.scales.data() + col);
    if (tb == 2) {
      const __m512i wp1 = int16_pairs(w.zw.data() + col + kTile, w.sv.data() + col + kTile);
      const __m512 s1 = _mm512_loadu_ps(w.scales.data() + col + kTile);
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512i pr = _mm512_set1_epi32(ap[r * w.k_blocks]);
        const __m512i i0 = _mm512_add_epi32(_mm512_madd_epi16(wp0, pr), _mm512_load_si512(c + r * kCols));
        const __m512i i1 = _mm512_add_epi32(_mm512_madd_epi16(wp1, pr), _mm512_load_si512(c + r * kCols + 16));
        float* fr = f + r * kCols;
        out.put(fr, r, 0, _mm512_fmadd_ps(s0, _mm512_cvtepi32_ps(i0), previous<First>(fr)));
        out.put(fr + 16, r, 1, _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(i1), previous<First>(fr + 16)));
      }
    } else {
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512i pr = _mm512_set1_epi32(ap[r * w.k_blocks]);
        const __m512i i0 = _mm512_add_epi32(_mm512_madd_epi16(wp0, pr), _mm512_load_si512(c + r * kCols));
        float* fr = f + r * kCols;
        out.put(fr, r, 0, _mm512_fmadd_ps(s0, _mm512_cvtepi32_ps(i0), previous<First>(fr)));
      }
    }
    return;
  }
  for (int i = 0; i < tb; ++i) {  // int32 corrections (blocks over 128)
    const __m512i zw = _mm512_loadu_si512(w.zw.data() + col + i * kTile);
    const __m512i sv = _mm512_loadu_si512(w.sv.data() + col + i * kTile);
    const __m512 sc = _mm512_loadu_ps(w.scales.data() + col + i * kTile);
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t m = m0 + r;
      const __m512i corr = _mm512_add_epi32(_mm512_mullo_epi32(zw, _mm512_set1_epi32(act.sc[m * w.k_blocks + blk])),
                                            _mm512_mullo_epi32(sv, _mm512_set1_epi32(act.z[m])));
      const __m512i sum = _mm512_sub_epi32(_mm512_load_si512(c + r * kCols + i * 16), corr);
      float* fr = f + r * kCols + i * 16;
      out.put(fr, r, i, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(sum), previous<First>(fr)));
    }
  }
}

template <int RA>
HN_INLINE void fold(const GemmArgs& g, const int32_t* c, float* f, int64_t m0, int64_t t, int tb, int64_t blk) {
  const bool last = blk + 1 == g.w->k_blocks;
  if (blk == 0)
    last ? fold_block<RA, true, true>(g, c, f, m0, t, tb, blk) : fold_block<RA, true, false>(g, c, f, m0, t, tb, blk);
  else
    last ? fold_block<RA, false, true>(g, c, f, m0, t, tb, blk) : fold_block<RA, false, false>(g, c, f, m0, t, tb, blk);
}

constexpr int64_t kMaxPairs = 8;  // column tile pairs per task (tiles_per_task <= 16)

// The task's weights in the order the micro-tiles read them: block by block, pair by pair, the pair's two column tiles
// of block/4 VNNI rows x 64 bytes each (2 KiB each for blocks of 128): one sequential stream the prefetchers follow.
struct WeightStream {
  const uint8_t* data;
  int64_t pairs, tile_bytes;  // tile_bytes = block / 4 * 64
  const uint8_t* at(int64_t blk, int64_t pair, int i) const {
    return data + ((blk * pairs + pair) * 2 + i) * tile_bytes;
  }
};

// Writes column tiles t0..t1 of the packed weight into the stream layout (4-bit: nibbles unpacked to bytes).
template <int Bits>
WeightStream stream_weights(const GemmArgs& g, int64_t t0, int64_t t1) {
  const WeightInfo& w = *g.w;
  WeightStream ws;
  ws.pairs = (t1 - t0 + 1) / 2;
  ws.tile_bytes = w.block / 4 * 64;
  if (Bits == 8 && w.k_blocks == 1) {  // one block: the packed tiles t0..t1 are the stream already (no copy)
    ws.data = g.b + t0 * w.tile_stride;
    return ws;
  }
  uint8_t* out = unpack_buffer(w.k_blocks * ws.pairs * 2 * ws.tile_bytes);
  ws.data = out;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pair = (t - t0) / 2;
    const int i = static_cast<int>((t - t0) % 2);
    const uint8_t* packed = g.b + t * w.tile_stride;
    for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
      uint8_t* dst = out + ((blk * ws.pairs + pair) * 2 + i) * ws.tile_bytes;
      if constexpr (Bits == 4) {  // packed row g: VNNI rows 2g (low nibbles) and 2g + 1 (high nibbles)
        const uint8_t* src = packed + blk * (w.block / 8) * 64;
        for (int64_t gi = 0; gi < w.block / 8; ++gi) {
          const __m512i v = _mm512_loadu_si512(src + gi * 64);
          _mm512_store_si512(dst + 2 * gi * 64, _mm512_and_si512(v, nibble));
          _mm512_store_si512(dst + (2 * gi + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
      } else {  // already VNNI rows
        std::memcpy(dst, packed + blk * (w.block / 4) * 64, static_cast<size_t>(ws.tile_bytes));
      }
    }
  }
  return ws;
}

// RA x 16 rows from row m0 x the task's column tiles t0..t1 (weights in `ws`), whole K. Block by block, pair by pair:
// the A tiles of the block stay in L1 for every pair, the weights stream in read order (software prefetches of that
// stream measured slower; the next block's activation rows are prefetched). The fold
// of the previous micro-tile runs on the AVX-512 ports while the tiles compute the current one (two C buffers).
template <int RA>
void amx_panel(const GemmArgs& g, int64_t m0, int64_t t0, int64_t t1, const WeightStream& ws, int64_t kstep) {
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  constexpr int64_t kRows = RA * kRowTile, kCols = 32, kMicro = kRows * kCols;
  const int64_t pairs = ws.pairs;
  alignas(64) int32_t c[2][kMicro];
  alignas(64) float f[kMaxPairs * kMicro];
  const uint8_t* a = act.a + m0 * act.lda;
  const int64_t lda = act.lda, steps = w.block / kstep;
  constexpr int64_t stride = kCols * 4;  // bytes per row of a C buffer
  int parity = 0;
  int64_t pending_pair = -1, pending_blk = 0;
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t t = t0 + 2 * pair;
      const bool two = t + 1 < t1;
      const uint8_t* b0 = ws.at(blk, pair, 0);
      const uint8_t* b1 = ws.at(blk, pair, 1);
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (RA > 1) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t k0 = blk * w.block + s * kstep;
        const int64_t off = s * kstep * 16;  // VNNI row s * kstep / 4, 64 bytes a row
        _tile_loadd(4, a + k0, lda);
        _tile_loadd(6, b0 + off, 64);
        _tile_dpbusd(0, 4, 6);
        if (two) {
          _tile_loadd(7, b1 + off, 64);
          _tile_dpbusd(1, 4, 7);
        }
        if constexpr (RA > 1) {
          _tile_loadd(5, a + kRowTile * lda + k0, lda);
          _tile_dpbusd(2, 5, 6);
          if (two) _tile_dpbusd(3, 5, 7);
        }
      }
      // the next block's activation rows (read by the first pair of the next block; the others find them in L1)
      if (pair == 0 && blk + 1 < w.k_blocks) {
        const uint8_t* next = a + (blk + 1) * w.block;
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t l = 0; l < w.block; l += 64) _mm_prefetch(reinterpret_cast<const char*>(next + r * lda + l), _MM_HINT_T0);
      }
      if (pending_pair >= 0)
        fold<RA>(g, c[parity ^ 1], f + pending_pair * kMicro, m0, t0 + 2 * pending_pair,
                 t0 + 2 * pending_pair + 1 < t1 ? 2 : 1, pending_blk);
      int32_t* cp = c[parity];
      _tile_stored(0, cp, stride);
      if (two) _tile_stored(1, cp + 16, stride);
      if constexpr (RA > 1) {
        _tile_stored(2, cp + kRowTile * kCols, stride);
        if (two) _tile_stored(3, cp + kRowTile * kCols + 16, stride);
      }
      pending_pair = pair;
      pending_blk = blk;
      parity ^= 1;
    }
  }
  fold<RA>(g, c[parity ^ 1], f + pending_pair * kMicro, m0, t0 + 2 * pending_pair,
           t0 + 2 * pending_pair + 1 < t1 ? 2 : 1, pending_blk);
}

// The k step of the tiles for this block size (a divisor of the block, <= 64 bytes), or 0 when too small to pay.
int64_t kstep_for(int64_t block) {
  const int64_t step = std::gcd(block, kMaxKStep);
  return step >= kMinKStep ? step : 0;
}

template <int Bits>
void int_gemm_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const IsaKernels& fallback = *avx512vnni_kernels();
  const IntGemmFn rest = Bits == 4 ? fallback.int_gemm4 : fallback.int_gemm8;
  const WeightInfo& w = *g.w;
  const int64_t kstep = kstep_for(w.block);
  const int64_t tiled = (m1 - m0) / kRowTile * kRowTile;  // rows the tiles take
  if (kstep == 0 || tiled == 0) {
    rest(g, m0, m1, t0, t1);
    return;
  }
  load_tile_config(kstep);
  for (int64_t tt = t0; tt < t1; tt += 2 * kMaxPairs) {
    const int64_t tt1 = std::min(t1, tt + 2 * kMaxPairs);
    const WeightStream ws = stream_weights<Bits>(g, tt, tt1);
    int64_t m = m0;
    for (; m + 2 * kRowTile <= m0 + tiled; m += 2 * kRowTile) amx_panel<2>(g, m, tt, tt1, ws, kstep);
    if (m + kRowTile <= m0 + tiled) amx_panel<1>(g, m, tt, tt1, ws, kstep);
  }
  _tile_release();
  if (m0 + tiled < m1) rest(g, m0 + tiled, m1, t0, t1);
}

// rows x column tiles per matmul task: 12 tiles (6 pairs a panel) divide the 72 and 288 tiles of 1152 and 4608 columns
// evenly and reuse each A panel for more columns than 8 did: 2 threads, [512, 1152] x [1152, 1152] two-level
// (benchmarks/int_gemm_harness.cc `NTH=2 TL=1 ./harness 512 1152 1152 4 amx 256 12` against `... 256 8`, 6
// interleaved pairs on a busy host): 0.40-0.48 against 0.44-0.57 ms, faster in every pair; K 4608 and N 4608 level
constexpr int64_t kTaskRows = 256, kTaskTiles = 12;

}  // namespace

const IsaKernels* amx_kernels() {
  static const IsaKernels kernels = inherit({.isa = Isa::kAmx,
                                             .int_gemm4 = int_gemm_amx<4>,
                                             .int_gemm8 = int_gemm_amx<8>,
                                             .rows_per_task = kTaskRows,
                                             .tiles_per_task = kTaskTiles,
                                             .row_task_unit = 2 * kRowTile},
                                            *avx512vnni_kernels());
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
