// The AVX2 IntMatMul micro-kernel (int_avx2.cc, int_avxvnni.cc) for the panel driver of int_panel.h, included after
// a `#pragma GCC target` and a definition of HN_DPBUSD_YMM(acc, a, w) (the AVX-VNNI intrinsic; only the avxvnni
// source instantiates Kind 0). A 64-byte row of the packed layout is two ymm halves of 8 columns x 4 k each; a panel
// is one column tile, whose R-row micro-kernels keep their int32 sums in 2 R ymm registers.
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
#include "int_panel.h"
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

// dot products (Kind: 0 = AVX-VNNI, 1 = vpmaddubsw for 4-bit, 2 = int16 vpmaddwd for 8-bit without VNNI)
template <int Kind>
struct Avx2Micro {
  // rows: 2R int32 accumulators + weights + broadcasts within 16 ymm registers
  static constexpr int kRows = Kind == 0 ? 4 : (Kind == 1 ? 3 : 2);
  static constexpr int kTiles = 1;
  template <int Bits>
  static constexpr int64_t kGranule = Bits == 4 ? 8 : 4;

  // R rows x the tile for one k step: int32 sums in registers, parked in `part` or corrected and folded into F
  template <int Bits, int R, int T>
  static HN_INLINE void step(const PanelStep& s, int64_t r0);

  // 4-bit: low and high nibbles of `groups` rows as bytes 0..15 in scratch [groups][2][64]; 8-bit: b itself
  template <int Bits, int T>
  static const uint8_t* weights(const uint8_t* b, int64_t /*tile_stride*/, int64_t groups, uint8_t* scratch) {
    static_assert(T == 1, "one column tile per panel");
    if constexpr (Bits == 8) {
      return b;
    } else {
      const __m256i nibble = _mm256_set1_epi8(0x0F);
      for (int64_t gi = 0; gi < groups; ++gi)
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + gi * 64 + 32 * h));
          _mm256_store_si256(reinterpret_cast<__m256i*>(scratch + gi * 128 + 32 * h), _mm256_and_si256(v, nibble));
          _mm256_store_si256(reinterpret_cast<__m256i*>(scratch + gi * 128 + 64 + 32 * h),
                             _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble));
        }
      return scratch;
    }
  }

  // y = fmadd(a_scale, F, bias) for the columns n0.. of row m that exist
  static void store_tile(const GemmArgs& g, int64_t m, int64_t n0, const float* bias, const float* f) {
    const __m256 as = _mm256_set1_ps(g.act->scale[m]);
    for (int h = 0; h < 2; ++h) {
      const int64_t nh = n0 + 8 * h;
      const int64_t count = std::min<int64_t>(8, g.n - nh);
      if (count <= 0) break;
      const __m256 v = _mm256_fmadd_ps(as, _mm256_load_ps(f + 8 * h), load_partial(bias + nh, count));
      store8(g.y, g.y_half, m * g.n + nh, v, count);
    }
  }
};

template <int Kind>
template <int Bits, int R, int T>
void Avx2Micro<Kind>::step(const PanelStep& s, int64_t r0) {
  static_assert(T == 1, "one column tile per panel");
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

}  // namespace
}  // namespace hadanorm
