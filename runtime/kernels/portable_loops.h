// The loops the compiler vectorises (the online transform's row kernels, the per-weight sums of the matmuls), written
// once and compiled by one source per instruction-set path, under that path's `#pragma GCC target`: int_scalar.cc
// (baseline: the scalar path, neondot on aarch64) and int_avx2.cc (AVX2 + FMA + F16C: avx2, avxvnni, and what the
// avx512vnni and amx paths do not replace). Everything here has internal linkage, one copy per including source.
//
// -ffp-contract=off (build.py) keeps every multiply and add separate and the compiler does not reassociate them, so
// every build computes the same floats in the same order: bit-identical (tests/test_kernel_dispatch.py). A source
// including this must include the standard headers below before its target pragma (their templates stay baseline).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gelu_tanh.h"
#include "half.h"
#include "int_kernels.h"
#include "transform.h"
#include "util.h"

namespace hadanorm {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Transform rows
// ---------------------------------------------------------------------------------------------------------------

// out = (x - mean) * mul (mean may be null)
void affine_row(const float* x, const float* scale, const float* shift, float* out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const float p = x[i] * scale[i];
    out[i] = p + shift[i];
  }
}

void center_scale_row(const float* x, const float* mean, const float* mul, float* out, int64_t d) {
  if (mean) {
    for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - mean[i]) * mul[i];
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = x[i] * mul[i];
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define HN_VECTOR_EXT 1
#pragma GCC diagnostic ignored "-Wpsabi"  // v8 never crosses a non-inlined call
// 8 floats as one GCC vector (portable vector extension: one AVX register in the AVX2 build, two SSE ones else)
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
HN_INLINE v8 load_v8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HN_INLINE void store_v8(float* p, const v8& v) { std::memcpy(p, &v, sizeof v); }
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
void fwht_rows(float* v, int64_t rows, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * m;
    int64_t h = 1;
#ifdef HN_VECTOR_EXT
    if (m >= 8) {
      const v8i p1 = {1, 0, 3, 2, 5, 4, 7, 6}, p2 = {2, 3, 0, 1, 6, 7, 4, 5}, p4 = {4, 5, 6, 7, 0, 1, 2, 3};
      const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
      const v8 s4 = {1, 1, 1, 1, -1, -1, -1, -1};
      for (int64_t i = 0; i < m; i += 8) {
        v8 x = load_v8(row + i);
        x = __builtin_shuffle(x, p1) + s1 * x;  // out[i] = x[i ^ 1] +- x[i]: (a + b, a - b) per pair
        x = __builtin_shuffle(x, p2) + s2 * x;
        x = __builtin_shuffle(x, p4) + s4 * x;
        store_v8(row + i, x);
      }
      h = 8;
    }
#endif
    for (; h < m; h *= 2) butterfly_stage(row, m, h);
  }
}

// v = Sylvester(M) @ ((x - mean) * mul) for each of the K rows of M floats
void center_scale_fwht_rows(const float* x, const float* mean, const float* mul, float* v, int64_t k, int64_t m) {
  center_scale_row(x, mean, mul, v, k * m);
  fwht_rows(v, k, m);
}

// out = scale * Sylvester(K) @ v for v [K, M] (K a power of two): butterflies (a + b, a - b) between rows i and i + h,
// h = 1, 2, 4, ..., in place on v, then the scale.
void fwht_across_rows(float* v, int64_t k, int64_t m, float scale, float* out) {
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
void dense_right_rows(float* v, int64_t rows, int64_t m, const float* right_t, float* tmp) {
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
      for (int c = 0; c < V; ++c) x[c] = load_v8(v + b * m + c0 + 8 * c);
      for (int r = 0; r < R; ++r) {
        const float s = left[(a0 + r) * k + b];
        for (int c = 0; c < V; ++c) acc[r][c] += s * x[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < V; ++c) store_v8(out + (a0 + r) * m + c0 + 8 * c, acc[r][c]);
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

void dense_left_rows(const float* v, const float* left, int64_t k, int64_t m, float* out) {
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

// mean[c] for c in [c0, c1): column sums over the n tokens, accumulated in double.
// Affine: over x' = x * scale + shift (the product rounded, then the sum: affine_row's values), scale and shift indexed
// by channel.
template <bool Affine>
void column_mean_of(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, const float* scale,
                    const float* shift, float* mean) {
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - b0);
    std::fill(acc, acc + w, 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d + b0;
      for (int64_t i = 0; i < w; ++i) {
        float v = row[i];
        if constexpr (Affine) {
          const float p = v * scale[b0 + i];
          v = p + shift[b0 + i];
        }
        acc[i] += static_cast<double>(v);
      }
    }
    for (int64_t i = 0; i < w; ++i) mean[b0 + i] = static_cast<float>(acc[i] / static_cast<double>(n));
  }
}

void column_mean_rows(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
  column_mean_of<false>(x, n, d, c0, c1, nullptr, nullptr, mean);
}

void column_mean_affine_rows(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, const float* scale,
                             const float* shift, float* mean) {
  column_mean_of<true>(x, n, d, c0, c1, scale, shift, mean);
}

// The same for float16 input, converted with this path's ToFloats.
template <HalvesToFloatsFn ToFloats>
void column_mean_half_rows(const uint16_t* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  float row[kBlock];
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - b0);
    std::fill(acc, acc + w, 0.0);
    for (int64_t t = 0; t < n; ++t) {
      ToFloats(x + t * d + b0, row, w);
      for (int64_t i = 0; i < w; ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < w; ++i) mean[b0 + i] = static_cast<float>(acc[i] / static_cast<double>(n));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-weight sums of the matmuls (int_kernels.h, FillWeightFn)
// ---------------------------------------------------------------------------------------------------------------

void fill_weight_rows(WeightInfo& w, const uint8_t* b, const float* scales, const void* zero_points) {
  const size_t size = static_cast<size_t>(w.k_blocks * w.n_pad);
  w.scales.assign(size, 0.0f);
  w.zw.assign(size, 0);
  w.sv.assign(size, 0);
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    for (int64_t n = 0; n < w.n; ++n) {
      const int64_t i = blk * w.n + n;
      w.scales[blk * w.n_pad + n] = scales[i];
      w.zw[blk * w.n_pad + n] = w.bits == 4 ? static_cast<const uint8_t*>(zero_points)[i]
                                            : static_cast<const int8_t*>(zero_points)[i];
    }
  }
  const int64_t groups_per_block = w.block / (w.bits == 4 ? 8 : 4);
  for (int64_t t = 0; t < w.tiles; ++t) {
    for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
      int32_t su[kTile] = {};
      const uint8_t* rows = b + t * w.tile_stride + blk * groups_per_block * 64;
      for (int64_t g = 0; g < groups_per_block; ++g) {
        const uint8_t* row = rows + g * 64;
        for (int c = 0; c < kTile; ++c) {
          int32_t s = 0;
          for (int j = 0; j < 4; ++j) {
            const uint8_t v = row[4 * c + j];
            s += w.bits == 4 ? (v & 0x0F) + (v >> 4) : static_cast<int8_t>(v);
          }
          su[c] += s;
        }
      }
      for (int c = 0; c < kTile; ++c) {
        const int64_t i = blk * w.n_pad + t * kTile + c;
        w.sv[i] = su[c] - w.zw[i] * static_cast<int32_t>(w.block);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The matmul epilogue's activation
// ---------------------------------------------------------------------------------------------------------------

// gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (ONNX Gelu, approximate="tanh"), in place on n floats,
// with only IEEE-exact operations (+, *, fma, compares, integer bit arithmetic) so that every build and the AVX-512
// version (gelu_avx512.h) give the same bits:
//   u = x * fma(c1, x * x, c0), c0 = sqrt(2/pi), c1 = c0 * 0.044715; u clamped to [-k, k], k = 7.90531110763549805
//   tanh(u) = u p(u^2) / q(u^2): Eigen's rational approximation (float, odd degree 13 over even degree 6), Horner
//   with fmas; 1 / q by three Newton steps r = fma(r, fma(-q, r, 1), r) from the bit-pattern estimate
//   0x7EF311C3 - bits(q) (q in [0.0049, 0.91]: positive and normal; relative error 12% -> 1.4e-2 -> 2e-4 -> 4e-8)
//   t = +-1 where u was clamped; y = fma(h, t, h), h = 0.5 x
// Within a few ulp of tanh's; measured against onnxruntime's Gelu in tests/test_matmul_activation.py.
HN_INLINE float gelu_tanh_value(float x) {
  using G = GeluTanh;
  float u = x * __builtin_fmaf(G::c1, x * x, G::c0);
  u = u < G::clamp ? u : G::clamp;    // minps / maxps semantics (the second operand when either is NaN)
  u = u > -G::clamp ? u : -G::clamp;
  const float u2 = u * u;
  float p = __builtin_fmaf(u2, G::a13, G::a11);
  p = __builtin_fmaf(u2, p, G::a9);
  p = __builtin_fmaf(u2, p, G::a7);
  p = __builtin_fmaf(u2, p, G::a5);
  p = __builtin_fmaf(u2, p, G::a3);
  p = __builtin_fmaf(u2, p, G::a1);
  p = u * p;
  float q = __builtin_fmaf(u2, G::b6, G::b4);
  q = __builtin_fmaf(u2, q, G::b2);
  q = __builtin_fmaf(u2, q, G::b0);
  uint32_t qb;
  std::memcpy(&qb, &q, 4);
  qb = G::magic - qb;
  float r;
  std::memcpy(&r, &qb, 4);
  r = __builtin_fmaf(r, __builtin_fmaf(-q, r, 1.0f), r);
  r = __builtin_fmaf(r, __builtin_fmaf(-q, r, 1.0f), r);
  r = __builtin_fmaf(r, __builtin_fmaf(-q, r, 1.0f), r);
  float t = p * r;
  t = u == G::clamp ? 1.0f : (u == -G::clamp ? -1.0f : t);  // +-1 exactly where u was clamped (p * r is 2.4e-7 off)
  const float h = 0.5f * x;
  return __builtin_fmaf(h, t, h);
}

void gelu_tanh_row(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh_value(y[i]);
}

// The low-rank epilogue of IntMatMul{4,8}LowRank (int_kernels.h, LowRankAddFn); gelu_avx512.h has the AVX-512
// version (register blocked, the same bits).
void low_rank_add_rows(float* y, int64_t ldy, const float* t, int64_t ldt, int64_t rows, const float* right, int64_t r,
                       int64_t ldr, int64_t n) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < n; ++c) {
      float s = 0.0f;
      for (int64_t j = 0; j < r; ++j) s = __builtin_fmaf(t[i * ldt + j], right[j * ldr + c], s);
      y[i * ldy + c] = y[i * ldy + c] + s;
    }
}

// The residual epilogue of IntMatMul{4,8}[LowRank][Gated]Residual (int_kernels.h, ResidualAddFn): y = residual + y,
// or residual + gate * y (the product rounded, then the sum: the graph's Mul, then its Add).
void residual_add_row(float* y, const float* residual, const float* gate, int64_t n) {
  if (gate) {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i] * y[i];
      y[i] = residual[i] + g;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = residual[i] + y[i];
  }
}

// This source's build of the transform's row kernels; column_mean_half converts with ToFloats (the path's
// HalfKernels::to_floats).
template <HalvesToFloatsFn ToFloats>
constexpr TransformKernels portable_transform_kernels() {
  return {.center_scale_fwht = center_scale_fwht_rows,
          .dense_left = dense_left_rows,
          .column_mean = column_mean_rows,
          .column_mean_half = column_mean_half_rows<ToFloats>,
          .column_mean_affine = column_mean_affine_rows,
          .affine = affine_row,
          .center_scale = center_scale_row,
          .dense_right = dense_right_rows,
          .fwht_across_rows = fwht_across_rows};
}

}  // namespace
}  // namespace hadanorm
