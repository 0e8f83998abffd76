// Run-time CPU feature detection for the integer kernels (see isa.h).

#include "isa.h"

#include <cstdlib>
#include <cstring>

#include "util.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace hadanorm {

namespace {

struct IsaEntry {
  Isa isa;
  const char* name;
};

constexpr IsaEntry kIsas[] = {{Isa::kScalar, "scalar"},
                              {Isa::kAvx2, "avx2"},
                              {Isa::kAvxVnni, "avxvnni"},
                              {Isa::kAvx512Vnni, "avx512vnni"},
                              {Isa::kAmx, "amx"},
                              {Isa::kNeonDot, "neondot"}};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)
// CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
bool cpu_has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx & (1u << 24)) && (edx & (1u << 25));
}

// Asks Linux once for the AMX tile data state (process-wide, inherited by threads created later and by children).
// "" when granted, else the reason.
std::string request_amx() {
  if (!cpu_has_amx_int8()) return "this CPU has no AMX-INT8";
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return std::string("the kernel refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
           std::strerror(errno) + ")";
  return "";
#else
  return "AMX permission is only requested on Linux";
#endif
}
#endif

}  // namespace

std::string amx_unavailable_reason() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)
  static const std::string reason = request_amx();  // asked once per process (thread-safe static)
  if (!reason.empty()) return reason;
  if (!isa_supported(Isa::kAvx512Vnni)) return "this CPU has AMX but no AVX-512 VNNI (the amx path's other half)";
  return "";
#else
  return "this build has no amx path";
#endif
}

const char* isa_name(Isa isa) {
  for (const IsaEntry& e : kIsas)
    if (e.isa == isa) return e.name;
  return "unknown";
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvxVnni:
      return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::kAmx:
      return amx_unavailable_reason().empty();
#endif
#if defined(__aarch64__) && !defined(HADANORM_SCALAR_ONLY)
    case Isa::kNeonDot:
#if defined(__linux__)
      return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
      return false;
#endif
#endif
    default:
      return false;
  }
}

Isa best_isa() {
  for (Isa isa : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvxVnni, Isa::kAvx2, Isa::kNeonDot})
    if (isa_supported(isa)) return isa;
  return Isa::kScalar;
}

Isa select_isa() {
  const char* value = std::getenv("HADANORM_KERNELS_ISA");
  if (!value || !*value) return best_isa();
  for (const IsaEntry& e : kIsas) {
    if (std::strcmp(value, e.name) != 0) continue;
    if (!isa_supported(e.isa)) {
      const Isa best = best_isa();
      if (e.isa == Isa::kAmx)
        fail("HADANORM_KERNELS_ISA=amx but ", amx_unavailable_reason(), "; unset it or use ", isa_name(best),
             " (the best path here)");
      fail("HADANORM_KERNELS_ISA=", value, " but this CPU (or this build) has no ", e.name, " path; unset it or use ",
           best == Isa::kScalar ? "scalar" : isa_name(best), best == Isa::kScalar ? "" : " (the best path here) or scalar");
    }
    return e.isa;
  }
  fail("HADANORM_KERNELS_ISA=", value, " is not a kernel path; use one of scalar, avx2, avxvnni, avx512vnni, "
       "amx, neondot, or unset it");
}

std::string selected_isa_description() {
  try {
    return isa_name(select_isa());
  } catch (const std::exception& e) {
    return std::string("error: ") + e.what();
  }
}

}  // namespace hadanorm
