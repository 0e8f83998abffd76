// The constants of the matmul epilogue's gelu (portable_loops.h, gelu_tanh_value; gelu_avx512.h).
#pragma once

#include <cstdint>

namespace hadanorm {

struct GeluTanh {
  static constexpr float c0 = 0.7978845608028654f, c1 = 0.035677408136300125f, clamp = 7.90531110763549805f;
  static constexpr float a1 = 4.89352455891786e-03f, a3 = 6.37261928875436e-04f, a5 = 1.48572235717979e-05f,
                         a7 = 5.12229709037114e-08f, a9 = -8.60467152213735e-11f, a11 = 2.00018790482477e-13f,
                         a13 = -2.76076847742355e-16f;
  static constexpr float b0 = 4.89352518554385e-03f, b2 = 2.26843463243900e-03f, b4 = 1.18534705686654e-04f,
                         b6 = 1.19825839466702e-06f;
  static constexpr uint32_t magic = 0x7EF311C3u;
};

}  // namespace hadanorm
