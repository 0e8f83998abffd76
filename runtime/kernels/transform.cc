// The online transform of one token (see transform.h): contiguous float loops the compiler vectorises, and AVX-512
// code chosen by CPU (HADANORM_TRANSFORM_GENERIC=1 forces the portable loops: the test of the two against each
// other) for the centering + scale + fast Walsh-Hadamard transform and the token means (bit-identical to the loops)
// and for the product by a dense h_left (the Paley factor of 1152 = 36 x 32 and 4608 = 36 x 128), which uses fused
// multiply-adds and so may differ from the portable loops (multiply, then add) in the last bit.

#include "transform.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)
#include <immintrin.h>
#endif

#include "half.h"
#include "util.h"

namespace hadanorm {

// ---------------------------------------------------------------------------------------------------------------
// The rotation plan: which fast paths h_left and h_right allow
// ---------------------------------------------------------------------------------------------------------------


bool is_identity(const float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (h[i * n + j] != (i == j ? 1.0f : 0.0f)) return false;
  return true;
}

// Exactly c * H_M with H_M = H_2 (x) ... (x) H_2, H_2 = [[1, 1], [1, -1]]: entry (i, j) is c * (-1)^popcount(i & j).
bool sylvester_scale(const float* h, int64_t m, float* scale) {
  if (m < 1 || (m & (m - 1)) != 0) return false;
  const float c = h[0];
  if (!(c != 0.0f) || !std::isfinite(c)) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const float expected = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -c : c;
      if (h[i * m + j] != expected) return false;
    }
  *scale = c;
  return true;
}

Rotation make_rotation(const float* h_left, const std::vector<int64_t>& left_shape, const float* h_right,
                       const std::vector<int64_t>& right_shape, int64_t d) {
  if (left_shape.size() != 2 || left_shape[0] != left_shape[1])
    fail("h_left must be a square matrix [K, K], got ", shape_string(left_shape));
  if (right_shape.size() != 2 || right_shape[0] != right_shape[1])
    fail("h_right must be a square matrix [M, M], got ", shape_string(right_shape));
  Rotation r;
  r.K = left_shape[0];
  r.M = right_shape[0];
  if (r.K * r.M != d)
    fail("h_left ", shape_string(left_shape), " and h_right ", shape_string(right_shape),
         " do not factor the channel width ", d, " (K * M must equal d)");
  r.left_identity = is_identity(h_left, r.K);
  if (!r.left_identity) {
    r.left_fwht = sylvester_scale(h_left, r.K, &r.left_scale);
    if (!r.left_fwht) r.left.assign(h_left, h_left + r.K * r.K);
  }
  r.right_fwht = sylvester_scale(h_right, r.M, &r.right_scale);
  if (!r.right_fwht) {
    r.right_t.resize(static_cast<size_t>(r.M * r.M));
    for (int64_t i = 0; i < r.M; ++i)
      for (int64_t j = 0; j < r.M; ++j) r.right_t[j * r.M + i] = h_right[i * r.M + j];
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Row kernels (contiguous float loops the compiler vectorises)
// ---------------------------------------------------------------------------------------------------------------

// out = (x - mean) * mul (mean may be null)
HN_HOT void center_scale_row(const float* x, const float* mean, const float* mul, float* out, int64_t d) {
  if (mean) {
    for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - mean[i]) * mul[i];
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = x[i] * mul[i];
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define HN_VECTOR_EXT 1
#pragma GCC diagnostic ignored "-Wpsabi"  // v8 never crosses a non-inlined call
// 8 floats as one GCC vector (portable vector extension: AVX in the x86-64-v3 clone, SSE pairs otherwise)
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
HN_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HN_INLINE void store8(float* p, const v8& v) { std::memcpy(p, &v, sizeof v); }
#endif

// One butterfly stage of distance h >= 1 on a row of length m: (a, b) -> (a + b, a - b).
HN_INLINE void butterfly_stage(float* row, int64_t m, int64_t h) {
  for (int64_t i = 0; i < m; i += 2 * h) {
    float* a = row + i;
    float* b = row + i + h;
    for (int64_t j = 0; j < h; ++j) {
      const float u = a[j], w = b[j];
      a[j] = u + w;
      b[j] = u - w;
    }
  }
}

// Unnormalised in-place Walsh-Hadamard transform of each of the `rows` rows of length m (power of two), i.e.
// row <- Sylvester(m) @ row. The stages of distance 1, 2, 4 (too short to vectorise as loops) run as one
// 8-point transform in a vector register (shuffle + multiply-add per stage); the others as contiguous loops.
HN_HOT void fwht_rows(float* v, int64_t rows, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * m;
    int64_t h = 1;
#ifdef HN_VECTOR_EXT
    if (m >= 8) {
      const v8i p1 = {1, 0, 3, 2, 5, 4, 7, 6}, p2 = {2, 3, 0, 1, 6, 7, 4, 5}, p4 = {4, 5, 6, 7, 0, 1, 2, 3};
      const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
      const v8 s4 = {1, 1, 1, 1, -1, -1, -1, -1};
      for (int64_t i = 0; i < m; i += 8) {
        v8 x = load8(row + i);
        x = __builtin_shuffle(x, p1) + s1 * x;  // out[i] = x[i ^ 1] +- x[i]: (a + b, a - b) per pair
        x = __builtin_shuffle(x, p2) + s2 * x;
        x = __builtin_shuffle(x, p4) + s4 * x;
        store8(row + i, x);
      }
      h = 8;
    }
#endif
    for (; h < m; h *= 2) butterfly_stage(row, m, h);
  }
}

// out = scale * Sylvester(K) @ v for v [K, M] (K a power of two): butterflies (a + b, a - b) between rows i and i + h,
// h = 1, 2, 4, ..., in place on v, then the scale.
HN_HOT void fwht_across_rows(float* v, int64_t k, int64_t m, float scale, float* out) {
  for (int64_t h = 1; h < k; h *= 2)
    for (int64_t i = 0; i < k; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        float* a = v + j * m;
        float* b = v + (j + h) * m;
        for (int64_t c = 0; c < m; ++c) {
          const float u = a[c], w = b[c];
          a[c] = u + w;
          b[c] = u - w;
        }
      }
  for (int64_t i = 0; i < k * m; ++i) out[i] = v[i] * scale;
}

// out[k, :] = v[k, :] @ h_right^T for each of the K rows (tmp: M floats)
HN_HOT void dense_right_rows(float* v, int64_t rows, int64_t m, const float* right_t, float* tmp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * m;
    std::fill(tmp, tmp + m, 0.0f);
    for (int64_t j = 0; j < m; ++j) {
      const float s = row[j];
      const float* hrow = right_t + j * m;
      for (int64_t i = 0; i < m; ++i) tmp[i] += s * hrow[i];
    }
    std::copy(tmp, tmp + m, row);
  }
}

// out = h_left @ v for v, out [K, M] row-major: blocks of R output rows x C columns accumulated in registers.
template <int R, int C>
HN_INLINE void left_block(const float* __restrict v, const float* __restrict left, int64_t k, int64_t m,
                          float* __restrict out, int64_t a0, int64_t c0) {
#ifdef HN_VECTOR_EXT
  if constexpr (C % 8 == 0) {
    constexpr int V = C / 8;
    v8 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < V; ++c) acc[r][c] = v8{};
    for (int64_t b = 0; b < k; ++b) {
      v8 x[V];
      for (int c = 0; c < V; ++c) x[c] = load8(v + b * m + c0 + 8 * c);
      for (int r = 0; r < R; ++r) {
        const float s = left[(a0 + r) * k + b];
        for (int c = 0; c < V; ++c) acc[r][c] += s * x[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < V; ++c) store8(out + (a0 + r) * m + c0 + 8 * c, acc[r][c]);
    return;
  }
#endif
  float acc[R][C] = {};
  for (int64_t b = 0; b < k; ++b) {
    const float* x = v + b * m + c0;
    for (int r = 0; r < R; ++r) {
      const float s = left[(a0 + r) * k + b];
      for (int c = 0; c < C; ++c) acc[r][c] += s * x[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[(a0 + r) * m + c0 + c] = acc[r][c];
}

template <int C>
HN_INLINE void left_columns(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  for (int64_t c0 = 0; c0 < m; c0 += C) {
    int64_t a = 0;
    for (; a + 4 <= k; a += 4) left_block<4, C>(v, left, k, m, out, a, c0);
    for (; a < k; ++a) left_block<1, C>(v, left, k, m, out, a, c0);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)
#define HN_LEFT_AVX512 1
// AVX-512 h_left product: out = h_left @ v, R output rows x C zmm (16 columns each) accumulated in registers, over b
// in order with fused multiply-adds: out[a, c] = fma(h[a, K-1], v[K-1, c], ... fma(h[a, 0], v[0, c], 0)).
template <int R, int C>
__attribute__((target("avx512f"), always_inline)) inline void left_block512(const float* __restrict v,
                                                                           const float* __restrict left, int64_t k,
                                                                           int64_t m, float* __restrict out,
                                                                           int64_t a0, int64_t c0) {
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
__attribute__((target("avx512f"))) void left_columns512(const float* v, const float* left, int64_t k, int64_t m,
                                                        float* out) {
  constexpr int R = C >= 4 ? 6 : 12;  // 24 accumulators of the 32 zmm registers
  for (int64_t c0 = 0; c0 < m; c0 += 16 * C) {
    int64_t a = 0;
    for (; a + R <= k; a += R) left_block512<R, C>(v, left, k, m, out, a, c0);
    for (; a < k; ++a) left_block512<1, C>(v, left, k, m, out, a, c0);
  }
}

// One in-register butterfly stage: lanes whose bit h is set take partner - self (the b of a butterfly), the others
// partner + self (= self + partner).
__attribute__((target("avx512f"), always_inline)) inline __m512 fwht_stage512(__m512 r, __m512i perm,
                                                                             __mmask16 upper) {
  const __m512 partner = _mm512_permutexvar_ps(perm, r);
  return _mm512_mask_sub_ps(_mm512_add_ps(partner, r), upper, partner, r);
}

// AVX-512 centering, scale and the fast Walsh-Hadamard transform of each of the K rows of M = 16 * NV floats, the
// row held in NV registers: the same operations in the same order as center_scale_row + fwht_rows (subtract,
// multiply; butterflies (a + b, a - b) with h = 1, 2, 4, ...), so bit-identical to them.
template <int NV>
__attribute__((target("avx512f"))) void center_scale_fwht512(const float* x, const float* mean, const float* mul,
                                                             float* v, int64_t k) {
  constexpr int64_t m = 16 * NV;
  const __m512i p1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  const __m512i p2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
  const __m512i p4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
  const __m512i p8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  for (int64_t row = 0; row < k; ++row) {
    __m512 r[NV];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      const int64_t off = row * m + 16 * i;
      __m512 xv = _mm512_loadu_ps(x + off);
      if (mean) xv = _mm512_sub_ps(xv, _mm512_loadu_ps(mean + off));
      xv = _mm512_mul_ps(xv, _mm512_loadu_ps(mul + off));
      xv = fwht_stage512(xv, p1, 0xAAAA);
      xv = fwht_stage512(xv, p2, 0xCCCC);
      xv = fwht_stage512(xv, p4, 0xF0F0);
      r[i] = fwht_stage512(xv, p8, 0xFF00);
    }
#pragma GCC unroll 8
    for (int h = 1; h < NV; h *= 2)
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i)
        if ((i & h) == 0) {
          const __m512 a = r[i], b = r[i + h];
          r[i] = _mm512_add_ps(a, b);
          r[i + h] = _mm512_sub_ps(a, b);
        }
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(v + row * m + 16 * i, r[i]);
  }
}

// The AVX-512 centering + scale + h_right fast transform for row lengths it handles; false otherwise.
bool center_scale_fwht_avx512(const float* x, const float* mean, const float* mul, float* v, int64_t k, int64_t m) {
  switch (m) {
    case 16: center_scale_fwht512<1>(x, mean, mul, v, k); return true;
    case 32: center_scale_fwht512<2>(x, mean, mul, v, k); return true;
    case 64: center_scale_fwht512<4>(x, mean, mul, v, k); return true;
    case 128: center_scale_fwht512<8>(x, mean, mul, v, k); return true;
    case 256: center_scale_fwht512<16>(x, mean, mul, v, k); return true;
    default: return false;
  }
}

// The AVX-512 product for widths it handles (M a multiple of 16); false otherwise.
bool dense_left_avx512(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  if (m % 16) return false;
  // 64 columns x 6 rows per block: measured 1.8x faster than 128 x 3 at M = 128 (single thread, 512 tokens x 4608:
  // 2.2 -> 1.24 ms; 32 x 12: 1.35, 16 x 12: 1.49), the x loads shared by twice the rows
  if (m % 64 == 0)
    left_columns512<4>(v, left, k, m, out);
  else if (m % 32 == 0)
    left_columns512<2>(v, left, k, m, out);
  else
    left_columns512<1>(v, left, k, m, out);
  return true;
}
#endif

bool use_avx512_transform() {
#ifdef HN_LEFT_AVX512
  static const bool use = [] {
    const char* generic = std::getenv("HADANORM_TRANSFORM_GENERIC");
    return __builtin_cpu_supports("avx512f") && !(generic && *generic && std::strcmp(generic, "0") != 0);
  }();
  return use;
#else
  return false;
#endif
}

HN_HOT void dense_left_generic(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  // 4 rows x 16 columns: 8 vector accumulators + 2 loads fit the 16 AVX registers (measured best of 2..12 x 8..32)
  if (m % 16 == 0)
    left_columns<16>(v, left, k, m, out);
  else if (m % 8 == 0)
    left_columns<8>(v, left, k, m, out);
  else if (m % 4 == 0)
    left_columns<4>(v, left, k, m, out);
  else if (m % 2 == 0)
    left_columns<2>(v, left, k, m, out);
  else
    left_columns<1>(v, left, k, m, out);
}

Scratch::Scratch(const Rotation* rot, int64_t d) {
  if (rot) {
    if (!rot->left_identity) block.resize(static_cast<size_t>(d));
    if (!rot->right_fwht) tmp.resize(static_cast<size_t>(rot->M));
  }
}

// One token: out = rotate((x - mean) * mul) (rot may be null: no rotation). `mul_rot` is mul with the Sylvester
// scale folded in (used when rotating with the fast transform).
void transform_row(const float* x, const float* mean, const float* mul, const float* mul_rot, const Rotation* rot,
                   float* out, Scratch& scratch, int64_t d) {
  if (!rot) {
    center_scale_row(x, mean, mul, out, d);
    return;
  }
  float* v = rot->left_identity ? out : scratch.block.data();
  bool done = false;
#ifdef HN_LEFT_AVX512
  if (rot->right_fwht && use_avx512_transform()) done = center_scale_fwht_avx512(x, mean, mul_rot, v, rot->K, rot->M);
#endif
  if (!done) {
    center_scale_row(x, mean, rot->right_fwht ? mul_rot : mul, v, d);
    if (rot->right_fwht)
      fwht_rows(v, rot->K, rot->M);
    else
      dense_right_rows(v, rot->K, rot->M, rot->right_t.data(), scratch.tmp.data());
  }
  if (rot->left_fwht) {
    fwht_across_rows(v, rot->K, rot->M, rot->left_scale, out);
    return;
  }
  if (!rot->left_identity) {
#ifdef HN_LEFT_AVX512
    if (use_avx512_transform() && dense_left_avx512(v, rot->left.data(), rot->K, rot->M, out)) return;
#endif
    dense_left_generic(v, rot->left.data(), rot->K, rot->M, out);
  }
}

#ifdef HN_LEFT_AVX512
// The AVX-512 column means of 64 channels at a time: 8 zmm of double sums in registers over the tokens (per channel the
// same double additions in the same order as the portable loop below: bit-identical). Single thread, 512 tokens x
// 4608: 0.41 -> 0.34 ms (the tokens' 9.4 MB come from L3 either way).
__attribute__((target("avx512f"))) void column_mean64_avx512(const float* x, int64_t n, int64_t d, float* mean) {
  __m512d acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_pd();
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x + t * d;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_add_pd(acc[i], _mm512_cvtps_pd(_mm256_loadu_ps(row + 8 * i)));
  }
  const __m512d count = _mm512_set1_pd(static_cast<double>(n));
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(mean + 8 * i, _mm512_cvtpd_ps(_mm512_div_pd(acc[i], count)));
}
#endif

// Column sums over tokens of one channel block, accumulated in double.
HN_HOT void column_mean(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
#ifdef HN_LEFT_AVX512
  if (use_avx512_transform() && n > 0) {
    for (; c0 + 64 <= c1; c0 += 64) column_mean64_avx512(x + c0, n, d, mean + c0);
    if (c0 == c1) return;
  }
#endif
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - b0);
    std::fill(acc, acc + w, 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d + b0;
      for (int64_t i = 0; i < w; ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < w; ++i) mean[b0 + i] = static_cast<float>(acc[i] / static_cast<double>(n));
  }
}


HN_HOT void column_mean_half(const uint16_t* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  float row[kBlock];
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - b0);
    std::fill(acc, acc + w, 0.0);
    for (int64_t t = 0; t < n; ++t) {
      halves_to_floats(x + t * d + b0, row, w);
      for (int64_t i = 0; i < w; ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < w; ++i) mean[b0 + i] = static_cast<float>(acc[i] / static_cast<double>(n));
  }
}
}  // namespace hadanorm
