// Two-level weight scales (int_kernels.h, TwoLevel): finding them in a 4-bit weight's block scales, and the scalar
// expansion of its packed codes into the 8-bit layout that IntMatMul4 then runs with one block over the whole K.

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "int_kernels.h"
#include "util.h"

namespace hadanorm {

namespace {

constexpr int kMaxRatio = 16;  // r (u - 8) in [-128, 112]: int8

bool two_level_enabled() {
  const char* v = std::getenv("HADANORM_KERNELS_TWO_LEVEL");
  return !(v && std::strcmp(v, "0") == 0);
}

// The c of column n with scales[blk] == c * r_blk exactly for integers r_blk in 1..16, or 0 when there is none: the
// largest scale over R for R = 16, 15, ..., 1 (when the quantizer wrote c * r, c = max / max r is exact).
float column_unit(const WeightInfo& w, int64_t n, uint8_t* ratio) {
  float top = 0.0f;
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) top = std::fmax(top, w.scales[blk * w.n_pad + n]);
  if (!(top > 0.0f) || !std::isfinite(top)) return 0.0f;
  for (int big = kMaxRatio; big >= 1; --big) {
    const float c = top / static_cast<float>(big);
    bool ok = c > 0.0f;
    for (int64_t blk = 0; ok && blk < w.k_blocks; ++blk) {
      const float s = w.scales[blk * w.n_pad + n];
      const float r = std::nearbyint(s / c);
      ok = r >= 1.0f && r <= kMaxRatio && c * r == s;
      if (ok) ratio[blk * w.n_pad + n] = static_cast<uint8_t>(r);
    }
    if (ok) return c;
  }
  return 0.0f;
}

}  // namespace

void expand_two_level_scalar(const WeightInfo& w4, const uint8_t* ratio, const uint8_t* b, int64_t t0, int64_t t1,
                             uint8_t* out) {
  const int64_t stride8 = w4.k_pad / 4 * 64;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = b + t * w4.tile_stride;
    uint8_t* dst = out + (t - t0) * stride8;
    for (int64_t g = 0; g < w4.groups; ++g) {  // packed row g: k = 8g + j (low nibbles), 8g + 4 + j (high)
      const uint8_t* row = tile + g * 64;
      const uint8_t* r = ratio + ((8 * g) / w4.block) * w4.n_pad + t * kTile;
      for (int64_t i = 0; i < 64; ++i) {
        const int32_t rc = r[i / 4];
        dst[(2 * g) * 64 + i] = static_cast<uint8_t>(static_cast<int8_t>(rc * ((row[i] & 0x0F) - 8)));
        dst[(2 * g + 1) * 64 + i] = static_cast<uint8_t>(static_cast<int8_t>(rc * ((row[i] >> 4) - 8)));
      }
    }
  }
}

std::shared_ptr<const TwoLevel> detect_two_level(const WeightInfo& w4, const uint8_t* b, ExpandTwoLevelFn expand,
                                                 FillWeightFn fill) {
  if (w4.bits != 4 || w4.n == 0 || !two_level_enabled()) return nullptr;
  for (int64_t blk = 0; blk < w4.k_blocks; ++blk)
    for (int64_t n = 0; n < w4.n; ++n)
      if (w4.zw[blk * w4.n_pad + n] != 8) return nullptr;
  auto tl = std::make_shared<TwoLevel>();
  tl->ratio.assign(static_cast<size_t>(w4.k_blocks * w4.n_pad), 1);
  std::vector<float> units(static_cast<size_t>(w4.n), 0.0f);
  for (int64_t n = 0; n < w4.n; ++n)
    if (!((units[n] = column_unit(w4, n, tl->ratio.data())) > 0.0f)) return nullptr;
  // the 8-bit weight of one block: its sums (sv = sum_k r (u - 8)) from the expanded codes, filled by the path's build
  tl->w8 = weight_geometry(8, w4.n, 1, w4.k_pad);
  std::vector<uint8_t> expanded(static_cast<size_t>(w4.tiles * tl->w8.tile_stride));
  expand(w4, tl->ratio.data(), b, 0, w4.tiles, expanded.data());
  std::vector<int8_t> zeros(static_cast<size_t>(w4.n), 0);
  fill(tl->w8, expanded.data(), units.data(), zeros.data());
  return tl;
}

}  // namespace hadanorm
