// Instruction-set paths of the kernel library, detected at run time; no onnxruntime API. Each path is one table of
// functions (int_kernels.h, IsaKernels; the fused attention maps the path to its own, attention.h).
//
// HADANORM_KERNELS_ISA=scalar|avx2|avxvnni|avx512vnni|amx|neondot overrides the choice (a path this CPU lacks is
// refused with an error). The scalar path is the reference every other path is tested against.
//
// amx (Intel AMX int8 tiles, Sapphire Rapids and later) needs the process's permission to use the tile state: the
// library asks the kernel for it once (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); when that is refused
// (old kernel, seccomp filter, a hypervisor hiding AMX) the path is unsupported and the choice falls back to
// avx512vnni. Order of preference: amx > avx512vnni > avxvnni > avx2 > neondot > scalar.
#pragma once

#include <string>

namespace hadanorm {

enum class Isa { kScalar, kAvx2, kAvxVnni, kAvx512Vnni, kAmx, kNeonDot };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
// Why the amx path is unavailable here ("" when it is available).
std::string amx_unavailable_reason();
Isa best_isa();
// The path HADANORM_KERNELS_ISA asks for, or best_isa(); throws OpError naming the problem and the fix.
Isa select_isa();
// select_isa()'s name, or "error: <message>" (never throws).
std::string selected_isa_description();

}  // namespace hadanorm
