// onnxruntime CPU kernels for the ops of the "hadanorm" domain (opset 1).
//
// For x: float32 [..., N, d] (tokens on axis -2, channels on the last axis), mul: float32 [d],
// h_left: float32 [K, K], h_right: float32 [M, M], K * M = d:
//
//   Scale(x, mul)                              -> y = x * mul
//   ScaleRotate(x, mul, h_left, h_right)       -> y = rotate(x * mul)
//   CenterScale(x, mul)                        -> y = (x - mean) * mul, mean_y = mean * mul
//   CenterScaleRotate(x, mul, h_left, h_right) -> y = rotate((x - mean) * mul), mean_y = rotate(mean * mul)
//
// with mean the mean over axis -2 (per leading index, keepdims) and rotate(v) = h_left @ V @ h_right^T for v
// viewed row-major as V [K, M]. These are the same maths as the ONNX function bodies graph_passes/hadanorm_ops.py
// writes into the model.
//
// h_right is applied as a fast Walsh-Hadamard transform when it is exactly c * Sylvester(M) (checked on every
// run: O(M^2) compares, negligible next to the transform), else as a dense matmul; h_left is skipped when it is
// exactly the identity (block-diagonal Hadamard), else applied as a dense K x K matmul. Centering, scaling and
// rotation are fused in one pass per token; tokens are split over onnxruntime's intra-op thread pool (or over
// HADANORM_KERNELS_THREADS std::threads when that variable is set).
//
// Built without linking against onnxruntime (-DORT_API_MANUAL_INIT): RegisterCustomOps initialises the C++ API
// from the OrtApiBase onnxruntime passes in, requesting API version ORT_API_VERSION of the headers used (21).
//
// Environment:
//   HADANORM_KERNELS_THREADS=n     use n std::threads per op instead of onnxruntime's intra-op pool
//   HADANORM_KERNELS_CALL_LOG=path append one line "<op type>" per kernel run (tests: proves the kernel ran)
//   HADANORM_KERNELS_API_VERSION=v request API version v instead of ORT_API_VERSION (tests: incompatible API)

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// Hot loops are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time; no intrinsics.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(HADANORM_NO_CLONES)
#define HN_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HN_HOT
#endif

#define HN_STR_(x) #x
#define HN_STR(x) HN_STR_(x)

namespace hadanorm {

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw OpError(message.str());
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration from the environment
// ---------------------------------------------------------------------------------------------------------------

int env_threads() {
  const char* value = std::getenv("HADANORM_KERNELS_THREADS");
  if (!value || !*value) return 0;
  int n = std::atoi(value);
  return n > 0 ? n : 0;
}

void log_call(const char* op_type) {
  const char* path = std::getenv("HADANORM_KERNELS_CALL_LOG");
  if (!path || !*path) return;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\n", op_type);
    std::fclose(f);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The rotation plan: which fast paths h_left and h_right allow
// ---------------------------------------------------------------------------------------------------------------

struct Rotation {
  int64_t K = 1, M = 1;
  bool left_identity = true;
  std::vector<float> left;     // K x K row-major (when not the identity)
  bool right_fwht = true;
  float right_scale = 1.0f;    // h_right = right_scale * Sylvester(M) when right_fwht
  std::vector<float> right_t;  // h_right^T, M x M row-major (dense fallback)
};

bool is_identity(const float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (h[i * n + j] != (i == j ? 1.0f : 0.0f)) return false;
  return true;
}

// Exactly c * H_M with H_M = H_2 (x) ... (x) H_2, H_2 = [[1, 1], [1, -1]]: entry (i, j) is c * (-1)^popcount(i & j).
bool sylvester_scale(const float* h, int64_t m, float* scale) {
  if (m < 1 || (m & (m - 1)) != 0) return false;
  const float c = h[0];
  if (!(c != 0.0f) || !std::isfinite(c)) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const float expected = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -c : c;
      if (h[i * m + j] != expected) return false;
    }
  *scale = c;
  return true;
}

Rotation make_rotation(const float* h_left, const std::vector<int64_t>& left_shape, const float* h_right,
                       const std::vector<int64_t>& right_shape, int64_t d) {
  if (left_shape.size() != 2 || left_shape[0] != left_shape[1])
    fail("h_left must be a square matrix [K, K], got ", shape_string(left_shape));
  if (right_shape.size() != 2 || right_shape[0] != right_shape[1])
    fail("h_right must be a square matrix [M, M], got ", shape_string(right_shape));
  Rotation r;
  r.K = left_shape[0];
  r.M = right_shape[0];
  if (r.K * r.M != d)
    fail("h_left ", shape_string(left_shape), " and h_right ", shape_string(right_shape),
         " do not factor the channel width ", d, " (K * M must equal d)");
  r.left_identity = is_identity(h_left, r.K);
  if (!r.left_identity) r.left.assign(h_left, h_left + r.K * r.K);
  r.right_fwht = sylvester_scale(h_right, r.M, &r.right_scale);
  if (!r.right_fwht) {
    r.right_t.resize(static_cast<size_t>(r.M * r.M));
    for (int64_t i = 0; i < r.M; ++i)
      for (int64_t j = 0; j < r.M; ++j) r.right_t[j * r.M + i] = h_right[i * r.M + j];
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Row kernels (contiguous float loops the compiler vectorises)
// ---------------------------------------------------------------------------------------------------------------

// out = (x - mean) * mul (mean may be null)
HN_HOT void center_scale_row(const float* x, const float* mean, const float* mul, float* out, int64_t d) {
  if (mean) {
    for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - mean[i]) * mul[i];
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = x[i] * mul[i];
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define HN_VECTOR_EXT 1
#pragma GCC diagnostic ignored "-Wpsabi"  // v8 never crosses a non-inlined call
// 8 floats as one GCC vector (portable vector extension: AVX in the x86-64-v3 clone, SSE pairs otherwise)
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
#define HN_INLINE __attribute__((always_inline)) inline
HN_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HN_INLINE void store8(float* p, const v8& v) { std::memcpy(p, &v, sizeof v); }
#else
#define HN_INLINE inline
#endif

// One butterfly stage of distance h >= 1 on a row of length m: (a, b) -> (a + b, a - b).
HN_INLINE void butterfly_stage(float* row, int64_t m, int64_t h) {
  for (int64_t i = 0; i < m; i += 2 * h) {
    float* a = row + i;
    float* b = row + i + h;
    for (int64_t j = 0; j < h; ++j) {
      const float u = a[j], w = b[j];
      a[j] = u + w;
      b[j] = u - w;
    }
  }
}

// Unnormalised in-place Walsh-Hadamard transform of each of the `rows` rows of length m (power of two), i.e.
// row <- Sylvester(m) @ row. The stages of distance 1, 2, 4 (too short to vectorise as loops) run as one
// 8-point transform in a vector register (shuffle + multiply-add per stage); the others as contiguous loops.
HN_HOT void fwht_rows(float* v, int64_t rows, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * m;
    int64_t h = 1;
#ifdef HN_VECTOR_EXT
    if (m >= 8) {
      const v8i p1 = {1, 0, 3, 2, 5, 4, 7, 6}, p2 = {2, 3, 0, 1, 6, 7, 4, 5}, p4 = {4, 5, 6, 7, 0, 1, 2, 3};
      const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
      const v8 s4 = {1, 1, 1, 1, -1, -1, -1, -1};
      for (int64_t i = 0; i < m; i += 8) {
        v8 x = load8(row + i);
        x = __builtin_shuffle(x, p1) + s1 * x;  // out[i] = x[i ^ 1] +- x[i]: (a + b, a - b) per pair
        x = __builtin_shuffle(x, p2) + s2 * x;
        x = __builtin_shuffle(x, p4) + s4 * x;
        store8(row + i, x);
      }
      h = 8;
    }
#endif
    for (; h < m; h *= 2) butterfly_stage(row, m, h);
  }
}

// out[k, :] = v[k, :] @ h_right^T for each of the K rows (tmp: M floats)
HN_HOT void dense_right_rows(float* v, int64_t rows, int64_t m, const float* right_t, float* tmp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * m;
    std::fill(tmp, tmp + m, 0.0f);
    for (int64_t j = 0; j < m; ++j) {
      const float s = row[j];
      const float* hrow = right_t + j * m;
      for (int64_t i = 0; i < m; ++i) tmp[i] += s * hrow[i];
    }
    std::copy(tmp, tmp + m, row);
  }
}

// out = h_left @ v for v, out [K, M] row-major: blocks of R output rows x C columns accumulated in registers.
template <int R, int C>
HN_INLINE void left_block(const float* __restrict v, const float* __restrict left, int64_t k, int64_t m,
                          float* __restrict out, int64_t a0, int64_t c0) {
#ifdef HN_VECTOR_EXT
  if constexpr (C % 8 == 0) {
    constexpr int V = C / 8;
    v8 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < V; ++c) acc[r][c] = v8{};
    for (int64_t b = 0; b < k; ++b) {
      v8 x[V];
      for (int c = 0; c < V; ++c) x[c] = load8(v + b * m + c0 + 8 * c);
      for (int r = 0; r < R; ++r) {
        const float s = left[(a0 + r) * k + b];
        for (int c = 0; c < V; ++c) acc[r][c] += s * x[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < V; ++c) store8(out + (a0 + r) * m + c0 + 8 * c, acc[r][c]);
    return;
  }
#endif
  float acc[R][C] = {};
  for (int64_t b = 0; b < k; ++b) {
    const float* x = v + b * m + c0;
    for (int r = 0; r < R; ++r) {
      const float s = left[(a0 + r) * k + b];
      for (int c = 0; c < C; ++c) acc[r][c] += s * x[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[(a0 + r) * m + c0 + c] = acc[r][c];
}

template <int C>
HN_INLINE void left_columns(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  for (int64_t c0 = 0; c0 < m; c0 += C) {
    int64_t a = 0;
    for (; a + 4 <= k; a += 4) left_block<4, C>(v, left, k, m, out, a, c0);
    for (; a < k; ++a) left_block<1, C>(v, left, k, m, out, a, c0);
  }
}

HN_HOT void dense_left(const float* v, const float* left, int64_t k, int64_t m, float* out) {
  // 4 rows x 16 columns: 8 vector accumulators + 2 loads fit the 16 AVX registers (measured best of 2..12 x 8..32)
  if (m % 16 == 0)
    left_columns<16>(v, left, k, m, out);
  else if (m % 8 == 0)
    left_columns<8>(v, left, k, m, out);
  else if (m % 4 == 0)
    left_columns<4>(v, left, k, m, out);
  else if (m % 2 == 0)
    left_columns<2>(v, left, k, m, out);
  else
    left_columns<1>(v, left, k, m, out);
}

// Per-token scratch: the [K, M] intermediate when h_left is dense, plus M floats for a dense h_right.
struct Scratch {
  std::vector<float> block, tmp;
  Scratch(const Rotation* rot, int64_t d) {
    if (rot) {
      if (!rot->left_identity) block.resize(static_cast<size_t>(d));
      if (!rot->right_fwht) tmp.resize(static_cast<size_t>(rot->M));
    }
  }
};

// One token: out = rotate((x - mean) * mul) (rot may be null: no rotation). `mul_rot` is mul with the Sylvester
// scale folded in (used when rotating with the fast transform).
void transform_row(const float* x, const float* mean, const float* mul, const float* mul_rot, const Rotation* rot,
                   float* out, Scratch& scratch, int64_t d) {
  if (!rot) {
    center_scale_row(x, mean, mul, out, d);
    return;
  }
  float* v = rot->left_identity ? out : scratch.block.data();
  center_scale_row(x, mean, rot->right_fwht ? mul_rot : mul, v, d);
  if (rot->right_fwht)
    fwht_rows(v, rot->K, rot->M);
  else
    dense_right_rows(v, rot->K, rot->M, rot->right_t.data(), scratch.tmp.data());
  if (!rot->left_identity) dense_left(v, rot->left.data(), rot->K, rot->M, out);
}

// Column sums over tokens of one channel block, accumulated in double.
HN_HOT void column_mean(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) {
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - b0);
    std::fill(acc, acc + w, 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * d + b0;
      for (int64_t i = 0; i < w; ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < w; ++i) mean[b0 + i] = static_cast<float>(acc[i] / static_cast<double>(n));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Parallel for over chunks: onnxruntime's intra-op pool, or HADANORM_KERNELS_THREADS std::threads
// ---------------------------------------------------------------------------------------------------------------

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

void parallel_chunks(const Ort::KernelContext& ctx, ChunkJob& job, size_t chunks) {
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

// About 64 KiB of floats per chunk: enough work to amortise scheduling, enough chunks to balance threads.
int64_t rows_per_chunk(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// ---------------------------------------------------------------------------------------------------------------
// The kernel (one template for the four ops)
// ---------------------------------------------------------------------------------------------------------------

template <bool Center, bool Rotate>
struct TransformKernel {
  static constexpr const char* kName = Center ? (Rotate ? "CenterScaleRotate" : "CenterScale")
                                              : (Rotate ? "ScaleRotate" : "Scale");

  void Compute(OrtKernelContext* context) {
    log_call(kName);
    Ort::KernelContext ctx(context);

    Ort::ConstValue x_value = ctx.GetInput(0);
    Ort::ConstValue mul_value = ctx.GetInput(1);
    const std::vector<int64_t> x_shape = x_value.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> mul_shape = mul_value.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t rank = static_cast<int64_t>(x_shape.size());
    if (rank < (Center ? 2 : 1))
      fail("x must have shape [..., N, d] (rank >= ", (Center ? 2 : 1), "), got ", shape_string(x_shape));
    const int64_t d = x_shape[rank - 1];
    if (mul_shape.size() != 1 || mul_shape[0] != d)
      fail("mul must have shape [", d, "] (the channel width of x ", shape_string(x_shape), "), got ",
           shape_string(mul_shape));
    const float* x = x_value.GetTensorData<float>();
    const float* mul = mul_value.GetTensorData<float>();

    Rotation rotation;
    const Rotation* rot = nullptr;
    std::vector<float> mul_rot;
    if (Rotate) {
      Ort::ConstValue hl = ctx.GetInput(2);
      Ort::ConstValue hr = ctx.GetInput(3);
      rotation = make_rotation(hl.GetTensorData<float>(), hl.GetTensorTypeAndShapeInfo().GetShape(),
                               hr.GetTensorData<float>(), hr.GetTensorTypeAndShapeInfo().GetShape(), d);
      rot = &rotation;
      if (rotation.right_fwht) {
        mul_rot.resize(static_cast<size_t>(d));
        for (int64_t i = 0; i < d; ++i) mul_rot[i] = mul[i] * rotation.right_scale;
      }
    }

    Ort::UnownedValue y_value = ctx.GetOutput(0, x_shape);
    float* y = y_value.GetTensorMutableData<float>();
    int64_t total = 1;
    for (int64_t s : x_shape) total *= s;
    const int64_t rows = d > 0 ? total / d : 0;
    const int64_t n = Center ? x_shape[rank - 2] : 1;
    const int64_t groups = Center ? (n > 0 ? rows / n : 0) : 0;

    std::vector<float> mean;
    float* mean_y = nullptr;
    if (Center) {
      std::vector<int64_t> mean_shape = x_shape;
      mean_shape[rank - 2] = 1;
      Ort::UnownedValue mean_value = ctx.GetOutput(1, mean_shape);
      mean_y = mean_value.GetTensorMutableData<float>();
      int64_t mean_groups = 1;
      for (int64_t i = 0; i < rank - 2; ++i) mean_groups *= x_shape[i];
      mean.assign(static_cast<size_t>(mean_groups * d), 0.0f);
      if (n == 0) std::fill(mean.begin(), mean.end(), std::nanf(""));  // as ReduceMean over no tokens
      compute_means(ctx, x, groups, n, d, mean.data());
    }
    if (rows > 0 && d > 0) transform_rows(ctx, x, mean.data(), mul, mul_rot.data(), rot, y, d, n, rows);

    if (Center) {
      Scratch scratch(rot, d);
      const int64_t mean_groups = d > 0 ? static_cast<int64_t>(mean.size()) / d : 0;
      for (int64_t g = 0; g < mean_groups; ++g)
        transform_row(mean.data() + g * d, nullptr, mul, mul_rot.data(), rot, mean_y + g * d, scratch, d);
    }
  }

  static void transform_rows(const Ort::KernelContext& ctx, const float* x, const float* mean, const float* mul,
                             const float* mul_rot, const Rotation* rot, float* y, int64_t d, int64_t n, int64_t rows) {
    struct RowJob : ChunkJob {
      const float *x, *mean, *mul, *mul_rot;
      const Rotation* rot;
      float* y;
      int64_t d, n, rows, per_chunk;
      void run(size_t chunk) override {
        Scratch scratch(rot, d);
        const int64_t r0 = static_cast<int64_t>(chunk) * per_chunk;
        const int64_t r1 = std::min(rows, r0 + per_chunk);
        for (int64_t r = r0; r < r1; ++r) {
          const float* m = Center ? mean + (r / n) * d : nullptr;
          transform_row(x + r * d, m, mul, mul_rot, rot, y + r * d, scratch, d);
        }
      }
    } job;
    job.x = x;
    job.mean = mean;
    job.mul = mul;
    job.mul_rot = mul_rot;
    job.rot = rot;
    job.y = y;
    job.d = d;
    job.n = n;
    job.rows = rows;
    job.per_chunk = rows_per_chunk(d);
    parallel_chunks(ctx, job, static_cast<size_t>((rows + job.per_chunk - 1) / job.per_chunk));
  }

  static void compute_means(const Ort::KernelContext& ctx, const float* x, int64_t groups, int64_t n, int64_t d,
                            float* mean) {
    if (groups == 0 || n == 0 || d == 0) return;
    struct MeanJob : ChunkJob {
      const float* x;
      float* mean;
      int64_t n, d, blocks, width;
      void run(size_t chunk) override {
        const int64_t g = static_cast<int64_t>(chunk) / blocks;
        const int64_t c0 = (static_cast<int64_t>(chunk) % blocks) * width;
        column_mean(x + g * n * d, n, d, c0, std::min(d, c0 + width), mean + g * d);
      }
    } job;
    job.x = x;
    job.mean = mean;
    job.n = n;
    job.d = d;
    job.width = 256;
    job.blocks = (d + job.width - 1) / job.width;
    parallel_chunks(ctx, job, static_cast<size_t>(groups * job.blocks));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), message(e.what()).c_str());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, message(e.what()).c_str());
    }
  }

  static std::string message(const char* what) { return std::string("hadanorm::") + kName + ": " + what; }
};

// ---------------------------------------------------------------------------------------------------------------
// Op definitions
// ---------------------------------------------------------------------------------------------------------------

template <bool Center, bool Rotate>
struct TransformOp : Ort::CustomOpBase<TransformOp<Center, Rotate>, TransformKernel<Center, Rotate>, true> {
  using Kernel = TransformKernel<Center, Rotate>;

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/, void** kernel) const {
    *kernel = new Kernel();
    return nullptr;
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return Rotate ? 4 : 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return Center ? 2 : 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    const Ort::ShapeInferContext::Shape& x = ctx.GetInputShape(0);
    if (x.size() < 2) return Ort::Status(nullptr);  // unknown rank: leave the outputs unknown
    ctx.SetOutputShape(0, x);
    if (Center) {
      Ort::ShapeInferContext::Shape mean = x;
      mean[mean.size() - 2] = Ort::ShapeInferContext::SymbolicInteger(int64_t{1});
      ctx.SetOutputShape(1, mean);
    }
    return Ort::Status(nullptr);
  }
};

}  // namespace hadanorm

// ---------------------------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------------------------

namespace {

hadanorm::TransformOp<false, false> g_scale;
hadanorm::TransformOp<false, true> g_scale_rotate;
hadanorm::TransformOp<true, false> g_center_scale;
hadanorm::TransformOp<true, true> g_center_scale_rotate;

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

__attribute__((visibility("default"))) const char* HadanormKernelsApiVersion() {
  return "hadanorm kernels, onnxruntime API " HN_STR(ORT_API_VERSION);
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
    domain.Add(&g_scale);
    domain.Add(&g_scale_rotate);
    domain.Add(&g_center_scale);
    domain.Add(&g_center_scale_rotate);
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
