// AVX-512 helpers shared by the avx512vnni and amx IntMatMul paths (int_avx512.cc, int_amx.cc), included after their
// `#pragma GCC target` and <immintrin.h>.
#pragma once

#include <algorithm>
#include <cstdint>

namespace hadanorm {
namespace {

// zw (low int16) | sv (high int16) of 16 columns: the vpmaddwd operand that starts (or corrects) a small block's sums
inline __m512i int16_pairs(const int32_t* zw, const int32_t* sv) {
  return _mm512_or_si512(_mm512_and_si512(_mm512_loadu_si512(zw), _mm512_set1_epi32(0xFFFF)),
                         _mm512_slli_epi32(_mm512_loadu_si512(sv), 16));
}

// The columns n0 .. n0 + 15 that exist (n columns in all)
inline __mmask16 column_mask(int64_t n0, int64_t n) {
  const int64_t left = n - n0;
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(left, 0)) - 1u);
}

// 16 outputs as float or IEEE half, under a column mask
inline void store16(void* y, bool half, int64_t index, __m512 v, __mmask16 mask) {
  if (half) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + index, mask, h);
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + index, mask, v);
  }
}

}  // namespace
}  // namespace hadanorm
