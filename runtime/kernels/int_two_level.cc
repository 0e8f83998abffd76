// Two-level weight scales (int_kernels.h, TwoLevel): finding them in a 4-bit weight's block scales, and the scalar
// expansion of its packed codes into the 8-bit layout that IntMatMul4 then runs with one block over the whole K.

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "int_kernels.h"
#include "util.h"

namespace hadanorm {

namespace {

constexpr int kMaxRatio = 16;  // r (u - 8) in [-128, 112]: int8
// The one-block int32 sums sum_k (a - z) r (u - 8) stay exact up to 65536 rows (255 x 128 x 65536 < 2^31); longer
// weights keep the block route.
constexpr int64_t kMaxTwoLevelK = 65536;

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

// sv8[n] = sum_k r (u - 8) = sum_blk r_blk (sv4_blk + (zw4_blk - 8) block) in int32, from w4's block sums (what
// fill_weight_info makes of the expanded codes, without expanding them: the padding columns' ratio is 1 and zero
// point 0). |sv8| <= 128 k_pad: no overflow under kMaxTwoLevelK.
int32_t one_block_sum(const WeightInfo& w4, const uint8_t* ratio, int64_t n) {
  int32_t sum = 0;
  for (int64_t blk = 0; blk < w4.k_blocks; ++blk) {
    const int64_t i = blk * w4.n_pad + n;
    sum += static_cast<int32_t>(ratio[i]) * (w4.sv[i] + (w4.zw[i] - 8) * static_cast<int32_t>(w4.block));
  }
  return sum;
}

// Whether tl (units c = w8.scales, ratios r, sums sv8) is w4's: its block scales c r exactly and its codes' sums.
bool reproduces(const TwoLevel& tl, const WeightInfo& w4) {
  if (tl.w8.n != w4.n || tl.w8.k_pad != w4.k_pad || tl.ratio.size() != static_cast<size_t>(w4.k_blocks * w4.n_pad))
    return false;
  for (int64_t blk = 0; blk < w4.k_blocks; ++blk)
    for (int64_t n = 0; n < w4.n; ++n)
      if (tl.w8.scales[n] * static_cast<float>(tl.ratio[blk * w4.n_pad + n]) != w4.scales[blk * w4.n_pad + n])
        return false;
  for (int64_t n = 0; n < w4.n_pad; ++n)
    if (tl.w8.sv[n] != one_block_sum(w4, tl.ratio.data(), n)) return false;
  return true;
}

// The TwoLevel of each constant weight alive, by the address of its packed codes.
struct SharedTwoLevels {
  std::mutex mutex;
  std::map<const uint8_t*, std::weak_ptr<const TwoLevel>> by_codes;
};

SharedTwoLevels& shared_two_levels() {
  static SharedTwoLevels* shared = new SharedTwoLevels;  // never destroyed: kernels may outlive static teardown
  return *shared;
}

// The TwoLevel of w4 (null when some column has no unit). Its 8-bit weight of one block over k_pad: scales the units
// c (0 in padding columns), zero points 0, sums from w4's block sums (one_block_sum).
std::shared_ptr<const TwoLevel> build_two_level(const WeightInfo& w4) {
  auto tl = std::make_shared<TwoLevel>();
  tl->ratio.assign(static_cast<size_t>(w4.k_blocks * w4.n_pad), 1);
  WeightInfo& w8 = tl->w8;
  w8 = weight_geometry(8, w4.n, 1, w4.k_pad);
  w8.scales.assign(static_cast<size_t>(w8.n_pad), 0.0f);
  w8.zw.assign(static_cast<size_t>(w8.n_pad), 0);
  w8.sv.assign(static_cast<size_t>(w8.n_pad), 0);
  for (int64_t n = 0; n < w4.n; ++n)
    if (!((w8.scales[n] = column_unit(w4, n, tl->ratio.data())) > 0.0f)) return nullptr;
  for (int64_t n = 0; n < w4.n_pad; ++n) w8.sv[n] = one_block_sum(w4, tl->ratio.data(), n);
  return tl;
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

std::shared_ptr<const TwoLevel> detect_two_level(const WeightInfo& w4, const uint8_t* b, bool shared) {
  if (w4.bits != 4 || w4.n == 0 || w4.k_pad > kMaxTwoLevelK || !two_level_enabled()) return nullptr;
  for (int64_t blk = 0; blk < w4.k_blocks; ++blk)
    for (int64_t n = 0; n < w4.n; ++n)
      if (w4.zw[blk * w4.n_pad + n] != 8) return nullptr;
  if (!shared) return build_two_level(w4);
  SharedTwoLevels& cache = shared_two_levels();
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto found = cache.by_codes.find(b);
  if (found != cache.by_codes.end())
    if (std::shared_ptr<const TwoLevel> tl = found->second.lock(); tl && reproduces(*tl, w4)) return tl;
  std::shared_ptr<const TwoLevel> tl = build_two_level(w4);
  for (auto it = cache.by_codes.begin(); it != cache.by_codes.end();)  // drop the weights no kernel holds any more
    it = it->second.expired() ? cache.by_codes.erase(it) : std::next(it);
  if (tl) cache.by_codes[b] = tl;
  return tl;
}

}  // namespace hadanorm
