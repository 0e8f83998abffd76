// aarch64 "neondot" path of the integer kernels (int_kernels.h): IntMatMul with the NEON dot product (sdot,
// ARMv8.2 dotprod, checked at run time with getauxval). A 64-byte row of the packed layout is 4 int8x16 registers
// of 4 columns x 4 consecutive k, exactly the operand of sdot; `sdot v.4s, w.16b, a.4b[lane]` multiplies them by 4
// activation bytes of one register (a 16-byte load of codes feeds 4 sdots).
//
// sdot is signed x signed, and activation codes are 0..255: the codes and their zero point are both shifted by -128
// (c ^ 0x80 as int8), which leaves c - z unchanged; the block corrections use sum (c - 128) and z - 128.
// The panel driver is int_panel.h's (one column tile per panel, steps of a multiple of 16 k); everything but
// IntMatMul is the scalar path's.

#include "int_kernels.h"

#if defined(__aarch64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (their inline templates must stay baseline code).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#include <arm_neon.h>

#include "int_panel.h"
#include "util.h"

namespace hadanorm {

namespace {

// One k step (`len` k, a multiple of 16) of rows a[0..R) for one 16-column tile: int32 sums of (c - 128)(u) in
// acc[r][q] (columns 4q .. 4q + 3). `w` holds the step's weights as int8 rows of 16 columns x 4 k in k order (4-bit:
// unpacked).
template <int R>
inline void step_dots(const uint8_t* const* a, const int8_t* w, int64_t len, int32x4_t (&acc)[R][4]) {
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t k = 0; k < len; k += 16) {
    int8x16_t av[R];
    for (int r = 0; r < R; ++r) av[r] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(a[r] + k), flip));
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

// The micro-kernel of the panel driver (int_panel.h): 4 rows x 16 columns, 16 int32x4 accumulators.
struct NeonMicro {
  static constexpr int kRows = 4, kTiles = 1;
  template <int Bits>
  static constexpr int64_t kGranule = 16;  // one 16-byte activation load feeds 4 sdots

  // R rows x the tile for one k step: I = sum (c - 128) u - zw * sum (c - 128) - (z - 128) * sum (u - zw)
  template <int Bits, int R, int T>
  static void step(const PanelStep& p, int64_t r0) {
    const uint8_t* a[R];
    for (int r = 0; r < R; ++r) a[r] = p.a + (r0 + r) * p.lda;
    float* f = p.f + r0 * 16;
    int32_t* part = p.part + r0 * 16;
    int32x4_t acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = p.first ? vdupq_n_s32(0) : vld1q_s32(part + r * 16 + 4 * q);
    step_dots<R>(a, reinterpret_cast<const int8_t*>(p.w), p.len, acc);
    if (!p.last) {
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < 4; ++q) vst1q_s32(part + r * 16 + 4 * q, acc[r][q]);
      return;
    }
    for (int r = 0; r < R; ++r) {
      const int32_t sc = p.a_sc[(r0 + r) * p.kb] - 128 * static_cast<int32_t>(p.block);
      const int32_t z = p.a_z[r0 + r] - 128;
      for (int q = 0; q < 4; ++q) {
        const int32x4_t zw = vld1q_s32(p.w_zw + 4 * q), sv = vld1q_s32(p.w_sv + 4 * q);
        const int32x4_t corr = vaddq_s32(vmulq_n_s32(zw, sc), vmulq_n_s32(sv, z));
        const float32x4_t v = vcvtq_f32_s32(vsubq_s32(acc[r][q], corr));
        float* fr = f + r * 16 + 4 * q;
        vst1q_f32(fr, vfmaq_f32(vld1q_f32(fr), vld1q_f32(p.w_scales + 4 * q), v));
      }
    }
  }

  // The step's weights as int8 rows of 16 columns x 4 k, k order, in scratch (4-bit: nibbles unpacked)
  template <int Bits, int T>
  static const uint8_t* weights(const uint8_t* b, int64_t /*tile_stride*/, int64_t groups, uint8_t* scratch) {
    if constexpr (Bits == 4) {
      const uint8x16_t nibble = vdupq_n_u8(0x0F);
      for (int64_t gi = 0; gi < groups; ++gi) {
        const uint8_t* row = b + gi * 64;
        for (int q = 0; q < 4; ++q) {
          const uint8x16_t v = vld1q_u8(row + 16 * q);
          vst1q_u8(scratch + gi * 128 + 16 * q, vandq_u8(v, nibble));
          vst1q_u8(scratch + gi * 128 + 64 + 16 * q, vshrq_n_u8(v, 4));
        }
      }
    } else {
      std::memcpy(scratch, b, static_cast<size_t>(groups * 64));
    }
    return scratch;
  }

  // y = fmaf(a_scale, F, bias) for the columns n0.. of row m that exist
  static void store_tile(const GemmArgs& g, int64_t m, int64_t n0, const float* bias, const float* f) {
    for (int64_t c = 0; c < kTile && n0 + c < g.n; ++c)
      store_output(g.y, g.y_half, m * g.n + n0 + c, std::fmaf(g.act->scale[m], f[c], bias[n0 + c]));
  }
};

template <int Bits>
void int_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (g.w->block % 16) {  // blocks that are not a multiple of 16 k: the scalar reference
    scalar_kernels()->int_gemm4(g, m0, m1, t0, t1);
    return;
  }
  panel_int_gemm<NeonMicro, Bits>(g, m0, m1, t0, t1);
}

constexpr int64_t kTaskRows = kMaxTaskRows, kTaskTiles = 8;  // rows x column tiles per matmul task (96: one panel)

}  // namespace

const IsaKernels* neondot_kernels() {
  static const IsaKernels kernels = inherit({.isa = Isa::kNeonDot,
                                             .int_gemm4 = int_gemm<4>,
                                             .int_gemm8 = int_gemm<8>,
                                             .rows_per_task = kTaskRows,
                                             .tiles_per_task = kTaskTiles},
                                            *scalar_kernels());
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
