// Instruction-set paths of the integer kernels, detected at run time; no onnxruntime API.
//
// HADANORM_KERNELS_ISA=scalar|avx2|avxvnni|avx512vnni|neondot overrides the choice (a path this CPU lacks is
// refused with an error). The scalar path is the reference every other path is tested against.
#pragma once

#include <string>

namespace hadanorm {

enum class Isa { kScalar, kAvx2, kAvxVnni, kAvx512Vnni, kNeonDot };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
Isa best_isa();
// The path HADANORM_KERNELS_ISA asks for, or best_isa(); throws OpError naming the problem and the fix.
Isa select_isa();
// select_isa()'s name, or "error: <message>" (never throws).
std::string selected_isa_description();

}  // namespace hadanorm
