// AVX-512 VNNI path of the integer kernels (int_kernels.h). One 64-byte row of the packed layout is one zmm: 16
// columns x 4 consecutive k, the operand of vpdpbusd against 4 activation codes broadcast to every lane.
//
// IntMatMul: the panel driver of int_panel.h (up to 96 rows x 4 column tiles per panel) with a micro-kernel of R = 6
// rows x T = 4 tiles: per block the panel's weights are unpacked once (4-bit: nibbles -> bytes 0..15, 8 KiB in L1),
// and each micro-kernel runs the block with 24 int32 accumulators in registers (per group of 8 k: T weight loads,
// 2 R broadcasts, 2 R T vpdpbusd), starting from the block's corrections -(zw * sum c + z * sum (u - zw)) (one
// vpmaddwd of int16 pairs for blocks <= 128, vpmulld otherwise), and folds them into F = fmadd(scales, float(I), F);
// after the last block y = fmadd(a_scale, F, bias), stored as float or half (vcvtps2ph) under a column mask.
// Measured (benchmarks/int_linear.md): 6 x 4 beats 8 x 3, 5 x 4 and 4 x 4 by a few percent or ties; vpdpbusd as
// tied inline assembly, since with the intrinsic GCC 12 copied accumulators through the stack in the inner loop.
// The transform's AVX-512 row kernels (transform_avx512.h) are compiled here too.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (their inline templates must stay baseline code).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "gelu_avx512.h"
#include "int_avx512_store.h"
#include "int_panel.h"
#include "transform_avx512.h"
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

// The codes of a token whose range the caller took: h = max(max y, 0), l = min(min y, 0) (NaN skipped), as
// quantize_row_avx512 takes them (max and min are exact: any order gives the same bits). Floats, not the lane vectors:
// a function with zmm arguments returns without vzeroupper (GCC 12), and the callers' SSE code after it then ran
// about 8% slower (the 1152-wide op, one thread).
void quantize_codes_avx512(const float* y, int64_t d, float h, float l, float qmax, bool half_scale, uint8_t* codes,
                           float* scale_out, uint8_t* zp_out) {
  int64_t i = 0;
  float scale = (h - l) / qmax;
  scale = scale > FLT_MIN ? scale : FLT_MIN;
  if (half_scale) scale = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  float zp = __builtin_nearbyintf(-(l / scale));
  zp = zp >= 0.0f ? (zp > qmax ? qmax : zp) : 0.0f;
  const __m512 vscale = _mm512_set1_ps(scale), vzp = _mm512_set1_ps(zp), vmax = _mm512_set1_ps(qmax);
  const __m512 zero = _mm512_setzero_ps();
  // round(y / scale) without a division per vector (vdivps zmm: one per 16 cycles, half of this function's time):
  // t = y * (1 / scale) is within |t| * 3 * 2^-24 <= 2^-14 of the correctly rounded quotient (|t| <= qmax + 1 <=
  // 256 since lo <= 0 <= hi), so both round to the same integer unless t lies within 2^-14 of a half-integer; lanes
  // within 2^-12 of one (about 0.05%) redo the vector with the division. Bit-identical to dividing (the scalar path).
  const float inv = 1.0f / scale;
  const bool reciprocal = std::fabs(inv) >= FLT_MIN && std::fabs(inv) <= FLT_MAX;  // else divide every vector
  const __m512 vinv = _mm512_set1_ps(inv), near_half = _mm512_set1_ps(0.5f - 0x1p-12f);
  // round(y / scale) + zp, as floats
  auto shifted16 = [&](__m512 v) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512 r;
    if (reciprocal) {
      const __m512 t = _mm512_mul_ps(v, vinv);
      r = _mm512_roundscale_ps(t, kRound);
      const __m512 off = _mm512_abs_ps(_mm512_sub_ps(t, r));  // NaN/inf lanes compare false: kept as they are
      if (_mm512_cmp_ps_mask(off, near_half, _CMP_GT_OQ)) r = _mm512_roundscale_ps(_mm512_div_ps(v, vscale), kRound);
    } else {
      r = _mm512_roundscale_ps(_mm512_div_ps(v, vscale), kRound);
    }
    return _mm512_add_ps(r, vzp);
  };
  // the codes 0 .. qmax <= 255 as int32 (NaN -> 0: max returns the second operand)
  auto code16 = [&](__m512 v) {
    return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(shifted16(v), zero), vmax));
  };
  // the same unclamped, for the packs below to saturate: only with the reciprocal, where scale is finite and positive,
  // so |y / scale| <= qmax (1 + 2^-11) (|y| <= max(h, -l); a scale rounded to half is at most 2^-11 under (h - l) /
  // qmax) and the sum is within -qmax - 1 .. 2 qmax + 1; NaN -> INT32_MIN, which the packs take to 0
  auto unclamped16 = [&](__m512 v) { return _mm512_cvttps_epi32(shifted16(v)); };
  // 64 codes a store: two saturating packs (exact for 0..255) and one lane permute instead of four vpmovdb. With the
  // reciprocal the packs also do the clamp (int32 -> int16 -> uint8 saturating: below 0 -> 0) and one vpminub the
  // top (above qmax -> qmax) for the 64 codes, instead of a max and a min per 16 (the scalar path's clamp_code: NaN ->
  // 0, as INT32_MIN saturates to 0).
  const __m512i lanes = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  if (reciprocal) {
    const __m512i top = _mm512_set1_epi8(static_cast<char>(static_cast<uint8_t>(qmax)));
    for (; i + 64 <= d; i += 64) {
      const __m512i c0 = unclamped16(_mm512_loadu_ps(y + i)), c1 = unclamped16(_mm512_loadu_ps(y + i + 16));
      const __m512i c2 = unclamped16(_mm512_loadu_ps(y + i + 32)), c3 = unclamped16(_mm512_loadu_ps(y + i + 48));
      const __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3));
      _mm512_storeu_si512(codes + i, _mm512_permutexvar_epi32(lanes, _mm512_min_epu8(bytes, top)));
    }
  }
  for (; i + 64 <= d; i += 64) {
    const __m512i c0 = code16(_mm512_loadu_ps(y + i)), c1 = code16(_mm512_loadu_ps(y + i + 16));
    const __m512i c2 = code16(_mm512_loadu_ps(y + i + 32)), c3 = code16(_mm512_loadu_ps(y + i + 48));
    const __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3));
    _mm512_storeu_si512(codes + i, _mm512_permutexvar_epi32(lanes, bytes));
  }
  for (; i + 16 <= d; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code16(_mm512_loadu_ps(y + i))));
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1u);
    _mm_mask_storeu_epi8(codes + i, m, _mm512_cvtepi32_epi8(code16(_mm512_maskz_loadu_ps(m, y + i))));
  }
  *scale_out = scale;
  *zp_out = static_cast<uint8_t>(zp);
}

void quantize_row_avx512(const float* y, int64_t d, float qmax, bool half_scale, uint8_t* codes, float* scale_out,
                         uint8_t* zp_out) {
  // four independent max / min chains (one chain waited on each max's latency: 28% of this function's samples at d
  // 4608, perf of `benchmarks/bench_ops_ab.py quantize --width 4608`); max and min are exact, so the order does not
  // change the result
  __m512 hi = _mm512_setzero_ps(), lo = _mm512_setzero_ps();
  int64_t i = 0;
  {
    __m512 h1 = hi, h2 = hi, h3 = hi, l1 = lo, l2 = lo, l3 = lo;
    for (; i + 64 <= d; i += 64) {
      const __m512 v0 = _mm512_loadu_ps(y + i), v1 = _mm512_loadu_ps(y + i + 16);
      const __m512 v2 = _mm512_loadu_ps(y + i + 32), v3 = _mm512_loadu_ps(y + i + 48);
      hi = _mm512_max_ps(v0, hi);  // a NaN in y is skipped (max returns the second operand), as in the scalar path
      h1 = _mm512_max_ps(v1, h1);
      h2 = _mm512_max_ps(v2, h2);
      h3 = _mm512_max_ps(v3, h3);
      lo = _mm512_min_ps(v0, lo);
      l1 = _mm512_min_ps(v1, l1);
      l2 = _mm512_min_ps(v2, l2);
      l3 = _mm512_min_ps(v3, l3);
    }
    hi = _mm512_max_ps(_mm512_max_ps(hi, h1), _mm512_max_ps(h2, h3));
    lo = _mm512_min_ps(_mm512_min_ps(lo, l1), _mm512_min_ps(l2, l3));
  }
  for (; i + 16 <= d; i += 16) {
    const __m512 v = _mm512_loadu_ps(y + i);
    hi = _mm512_max_ps(v, hi);
    lo = _mm512_min_ps(v, lo);
  }
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, y + i);  // zeros in the unused lanes: hi >= 0 >= lo anyway
    hi = _mm512_max_ps(v, hi);
    lo = _mm512_min_ps(v, lo);
  }
  quantize_codes_avx512(y, d, _mm512_reduce_max_ps(hi), _mm512_reduce_min_ps(lo), qmax, half_scale, codes, scale_out,
                        zp_out);
}

// One token of a quantize op with h_right's fast transform alone (int_kernels.h, FwhtQuantizeRowFn): the transform row
// by row with the row's range taken in registers (transform_avx512.h), then its codes: the bits of affine,
// center_scale_fwht and quantize_row_avx512, without the pass that reloads y for the range nor the one through x' of
// the Modulate ops.
bool fwht_quantize_row_avx512(const float* x, const float* x_scale, const float* x_shift, const float* mean,
                              const float* mul, int64_t k, int64_t m, float qmax, bool half_scale, float* y,
                              uint8_t* codes, float* scale, uint8_t* zero_point) {
  __m512 hi = _mm512_setzero_ps(), lo = _mm512_setzero_ps();
  const bool done = x_scale ? center_scale_fwht_range_avx512<true>(x, x_scale, x_shift, mean, mul, y, k, m, &hi, &lo)
                            : center_scale_fwht_range_avx512<false>(x, nullptr, nullptr, mean, mul, y, k, m, &hi, &lo);
  if (done)
    quantize_codes_avx512(y, k * m, _mm512_reduce_max_ps(hi), _mm512_reduce_min_ps(lo), qmax, half_scale, codes, scale,
                          zero_point);
  return done;
}

// ---------------------------------------------------------------------------------------------------------------
// IntMatMul
// ---------------------------------------------------------------------------------------------------------------

// The micro-kernel of the panel driver (int_panel.h): 6 rows x 4 column tiles, 24 int32 accumulators + 4 weight
// registers + a broadcast of the 32 zmm.
struct Avx512Micro {
  static constexpr int kRows = 6, kTiles = 4;
  template <int Bits>
  static constexpr int64_t kGranule = Bits == 4 ? 8 : 4;

  template <int Bits, int R, int T>
  static HN_INLINE void step(const PanelStep& p, int64_t r0);

  // 4-bit: low and high nibbles of `groups` 64-byte rows of T tiles as bytes 0..15, out[g][0][i] = low, out[g][1][i] =
  // high; 8-bit: b itself (tiles tile_stride apart)
  template <int Bits, int T>
  static const uint8_t* weights(const uint8_t* b, int64_t tile_stride, int64_t groups, uint8_t* out) {
    if constexpr (Bits == 8) {
      return b;
    } else {
      const __m512i nibble = _mm512_set1_epi8(0x0F);
      for (int64_t gi = 0; gi < groups; ++gi) {
#pragma GCC unroll 16
        for (int i = 0; i < T; ++i) {
          const __m512i v = _mm512_loadu_si512(b + i * tile_stride + gi * 64);
          _mm512_store_si512(out + (gi * 2 * T + i) * 64, _mm512_and_si512(v, nibble));
          _mm512_store_si512(out + (gi * 2 * T + T + i) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
      }
      return out;
    }
  }

  // y = fmadd(a_scale, F, bias) for the columns n0 .. n0 + 15 of row m that exist
  static void store_tile(const GemmArgs& g, int64_t m, int64_t n0, const float* bias, const float* f) {
    const __mmask16 mask = column_mask(n0, g.n);
    const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(g.act->scale[m]), _mm512_load_ps(f),
                                     _mm512_maskz_loadu_ps(mask, bias + n0));
    store16(g.y, g.y_half, m * g.n + n0, v, mask);
  }
};

// R rows x T tiles (rows r0..r0+R of the panel) for one k step: int32 accumulators in registers, then either parked
// in `part` (more steps of this block to come) or corrected and folded into F.
template <int Bits, int R, int T>
void Avx512Micro::step(const PanelStep& p, int64_t r0) {
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

// ---------------------------------------------------------------------------------------------------------------
// FloatMatMul: one column tile per zmm, each k's 16 codes pulled out of the 64-byte row by shifts
// ---------------------------------------------------------------------------------------------------------------

// R rows x T column tiles at a time: R x T independent accumulator chains (one tile at a time, the R chains were
// bound by the fma latency), each k's codes shared by the R rows. Single thread, [2, 1152] x [1152, 1152]: 110-122 ->
// 86-99 us, [2, 4608] x [4608, 1152]: 452-494 -> 359-371 us (best of 50; the nibble shifts, conversions and fmas all
// queue for the same two 512-bit ports, which bounds it now).
// Lut (4-bit weights with one zero point for every column: WeightInfo::zw_uniform, e.g. two-level weights): the
// nibble's float(u) - float(zw) looked up with one vpermps (it reads the index's low 4 bits: no mask) instead of a
// mask, a conversion and a subtraction; the same exact small integers, so the same bits. Eight two-level 1152 x 1152
// weights, two rows, one thread (`python benchmarks/bench_ops_ab.py float-matmul OLD_LIB NEW_LIB`, busy host):
// 0.93 -> 0.65 ms.
template <int Bits, int R, int T, bool Lut = false>
HN_INLINE void float_rows_tiles(const FloatGemmArgs& g, int64_t m, int64_t t) {
  static_assert(!Lut || Bits == 4, "the lookup takes 4-bit codes");
  const WeightInfo& w = *g.w;
  const __m512 lut = _mm512_sub_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                   _mm512_set1_ps(static_cast<float>(w.zw_uniform)));
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
    for (int i = 0; i < T; ++i)
      zw[i] = w.zw.empty() ? _mm512_set1_ps(static_cast<float>(w.zw_uniform))
                           : _mm512_cvtepi32_ps(_mm512_loadu_si512(w.zw.data() + col + i * kTile));
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
          __m512 u;
          if constexpr (Lut) {
            const int shift = 8 * (j % 4) + 4 * (j / 4);
            u = _mm512_permutexvar_ps(shift ? _mm512_srli_epi32(v[i], shift) : v[i], lut);
          } else {
            __m512i q;
            if constexpr (Bits == 4)
              q = _mm512_and_si512(_mm512_srli_epi32(v[i], 8 * (j % 4) + 4 * (j / 4)), nibble);
            else
              q = _mm512_srai_epi32(_mm512_slli_epi32(v[i], 24 - 8 * j), 24);
            u = _mm512_sub_ps(_mm512_cvtepi32_ps(q), zw[i]);
          }
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
template <int Bits, int R, bool Lut = false>
void float_rows_with(const FloatGemmArgs& g, int64_t m, int64_t t0, int64_t t1) {
  constexpr int T = R >= 3 ? 2 : 4;
  int64_t t = t0;
  for (; t + T <= t1; t += T) float_rows_tiles<Bits, R, T, Lut>(g, m, t);
  for (; t < t1; ++t) float_rows_tiles<Bits, R, 1, Lut>(g, m, t);
}

template <int Bits, int R>
void float_rows(const FloatGemmArgs& g, int64_t m, int64_t t0, int64_t t1) {
  if constexpr (Bits == 4)
    if (g.w->zw.empty()) return float_rows_with<4, R, true>(g, m, t0, t1);
  float_rows_with<Bits, R>(g, m, t0, t1);
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

// The two-level expansion (int_kernels.h, ExpandTwoLevelFn): per packed 64-byte row, the low and high nibbles u as
// bytes, r u computed in 16-bit lanes (even and odd bytes apart: r u <= 240 fits the byte), minus 8 r per byte
// (modulo 256: the int8 r (u - 8)). The same bytes as expand_two_level_scalar.
void expand_two_level_avx512(const WeightInfo& w4, const uint8_t* ratio, const uint8_t* b, int64_t t0, int64_t t1,
                             uint8_t* out) {
  const int64_t stride8 = w4.k_pad / 4 * 64, rows_per_block = w4.block / 8;
  const __m512i nibble = _mm512_set1_epi8(0x0F), low_bytes = _mm512_set1_epi16(0x00FF);
  // per column c (dword c of a row): r in both 16-bit halves, and 8 r in each byte
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = b + t * w4.tile_stride;
    uint8_t* dst = out + (t - t0) * stride8;
    for (int64_t blk = 0; blk < w4.k_blocks; ++blk) {
      const __m128i r8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ratio + blk * w4.n_pad + t * kTile));
      const __m512i r32 = _mm512_cvtepu8_epi32(r8);  // r of column c in dword c
      const __m512i r16 = _mm512_or_si512(r32, _mm512_slli_epi32(r32, 16));
      const __m512i r8x = _mm512_mullo_epi32(r32, _mm512_set1_epi32(0x08080808));  // 8 r in each byte
      auto times_r = [&](__m512i u) {  // bytes r u
        const __m512i even = _mm512_mullo_epi16(_mm512_and_si512(u, low_bytes), r16);
        const __m512i odd = _mm512_mullo_epi16(_mm512_srli_epi16(u, 8), r16);
        return _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(even, low_bytes), _mm512_slli_epi16(odd, 8)), r8x);
      };
      const int64_t g0 = blk * rows_per_block, g1 = std::min(w4.groups, g0 + rows_per_block);
      for (int64_t g = g0; g < g1; ++g) {
        const __m512i v = _mm512_loadu_si512(tile + g * 64);
        _mm512_storeu_si512(dst + (2 * g) * 64, times_r(_mm512_and_si512(v, nibble)));
        _mm512_storeu_si512(dst + (2 * g + 1) * 64, times_r(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble)));
      }
    }
  }
}

constexpr int64_t kTaskRows = kMaxTaskRows, kTaskTiles = 8;  // rows x column tiles per matmul task (96: one panel)

}  // namespace

const IsaKernels* avx512vnni_kernels() {
  static const IsaKernels kernels = inherit(
      {.isa = Isa::kAvx512Vnni,
       .quantize_row = quantize_row_avx512,
       .fwht_quantize_row = fwht_quantize_row_avx512,
       .int_gemm4 = panel_int_gemm<Avx512Micro, 4>,
       .int_gemm8 = panel_int_gemm<Avx512Micro, 8>,
       .float_gemm4 = float_gemm<4>,
       .float_gemm8 = float_gemm<8>,
       .expand_two_level = expand_two_level_avx512,
       .gelu_tanh = gelu_tanh_avx512,  // gelu_avx512.h
       .low_rank_add = low_rank_add_avx512,
       .transform = {.center_scale_fwht = center_scale_fwht_avx512,  // transform_avx512.h
                     .dense_left = dense_left_avx512,
                     .paley2_left = paley2_left_avx512,
                     .column_mean = column_mean_avx512,
                     .column_mean_affine = column_mean_affine_avx512},
       .rows_per_task = kTaskRows,
       .tiles_per_task = kTaskTiles},
      *avx2_kernels());  // the AVX2 build of the portable loops, the F16C conversions
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
