// exp for the AVX-512 paths of the fused attention (attention_avx512.cc, attention_amx.cc): include it after the
// file's `#pragma GCC target` with AVX-512F (its functions have internal linkage: each file compiles its own copy for
// its own targets).
#pragma once

#include <immintrin.h>

#include "util.h"

namespace hadanorm {
namespace {

// The polynomial with coefficients c (c[0] of the highest power) at r by Horner's rule: p = c[0], then
// p = fmadd(p, r, c[i]) for each further coefficient.
template <int N>
HN_INLINE __m512 horner(__m512 r, const float (&c)[N]) {
  __m512 p = _mm512_set1_ps(c[0]);
#pragma GCC unroll 8
  for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
  return p;
}

// e^y = 2^n e^r for the lanes of `normal` (0 in the others): n = round(y / ln 2) by the 1.5 * 2^23 trick, r = y - n ln 2
// in two parts (Cephes), e^r by a degree-6 minimax polynomial (relative error 2e-9 on [-ln 2 / 2, ln 2 / 2]), 2^n by
// vscalefps: within 1 ulp of std::exp.
HN_INLINE __m512 exp_core(__m512 y, __mmask16 normal) {
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(y, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  static constexpr float kExp[] = {1.3836845755577087e-3f, 8.374815806746483e-3f, 4.166822507977486e-2f,
                                   1.6666419804096222e-1f, 4.9999991059303284e-1f, 1.0f, 1.0f};
  return _mm512_maskz_scalef_ps(normal, horner(r, kExp), n);
}

// The lanes at or above ln FLT_MIN (NaN included: NaN stays NaN).
HN_INLINE __mmask16 exp_normal(__m512 y) {
  return _mm512_cmp_ps_mask(y, _mm512_set1_ps(-87.3365447f), _CMP_NLT_UQ);
}

// exp(y) for y <= 0, except that results under FLT_MIN (y < ln FLT_MIN, -inf included) are 0: what vcvtne2ps2bf16
// makes of them anyway, and computing them would cost a microcode assist a denormal.
HN_INLINE __m512 exp_ps(__m512 y) {
  const __mmask16 normal = exp_normal(y);
  return exp_core(_mm512_max_ps(_mm512_set1_ps(-87.3365447f), y), normal);  // max: NaN (second operand) stays
}

// 2^y for y <= 0, for p that is rounded to bfloat16 next (the AMX path's p = exp(s - mx') = 2^((s - mx') log2 e)):
// n = round(y) by the 1.5 * 2^23 trick, r = y - n (exact), 2^r by a degree-5 polynomial with constant term 1 (a
// Lawson fit of the relative error on [-1/2, 1/2]: at most 1.8e-7 in float, about exp_ps's error; degree 4, 3.2e-6,
// changed p's bf16 rounding often enough to move the AMX path 1e-4 from the scalar reference, relative L2), 2^n by
// vscalefps; 0 where 2^y < FLT_MIN (y < -126, -inf included), NaN stays NaN. Ten operations, twelve with the caller's
// s - mx' and its product by log2 e, against thirteen for the clamp-free exp_ps (exp_core under exp_normal's mask)
// of s - mx' that it replaced: no two-part ln 2 reduction, one polynomial term fewer.
HN_INLINE __m512 exp2_bf16_ps(__m512 y) {
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(y, shifter), shifter);
  const __m512 r = _mm512_sub_ps(y, n);
  static constexpr float kExp2[] = {1.3302209554240108e-3f, 9.67293232679367e-3f, 5.55061511695385e-2f,
                                    2.4022217094898224e-1f, 6.931470632553101e-1f, 1.0f};
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ), horner(r, kExp2), n);
}

}  // namespace
}  // namespace hadanorm
