// aarch64 "neondot" path of the integer kernels (int_kernels.h): IntMatMul with the NEON dot product (sdot,
// ARMv8.2 dotprod, checked at run time with getauxval). A 64-byte row of the packed layout is 4 int8x16 registers
// of 4 columns x 4 consecutive k, exactly the operand of sdot; `sdot v.4s, w.16b, a.4b[lane]` multiplies them by 4
// activation bytes of one register (a 16-byte load of codes feeds 4 sdots).
//
// sdot is signed x signed, and activation codes are 0..255: the codes and their zero point are both shifted by -128
// (c ^ 0x80 as int8), which leaves c - z unchanged; the block corrections use sum (c - 128) and z - 128.
// Quantizer and FloatMatMul: the scalar path's.

#include "int_kernels.h"

#if defined(__aarch64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "util.h"

namespace hadanorm {

namespace {

constexpr int kRows = 4;               // 4 rows x 16 columns: 16 int32x4 accumulators
constexpr int64_t kMaxTaskRows = 96;   // rows_per_task must not exceed this
constexpr int64_t kSubK = 128;

struct BlockSplit {
  int64_t count, len;
};
inline BlockSplit split_block(int64_t block, int64_t granule) {
  int64_t count = (block + kSubK - 1) / kSubK;
  while (block % count || (block / count) % granule) ++count;
  return {count, block / count};
}

// One k step (`len` k from k0, a multiple of 16) of rows m .. m + R for one 16-column tile: int32 sums of
// (c - 128)(u) in acc[r][q] (columns 4q .. 4q + 3). `w` holds the step's weights as int8 rows of 16 columns x 4 k
// in k order (4-bit: unpacked).
template <int R>
inline void step_dots(const uint8_t* const* a, int64_t k0, const int8_t* w, int64_t len, int32x4_t (&acc)[R][4]) {
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t k = 0; k < len; k += 16) {
    int8x16_t av[R];
    for (int r = 0; r < R; ++r) av[r] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(a[r] + k0 + k), flip));
    const int8_t* wk = w + k * 16;  // 4 rows of 64 bytes: k .. k + 15
#define HN_LANE(lane)                                                                  \
  {                                                                                    \
    const int8x16_t w0 = vld1q_s8(wk + 64 * lane), w1 = vld1q_s8(wk + 64 * lane + 16); \
    const int8x16_t w2 = vld1q_s8(wk + 64 * lane + 32), w3 = vld1q_s8(wk + 64 * lane + 48); \
    for (int r = 0; r < R; ++r) {                                                      \
      acc[r][0] = vdotq_laneq_s32(acc[r][0], w0, av[r], lane);                         \
      acc[r][1] = vdotq_laneq_s32(acc[r][1], w1, av[r], lane);                         \
      acc[r][2] = vdotq_laneq_s32(acc[r][2], w2, av[r], lane);                         \
      acc[r][3] = vdotq_laneq_s32(acc[r][3], w3, av[r], lane);                         \
    }                                                                                  \
  }
    HN_LANE(0) HN_LANE(1) HN_LANE(2) HN_LANE(3)
#undef HN_LANE
  }
}

template <int Bits, int R>
void panel_rows(const GemmArgs& g, int64_t m, int64_t t, const int8_t* w, int64_t k0, int64_t len, int64_t blk,
                bool first, bool last, float* f, int32_t* part) {
  const WeightInfo& wi = *g.w;
  const ActInfo& act = *g.act;
  const uint8_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = act.a + (m + r) * act.lda;
  int32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = first ? vdupq_n_s32(0) : vld1q_s32(part + r * 16 + 4 * q);
  step_dots<R>(a, k0, w, len, acc);
  if (!last) {
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) vst1q_s32(part + r * 16 + 4 * q, acc[r][q]);
    return;
  }
  // I = sum (c - 128) u - zw * sum (c - 128) - (z - 128) * sum (u - zw)
  const int64_t col = blk * wi.n_pad + t * kTile;
  for (int r = 0; r < R; ++r) {
    const int32_t sc = act.sc[(m + r) * wi.k_blocks + blk] - 128 * static_cast<int32_t>(wi.block);
    const int32_t z = act.z[m + r] - 128;
    for (int q = 0; q < 4; ++q) {
      const int32x4_t zw = vld1q_s32(wi.zw.data() + col + 4 * q), sv = vld1q_s32(wi.sv.data() + col + 4 * q);
      const int32x4_t corr = vaddq_s32(vmulq_n_s32(zw, sc), vmulq_n_s32(sv, z));
      const float32x4_t v = vcvtq_f32_s32(vsubq_s32(acc[r][q], corr));
      float* fr = f + r * 16 + 4 * q;
      vst1q_f32(fr, vfmaq_f32(vld1q_f32(fr), vld1q_f32(wi.scales.data() + col + 4 * q), v));
    }
  }
}

template <int Bits, int R>
void panel_rows_rest(const GemmArgs& g, int64_t m, int64_t rows, int64_t t, const int8_t* w, int64_t k0,
                     int64_t len, int64_t blk, bool first, bool last, float* f, int32_t* part) {
  if constexpr (R > 0) {
    if (rows == R)
      panel_rows<Bits, R>(g, m, t, w, k0, len, blk, first, last, f, part);
    else
      panel_rows_rest<Bits, R - 1>(g, m, rows, t, w, k0, len, blk, first, last, f, part);
  }
}

// Rows m0..m1 x one tile t over the whole K (see int_avx512.cc for the scheme).
template <int Bits>
void int_panel(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t) {
  const WeightInfo& w = *g.w;
  const ActInfo& act = *g.act;
  const int64_t rows = m1 - m0;
  const int64_t granule = Bits == 4 ? 8 : 4;
  // steps of a multiple of 16 k (one 16-byte activation load feeds 4 sdots)
  BlockSplit split = split_block(w.block, 16);
  alignas(16) float f[kMaxTaskRows * 16];
  alignas(16) int32_t part[kMaxTaskRows * 16];
  alignas(16) int8_t scratch[kSubK * 16 * 2];
  std::fill(f, f + rows * 16, 0.0f);
  const uint8_t* b = g.b + t * w.tile_stride;
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    for (int64_t s = 0; s < split.count; ++s) {
      const int64_t k0 = blk * w.block + s * split.len;
      // weights of this step as int8 rows of 16 columns x 4 k, k order
      if constexpr (Bits == 4) {
        const uint8x16_t nibble = vdupq_n_u8(0x0F);
        for (int64_t gi = 0; gi < split.len / 8; ++gi) {
          const uint8_t* row = b + (k0 / granule + gi) * 64;
          for (int q = 0; q < 4; ++q) {
            const uint8x16_t v = vld1q_u8(row + 16 * q);
            vst1q_s8(scratch + gi * 128 + 16 * q, vreinterpretq_s8_u8(vandq_u8(v, nibble)));
            vst1q_s8(scratch + gi * 128 + 64 + 16 * q, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)));
          }
        }
      } else {
        std::memcpy(scratch, b + (k0 / granule) * 64, static_cast<size_t>(split.len * 16));
      }
      const bool first = s == 0, last = s == split.count - 1;
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows)
        panel_rows<Bits, kRows>(g, m0 + r, t, scratch, k0, split.len, blk, first, last, f + r * 16, part + r * 16);
      panel_rows_rest<Bits, kRows - 1>(g, m0 + r, rows - r, t, scratch, k0, split.len, blk, first, last,
                                       f + r * 16, part + r * 16);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float* bias = g.bias + (m / g.rows_per_bias) * g.bias_stride;
    for (int64_t c = 0; c < kTile; ++c) {
      const int64_t n = t * kTile + c;
      if (n >= g.n) break;
      store_output(g.y, g.y_half, m * g.n + n, std::fmaf(act.scale[m], f[r * 16 + c], bias[n]));
    }
  }
}

template <int Bits>
void int_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (g.w->block % 16) {  // blocks that are not a multiple of 16 k: the scalar reference
    scalar_kernels()->int_gemm4(g, m0, m1, t0, t1);
    return;
  }
  for (int64_t r0 = m0; r0 < m1; r0 += kMaxTaskRows) {
    const int64_t r1 = std::min(m1, r0 + kMaxTaskRows);
    for (int64_t t = t0; t < t1; ++t) int_panel<Bits>(g, r0, r1, t);
  }
}

}  // namespace

const IsaKernels* neondot_kernels() {
  static const IsaKernels kernels = {Isa::kNeonDot, scalar_kernels()->quantize_row, int_gemm<4>, int_gemm<8>,
                                     scalar_kernels()->float_gemm4, scalar_kernels()->float_gemm8, 96, 8};
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
