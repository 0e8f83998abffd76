// AVX-512 row kernels of the transform (transform.h, TransformKernels) for the avx512vnni and amx paths, included by
// int_avx512.cc after its target pragma: the centering + scale + fast Walsh-Hadamard transform with the row in
// registers and the token means (the same operations in the same order as the portable loops: bit-identical), and
// the product by a dense h_left and its Paley II factored form (the Paley factor of 1152 = 36 x 32 and
// 4608 = 36 x 128), which use fused multiply-adds and so may differ from the loops (multiply, then add) in the last
// bits. Shapes these do not handle run the avx2 build of the loops.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "int_kernels.h"
#include "transform.h"
#include "util.h"

namespace hadanorm {
namespace {

// AVX-512 h_left product: out = h_left @ v, R output rows x C zmm (16 columns each) accumulated in registers, over b
// in order with fused multiply-adds: out[a, c] = fma(h[a, K-1], v[K-1, c], ... fma(h[a, 0], v[0, c], 0)).
template <int R, int C>
HN_INLINE void left_block512(const float* __restrict v, const float* __restrict left, int64_t k, int64_t m,
                             float* __restrict out, int64_t a0, int64_t c0) {
  __m512 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* lrow = left + a0 * k;
  for (int64_t b = 0; b < k; ++b) {
    __m512 x[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) x[c] = _mm512_loadu_ps(v + b * m + c0 + 16 * c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(lrow[r * k + b]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(s, x[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (a0 + r) * m + c0 + 16 * c, acc[r][c]);
}

template <int C>
void left_columns512(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  constexpr int R = C >= 4 ? 6 : 12;  // 24 accumulators of the 32 zmm registers
  for (int64_t c0 = 0; c0 < m; c0 += 16 * C) {
    int64_t a = 0;
    for (; a + R <= k; a += R) left_block512<R, C>(v, left, k, m, out, a, c0);
    for (; a < k; ++a) left_block512<1, C>(v, left, k, m, out, a, c0);
  }
}

// One in-register butterfly stage: lanes whose bit h is set take partner - self (the b of a butterfly), the others
// partner + self (= self + partner), as one fused multiply-add by sign = -1 / +1: the product by +-1 is exact, so
// fma(self, sign, partner) rounds partner +- self once, the add / sub's bits (a permute and an fma a stage instead of
// a permute, an add and a masked sub).
HN_INLINE __m512 fwht_stage512(__m512 r, __m512i perm, __m512 sign) {
  return _mm512_fmadd_ps(r, sign, _mm512_permutexvar_ps(perm, r));
}

// +1 in the lanes whose bit h is clear, -1 where it is set
HN_INLINE __m512 fwht_sign512(__mmask16 upper) {
  return _mm512_mask_blend_ps(upper, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
}

// AVX-512 centering, scale and the fast Walsh-Hadamard transform of each of the K rows of M = 16 * NV floats, the
// row held in NV registers: the same operations in the same order as center_scale_row + fwht_rows (subtract,
// multiply; butterflies (a + b, a - b) with h = 1, 2, 4, ...), so bit-identical to them (portable_loops.h).
// Affine: x is first replaced by x * x_scale + x_shift (the product rounded, then the sum: affine_row's bits), without
// writing it. Range: *hi = max(*hi, every output), *lo = min(*lo, every output), lane by lane (as quantize_row takes
// its range: max(v, hi), so a NaN output leaves hi as it is).
template <int NV, bool Affine = false, bool Range = false>
void center_scale_fwht512(const float* x, const float* x_scale, const float* x_shift, const float* mean,
                          const float* mul, float* v, int64_t k, __m512* hi = nullptr, __m512* lo = nullptr) {
  constexpr int64_t m = 16 * NV;
  const __m512i p1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  const __m512i p2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
  const __m512i p4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
  const __m512i p8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  const __m512 s1 = fwht_sign512(0xAAAA), s2 = fwht_sign512(0xCCCC), s4 = fwht_sign512(0xF0F0),
               s8 = fwht_sign512(0xFF00);
  // the range in up to 4 independent max / min chains (one chain waits on each max's latency)
  constexpr int kChains = NV < 4 ? NV : 4;
  __m512 h[kChains], l[kChains];
  for (int c = 0; c < kChains; ++c) {
    h[c] = Range ? *hi : _mm512_setzero_ps();
    l[c] = Range ? *lo : _mm512_setzero_ps();
  }
  for (int64_t row = 0; row < k; ++row) {
    __m512 r[NV];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      const int64_t off = row * m + 16 * i;
      __m512 xv = _mm512_loadu_ps(x + off);
      if constexpr (Affine)
        xv = _mm512_add_ps(_mm512_mul_ps(xv, _mm512_loadu_ps(x_scale + off)), _mm512_loadu_ps(x_shift + off));
      if (mean) xv = _mm512_sub_ps(xv, _mm512_loadu_ps(mean + off));
      xv = _mm512_mul_ps(xv, _mm512_loadu_ps(mul + off));
      xv = fwht_stage512(xv, p1, s1);
      xv = fwht_stage512(xv, p2, s2);
      xv = fwht_stage512(xv, p4, s4);
      r[i] = fwht_stage512(xv, p8, s8);
    }
#pragma GCC unroll 8
    for (int hh = 1; hh < NV; hh *= 2)
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i)
        if ((i & hh) == 0) {
          const __m512 a = r[i], b = r[i + hh];
          r[i] = _mm512_add_ps(a, b);
          r[i + hh] = _mm512_sub_ps(a, b);
        }
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      _mm512_storeu_ps(v + row * m + 16 * i, r[i]);
      if constexpr (Range) {
        h[i % kChains] = _mm512_max_ps(r[i], h[i % kChains]);
        l[i % kChains] = _mm512_min_ps(r[i], l[i % kChains]);
      }
    }
  }
  if constexpr (Range) {
    for (int c = 1; c < kChains; ++c) {
      h[0] = _mm512_max_ps(h[c], h[0]);  // never NaN: max(v, h) keeps h when v is NaN
      l[0] = _mm512_min_ps(l[c], l[0]);
    }
    *hi = h[0];
    *lo = l[0];
  }
}

// The AVX-512 column means of 64 channels at a time: 8 zmm of double sums in registers over the tokens (per channel the
// same double additions in the same order as the portable loop: bit-identical). Single thread, 512 tokens x
// 4608: 0.41 -> 0.34 ms (the tokens' 9.4 MB come from L3 either way). The 256 bytes a token are prefetched 16 tokens
// ahead (each token is another 4 KB page at 1152 channels and more, where the hardware prefetchers stop): the whole
// op alone, one thread, 4096 tokens (`python benchmarks/bench_ops_ab.py quantize --tokens 4096`, 15 rounds) 1152 wide
// 5.93 -> 5.53 ms, 4608 wide 43.95 -> 39.41; the 2-block 1024 px call level (722.8 -> 721.1 ms, bench_call_ab.py).
// Affine: over x' = x * scale + shift, 64 channels from scale, shift (the product rounded, then the sum, as affine_row;
// then the same double additions: bit-identical to column_mean_affine_rows).
template <bool Affine>
void column_mean64_of(const float* x, int64_t n, int64_t d, const float* scale, const float* shift, float* mean) {
  __m512d acc[8];
  __m256 s[8], b[8];
  for (int i = 0; i < 8; ++i) {
    acc[i] = _mm512_setzero_pd();
    if constexpr (Affine) {
      s[i] = _mm256_loadu_ps(scale + 8 * i);
      b[i] = _mm256_loadu_ps(shift + 8 * i);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x + t * d;
    if (t + 16 < n)
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(row + 16 * d + 16 * i), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m256 v = _mm256_loadu_ps(row + 8 * i);
      if constexpr (Affine) v = _mm256_add_ps(_mm256_mul_ps(v, s[i]), b[i]);
      acc[i] = _mm512_add_pd(acc[i], _mm512_cvtps_pd(v));
    }
  }
  const __m512d count = _mm512_set1_pd(static_cast<double>(n));
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(mean + 8 * i, _mm512_cvtpd_ps(_mm512_div_pd(acc[i], count)));
}

// The AVX-512 centering + scale + h_right fast transform for row lengths 16..256; the avx2 loops for the others.
void center_scale_fwht_avx512(const float* x, const float* mean, const float* mul, float* v, int64_t k, int64_t m) {
  switch (m) {
    case 16: return center_scale_fwht512<1>(x, nullptr, nullptr, mean, mul, v, k);
    case 32: return center_scale_fwht512<2>(x, nullptr, nullptr, mean, mul, v, k);
    case 64: return center_scale_fwht512<4>(x, nullptr, nullptr, mean, mul, v, k);
    case 128: return center_scale_fwht512<8>(x, nullptr, nullptr, mean, mul, v, k);
    case 256: return center_scale_fwht512<16>(x, nullptr, nullptr, mean, mul, v, k);
    default: return avx2_kernels()->transform.center_scale_fwht(x, mean, mul, v, k, m);
  }
}

// center_scale_fwht512 with its Affine and Range options for row lengths 16..256 (false for the others, doing nothing)
template <bool Affine>
bool center_scale_fwht_range_avx512(const float* x, const float* x_scale, const float* x_shift, const float* mean,
                                    const float* mul, float* v, int64_t k, int64_t m, __m512* hi, __m512* lo) {
  switch (m) {
    case 16: return center_scale_fwht512<1, Affine, true>(x, x_scale, x_shift, mean, mul, v, k, hi, lo), true;
    case 32: return center_scale_fwht512<2, Affine, true>(x, x_scale, x_shift, mean, mul, v, k, hi, lo), true;
    case 64: return center_scale_fwht512<4, Affine, true>(x, x_scale, x_shift, mean, mul, v, k, hi, lo), true;
    case 128: return center_scale_fwht512<8, Affine, true>(x, x_scale, x_shift, mean, mul, v, k, hi, lo), true;
    case 256: return center_scale_fwht512<16, Affine, true>(x, x_scale, x_shift, mean, mul, v, k, hi, lo), true;
    default: return false;
  }
}

// The AVX-512 h_left product for widths M that are a multiple of 16; the avx2 loops for the others.
void dense_left_avx512(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  // 64 columns x 6 rows per block: measured 1.8x faster than 128 x 3 at M = 128 (single thread, 512 tokens x 4608:
  // 2.2 -> 1.24 ms; 32 x 12: 1.35, 16 x 12: 1.49), the x loads shared by twice the rows
  if (m % 64 == 0)
    left_columns512<4>(v, left, k, m, out);
  else if (m % 32 == 0)
    left_columns512<2>(v, left, k, m, out);
  else if (m % 16 == 0)
    left_columns512<1>(v, left, k, m, out);
  else
    avx2_kernels()->transform.dense_left(v, left, k, m, out);
}

// The Paley II h_left product (transform.h) of one chunk of 16 C columns, R output row pairs: out_2i = g_i w_i +
// sum_j a_ij u_j, out_2i+1 = -g_i u_i + sum_j a_ij w_j (a_ii = 0), over j in order with fused multiply-adds; u and w
// hold the chunk's columns (row stride 16 C), out the whole rows (stride m) from column c0. Non-finite inputs: the
// zero a_ii times an infinite u_i gives NaN where the dense product gives +-inf (such a token has no finite
// quantization either way).
template <int R, int C>
HN_INLINE void paley2_block512(const float* __restrict u, const float* __restrict w, const float* __restrict a,
                               const float* __restrict g, int64_t half, int64_t m, float* __restrict out, int64_t i0,
                               int64_t c0) {
  constexpr int64_t ld = 16 * C;
  __m512 even[R][C], odd[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 gi = _mm512_set1_ps(g[i0 + r]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      even[r][c] = _mm512_mul_ps(gi, _mm512_load_ps(w + (i0 + r) * ld + 16 * c));
      const __m512i ui = _mm512_castps_si512(_mm512_load_ps(u + (i0 + r) * ld + 16 * c));  // -u: AVX-512F only
      odd[r][c] = _mm512_mul_ps(gi, _mm512_castsi512_ps(_mm512_xor_si512(ui, _mm512_set1_epi32(INT32_MIN))));
    }
  }
  const float* arow = a + i0 * half;
  for (int64_t j = 0; j < half; ++j) {
    __m512 xu[C], xw[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      xu[c] = _mm512_load_ps(u + j * ld + 16 * c);
      xw[c] = _mm512_load_ps(w + j * ld + 16 * c);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(arow[r * half + j]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        even[r][c] = _mm512_fmadd_ps(s, xu[c], even[r][c]);
        odd[r][c] = _mm512_fmadd_ps(s, xw[c], odd[r][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(out + 2 * (i0 + r) * m + c0 + 16 * c, even[r][c]);
      _mm512_storeu_ps(out + (2 * (i0 + r) + 1) * m + c0 + 16 * c, odd[r][c]);
    }
}

// Chunk by chunk of 16 C columns: u, w of the chunk (K x 16 C floats of `uw`, 64-byte aligned), then its products.
template <int C>
void paley2_columns512(const float* v, const float* a, const float* g, int64_t half, int64_t m, float* uw,
                       float* out) {
  constexpr int R = C >= 2 ? 6 : 12;  // 2 R C accumulators + 2 C loads of the 32 zmm registers
  constexpr int64_t ld = 16 * C;
  float* u = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(uw) + 63) & ~uintptr_t{63});
  float* w = u + half * ld;
  for (int64_t c0 = 0; c0 < m; c0 += ld) {
    for (int64_t j = 0; j < half; ++j)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512 top = _mm512_loadu_ps(v + 2 * j * m + c0 + 16 * c);
        const __m512 bottom = _mm512_loadu_ps(v + (2 * j + 1) * m + c0 + 16 * c);
        _mm512_store_ps(u + j * ld + 16 * c, _mm512_add_ps(top, bottom));
        _mm512_store_ps(w + j * ld + 16 * c, _mm512_sub_ps(top, bottom));
      }
    int64_t i = 0;
    for (; i + R <= half; i += R) paley2_block512<R, C>(u, w, a, g, half, m, out, i, c0);
    for (; i < half; ++i) paley2_block512<1, C>(u, w, a, g, half, m, out, i, c0);
  }
}

// The AVX-512 Paley II h_left product for widths M that are a multiple of 16 (uw: scratch of K x M + 16 floats, at
// least K x 16 C + 16); the dense product of `left` for the others. One thread, 256 tokens, the whole transform
// (centering, scale, h_right's butterflies, h_left; benchmarks/transform_harness.cc): 1152 (K 36, M 32) 0.20 -> 0.14
// ms, 4608 (M 128) 0.85 -> 0.70 ms (h_left alone 0.14 -> 0.075 and 0.56 -> 0.41 ms).
void paley2_left_avx512(const float* v, const float* left, const float* a, const float* g, int64_t k, int64_t m,
                        float* uw, float* out) {
  if (m % 16 != 0) return dense_left_avx512(v, left, k, m, out);
  if (m % 32 == 0)
    paley2_columns512<2>(v, a, g, k / 2, m, uw, out);
  else
    paley2_columns512<1>(v, a, g, k / 2, m, uw, out);
}

// Column means (of x' = x * scale + shift when Affine): 64 channels at a time in AVX-512, the rest with the avx2 loops.
template <bool Affine>
void column_mean_of_avx512(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, const float* scale,
                           const float* shift, float* mean) {
  if (n > 0) {
    for (; c0 + 64 <= c1; c0 += 64)
      column_mean64_of<Affine>(x + c0, n, d, Affine ? scale + c0 : nullptr, Affine ? shift + c0 : nullptr, mean + c0);
    if (c0 == c1) return;
  }
  if constexpr (Affine)
    avx2_kernels()->transform.column_mean_affine(x, n, d, c0, c1, scale, shift, mean);
  else
    avx2_kernels()->transform.column_mean(x, n, d, c0, c1, mean);
}

void column_mean_avx512(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
  column_mean_of_avx512<false>(x, n, d, c0, c1, nullptr, nullptr, mean);
}

void column_mean_affine_avx512(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, const float* scale,
                               const float* shift, float* mean) {
  column_mean_of_avx512<true>(x, n, d, c0, c1, scale, shift, mean);
}

}  // namespace
}  // namespace hadanorm
