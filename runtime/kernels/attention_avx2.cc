// AVX2 path of the fused attention (attention.h), both precisions: plain loops the compiler vectorises for AVX2 + FMA
// (this file is compiled for those targets; the library picks the path only on a CPU that has them). For CPUs
// without AVX-512, e.g. laptops.
//
// Packed per head: k^T in key blocks of 128 ([d][128] floats, keys past nk zero), then v [nk][dv] (kBf16: rounded to
// bf16 values). A task walks the key blocks once; per block, each of its query rows computes its scores
// s[j] += q[c] k^T[c][j] (c outer, the keys vectorised: the same order of sums per score as the scalar path), the
// softmax step (exp_poly: Cephes' expf reduction and polynomial, vectorisable; within 2 ulp of std::exp, 0 below
// FLT_MIN) and o[c] += p[j] v[j][c] (keys outer, the columns vectorised), while the block's k and v stay in cache.

#include "attention.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (their inline templates must not be compiled for AVX2 here).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "util.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace hadanorm {

namespace {

constexpr int64_t kBlock = kAttentionKeyBlock;

// exp(x) for x <= 0 (and NaN): 0 below ln FLT_MIN; n = round(x / ln 2) by the 1.5 * 2^23 trick, r = x - n ln 2 in
// two parts, e^r by Cephes' degree-5 polynomial, 2^n from the exponent bits. Written for the vectoriser.
inline float exp_poly(float x) {
  const bool tiny = x < -87.3365447f;
  const float y = tiny ? -87.0f : x;
  const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return tiny ? 0.0f : p * scale;
}

// round_bf16 (attention_scalar.cc) written for the vectoriser: nearest even, NaN kept, denormals to signed zero.
inline float round_bf16_inline(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const bool denormal = (bits & 0x7f800000u) == 0;
  uint32_t r = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  r = denormal ? (bits & 0x80000000u) : r;
  r = nan ? bits : r;
  float y;
  std::memcpy(&y, &r, 4);
  return y;
}

struct Layout {
  int64_t blocks, nk_pad;
  explicit Layout(const AttentionShape& s) : blocks(ceil_div(s.nk, kBlock)), nk_pad(blocks * kBlock) {}
};

size_t avx2_packed_bytes(const AttentionShape& s) {
  const Layout l(s);
  return static_cast<size_t>(l.nk_pad * s.d + s.nk * s.dv) * sizeof(float);
}

void avx2_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  const Layout lay(s);
  const bool bf16 = s.precision == AttentionPrecision::kBf16;
  float* kt = static_cast<float*>(packed);
  float* vp = kt + lay.nk_pad * s.d;
  std::memset(kt, 0, static_cast<size_t>(lay.nk_pad * s.d) * sizeof(float));
  for (int64_t j = 0; j < s.nk; ++j) {
    float* block = kt + (j / kBlock) * kBlock * s.d + (j % kBlock);
    for (int64_t c = 0; c < s.d; ++c) {
      const float x = k[j * s.k_stride + c];
      block[c * kBlock] = bf16 ? round_bf16(x) : x;
    }
    for (int64_t c = 0; c < s.dv; ++c) {
      const float x = v[j * s.v_stride + c];
      vp[j * s.dv + c] = bf16 ? round_bf16(x) : x;
    }
  }
}

void avx2_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  const Layout lay(s);
  const float* kt = static_cast<const float*>(packed);
  const float* vp = kt + lay.nk_pad * s.d;
  const bool bf16 = s.precision == AttentionPrecision::kBf16;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t rows = q1 - q0;
  thread_local std::vector<float> q, O, mx, l, S, acc;
  q.resize(static_cast<size_t>(rows * s.d));
  O.assign(static_cast<size_t>(rows * s.dv), 0.0f);
  mx.assign(static_cast<size_t>(rows), neg_inf);
  l.assign(static_cast<size_t>(rows), 0.0f);
  S.resize(static_cast<size_t>(kBlock));
  acc.resize(static_cast<size_t>(s.dv));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < s.d; ++c) {
      const float scaled = s.scale * h.q[(q0 + r) * s.q_stride + c];
      q[r * s.d + c] = bf16 ? round_bf16(scaled) : scaled;
    }
  float* __restrict sc = S.data();
  float* __restrict ac = acc.data();
  for (int64_t b = 0; b < lay.blocks; ++b) {
    const int64_t j0 = b * kBlock, nb = std::min(kBlock, s.nk - j0);
    const float* __restrict block = kt + b * kBlock * s.d;
    const float* __restrict vb = vp + j0 * s.dv;
    {
      for (int64_t r = 0; r < rows; ++r) {  // every row of the task against this block (in cache)
        const float* qr = q.data() + r * s.d;
        for (int64_t j = 0; j < kBlock; ++j) sc[j] = 0.0f;
        for (int64_t c = 0; c < s.d; ++c) {
          const float qc = qr[c];
          const float* __restrict row = block + c * kBlock;
          for (int64_t j = 0; j < kBlock; ++j) sc[j] += qc * row[j];
        }
        const int64_t qi = q0 + r;
        float block_max = neg_inf;
        for (int64_t j = 0; j < nb; ++j) {
          if (h.mask) sc[j] += h.mask[qi * h.mask_row + (j0 + j) * h.mask_col];
          block_max = std::max(block_max, sc[j]);
        }
        const float new_max = std::max(mx[r], block_max);
        if (new_max == neg_inf) continue;  // every score so far is -inf: nothing to add
        const float alpha = std::exp(mx[r] - new_max);
        float sum = 0.0f;
        for (int64_t j = 0; j < nb; ++j) sc[j] = exp_poly(sc[j] - new_max);
        if (bf16)
          for (int64_t j = 0; j < nb; ++j) sc[j] = round_bf16_inline(sc[j]);
        for (int64_t j = 0; j < nb; ++j) sum += sc[j];
        l[r] = alpha * l[r] + sum;
        mx[r] = new_max;
        for (int64_t c = 0; c < s.dv; ++c) ac[c] = 0.0f;
        for (int64_t j = 0; j < nb; ++j) {
          const float p = sc[j];
          const float* __restrict vj = vb + j * s.dv;
          for (int64_t c = 0; c < s.dv; ++c) ac[c] += p * vj[c];
        }
        float* o = O.data() + r * s.dv;
        for (int64_t c = 0; c < s.dv; ++c) o[c] = alpha * o[c] + ac[c];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : std::numeric_limits<float>::quiet_NaN();
    for (int64_t c = 0; c < s.dv; ++c) h.out[(q0 + r) * s.out_stride + c] = O[r * s.dv + c] * inv;
  }
}

}  // namespace

const AttentionPath* attention_avx2_path() {
  static const AttentionPath path{"avx2", avx2_packed_bytes, avx2_pack, avx2_rows, 64};
  return isa_supported(Isa::kAvx2) ? &path : nullptr;
}

}  // namespace hadanorm

#pragma GCC pop_options

#else

namespace hadanorm {
const AttentionPath* attention_avx2_path() { return nullptr; }
}  // namespace hadanorm

#endif
