// Functions the "avx2" source (int_avx2.cc) shares with the "avxvnni" one (int_avxvnni.cc).
#pragma once

#include "int_kernels.h"

namespace hadanorm {

QuantizeRowFn avx2_quantize_row();
FloatGemmFn avx2_float_gemm4();
FloatGemmFn avx2_float_gemm8();

}  // namespace hadanorm
