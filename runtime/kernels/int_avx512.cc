// AVX-512 VNNI path of the integer kernels (int_kernels.h). One 64-byte row of the packed layout is one zmm: 16
// columns x 4 consecutive k, the operand of vpdpbusd against 4 activation codes broadcast to every lane.
//
// IntMatMul, per task (up to 96 rows x a few 16-column tiles) and panel (the rows x T = 4 tiles), block by block:
//  - the block's weights of the T tiles are unpacked once (4-bit: nibbles -> bytes 0..15, 8 KiB in L1);
//  - every micro-kernel of R = 6 rows runs the block with 24 int32 accumulators in registers (per group of 8 k:
//    T weight loads, 2 R broadcasts, 2 R T vpdpbusd), starting from the block's corrections
//    -(zw * sum c + z * sum (u - zw)) (one vpmaddwd of int16 pairs for blocks <= 128, vpmulld otherwise), and folds
//    them into F = fmadd(scales, float(I), F), F [rows][T][16] in L1;
//  - after the last block, y = fmadd(a_scale, F, bias), stored as float or half (vcvtps2ph) under a column mask.
// Blocks over 128 k run in steps of <= 128 k with the int32 sums parked in L1 between steps.
// Measured (benchmarks/int_linear.md): 6 x 4 beats 8 x 3, 5 x 4 and 4 x 4 by a few percent or ties; vpdpbusd as
// tied inline assembly, since with the intrinsic GCC 12 copied accumulators through the stack in the inner loop.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "int_avx512_store.h"
#include "util.h"

namespace hadanorm {

namespace {

inline __m512i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc += dot4(a (u8), w (s8)) per int32 lane. Written as inline assembly with acc tied to its register ("+v"):
// with the intrinsic GCC 12 copies accumulators between registers and the stack in the inner loop.
HN_INLINE void dpbusd(__m512i& acc, __m512i a, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
}

// ---------------------------------------------------------------------------------------------------------------
// Quantize one token
// ---------------------------------------------------------------------------------------------------------------

void quantize_row_avx512(const float* y, int64_t d, float qmax, bool half_scale, uint8_t* codes, float* scale_out,
                         uint8_t* zp_out) {
  __m512 hi = _mm512_setzero_ps(), lo = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 v = _mm512_loadu_ps(y + i);
    hi = _mm512_max_ps(v, hi);  // a NaN in y is skipped (max returns the second operand), as in the scalar path
    lo = _mm512_min_ps(v, lo);
  }
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, y + i);  // zeros in the unused lanes: hi >= 0 >= lo anyway
    hi = _mm512_max_ps(v, hi);
    lo = _mm512_min_ps(v, lo);
  }
  const float h = _mm512_reduce_max_ps(hi), l = _mm512_reduce_min_ps(lo);
  float scale = (h - l) / qmax;
  scale = scale > FLT_MIN ? scale : FLT_MIN;
  if (half_scale) scale = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  float zp = __builtin_nearbyintf(-(l / scale));
  zp = zp >= 0.0f ? (zp > qmax ? qmax : zp) : 0.0f;
  const __m512 vscale = _mm512_set1_ps(scale), vzp = _mm512_set1_ps(zp), vmax = _mm512_set1_ps(qmax);
  const __m512 zero = _mm512_setzero_ps();
  auto code16 = [&](__m512 v) {
    v = _mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(v, vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                      vzp);
    v = _mm512_min_ps(_mm512_max_ps(v, zero), vmax);  // NaN -> 0 (max returns the second operand)
    return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
  };
  for (i = 0; i + 16 <= d; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), code16(_mm512_loadu_ps(y + i)));
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1u);
    _mm_mask_storeu_epi8(codes + i, m, code16(_mm512_maskz_loadu_ps(m, y + i)));
  }
  *scale_out = scale;
  *zp_out = static_cast<uint8_t>(zp);
}

// ---------------------------------------------------------------------------------------------------------------
// IntMatMul
// ---------------------------------------------------------------------------------------------------------------

constexpr int kRows = 6, kTiles = 4;  // 24 int32 accumulators + 4 weight registers + a broadcast
constexpr int64_t kMaxTaskRows = 96;          // rows_per_task must not exceed this (the F buffer)
constexpr int64_t kSubK = 128;                // k per step: a block, or a part of a block over 128

// The k steps of a block: `count` parts of `len` k each (len a multiple of the layout's granule, <= kSubK when the
// block allows it).
struct BlockSplit {
  int64_t count, len;
};
inline BlockSplit split_block(int64_t block, int64_t granule) {
  int64_t count = (block + kSubK - 1) / kSubK;
  while (block % count || (block / count) % granule) ++count;
  return {count, block / count};
}

// State of one panel (rows m0..m1 x T tiles at t) while its k steps run. Everything a step reads, as plain
// values: the steps write float / int32 buffers, and with pointers into GemmArgs the compiler would reload them.
struct Panel {
  const uint8_t* a;            // activation codes of row m0 at this step's k0 (rows lda apart)
  int64_t lda;
  const int32_t* a_pair;       // act.pair of row m0, block blk (rows k_blocks apart)
  const int32_t* a_sc;         // act.sc of row m0, block blk (rows k_blocks apart)
  const int32_t* a_z;          // act.z of row m0
  int64_t kb;
  const int32_t* w_zw;         // w.zw / sv / scales at (blk, tile t)
  const int32_t* w_sv;
  const float* w_scales;
  const uint8_t* w;            // this step's weights: unpacked scratch [groups][2][T][64] (4-bit) or b (8-bit)
  int64_t w_stride;            // 8-bit: bytes between tiles in b
  int64_t groups;              // 64-byte rows in this step
  int64_t ahead;               // offset from a row's codes to the same codes 2 micro-kernels later (prefetched)
  bool small_block;            // corrections as int16 pairs (block <= kSmallBlock)
  bool first, last;            // first / last step of the block
  float* f;                    // [rows][T][16] float block sums, row m0 first
  int32_t* part;               // [rows][T][16] int32 partial sums (blocks split in several steps)
};

// R rows x T tiles (rows r0..r0+R of the panel) for one k step: int32 accumulators in registers, then either parked
// in `part` (more steps of this block to come) or corrected and folded into F.
template <int Bits, int R, int T>
HN_INLINE void panel_step(const Panel& p, int64_t r0) {
  const uint8_t* a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = p.a + (r0 + r) * p.lda;
  float* __restrict f = p.f + r0 * T * 16;
  int32_t* __restrict part = p.part + r0 * T * 16;
  const uint8_t* __restrict wbase = p.w;
  const int64_t groups = p.groups, w_stride = p.w_stride;

  __m512i acc[R][T];
  if (!p.first) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) acc[r][i] = _mm512_load_si512(part + (r * T + i) * 16);
  } else if (p.small_block) {  // start from -(zw * sum c + z * sum (u - zw)): one vpmaddwd of int16 pairs
    __m512i ap[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) ap[r] = _mm512_set1_epi32(p.a_pair[(r0 + r) * p.kb]);
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i) {
      const __m512i wp = int16_pairs(p.w_zw + i * kTile, p.w_sv + i * kTile);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_madd_epi16(wp, ap[r]);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) acc[r][i] = _mm512_setzero_si512();
  }

  // the codes the micro-kernel after next reads (rows r0 + 2R .., this k step; 2 cache lines a row): the panel's
  // rows are more streams than the hardware prefetchers follow
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const char* next = reinterpret_cast<const char*>(a[r] + p.ahead);
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + 64, _MM_HINT_T0);
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512i wv[T];
    if constexpr (Bits == 4) {
      const uint8_t* lo = wbase + gi * 2 * T * 64;  // low nibbles (k = 8g .. 8g + 3), then high (8g + 4 .. 8g + 7)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) wv[i] = _mm512_load_si512(lo + i * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i a0 = bcast32(a[r] + 8 * gi);
#pragma GCC unroll 16
        for (int i = 0; i < T; ++i) dpbusd(acc[r][i], a0, wv[i]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) wv[i] = _mm512_load_si512(lo + (T + i) * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i a1 = bcast32(a[r] + 8 * gi + 4);
#pragma GCC unroll 16
        for (int i = 0; i < T; ++i) dpbusd(acc[r][i], a1, wv[i]);
      }
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) wv[i] = _mm512_loadu_si512(wbase + i * w_stride + gi * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i a0 = bcast32(a[r] + 4 * gi);
#pragma GCC unroll 16
        for (int i = 0; i < T; ++i) dpbusd(acc[r][i], a0, wv[i]);
      }
    }
  }

  if (!p.last) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) _mm512_store_si512(part + (r * T + i) * 16, acc[r][i]);
    return;
  }
  if (!p.small_block) {  // subtract zw * sum c + z * sum (u - zw) in int32
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i) {
      const __m512i zw = _mm512_loadu_si512(p.w_zw + i * kTile);
      const __m512i sv = _mm512_loadu_si512(p.w_sv + i * kTile);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i corr = _mm512_add_epi32(_mm512_mullo_epi32(zw, _mm512_set1_epi32(p.a_sc[(r0 + r) * p.kb])),
                                              _mm512_mullo_epi32(sv, _mm512_set1_epi32(p.a_z[r0 + r])));
        acc[r][i] = _mm512_sub_epi32(acc[r][i], corr);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < T; ++i) {
    const __m512 s = _mm512_loadu_ps(p.w_scales + i * kTile);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* fr = f + (r * T + i) * 16;
      _mm512_store_ps(fr, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(acc[r][i]), _mm512_load_ps(fr)));
    }
  }
}

template <int Bits, int R, int T>
void panel_step_rest(const Panel& p, int64_t r0, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R)
      panel_step<Bits, R, T>(p, r0);
    else
      panel_step_rest<Bits, R - 1, T>(p, r0, rows);
  }
}

// Low and high nibbles of `groups` 64-byte rows of T tiles, as bytes 0..15: out[g][0][i] = low, out[g][1][i] = high.
template <int T>
void unpack_nibbles(const uint8_t* b, int64_t tile_stride, int64_t groups, uint8_t* out) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t gi = 0; gi < groups; ++gi) {
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i) {
      const __m512i v = _mm512_loadu_si512(b + i * tile_stride + gi * 64);
      _mm512_store_si512(out + (gi * 2 * T + i) * 64, _mm512_and_si512(v, nibble));
      _mm512_store_si512(out + (gi * 2 * T + T + i) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    }
  }
}

// Rows m0..m1 (at most kMaxTaskRows) x T tiles at t, over the whole K, block by block: the block's weights are
// unpacked once (4-bit) and shared by every R-row micro-tile of the panel, whose sums stay in L1.
template <int Bits, int T>
void int_panel(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t) {
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  const int64_t rows = m1 - m0;
  const int64_t granule = Bits == 4 ? 8 : 4;
  const BlockSplit split = split_block(w.block, granule);
  alignas(64) float f[kMaxTaskRows * T * 16];
  alignas(64) int32_t part[kMaxTaskRows * T * 16];
  alignas(64) uint8_t scratch[Bits == 4 ? (kSubK / 8) * 2 * T * 64 : 64];
  std::fill(f, f + rows * T * 16, 0.0f);
  Panel p;
  p.lda = act.lda;
  p.ahead = 2 * kRows * act.lda;  // past the panel's last rows: prefetches of lines not read (harmless)
  p.a_z = act.z.data() + m0;
  p.kb = w.k_blocks;
  p.w_stride = w.tile_stride;
  p.groups = split.len / granule;
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
      const uint8_t* bk = b + (k0 / granule) * 64;
      if constexpr (Bits == 4) {
        unpack_nibbles<T>(bk, w.tile_stride, p.groups, scratch);
        p.w = scratch;
      } else {
        p.w = bk;
      }
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows) panel_step<Bits, kRows, T>(p, r);
      panel_step_rest<Bits, kRows - 1, T>(p, r, rows - r);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
    const __m512 as = _mm512_set1_ps(act.scale[m]);
    for (int i = 0; i < T; ++i) {
      const int64_t n0 = (t + i) * kTile;
      const __mmask16 mask = column_mask(n0, g.n);
      const __m512 v = _mm512_fmadd_ps(as, _mm512_load_ps(f + (r * T + i) * 16), _mm512_maskz_loadu_ps(mask, bias + n0));
      store16(g.y, g.y_half, m * g.n + n0, v, mask);
    }
  }
}

template <int Bits, int T>
void int_panel_rest(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t, int64_t tiles) {
  if constexpr (T > 0) {
    if (tiles == T)
      int_panel<Bits, T>(g, m0, m1, t);
    else
      int_panel_rest<Bits, T - 1>(g, m0, m1, t, tiles);
  }
}

template <int Bits>
void int_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t r0 = m0; r0 < m1; r0 += kMaxTaskRows) {
    const int64_t r1 = std::min(m1, r0 + kMaxTaskRows);
    int64_t t = t0;
    for (; t + kTiles <= t1; t += kTiles) int_panel<Bits, kTiles>(g, r0, r1, t);
    int_panel_rest<Bits, kTiles - 1>(g, r0, r1, t, t1 - t);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// FloatMatMul: one column tile per zmm, each k's 16 codes pulled out of the 64-byte row by shifts
// ---------------------------------------------------------------------------------------------------------------

// R rows x T column tiles at a time: R x T independent accumulator chains (one tile at a time, the R chains were
// bound by the fma latency), each k's codes shared by the R rows. Single thread, [2, 1152] x [1152, 1152]: 110-122 ->
// 86-99 us, [2, 4608] x [4608, 1152]: 452-494 -> 359-371 us (best of 50; the nibble shifts, conversions and fmas all
// queue for the same two 512-bit ports, which bounds it now).
template <int Bits, int R, int T>
HN_INLINE void float_rows_tiles(const FloatGemmArgs& g, int64_t m, int64_t t) {
  const WeightInfo& w = *g.w;
  const int64_t gpb = w.block / (Bits == 4 ? 8 : 4);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  const float* x[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) x[r] = g.x + (m + r) * g.ldx;
  __m512 y[R][T];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < T; ++i) y[r][i] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    const int64_t col = blk * w.n_pad + t * kTile;
    __m512 zw[T];
    __m512 acc[R][T];
#pragma GCC unroll 4
    for (int i = 0; i < T; ++i) zw[i] = _mm512_cvtepi32_ps(_mm512_loadu_si512(w.zw.data() + col + i * kTile));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int i = 0; i < T; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < gpb; ++gi) {
      __m512i v[T];
#pragma GCC unroll 4
      for (int i = 0; i < T; ++i) v[i] = _mm512_loadu_si512(g.b + (t + i) * w.tile_stride + (blk * gpb + gi) * 64);
      const int64_t k0 = blk * w.block + gi * (Bits == 4 ? 8 : 4);
      // k = k0 + j: byte j of each 32-bit lane (8-bit), or its low (k0 + j) / high (k0 + 4 + j) nibble (4-bit)
      constexpr int kPerGroup = Bits == 4 ? 8 : 4;
#pragma GCC unroll 8
      for (int j = 0; j < kPerGroup; ++j) {
        __m512 xs[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) xs[r] = _mm512_set1_ps(x[r][k0 + j]);
#pragma GCC unroll 4
        for (int i = 0; i < T; ++i) {
          __m512i q;
          if constexpr (Bits == 4)
            q = _mm512_and_si512(_mm512_srli_epi32(v[i], 8 * (j % 4) + 4 * (j / 4)), nibble);
          else
            q = _mm512_srai_epi32(_mm512_slli_epi32(v[i], 24 - 8 * j), 24);
          const __m512 u = _mm512_sub_ps(_mm512_cvtepi32_ps(q), zw[i]);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(xs[r], u, acc[r][i]);
        }
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < T; ++i) {
      const __m512 s = _mm512_loadu_ps(w.scales.data() + col + i * kTile);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) y[r][i] = _mm512_fmadd_ps(s, acc[r][i], y[r][i]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < T; ++i) {
    const int64_t n0 = (t + i) * kTile;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) store16(g.y, g.y_half, (m + r) * g.n + n0, y[r][i], column_mask(n0, g.n));
  }
}

// Up to 4 rows at a time share each k's unpacked codes. Per row and column the same operations in the same order
// as the scalar path: acc = fmaf(x_k, float(u) - float(zw), acc) over the block, y = fmaf(scales, acc, y).
template <int Bits, int R>
void float_rows(const FloatGemmArgs& g, int64_t m, int64_t t0, int64_t t1) {
  constexpr int T = R >= 3 ? 2 : 4;
  int64_t t = t0;
  for (; t + T <= t1; t += T) float_rows_tiles<Bits, R, T>(g, m, t);
  for (; t < t1; ++t) float_rows_tiles<Bits, R, 1>(g, m, t);
}

template <int Bits>
void float_gemm(const FloatGemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) float_rows<Bits, 4>(g, m, t0, t1);
  switch (m1 - m) {
    case 3: float_rows<Bits, 3>(g, m, t0, t1); break;
    case 2: float_rows<Bits, 2>(g, m, t0, t1); break;
    case 1: float_rows<Bits, 1>(g, m, t0, t1); break;
    default: break;
  }
}

const IsaKernels kAvx512 = {Isa::kAvx512Vnni, quantize_row_avx512, int_gemm<4>, int_gemm<8>, float_gemm<4>,
                            float_gemm<8>, 96, 8};

}  // namespace

const IsaKernels* avx512vnni_kernels() { return &kAvx512; }

}  // namespace hadanorm

#pragma GCC pop_options

#endif
