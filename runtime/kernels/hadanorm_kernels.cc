// onnxruntime CPU kernels for the ops of the "hadanorm" domain (opset 1): registration and exported symbols.
//
//   transform ops (transform_ops.cc): Scale, ScaleRotate, CenterScale, CenterScaleRotate
//   quantize ops  (transform_ops.cc): Quantize, ScaleQuantize, ScaleRotateQuantize, CenterScaleQuantize,
//                                     CenterScaleRotateQuantize
//   matmul ops    (matmul_ops.cc):    IntMatMul4, IntMatMul8, FloatMatMul4, FloatMatMul8
//   attention     (attention_op.cc):  Attention (fused softmax attention, attention.h)
//
// Every op is registered twice, for float32 and for float16 tensors (onnxruntime picks the kernel by the input
// types); both compute in float32. The same maths as the ONNX function bodies graph_passes writes into the model.
//
// Built without linking against onnxruntime (-DORT_API_MANUAL_INIT): RegisterCustomOps initialises the C++ API
// from the OrtApiBase onnxruntime passes in, requesting API version ORT_API_VERSION of the headers used (21).
//
// Environment:
//   HADANORM_KERNELS_ISA=path       scalar|avx2|avxvnni|avx512vnni|amx|neondot instead of the best path (isa.h), for
//                                   every op and every CPU-dependent function (the path tables of int_kernels.h)
//   HADANORM_KERNELS_THREADS=n      use n std::threads per op instead of onnxruntime's intra-op pool
//   HADANORM_KERNELS_CALL_LOG=path  append one line "<op type>" per kernel run (tests: proves the kernel ran);
//                                   HADANORM_KERNELS_CALL_LOG_ISA=1 appends " <path>" (the attention: its own path)
//   HADANORM_KERNELS_API_VERSION=v  request API version v instead of ORT_API_VERSION (tests: incompatible API)
//   HADANORM_KERNELS_TWO_LEVEL=0    run IntMatMul4 weights with two-level scales by the block route (int_kernels.h,
//                                   TwoLevel; benchmarks and tests compare the two routes)

#include <onnxruntime_cxx_api.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "attention.h"
#include "isa.h"
#include "util.h"


namespace hadanorm {
void add_transform_ops(Ort::CustomOpDomain& domain);
void add_matmul_ops(Ort::CustomOpDomain& domain);
void add_attention_ops(Ort::CustomOpDomain& domain);
}  // namespace hadanorm

namespace {

std::mutex g_domains_mutex;
std::vector<Ort::CustomOpDomain> g_domains;  // must outlive every session that uses them

uint32_t requested_api_version() {
  const char* value = std::getenv("HADANORM_KERNELS_API_VERSION");
  if (value && *value) {
    const long v = std::atol(value);
    if (v > 0) return static_cast<uint32_t>(v);
  }
  return ORT_API_VERSION;
}

}  // namespace

extern "C" {

// The path a kernel created now would run (HADANORM_KERNELS_ISA honoured), e.g. "avx512vnni", or
// "error: <why>" when the override names a path this CPU lacks.
__attribute__((visibility("default"))) const char* HadanormKernelsIsa() {
  static std::mutex mutex;
  static std::string last;
  std::lock_guard<std::mutex> lock(mutex);
  last = hadanorm::selected_isa_description();
  return last.c_str();
}

// The path hadanorm::Attention would run now at `precision` ("float", "bf16", "int8" or "fast"), e.g. "amx",
// "avx512", "scalar" ("avx512 (computes float)": a bf16 or int8 op on a path that computes fp32; "fast": the path and
// what it computes, "amx (bf16)", "avx512 (int8)", "avx2 (float)"), or "error: <why>".
__attribute__((visibility("default"))) const char* HadanormAttentionPath(const char* precision) {
  static std::mutex mutex;
  static std::string last;
  std::lock_guard<std::mutex> lock(mutex);
  try {
    const std::string p = precision ? precision : "";
    const hadanorm::Isa isa = hadanorm::select_isa();
    const hadanorm::AttentionPrecision which = hadanorm::parse_attention_precision(p, isa);
    const hadanorm::AttentionPath& path = hadanorm::attention_path(which, isa);
    const hadanorm::AttentionPrecision computed = hadanorm::attention_precision(which, path);
    last = path.name;
    if (p == "fast")
      last += computed == hadanorm::AttentionPrecision::kBf16   ? " (bf16)"
              : computed == hadanorm::AttentionPrecision::kInt8 ? " (int8)"
                                                                : " (float)";
    else if (computed != which)
      last += " (computes float)";
  } catch (const std::exception& e) {
    last = std::string("error: ") + e.what();
  }
  return last.c_str();
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  const uint32_t version = requested_api_version();
  const OrtApi* api = api_base->GetApi(version);
  if (!api) {
    // API version 1 is always there and has CreateStatus.
    const OrtApi* base = api_base->GetApi(1);
    std::string message = "hadanorm kernel library needs onnxruntime C API version " + std::to_string(version) +
                          " (onnxruntime >= 1." + std::to_string(version) + "), but this onnxruntime is " +
                          api_base->GetVersionString() + "; upgrade onnxruntime or rebuild the library with " +
                          "`python -m runtime.kernels.build --force`";
    return base ? base->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{"hadanorm"};
    hadanorm::add_transform_ops(domain);
    hadanorm::add_matmul_ops(domain);
    hadanorm::add_attention_ops(domain);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
