// Bulk float16 <-> float32 conversion: F16C (vcvtph2ps / vcvtps2ph, 8 at a time) when the CPU has it, the
// compiler's __fp16 conversion on aarch64, else the portable bit conversion of half.h (all bit-identical).

#include "half.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace hadanorm {

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

}  // namespace

void halves_to_floats(const uint16_t* in, float* out, int64_t n) {
  if (has_f16c()) return halves_to_floats_f16c(in, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(in[i]);
}

void floats_to_halves(const float* in, uint16_t* out, int64_t n) {
  if (has_f16c()) return floats_to_halves_f16c(in, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(in[i]);
}

#elif defined(__aarch64__)
typedef __fp16 half_alias __attribute__((may_alias));  // IEEE binary16 storage type, hardware conversions

void halves_to_floats(const uint16_t* in, float* out, int64_t n) {
  const half_alias* h = reinterpret_cast<const half_alias*>(in);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
}

void floats_to_halves(const float* in, uint16_t* out, int64_t n) {
  half_alias* h = reinterpret_cast<half_alias*>(out);
  for (int64_t i = 0; i < n; ++i) h[i] = static_cast<__fp16>(in[i]);
}

#else
void halves_to_floats(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(in[i]);
}

void floats_to_halves(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(in[i]);
}
#endif

}  // namespace hadanorm
