// AVX-512 versions of the matmul epilogue's gelu and low-rank term (portable_loops.h, gelu_tanh_value and
// low_rank_add_rows): the same IEEE operations in the same order, 16 lanes at a time (bit-identical to the scalar
// path), included by int_avx512.cc after its target pragma.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "gelu_tanh.h"
#include "util.h"

namespace hadanorm {
namespace {

HN_INLINE __m512 gelu_tanh16(__m512 x) {
  using G = GeluTanh;
  const __m512 clamp = _mm512_set1_ps(G::clamp), one = _mm512_set1_ps(1.0f);
  __m512 u = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(G::c1), _mm512_mul_ps(x, x), _mm512_set1_ps(G::c0)));
  u = _mm512_min_ps(u, clamp);  // u < clamp ? u : clamp
  u = _mm512_max_ps(u, _mm512_set1_ps(-G::clamp));
  const __m512 u2 = _mm512_mul_ps(u, u);
  __m512 p = _mm512_fmadd_ps(u2, _mm512_set1_ps(G::a13), _mm512_set1_ps(G::a11));
  p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(G::a9));
  p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(G::a7));
  p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(G::a5));
  p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(G::a3));
  p = _mm512_fmadd_ps(u2, p, _mm512_set1_ps(G::a1));
  p = _mm512_mul_ps(u, p);
  __m512 q = _mm512_fmadd_ps(u2, _mm512_set1_ps(G::b6), _mm512_set1_ps(G::b4));
  q = _mm512_fmadd_ps(u2, q, _mm512_set1_ps(G::b2));
  q = _mm512_fmadd_ps(u2, q, _mm512_set1_ps(G::b0));
  __m512 r = _mm512_castsi512_ps(
      _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int32_t>(G::magic)), _mm512_castps_si512(q)));
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, one), r);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, one), r);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, one), r);
  __m512 t = _mm512_mul_ps(p, r);
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, clamp, _CMP_EQ_OQ), t, one);
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_set1_ps(-G::clamp), _CMP_EQ_OQ), t, _mm512_set1_ps(-1.0f));
  const __m512 h = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
  return _mm512_fmadd_ps(h, t, h);
}

void gelu_tanh_avx512(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, gelu_tanh16(_mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, gelu_tanh16(_mm512_maskz_loadu_ps(m, y + i)));
  }
}

// R rows x C column vectors of sums in registers: per j, C loads of right and R broadcasts of t feed R x C fmas.
template <int R, int C>
HN_INLINE void low_rank_block512(float* y, int64_t ldy, const float* t, int64_t ldt, const float* right, int64_t r,
                                 int64_t ldr, __mmask16 last) {
  __m512 s[R][C];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) s[i][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < r; ++j) {
    __m512 w[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c)
      w[c] = _mm512_maskz_loadu_ps(c == C - 1 ? last : static_cast<__mmask16>(0xFFFF), right + j * ldr + 16 * c);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512 ti = _mm512_set1_ps(t[i * ldt + j]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) s[i][c] = _mm512_fmadd_ps(ti, w[c], s[i][c]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __mmask16 m = c == C - 1 ? last : static_cast<__mmask16>(0xFFFF);
      float* yp = y + i * ldy + 16 * c;
      _mm512_mask_storeu_ps(yp, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yp), s[i][c]));
    }
}

// R rows x `vectors` (1..4) column vectors from (y, t): the block for that width
template <int R>
HN_INLINE void low_rank_rows512(int vectors, float* y, int64_t ldy, const float* t, int64_t ldt, const float* right,
                                int64_t r, int64_t ldr, __mmask16 last) {
  switch (vectors) {
    case 4: return low_rank_block512<R, 4>(y, ldy, t, ldt, right, r, ldr, last);
    case 3: return low_rank_block512<R, 3>(y, ldy, t, ldt, right, r, ldr, last);
    case 2: return low_rank_block512<R, 2>(y, ldy, t, ldt, right, r, ldr, last);
    default: return low_rank_block512<R, 1>(y, ldy, t, ldt, right, r, ldr, last);
  }
}

void low_rank_add_avx512(float* y, int64_t ldy, const float* t, int64_t ldt, int64_t rows, const float* right,
                         int64_t r, int64_t ldr, int64_t n) {
  for (int64_t c0 = 0; c0 < n; c0 += 64) {  // 4 rows x 4 vectors: 16 sums, 4 loads and 4 broadcasts per j
    const int64_t width = std::min<int64_t>(64, n - c0);
    const int vectors = static_cast<int>((width + 15) / 16);
    const int64_t tail = width - 16 * (vectors - 1);
    const __mmask16 last = static_cast<__mmask16>(tail >= 16 ? 0xFFFF : (1u << tail) - 1u);
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
      low_rank_rows512<4>(vectors, y + i * ldy + c0, ldy, t + i * ldt, ldt, right + c0, r, ldr, last);
    for (; i < rows; ++i)
      low_rank_rows512<1>(vectors, y + i * ldy + c0, ldy, t + i * ldt, ldt, right + c0, r, ldr, last);
  }
}

}  // namespace
}  // namespace hadanorm
