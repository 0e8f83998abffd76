// The "avx2" path (int_kernels.h): AVX2 + FMA + F16C, no VNNI. IntMatMul is the panel driver of int_panel.h with
// the micro-kernel of int_avx2_micro.h (vpmaddubsw (4-bit) / int16 vpmaddwd (8-bit) dot products); the quantizer,
// FloatMatMul, the AVX2 build of the portable loops (transform rows, per-weight sums) and the F16C conversions here
// are also the avxvnni path's, and all but the first two the avx512vnni and amx paths'.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (their inline templates must stay baseline code).
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "int_avx2_micro.h"
#include "portable_loops.h"

namespace hadanorm {

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Quantize one token
// ---------------------------------------------------------------------------------------------------------------

void quantize_row_avx2(const float* y, int64_t d, float qmax, bool half_scale, uint8_t* codes, float* scale_out,
                       uint8_t* zp_out) {
  __m256 hi = _mm256_setzero_ps(), lo = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    hi = _mm256_max_ps(v, hi);  // NaN skipped (max returns the second operand), as in the scalar path
    lo = _mm256_min_ps(v, lo);
  }
  alignas(32) float h8[8], l8[8];
  _mm256_store_ps(h8, hi);
  _mm256_store_ps(l8, lo);
  float h = 0.0f, l = 0.0f;
  for (int j = 0; j < 8; ++j) {
    h = h8[j] > h ? h8[j] : h;
    l = l8[j] < l ? l8[j] : l;
  }
  for (; i < d; ++i) {
    h = y[i] > h ? y[i] : h;
    l = y[i] < l ? y[i] : l;
  }
  float scale = (h - l) / qmax;
  scale = scale > FLT_MIN ? scale : FLT_MIN;
  if (half_scale) scale = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  float zp = __builtin_nearbyintf(-(l / scale));
  zp = zp >= 0.0f ? (zp > qmax ? qmax : zp) : 0.0f;
  const __m256 vscale = _mm256_set1_ps(scale), vzp = _mm256_set1_ps(zp), vmax = _mm256_set1_ps(qmax);
  const __m256 zero = _mm256_setzero_ps();
  for (i = 0; i + 8 <= d; i += 8) {
    __m256 v = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(y + i), vscale),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzp);
    v = _mm256_min_ps(_mm256_max_ps(v, zero), vmax);  // NaN -> 0
    const __m256i q = _mm256_cvttps_epi32(v);         // 0..255 per int32 lane
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const __m128i b = _mm_packus_epi16(w, w);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), b);
  }
  for (; i < d; ++i) {
    float v = __builtin_nearbyintf(y[i] / scale) + zp;
    v = v >= 0.0f ? (v > qmax ? qmax : v) : 0.0f;
    codes[i] = static_cast<uint8_t>(v);
  }
  *scale_out = scale;
  *zp_out = static_cast<uint8_t>(zp);
}

// ---------------------------------------------------------------------------------------------------------------
// FloatMatMul: 8 columns per ymm, each k's codes pulled out of the 32-byte half row by shifts
// ---------------------------------------------------------------------------------------------------------------

template <int Bits>
void float_gemm(const FloatGemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const WeightInfo& w = *g.w;
  const int64_t gpb = w.block / (Bits == 4 ? 8 : 4);
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = g.x + m * g.ldx;
    for (int64_t t = t0; t < t1; ++t) {
      for (int h = 0; h < 2; ++h) {
        const int64_t n0 = t * kTile + 8 * h;
        const int64_t count = std::min<int64_t>(8, g.n - n0);
        if (count <= 0) break;
        const uint8_t* b = g.b + t * w.tile_stride + 32 * h;
        __m256 y = _mm256_setzero_ps();
        for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
          const int64_t col = blk * w.n_pad + n0;
          const __m256 zw = w.zw.empty() ? _mm256_set1_ps(static_cast<float>(w.zw_uniform))
                                         : _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zw.data() + col)));
          __m256 acc = _mm256_setzero_ps();
          for (int64_t gi = 0; gi < gpb; ++gi) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (blk * gpb + gi) * 64));
            const float* xk = x + blk * w.block + gi * (Bits == 4 ? 8 : 4);
            if constexpr (Bits == 4) {
#define HN_NIBBLE(shift, kk)                                                                                     \
  acc = _mm256_fmadd_ps(_mm256_set1_ps(xk[kk]),                                                                  \
                        _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), nibble)), zw), \
                        acc);
              HN_NIBBLE(0, 0) HN_NIBBLE(8, 1) HN_NIBBLE(16, 2) HN_NIBBLE(24, 3)
              HN_NIBBLE(4, 4) HN_NIBBLE(12, 5) HN_NIBBLE(20, 6) HN_NIBBLE(28, 7)
#undef HN_NIBBLE
            } else {
#define HN_BYTE(shift, kk)                                                                                        \
  acc = _mm256_fmadd_ps(_mm256_set1_ps(xk[kk]),                                                                   \
                        _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, shift), 24)), zw), \
                        acc);
              HN_BYTE(24, 0) HN_BYTE(16, 1) HN_BYTE(8, 2) HN_BYTE(0, 3)
#undef HN_BYTE
            }
          }
          y = _mm256_fmadd_ps(_mm256_loadu_ps(w.scales.data() + col), acc, y);
        }
        store8(g.y, g.y_half, m * g.n + n0, y, count);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// float16 <-> float32, 8 at a time (vcvtph2ps / vcvtps2ph: bit-identical to half.h's conversions)
// ---------------------------------------------------------------------------------------------------------------

void halves_to_floats_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

void floats_to_halves_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

constexpr int64_t kTaskRows = 48, kTaskTiles = 8;  // rows x column tiles per matmul task

constexpr IsaKernels kAvx2 = {.isa = Isa::kAvx2,
                              .quantize_row = quantize_row_avx2,
                              .int_gemm4 = panel_int_gemm<Avx2Micro<1>, 4>,
                              .int_gemm8 = panel_int_gemm<Avx2Micro<2>, 8>,
                              .float_gemm4 = float_gemm<4>,
                              .float_gemm8 = float_gemm<8>,
                              .fill_weight_info = fill_weight_rows,
                              .expand_two_level = expand_two_level_scalar,
                              .gelu_tanh = gelu_tanh_row,
                              .low_rank_add = low_rank_add_rows,
                              .residual_add = residual_add_row,
                              .transform = portable_transform_kernels<halves_to_floats_f16c>(),
                              .half = {.to_floats = halves_to_floats_f16c, .to_halves = floats_to_halves_f16c},
                              .rows_per_task = kTaskRows,
                              .tiles_per_task = kTaskTiles};

}  // namespace

const IsaKernels* avx2_kernels() { return &kAvx2; }

}  // namespace hadanorm

#pragma GCC pop_options

#endif
