// The int8 codes of the fused attention (attention_int8.h): portable C++, shared by every path.

#include "attention_int8.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace hadanorm {

namespace {

// x[0, n) in place: the unnormalised Hadamard transform on each block of hb (a power of two) channels.
void block_hadamard(float* x, int64_t n, int64_t hb) {
  for (int64_t b = 0; b < n; b += hb)
    for (int64_t h = 1; h < hb; h *= 2)
      for (int64_t i = b; i < b + hb; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = x[j], c = x[j + h];
          x[j] = a + c;
          x[j + h] = a - c;
        }
}

// x rounded to the nearest integer, ties to even, for |x| <= 2^22 (adding 1.5 * 2^23 rounds in the FPU's default
// mode): std::nearbyint without a libm call on baseline x86-64 (no SSE4.1 roundss).
inline float round_even(float x) { return (x + 12582912.0f) - 12582912.0f; }

// Symmetric int8 codes of x[0, n): round(x / scale) with scale = max|x| / 127; returns scale (0: codes 0).
float symmetric_codes(const float* x, int64_t n, int8_t* codes, int64_t code_stride) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  if (!(inv <= FLT_MAX)) inv = 0.0f;  // amax under 127 / FLT_MAX: a zero row to int8 (codes 0)
  for (int64_t i = 0; i < n; ++i)
    codes[i * code_stride] = static_cast<int8_t>(std::clamp(round_even(x[i] * inv), -127.0f, 127.0f));
  return amax / 127.0f;
}

// The mean over the n rows (row stride `stride`) of each of `width` channels, summed in double.
std::vector<float> channel_means(const float* x, int64_t n, int64_t width, int64_t stride) {
  std::vector<double> sums(static_cast<size_t>(width), 0.0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < width; ++c) sums[c] += x[j * stride + c];
  std::vector<float> means(static_cast<size_t>(width));
  for (int64_t c = 0; c < width; ++c) means[c] = static_cast<float>(sums[c] / static_cast<double>(n));
  return means;
}

}  // namespace

int64_t attention_int8_rotation_block(int64_t d) { return std::min<int64_t>(d & -d, 128); }

void attention_int8_keys(const AttentionShape& s, const float* k, int8_t* codes, int64_t code_stride, float* scales) {
  const int64_t hb = attention_int8_rotation_block(s.d);
  const std::vector<float> mean = channel_means(k, s.nk, s.d, s.k_stride);
  std::vector<float> row(static_cast<size_t>(s.d));
  for (int64_t j = 0; j < s.nk; ++j) {
    for (int64_t c = 0; c < s.d; ++c) row[c] = k[j * s.k_stride + c] - mean[c];
    block_hadamard(row.data(), s.d, hb);
    int8_t* out = codes + j * code_stride;
    scales[j] = symmetric_codes(row.data(), s.d, out, 1);
    std::fill(out + s.d, out + code_stride, int8_t{0});
  }
}

void attention_int8_values(const AttentionShape& s, const float* v, int8_t* codes, int64_t code_stride,
                           float* scales, float* means) {
  const std::vector<float> mean = channel_means(v, s.nk, s.dv, s.v_stride);
  std::vector<float> column(static_cast<size_t>(s.nk));
  for (int64_t c = 0; c < s.dv; ++c) {
    for (int64_t j = 0; j < s.nk; ++j) column[j] = v[j * s.v_stride + c] - mean[c];
    scales[c] = symmetric_codes(column.data(), s.nk, codes + c, code_stride);
    means[c] = mean[c];
  }
  for (int64_t j = 0; j < s.nk; ++j) std::fill(codes + j * code_stride + s.dv, codes + (j + 1) * code_stride, 0);
}

float attention_int8_query(const AttentionShape& s, const float* q, int8_t* codes) {
  const int64_t hb = attention_int8_rotation_block(s.d);
  thread_local std::vector<float> row;
  row.assign(q, q + s.d);
  block_hadamard(row.data(), s.d, hb);
  const float sq = symmetric_codes(row.data(), s.d, codes, 1);
  std::fill(codes + s.d, codes + attention_int8_d_pad(s.d), int8_t{0});
  return attention_int8_query_factor(s, hb, sq);
}

float attention_int8_mask(float mask) {
  const float scaled = mask * kInt8Log2e;
  return std::isfinite(mask) ? std::clamp(scaled, -FLT_MAX, FLT_MAX) : scaled;
}

int32_t attention_int8_p_code(float t) {
  t = t >= -30.0f ? t : -30.0f;  // NaN too, as vmaxps(t, -30) gives
  const float n = round_even(t);
  const float r = t - n;
  float p = kInt8P255[0];
  for (int i = 1; i < 5; ++i) p = std::fma(p, r, kInt8P255[i]);
  return static_cast<int32_t>(std::nearbyint(std::ldexp(p, static_cast<int>(n))));
}

}  // namespace hadanorm
