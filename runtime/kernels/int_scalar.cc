// The scalar reference path (int_kernels.h): the definitions of the integer kernels written out, element by element,
// and the baseline build of the portable loops (transform rows, per-weight sums) and float16 conversions. Every
// vector path is tested against it (bit for bit where the tables' contracts say so).

#include <cfloat>
#include <cmath>

#include "half.h"
#include "int_kernels.h"
#include "portable_loops.h"

namespace hadanorm {

namespace {

// u[k, 16t + c] from the packed layout
inline int32_t code_at(const WeightInfo& w, const uint8_t* b, int64_t t, int64_t k, int64_t c) {
  const uint8_t* tile = b + t * w.tile_stride;
  if (w.bits == 4) {
    const uint8_t v = tile[(k / 8) * 64 + 4 * c + (k % 4)];
    return (k % 8) < 4 ? (v & 0x0F) : (v >> 4);
  }
  return static_cast<int8_t>(tile[(k / 4) * 64 + 4 * c + (k % 4)]);
}

float clamp_code(float v, float qmax) {
  if (!(v >= 0.0f)) return 0.0f;  // NaN -> 0, as max(v, 0) in the vector paths
  return v > qmax ? qmax : v;
}

void quantize_row_scalar(const float* y, int64_t d, float qmax, bool half_scale, uint8_t* codes, float* scale_out,
                         uint8_t* zp_out) {
  float hi = 0.0f, lo = 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    hi = y[i] > hi ? y[i] : hi;
    lo = y[i] < lo ? y[i] : lo;
  }
  float scale = (hi - lo) / qmax;
  scale = scale > FLT_MIN ? scale : FLT_MIN;
  if (half_scale) scale = round_to_half(scale);
  const float zp = clamp_code(std::nearbyintf(-(lo / scale)), qmax);
  for (int64_t i = 0; i < d; ++i)
    codes[i] = static_cast<uint8_t>(clamp_code(std::nearbyintf(y[i] / scale) + zp, qmax));
  *scale_out = scale;
  *zp_out = static_cast<uint8_t>(zp);
}

void int_gemm_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = act.a + m * act.lda;
    const int32_t z = act.z[m];
    const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = 0; c < kTile; ++c) {
        const int64_t n = t * kTile + c;
        if (n >= g.n) break;
        float f = 0.0f;
        for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
          const int32_t zw = w.zw[blk * w.n_pad + n];
          int32_t sum = 0;
          for (int64_t k = blk * w.block; k < (blk + 1) * w.block; ++k)
            sum += (static_cast<int32_t>(a[k]) - z) * (code_at(w, g.b, t, k, c) - zw);
          f = std::fmaf(w.scales[blk * w.n_pad + n], static_cast<float>(sum), f);
        }
        store_output(g.y, g.y_half, m * g.n + n, std::fmaf(act.scale[m], f, bias[n]));
      }
    }
  }
}

void float_gemm_scalar(const FloatGemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const WeightInfo& w = *g.w;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = g.x + m * g.ldx;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = 0; c < kTile; ++c) {
        const int64_t n = t * kTile + c;
        if (n >= g.n) break;
        float y = 0.0f;
        for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
          const float zw = static_cast<float>(w.zw_at(blk * w.n_pad + n));
          float acc = 0.0f;
          for (int64_t k = blk * w.block; k < (blk + 1) * w.block; ++k)
            acc = std::fmaf(x[k], static_cast<float>(code_at(w, g.b, t, k, c)) - zw, acc);
          y = std::fmaf(w.scales[blk * w.n_pad + n], acc, y);
        }
        store_output(g.y, g.y_half, m * g.n + n, y);
      }
    }
  }
}

constexpr int64_t kTaskRows = 8, kTaskTiles = 4;  // rows x column tiles per matmul task

constexpr IsaKernels kScalar = {.isa = Isa::kScalar,
                                .quantize_row = quantize_row_scalar,
                                .int_gemm4 = int_gemm_scalar,
                                .int_gemm8 = int_gemm_scalar,
                                .float_gemm4 = float_gemm_scalar,
                                .float_gemm8 = float_gemm_scalar,
                                .fill_weight_info = fill_weight_rows,
                                .expand_two_level = expand_two_level_scalar,
                                .gelu_tanh = gelu_tanh_row,
                                .low_rank_add = low_rank_add_rows,
                                .residual_add = residual_add_row,
                                .transform = portable_transform_kernels<halves_to_floats>(),
                                .half = {.to_floats = halves_to_floats, .to_halves = floats_to_halves},
                                .rows_per_task = kTaskRows,
                                .tiles_per_task = kTaskTiles};

}  // namespace

const IsaKernels* scalar_kernels() { return &kScalar; }

void fill_weight_info(WeightInfo& info, const uint8_t* b, const float* scales, const void* zero_points) {
  fill_weight_rows(info, b, scales, zero_points);
}

#if !defined(__x86_64__) || defined(HADANORM_SCALAR_ONLY)
const IsaKernels* avx2_kernels() { return nullptr; }
const IsaKernels* avxvnni_kernels() { return nullptr; }
const IsaKernels* avx512vnni_kernels() { return nullptr; }
const IsaKernels* amx_kernels() { return nullptr; }
#endif
#if !defined(__aarch64__) || defined(HADANORM_SCALAR_ONLY)
const IsaKernels* neondot_kernels() { return nullptr; }
#endif

}  // namespace hadanorm
