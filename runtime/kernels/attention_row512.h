// What the AVX-512 paths of the fused attention (attention_avx512.cc: float, attention_vnni_int8.cc: int8; `lanes` also
// attention_amx.cc) share: the tail masks, the first softmax pass over one query row's scores of a key block, the split
// of p v's output columns into passes, the rows' last step (out = o / l), and a row's prefetch.
// Include it after the file's `#pragma GCC target` with AVX-512F (internal linkage: each file compiles its own copy
// for its own targets).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <limits>

#include "attention.h"
#include "attention_int8.h"  // kInt8Log2e
#include "util.h"

namespace hadanorm {
namespace {

// Lanes [0, n) of 16 (n may be <= 0 or >= 16).
HN_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// Prefetches the cache lines of one row of `n` floats (for writing: prefetchw), into L2 and L1: the rows of a head
// are heads * d apart in the bnhd layout, one miss each for the hardware prefetchers.
HN_INLINE void prefetch_row(const float* x, int64_t n, bool write) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(x) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(x + n) - 1;
  for (uintptr_t line = first; line <= last; line += 64) {
    if (write)
      __builtin_prefetch(reinterpret_cast<const void*>(line), 1, 3);
    else
      __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
  }
}

// srow [ceil(nb / 16) * 16]: the scores of query row qi against keys j0 .. j0 + nb. Adds the mask (h.mask, element
// strides h.mask_row, h.mask_col; none when null; when Log2Mask, in the int8 path's log2 units as
// attention_int8_mask gives it), sets the lanes past nb to -inf, stores the row back and returns its maximum.
template <bool Log2Mask = false>
inline float masked_row_max(const AttentionHead& h, float* srow, int64_t qi, int64_t j0, int64_t nb) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t vecs = ceil_div(nb, 16);
  const __mmask16 tail = nb % 16 ? static_cast<__mmask16>((1u << (nb % 16)) - 1) : 0xffff;
  __m512 vmax = _mm512_set1_ps(neg_inf);
  for (int64_t t = 0; t < vecs; ++t) {
    __m512 x = _mm512_loadu_ps(srow + 16 * t);
    if (h.mask) {
      const float* m = h.mask + qi * h.mask_row + (j0 + 16 * t) * h.mask_col;
      const __mmask16 valid = t + 1 == vecs ? tail : 0xffff;
      __m512 mv;
      if (h.mask_col == 1) {
        mv = _mm512_maskz_loadu_ps(valid, m);
      } else if (h.mask_col == 0) {
        mv = _mm512_set1_ps(*m);
      } else {
        alignas(64) float tmp[16] = {};
        for (int e = 0; e < 16 && 16 * t + e < nb; ++e) tmp[e] = m[e * h.mask_col];
        mv = _mm512_load_ps(tmp);
      }
      if constexpr (Log2Mask) {  // attention_int8_mask: finite masks clamped to +-FLT_MAX, +-inf and NaN kept
        const __m512 scaled = _mm512_mul_ps(mv, _mm512_set1_ps(kInt8Log2e));
        const __m512 clamped = _mm512_max_ps(_mm512_min_ps(scaled, _mm512_set1_ps(FLT_MAX)), _mm512_set1_ps(-FLT_MAX));
        mv = _mm512_mask_mov_ps(clamped, _mm512_fpclass_ps_mask(mv, 0x99), scaled);  // 0x99: NaN, +inf, -inf
      }
      x = _mm512_add_ps(x, mv);
    }
    if (t + 1 == vecs) x = _mm512_mask_mov_ps(_mm512_set1_ps(neg_inf), tail, x);
    _mm512_storeu_ps(srow + 16 * t, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  return _mm512_reduce_max_ps(vmax);
}

// p v's output columns [0, dv_pad) (a multiple of 16) in passes of at most MaxVectors vectors of 16:
// pass.template operator()<NV>(c0) for each, NV the pass's vectors (a compile-time count: its accumulators' array).
template <int MaxVectors, class Pass>
HN_INLINE void column_passes(int64_t dv_pad, Pass&& pass) {
  static_assert(MaxVectors == 6, "the switch below has a case per count up to 6");
  for (int64_t c0 = 0; c0 < dv_pad; c0 += 16 * MaxVectors) {
    switch (std::min<int64_t>(MaxVectors, (dv_pad - c0) / 16)) {
      case 1: pass.template operator()<1>(c0); break;
      case 2: pass.template operator()<2>(c0); break;
      case 3: pass.template operator()<3>(c0); break;
      case 4: pass.template operator()<4>(c0); break;
      case 5: pass.template operator()<5>(c0); break;
      default: pass.template operator()<6>(c0); break;
    }
  }
}

}  // namespace
// The rows' last step: out[q0 + r][:dv] = O[r] * (1 / l[r]) (O: rows x dv_pad sums, l: the row sums; NaN where l is
// 0: every score -inf), then, when given, times scale[c] and plus offset[c] (the int8 path's value scales and means).
inline void store_rows(const AttentionShape& s, const AttentionHead& h, int64_t q0, int64_t rows, const float* O,
                       int64_t dv_pad, const float* l, const float* scale = nullptr, const float* offset = nullptr) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : nan);
    const float* o = O + r * dv_pad;
    float* out = h.out + (q0 + r) * s.out_stride;
    for (int64_t c = 0; c < s.dv; c += 16) {
      __m512 y = _mm512_mul_ps(_mm512_loadu_ps(o + c), inv);
      if (scale) y = _mm512_mul_ps(y, _mm512_loadu_ps(scale + c));
      if (offset) y = _mm512_add_ps(y, _mm512_loadu_ps(offset + c));
      _mm512_mask_storeu_ps(out + c, lanes(s.dv - c), y);
    }
  }
}

}  // namespace hadanorm
