// The "avx2" path of the integer kernels (int_kernels.h): AVX2 + FMA + F16C, no VNNI. IntMatMul is the panel
// scheme of int_avx2_panel.h with vpmaddubsw (4-bit) / int16 vpmaddwd (8-bit) dot products; the quantizer and
// FloatMatMul here are shared with the "avxvnni" path (int_avxvnni.cc).

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cfloat>

#include "int_avx2_ops.h"
#include "int_avx2_panel.h"

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
          const __m256 zw = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zw.data() + col)));
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

const IsaKernels kAvx2 = {Isa::kAvx2, quantize_row_avx2, int_gemm<4, 1>, int_gemm<8, 2>, float_gemm<4>,
                          float_gemm<8>, 48, 8};

}  // namespace

const IsaKernels* avx2_kernels() { return &kAvx2; }

// for the avxvnni path (int_avxvnni.cc): the same quantizer and FloatMatMul
QuantizeRowFn avx2_quantize_row() { return quantize_row_avx2; }
FloatGemmFn avx2_float_gemm4() { return float_gemm<4>; }
FloatGemmFn avx2_float_gemm8() { return float_gemm<8>; }

}  // namespace hadanorm

#pragma GCC pop_options

#endif
