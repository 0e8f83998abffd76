// onnxruntime glue shared by the op kernels: call log, parallel for, float/float16 tensors, error statuses.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "half.h"
#include "util.h"

namespace hadanorm {

// HADANORM_KERNELS_THREADS=n: n std::threads per op instead of onnxruntime's intra-op pool.
inline int env_threads() {
  const char* value = std::getenv("HADANORM_KERNELS_THREADS");
  if (!value || !*value) return 0;
  int n = std::atoi(value);
  return n > 0 ? n : 0;
}

// HADANORM_KERNELS_CALL_LOG=path: one line "<op type>" per kernel run (" <path>" appended when
// HADANORM_KERNELS_CALL_LOG_ISA=1: the instruction-set path, or the attention path).
inline void log_call(const char* op_type, const char* isa = nullptr) {
  const char* path = std::getenv("HADANORM_KERNELS_CALL_LOG");
  if (!path || !*path) return;
  const char* with_isa = std::getenv("HADANORM_KERNELS_CALL_LOG_ISA");
  const bool suffix = isa && with_isa && with_isa[0] == '1';
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, suffix ? "%s %s\n" : "%s\n", op_type, isa);
    std::fclose(f);
  }
}

struct ChunkJob {
  virtual void run(size_t chunk) = 0;
  virtual ~ChunkJob() = default;
  std::mutex error_mutex;
  std::string error;
  void run_safely(size_t chunk) {
    try {
      run(chunk);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty()) error = e.what();
    }
  }
};

// Runs job.run(c) for c in [0, chunks): onnxruntime's intra-op pool, or HADANORM_KERNELS_THREADS std::threads.
inline void parallel_chunks(const Ort::KernelContext& ctx, ChunkJob& job, size_t chunks) {
  if (chunks == 0) return;
  const int threads = env_threads();
  if (chunks == 1 || threads == 1) {
    for (size_t c = 0; c < chunks; ++c) job.run_safely(c);
  } else if (threads > 1) {
    std::atomic<size_t> next{0};
    auto worker = [&]() {
      for (size_t c = next++; c < chunks; c = next++) job.run_safely(c);
    };
    std::vector<std::thread> pool;
    const size_t extra = std::min<size_t>(static_cast<size_t>(threads), chunks) - 1;
    for (size_t i = 0; i < extra; ++i) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
  } else {
    // num_batch = chunks: one task per chunk, claimed dynamically by the pool's threads and the calling thread, so
    // a worker that is descheduled (busy machine) delays one chunk, not a static half of the op.
    ctx.ParallelFor([](void* data, size_t c) { static_cast<ChunkJob*>(data)->run_safely(c); }, chunks, chunks,
                    &job);
  }
  if (!job.error.empty()) throw OpError(job.error);
}

// A parallel loop over [0, chunks) calling fn(chunk).
template <typename Fn>
void parallel_for(const Ort::KernelContext& ctx, size_t chunks, Fn&& fn) {
  struct Job : ChunkJob {
    Fn* fn;
    void run(size_t chunk) override { (*fn)(chunk); }
  } job;
  job.fn = &fn;
  parallel_chunks(ctx, job, chunks);
}

// Scratch memory for one kernel call (64-byte aligned, freed at the end of the scope) from onnxruntime's allocator for
// the CPU: the session's arena when it has one, which keeps the memory between calls, so a large buffer is not mapped
// and faulted in page by page every call (the 1024 px attention's 44 MB packed K/V: about 22 000 page faults a call
// from new[] and delete[], glibc's mmap and munmap); plain malloc when the session's arena is off
// (enable_cpu_mem_arena = 0) or shrunk after each run.
class OrtScratch {
 public:
  OrtScratch(const Ort::KernelContext& ctx, size_t bytes) {
    static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    allocator_ = ctx.GetAllocator(*cpu);
    raw_ = allocator_->Alloc(allocator_, bytes + 64);
    if (!raw_) {
      Ort::GetApi().ReleaseAllocator(allocator_);
      fail("out of memory: ", bytes, " bytes of scratch");
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw_);
    data_ = static_cast<uint8_t*>(raw_) + (64 - p % 64) % 64;
  }
  ~OrtScratch() {
    allocator_->Free(allocator_, raw_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }
  OrtScratch(const OrtScratch&) = delete;
  OrtScratch& operator=(const OrtScratch&) = delete;
  uint8_t* data() const { return data_; }

 private:
  OrtAllocator* allocator_ = nullptr;
  void* raw_ = nullptr;
  uint8_t* data_ = nullptr;
};

// About 64 KiB of floats per chunk: enough work to amortise scheduling, enough chunks to balance threads.
inline int64_t rows_per_chunk(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

inline constexpr ONNXTensorElementDataType float_type(bool half) {
  return half ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

inline std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

inline int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

// The float32 data of a float or float16 tensor: the tensor itself, or a copy in `storage` converted by `convert`
// (the kernel's path's HalfKernels).
inline const float* float_data(const Ort::ConstValue& v, bool half, std::vector<float>& storage,
                               const HalfKernels& convert) {
  if (!half) return v.GetTensorData<float>();
  const int64_t n = element_count(shape_of(v));
  storage.resize(static_cast<size_t>(n));
  convert.to_floats(static_cast<const uint16_t*>(v.GetTensorRawData()), storage.data(), n);
  return storage.data();
}

// Runs fn() and turns exceptions into an onnxruntime status whose message starts "hadanorm::<op>: ".
template <typename Fn>
OrtStatusPtr status_of(const char* op_type, Fn&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(),
                                      (std::string("hadanorm::") + op_type + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
                                      (std::string("hadanorm::") + op_type + ": " + e.what()).c_str());
  }
}

// Ops list for registration (each source adds its own).
struct OpList {
  std::vector<const OrtCustomOp*> ops;
};

}  // namespace hadanorm
