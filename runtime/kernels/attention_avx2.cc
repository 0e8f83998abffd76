// AVX2 path of the fused attention (attention.h), fp32 (precision kFloat, and what a kBf16 op runs on a CPU without AMX
// tiles), for CPUs without AVX-512 (laptops): AVX2 + FMA
// (this file is compiled for those targets; the library picks the path only on a CPU that has them).
//
// Packed per head: k^T in key blocks of 128 ([d][128] floats, keys past nk zero), then v [nk][dv_pad] (dv rounded up
// to 8). A task walks the key blocks once; per block, its query rows in pairs compute
// their scores (2 rows x 32 keys of FMA accumulators in registers over d), then per row the softmax step (exp_poly:
// Cephes' expf reduction and polynomial in loops the compiler vectorises; within 2 ulp of std::exp, 0 below FLT_MIN)
// and the block's p v (up to 12 column vectors of accumulators in registers over the keys), while the block's k and v
// stay in cache.

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
#include <immintrin.h>

namespace hadanorm {

namespace {

constexpr int64_t kBlock = kAttentionKeyBlock;
constexpr int64_t kRowsPerTask = 64;  // query rows per task (32 pairs)

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

// sc[0..32) of rows r0, r1 (q rows q0r, q1r) for 32 keys of a k^T block row stride kBlock: 2 rows x 4 vectors of
// fp32 FMAs over d.
inline void scores32x2(const float* q0r, const float* q1r, int64_t d, const float* kt, float* s0, float* s1) {
  __m256 a[2][4];
  for (int v = 0; v < 4; ++v) a[0][v] = a[1][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    const float* row = kt + c * kAttentionKeyBlock;
    const __m256 b0 = _mm256_broadcast_ss(q0r + c), b1 = _mm256_broadcast_ss(q1r + c);
    for (int v = 0; v < 4; ++v) {
      const __m256 k = _mm256_loadu_ps(row + 8 * v);
      a[0][v] = _mm256_fmadd_ps(b0, k, a[0][v]);
      a[1][v] = _mm256_fmadd_ps(b1, k, a[1][v]);
    }
  }
  for (int v = 0; v < 4; ++v) {
    _mm256_storeu_ps(s0 + 8 * v, a[0][v]);
    _mm256_storeu_ps(s1 + 8 * v, a[1][v]);
  }
}

// ac[0..8 NV) = sum_j p[j] v[j][0..8 NV) over nb keys (v row stride ldv), accumulators in registers.
template <int NV>
inline void pv_row(const float* p, const float* v, int64_t ldv, int64_t nb, float* ac) {
  __m256 a[NV];
  for (int c = 0; c < NV; ++c) a[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    for (int c = 0; c < NV; ++c) a[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * ldv + 8 * c), a[c]);
  }
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(ac + 8 * c, a[c]);
}

struct Layout {
  int64_t blocks, nk_pad;
  explicit Layout(const AttentionShape& s) : blocks(ceil_div(s.nk, kBlock)), nk_pad(blocks * kBlock) {}
};

int64_t dv_pad(const AttentionShape& s) { return (s.dv + 7) / 8 * 8; }

size_t avx2_packed_bytes(const AttentionShape& s) {
  const Layout l(s);
  return static_cast<size_t>(l.nk_pad * s.d + s.nk * dv_pad(s)) * sizeof(float);
}

void avx2_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  const Layout lay(s);
  float* kt = static_cast<float*>(packed);
  float* vp = kt + lay.nk_pad * s.d;
  const int64_t ldv = dv_pad(s);
  std::memset(packed, 0, avx2_packed_bytes(s));
  for (int64_t j = 0; j < s.nk; ++j) {
    float* block = kt + (j / kBlock) * kBlock * s.d + (j % kBlock);
    for (int64_t c = 0; c < s.d; ++c) {
      const float x = k[j * s.k_stride + c];
      block[c * kBlock] = x;
    }
    for (int64_t c = 0; c < s.dv; ++c) {
      const float x = v[j * s.v_stride + c];
      vp[j * ldv + c] = x;
    }
  }
}

void avx2_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  const Layout lay(s);
  const int64_t ldv = dv_pad(s);
  const float* kt = static_cast<const float*>(packed);
  const float* vp = kt + lay.nk_pad * s.d;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t rows = q1 - q0;
  thread_local std::vector<float> q, O, mx, l, S, acc;
  q.resize(static_cast<size_t>((rows + 1) * s.d));  // + a zero row: the partner of an odd last row
  O.assign(static_cast<size_t>(rows * s.dv), 0.0f);
  mx.assign(static_cast<size_t>(rows), neg_inf);
  l.assign(static_cast<size_t>(rows), 0.0f);
  S.resize(static_cast<size_t>(2 * kBlock));
  acc.resize(static_cast<size_t>(ldv));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < s.d; ++c) {
      const float scaled = s.scale * h.q[(q0 + r) * s.q_stride + c];
      q[r * s.d + c] = scaled;
    }
  std::fill(q.begin() + rows * s.d, q.end(), 0.0f);
  float* ac = acc.data();
  for (int64_t b = 0; b < lay.blocks; ++b) {
    const int64_t j0 = b * kBlock, nb = std::min(kBlock, s.nk - j0);
    const float* block = kt + b * kBlock * s.d;
    const float* vb = vp + j0 * ldv;
    for (int64_t r0 = 0; r0 < rows; r0 += 2) {  // every row of the task against this block (in cache), in pairs
      const int64_t r1 = std::min(r0 + 1, rows);  // == rows: the zero row, computed and dropped
      for (int64_t j = 0; j < nb; j += 32)
        scores32x2(q.data() + r0 * s.d, q.data() + r1 * s.d, s.d, block + j, S.data() + j, S.data() + kBlock + j);
      for (int64_t r = r0; r < std::min(r0 + 2, rows); ++r) {
        float* sc = S.data() + (r - r0) * kBlock;
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
        for (int64_t j = 0; j < nb; ++j) sum += sc[j];
        l[r] = alpha * l[r] + sum;
        mx[r] = new_max;
        for (int64_t c0 = 0; c0 < ldv; c0 += 96) {  // 12 column vectors per pass
          switch ((std::min<int64_t>(ldv - c0, 96)) / 8) {
            case 1: pv_row<1>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 2: pv_row<2>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 3: pv_row<3>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 4: pv_row<4>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 5: pv_row<5>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 6: pv_row<6>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 7: pv_row<7>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 8: pv_row<8>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 9: pv_row<9>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 10: pv_row<10>(sc, vb + c0, ldv, nb, ac + c0); break;
            case 11: pv_row<11>(sc, vb + c0, ldv, nb, ac + c0); break;
            default: pv_row<12>(sc, vb + c0, ldv, nb, ac + c0); break;
          }
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
  static const AttentionPath path{.name = "avx2",
                                  .packed_bytes = avx2_packed_bytes,
                                  .pack = avx2_pack,
                                  .rows = avx2_rows,
                                  .rows_per_task = kRowsPerTask,
                                  .computes_bf16 = false};
  return isa_supported(Isa::kAvx2) ? &path : nullptr;
}

}  // namespace hadanorm

#pragma GCC pop_options

#else

namespace hadanorm {
const AttentionPath* attention_avx2_path() { return nullptr; }
}  // namespace hadanorm

#endif
