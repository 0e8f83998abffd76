// The "avxvnni" path of the integer kernels (int_kernels.h): AVX-VNNI vpdpbusd on ymm (Alder Lake and later
// clients, Sapphire Rapids and later servers), IntMatMul with the panel scheme of int_avx2_panel.h; quantizer and
// FloatMatMul from the avx2 path.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The intrinsic, not inline assembly: with a tied asm operand GCC 12 keeps these ymm accumulators in memory.
#define HN_DPBUSD_YMM(acc, a, w) _mm256_dpbusd_avx_epi32((acc), (a), (w))

#include "int_avx2_ops.h"
#include "int_avx2_panel.h"

namespace hadanorm {

const IsaKernels* avxvnni_kernels() {
  static const IsaKernels kernels = {Isa::kAvxVnni, avx2_quantize_row(), int_gemm<4, 0>, int_gemm<8, 0>,
                                     avx2_float_gemm4(), avx2_float_gemm8(), 48, 8};
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
