// The "avxvnni" path (int_kernels.h): AVX-VNNI vpdpbusd on ymm (Alder Lake and later clients, Sapphire Rapids and
// later servers), IntMatMul with the panel driver of int_panel.h and the micro-kernel of int_avx2_micro.h; everything
// else is the avx2 path's.

#include "int_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (their inline templates must stay baseline code).
#include <algorithm>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
// GCC 12 reports its own intrinsics headers (_mm*_undefined_*) as uninitialised reads under -Wall
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The intrinsic, not inline assembly: with a tied asm operand GCC 12 keeps these ymm accumulators in memory.
#define HN_DPBUSD_YMM(acc, a, w) _mm256_dpbusd_avx_epi32((acc), (a), (w))

#include "int_avx2_micro.h"

namespace hadanorm {

const IsaKernels* avxvnni_kernels() {
  static const IsaKernels kernels = inherit({.isa = Isa::kAvxVnni,
                                             .int_gemm4 = panel_int_gemm<Avx2Micro<0>, 4>,
                                             .int_gemm8 = panel_int_gemm<Avx2Micro<0>, 8>},
                                            *avx2_kernels());  // and the avx2 task sizes
  return &kernels;
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
