// The AVX2 IntMatMul panel kernels (int_avx2.cc, int_avxvnni.cc), included after a `#pragma GCC target` and a
// definition of HN_DPBUSD_YMM(acc, a, w) (the AVX-VNNI intrinsic; only the avxvnni source instantiates Kind 0).
// A 64-byte row of the packed layout is two ymm halves of 8 columns x 4 k each. The scheme is the AVX-512 path's
// (int_avx512.cc): per block, the tile's weights are unpacked once (4-bit) and shared by the R-row micro-kernels of
// the panel, whose int32 sums (2 R ymm registers) are corrected and folded into float block sums F in L1.
//
// Without VNNI, u8 x s8 dot products of 4 take vpmaddubsw (u8 x s8 -> int16 pairs, saturating) + vpmaddwd (x 1 ->
// int32): exact for 4-bit weights (2 * 255 * 15 < 2^15, also after adding the low- and high-nibble pairs); 8-bit
// weights would saturate, so they take vpmovsxbw + vpmaddwd on int16 (activations widened with vpmovzxbw), 4
// columns per register, pairs added at the end of each step.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "int_kernels.h"
#include "util.h"

#ifndef HN_DPBUSD_YMM
#define HN_DPBUSD_YMM(acc, a, w) (acc)  // never instantiated without AVX-VNNI (Kind 0)
#endif

namespace hadanorm {
namespace {

// zw (low int16) | sv (high int16) of 8 columns: the vpmaddwd operand that starts a small block's sums
inline __m256i int16_pairs8(const int32_t* zw, const int32_t* sv) {
  return _mm256_or_si256(
      _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zw)), _mm256_set1_epi32(0xFFFF)),
      _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sv)), 16));
}

inline __m256i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 8 lanes as float or half, only the first `count` (0..8)
inline void store8(void* y, bool half, int64_t index, __m256 v, int64_t count) {
  if (count >= 8) {
    if (half)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + index),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
      _mm256_storeu_ps(static_cast<float*>(y) + index, v);
    return;
  }
  alignas(32) float tmp[8];
  alignas(16) uint16_t htmp[8];
  _mm256_store_ps(tmp, v);
  if (half) {
    _mm_store_si128(reinterpret_cast<__m128i*>(htmp), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (int64_t c = 0; c < count; ++c) static_cast<uint16_t*>(y)[index + c] = htmp[c];
  } else {
    for (int64_t c = 0; c < count; ++c) static_cast<float*>(y)[index + c] = tmp[c];
  }
}

inline __m256 load_partial(const float* p, int64_t count) {
  if (count >= 8) return _mm256_loadu_ps(p);
  alignas(32) float tmp[8] = {};
  for (int64_t c = 0; c < count; ++c) tmp[c] = p[c];
  return _mm256_load_ps(tmp);
}

constexpr int64_t kMaxTaskRows = 96;  // rows_per_task must not exceed this
constexpr int64_t kSubK = 128;

struct BlockSplit {
  int64_t count, len;
};
inline BlockSplit split_block(int64_t block, int64_t granule) {
  int64_t count = (block + kSubK - 1) / kSubK;
  while (block % count || (block / count) % granule) ++count;
  return {count, block / count};
}

// Everything one k step of a panel (rows m0.., one 16-column tile) reads; see int_avx512.cc.
struct Step {
  const uint8_t* a;       // codes of row m0 at this step's k0
  int64_t lda;
  const int32_t* a_pair;  // act.pair of row m0, this block
  const int32_t* a_sc;
  const int32_t* a_z;     // act.z of row m0
  int64_t kb;
  const int32_t* w_zw;
  const int32_t* w_sv;
  const float* w_scales;
  const uint8_t* w;       // 4-bit: unpacked scratch [groups][2][64]; 8-bit: b at this step
  int64_t groups;
  bool small_block, first, last;
  float* f;               // [rows][16]
  int32_t* part;          // [rows][16]
};

template <int Bits, int Kind, int R>
HN_INLINE void panel_step(const Step& s, int64_t r0) {
  float* __restrict f = s.f + r0 * 16;
  int32_t* __restrict part = s.part + r0 * 16;
  const uint8_t* a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = s.a + (r0 + r) * s.lda;
  // int32 accumulators of columns 0..7 (c0) and 8..15 (c1) of the tile
  __m256i c0[R], c1[R];
  if (!s.first) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part + r * 16));
      c1[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part + r * 16 + 8));
    }
  } else if (s.small_block) {
    const __m256i wp0 = int16_pairs8(s.w_zw, s.w_sv);  // zw (low int16) | sv (high int16)
    const __m256i wp1 = int16_pairs8(s.w_zw + 8, s.w_sv + 8);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i ap = _mm256_set1_epi32(s.a_pair[(r0 + r) * s.kb]);
      c0[r] = _mm256_madd_epi16(wp0, ap);
      c1[r] = _mm256_madd_epi16(wp1, ap);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
  }

  // dot products (Kind: 0 = AVX-VNNI, 1 = vpmaddubsw for 4-bit, 2 = int16 vpmaddwd for 8-bit without VNNI)
  const uint8_t* __restrict wb = s.w;
  const int64_t groups = s.groups;
  if constexpr (Kind == 0) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint8_t* row = Bits == 4 ? wb + gi * 128 : wb + gi * 64;
      __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i av = bcast32(a[r] + (Bits == 4 ? 8 : 4) * gi);
        c0[r] = HN_DPBUSD_YMM(c0[r], av, w0);
        c1[r] = HN_DPBUSD_YMM(c1[r], av, w1);
      }
      if constexpr (Bits == 4) {  // high nibbles: k = 8g + 4 .. 8g + 7
        w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 64));
        w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 96));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m256i av = bcast32(a[r] + 8 * gi + 4);
          c0[r] = HN_DPBUSD_YMM(c0[r], av, w0);
          c1[r] = HN_DPBUSD_YMM(c1[r], av, w1);
        }
      }
    }
  } else if constexpr (Kind == 1) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint8_t* row = wb + gi * 128;
      const __m256i l0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i l1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 32));
      const __m256i h0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 64));
      const __m256i h1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 96));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i alo = bcast32(a[r] + 8 * gi), ahi = bcast32(a[r] + 8 * gi + 4);
        // int16 pair sums of the low and high nibbles (each <= 2 * 255 * 15, their sum < 2^15), then int32
        const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(alo, l0), _mm256_maddubs_epi16(ahi, h0));
        const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(alo, l1), _mm256_maddubs_epi16(ahi, h1));
        c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(p0, ones));
        c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(p1, ones));
      }
    }
  } else {
    // int16: q_j[r] holds columns 4j .. 4j + 3 as (k0 k1, k2 k3) pair sums, reduced into c0 / c1 at the end
    __m256i q0[R], q1[R], q2[R], q3[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) q0[r] = q1[r] = q2[r] = q3[r] = _mm256_setzero_si256();
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint8_t* row = wb + gi * 64;
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16)));
      const __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32)));
      const __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 48)));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i a16 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(bcast32(a[r] + 4 * gi)));
        q0[r] = _mm256_add_epi32(q0[r], _mm256_madd_epi16(a16, w0));
        q1[r] = _mm256_add_epi32(q1[r], _mm256_madd_epi16(a16, w1));
        q2[r] = _mm256_add_epi32(q2[r], _mm256_madd_epi16(a16, w2));
        q3[r] = _mm256_add_epi32(q3[r], _mm256_madd_epi16(a16, w3));
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      // hadd within 128-bit lanes gives [c0 c1 c4 c5 | c2 c3 c6 c7]; vpermq puts c0..c7 in order
      c0[r] = _mm256_add_epi32(c0[r], _mm256_permute4x64_epi64(_mm256_hadd_epi32(q0[r], q1[r]), 0xD8));
      c1[r] = _mm256_add_epi32(c1[r], _mm256_permute4x64_epi64(_mm256_hadd_epi32(q2[r], q3[r]), 0xD8));
    }
  }

  if (!s.last) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(part + r * 16), c0[r]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(part + r * 16 + 8), c1[r]);
    }
    return;
  }
  if (!s.small_block) {  // subtract zw * sum c + z * sum (u - zw) in int32
    const __m256i zw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.w_zw));
    const __m256i zw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.w_zw + 8));
    const __m256i sv0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.w_sv));
    const __m256i sv1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.w_sv + 8));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i sc = _mm256_set1_epi32(s.a_sc[(r0 + r) * s.kb]), z = _mm256_set1_epi32(s.a_z[r0 + r]);
      c0[r] = _mm256_sub_epi32(c0[r], _mm256_add_epi32(_mm256_mullo_epi32(zw0, sc), _mm256_mullo_epi32(sv0, z)));
      c1[r] = _mm256_sub_epi32(c1[r], _mm256_add_epi32(_mm256_mullo_epi32(zw1, sc), _mm256_mullo_epi32(sv1, z)));
    }
  }
  const __m256 s0 = _mm256_loadu_ps(s.w_scales), s1 = _mm256_loadu_ps(s.w_scales + 8);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* fr = f + r * 16;
    _mm256_store_ps(fr, _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(c0[r]), _mm256_load_ps(fr)));
    _mm256_store_ps(fr + 8, _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(c1[r]), _mm256_load_ps(fr + 8)));
  }
}

template <int Bits, int Kind, int R>
void panel_step_rest(const Step& s, int64_t r0, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R)
      panel_step<Bits, Kind, R>(s, r0);
    else
      panel_step_rest<Bits, Kind, R - 1>(s, r0, rows);
  }
}

// micro-kernel rows: 2R int32 accumulators + weights + broadcasts within 16 ymm registers
template <int Bits, int Kind>
constexpr int rows_of() {
  return Kind == 0 ? 4 : (Kind == 1 ? 3 : 2);
}

template <int Bits, int Kind>
void int_panel(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t) {
  constexpr int R = rows_of<Bits, Kind>();
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  const int64_t rows = m1 - m0;
  const int64_t granule = Bits == 4 ? 8 : 4;
  const BlockSplit split = split_block(w.block, granule);
  alignas(64) float f[kMaxTaskRows * 16];
  alignas(64) int32_t part[kMaxTaskRows * 16];
  alignas(64) uint8_t scratch[Bits == 4 ? (kSubK / 8) * 128 : 64];
  std::fill(f, f + rows * 16, 0.0f);
  Step s;
  s.lda = act.lda;
  s.a_z = act.z.data() + m0;
  s.kb = w.k_blocks;
  s.groups = split.len / granule;
  s.small_block = w.small_block;
  s.f = f;
  s.part = part;
  const uint8_t* b = g.b + t * w.tile_stride;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    const int64_t col = blk * w.n_pad + t * kTile;
    s.a_pair = w.small_block ? act.pair.data() + m0 * w.k_blocks + blk : nullptr;
    s.a_sc = act.sc.data() + m0 * w.k_blocks + blk;
    s.w_zw = w.zw.data() + col;
    s.w_sv = w.sv.data() + col;
    s.w_scales = w.scales.data() + col;
    for (int64_t sub = 0; sub < split.count; ++sub) {
      const int64_t k0 = blk * w.block + sub * split.len;
      s.a = act.a + m0 * act.lda + k0;
      s.first = sub == 0;
      s.last = sub == split.count - 1;
      const uint8_t* bk = b + (k0 / granule) * 64;
      if constexpr (Bits == 4) {
        for (int64_t gi = 0; gi < s.groups; ++gi)
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + gi * 64 + 32 * h));
            _mm256_store_si256(reinterpret_cast<__m256i*>(scratch + gi * 128 + 32 * h), _mm256_and_si256(v, nibble));
            _mm256_store_si256(reinterpret_cast<__m256i*>(scratch + gi * 128 + 64 + 32 * h),
                               _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble));
          }
        s.w = scratch;
      } else {
        s.w = bk;
      }
      int64_t r = 0;
      for (; r + R <= rows; r += R) panel_step<Bits, Kind, R>(s, r);
      panel_step_rest<Bits, Kind, R - 1>(s, r, rows - r);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
    const __m256 as = _mm256_set1_ps(act.scale[m]);
    for (int h = 0; h < 2; ++h) {
      const int64_t n0 = t * kTile + 8 * h;
      const int64_t count = std::min<int64_t>(8, g.n - n0);
      if (count <= 0) break;
      const __m256 v = _mm256_fmadd_ps(as, _mm256_load_ps(f + r * 16 + 8 * h), load_partial(bias + n0, count));
      store8(g.y, g.y_half, m * g.n + n0, v, count);
    }
  }
}

template <int Bits, int Kind>
void int_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t r0 = m0; r0 < m1; r0 += kMaxTaskRows) {
    const int64_t r1 = std::min(m1, r0 + kMaxTaskRows);
    for (int64_t t = t0; t < t1; ++t) int_panel<Bits, Kind>(g, r0, r1, t);
  }
}

}  // namespace
}  // namespace hadanorm
