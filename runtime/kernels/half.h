// IEEE binary16 <-> binary32 conversion (round to nearest even), bit-exact with F16C / AVX-512 vcvtps2ph and numpy.
#pragma once

#include <cstdint>
#include <cstring>

namespace hadanorm {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf / nan (quiet nan keeps the top payload bits)
    return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? (0x200u | ((abs >> 13) & 0x3FFu)) : 0u));
  }
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: overflow to inf
  if (abs >= 0x38800000u) {  // normal half
    const uint32_t mant_odd = (abs >> 13) & 1u;
    const uint32_t rounded = abs + 0xFFFu + mant_odd;  // round half to even on bit 13
    return static_cast<uint16_t>(sign | (((rounded - 0x38000000u) >> 13) & 0x7FFFu));
  }
  if (abs < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // subnormal half: value = mant * 2^-24
  const uint32_t exp = abs >> 23;
  const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exp;  // 14 + (112 - exp): 14..24
  const uint32_t q = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t half_way = 1u << (shift - 1);
  const uint32_t up = (rest > half_way || (rest == half_way && (q & 1u))) ? 1u : 0u;
  return static_cast<uint16_t>(sign | (q + up));
}

// Round a float to the nearest half and back (what a float16 tensor stores).
inline float round_to_half(float f) { return half_to_float(float_to_half(f)); }

// Bulk conversions of one instruction-set path (IsaKernels::half): F16C (vcvtph2ps / vcvtps2ph) on the x86 vector
// paths, the functions below on the others; all bit-identical.
using HalvesToFloatsFn = void (*)(const uint16_t* in, float* out, int64_t n);
using FloatsToHalvesFn = void (*)(const float* in, uint16_t* out, int64_t n);
struct HalfKernels {
  HalvesToFloatsFn to_floats = nullptr;
  FloatsToHalvesFn to_halves = nullptr;
};

// The portable bulk conversions (the scalar path's): the compiler's __fp16 on aarch64, else the functions above.
void halves_to_floats(const uint16_t* in, float* out, int64_t n);
void floats_to_halves(const float* in, uint16_t* out, int64_t n);

}  // namespace hadanorm
