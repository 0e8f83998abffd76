// The portable bulk float16 <-> float32 conversions (the scalar path's; the x86 vector paths use F16C, int_avx2.cc):
// the compiler's __fp16 conversion on aarch64, else the bit conversion of half.h (bit-identical).

#include "half.h"

namespace hadanorm {

#if defined(__aarch64__)
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
