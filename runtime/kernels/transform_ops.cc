// onnxruntime kernels of the transform ops (Scale, ScaleRotate, CenterScale, CenterScaleRotate) and of the quantize
// ops fused with them (Quantize, ScaleQuantize, ScaleRotateQuantize, CenterScaleQuantize,
// CenterScaleRotateQuantize), for float32 and float16 tensors (computed in float32).
//
// Modulate* (ModulateScaleQuantize, ModulateScaleRotateQuantize, ModulateCenterScaleQuantize,
// ModulateCenterScaleRotateQuantize; float32): two more inputs x_scale, x_shift ([d] or [..., 1, d], one row per
// leading index of x), and the op reads x' = x * x_scale + x_shift (rounded as a Mul, then an Add) in place of x: a DiT
// block's adaLN modulation before a linear, without writing x' (graph_passes/fuse_modulation.py).
//
// For x [..., N, d] (tokens on axis -2, channels on the last axis), mul [d], h_left [K, K], h_right [M, M]:
//   y = rotate((x - mean) * mul) (the parts the op names; see transform.h), mean_y = rotate(mean * mul)
// The quantize ops do not write y: each token is quantized as it is transformed (int_kernels.h, QuantizeRowFn) to
// codes uint8 [..., N, d], scale T [..., N, 1], zero_point uint8 [..., N, 1] (+ mean_y for the Center ops).
// Tokens are split over onnxruntime's intra-op pool (or HADANORM_KERNELS_THREADS std::threads). Every function that
// depends on the CPU (row kernels, quantizer, float16 conversions) comes from the kernel's path table
// (isa_kernels(select_isa()): HADANORM_KERNELS_ISA).

#include <cmath>
#include <memory>
#include <string>

#include "int_kernels.h"
#include "ort_util.h"
#include "transform.h"

namespace hadanorm {

namespace {

template <bool Mul, bool Center, bool Rotate, bool Quant, bool Modulate = false>
constexpr const char* op_name() {
  if constexpr (Modulate) {
    static_assert(Mul && Quant, "only the Scale quantize ops take a modulation");
    if constexpr (Center) return Rotate ? "ModulateCenterScaleRotateQuantize" : "ModulateCenterScaleQuantize";
    return Rotate ? "ModulateScaleRotateQuantize" : "ModulateScaleQuantize";
  }
  if constexpr (!Mul) return "Quantize";
  if constexpr (Quant) {
    if constexpr (Center) return Rotate ? "CenterScaleRotateQuantize" : "CenterScaleQuantize";
    return Rotate ? "ScaleRotateQuantize" : "ScaleQuantize";
  }
  if constexpr (Center) return Rotate ? "CenterScaleRotate" : "CenterScale";
  return Rotate ? "ScaleRotate" : "Scale";
}

template <bool Mul, bool Center, bool Rotate, bool Quant, bool Half, bool Modulate = false>
struct TransformKernel {
  static_assert(!(Modulate && Half), "the Modulate ops are float32");
  static constexpr const char* kName = op_name<Mul, Center, Rotate, Quant, Modulate>();
  static constexpr size_t kInputs = (Rotate ? 4 : (Mul ? 2 : 1)) + (Modulate ? 2 : 0);
  static constexpr size_t kOutputs = (Quant ? 3 : 1) + (Center ? 1 : 0);
  using T = std::conditional_t<Half, uint16_t, float>;

  float qmax = 0.0f;
  const IsaKernels* kernels = nullptr;

  explicit TransformKernel(const Ort::ConstKernelInfo& info) {
    if constexpr (Quant) {
      const int64_t bits = info.GetAttribute<int64_t>("bits");
      if (bits < 2 || bits > 8) fail("attribute bits=", bits, " is outside 2..8; re-quantize with hn-export");
      qmax = static_cast<float>((1 << bits) - 1);
    }
    kernels = &isa_kernels(select_isa());
    if constexpr (Rotate) cache_constant_rotation(info);
  }

  // When mul, h_left and h_right are constant initializers (as hn-export writes them), the rotation plan (its
  // identity / Sylvester / Paley checks: O(K^2 + M^2) compares) and mul_rot are built once here, not on every call
  // (make_rotation had 6% of the samples of a 512-token, 1152-wide call in perf). With the quantizer and FWHT changes
  // of the same commit, `python benchmarks/bench_ops_ab.py quantize OLD_LIB NEW_LIB` (one thread, busy host):
  // 1152 wide 0.52 -> 0.40 ms, 4608 wide 1.90 -> 1.67 ms.
  struct ConstantRotation {
    Rotation rotation;
    std::vector<float> mul_rot;
    const void* mul_data = nullptr;
  };
  std::unique_ptr<ConstantRotation> constant_rotation;

  // mul with the Sylvester scale of a fast h_right folded in (empty when h_right is applied densely)
  static std::vector<float> mul_rot_of(const float* mul, const Rotation& rotation, int64_t d) {
    std::vector<float> out;
    if (rotation.right_fwht) {
      out.resize(static_cast<size_t>(d));
      for (int64_t i = 0; i < d; ++i) out[i] = mul[i] * rotation.right_scale;
    }
    return out;
  }

  void cache_constant_rotation(const Ort::ConstKernelInfo& info) {
    int constant[3] = {0, 0, 0};
    Ort::ConstValue values[3] = {Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}};
    for (size_t i = 0; i < 3; ++i) values[i] = info.GetTensorConstantInput(1 + i, &constant[i]);
    if (!(constant[0] && constant[1] && constant[2])) return;
    const std::vector<int64_t> mul_shape = shape_of(values[0]);
    if (mul_shape.size() != 1) return;  // reported with the run's shapes
    const int64_t d = mul_shape[0];
    std::vector<float> mul_storage, left_storage, right_storage;
    auto cached = std::make_unique<ConstantRotation>();
    try {
      cached->rotation = make_rotation(float_data(values[1], Half, left_storage, kernels->half), shape_of(values[1]),
                                       float_data(values[2], Half, right_storage, kernels->half),
                                       shape_of(values[2]), d);
    } catch (const OpError&) {
      return;  // reported with the run's shapes
    }
    cached->mul_rot = mul_rot_of(float_data(values[0], Half, mul_storage, kernels->half), cached->rotation, d);
    cached->mul_data = values[0].GetTensorRawData();
    constant_rotation = std::move(cached);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return status_of(kName, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    log_call(kName, isa_name(kernels->isa));
    const HalfKernels& half = kernels->half;
    Ort::KernelContext ctx(context);
    Ort::ConstValue x_value = ctx.GetInput(0);
    const std::vector<int64_t> x_shape = shape_of(x_value);
    const int64_t rank = static_cast<int64_t>(x_shape.size());
    if (rank < (Center ? 2 : 1))
      fail("x must have shape [..., N, d] (rank >= ", (Center ? 2 : 1), "), got ", shape_string(x_shape));
    const int64_t d = x_shape[rank - 1];
    const T* x = static_cast<const T*>(x_value.GetTensorRawData());

    std::vector<float> mul_storage, left_storage, right_storage;
    const float* mul = nullptr;
    if constexpr (Mul) {
      Ort::ConstValue mul_value = ctx.GetInput(1);
      const std::vector<int64_t> mul_shape = shape_of(mul_value);
      if (mul_shape.size() != 1 || mul_shape[0] != d)
        fail("mul must have shape [", d, "] (the channel width of x ", shape_string(x_shape), "), got ",
             shape_string(mul_shape));
      mul = float_data(mul_value, Half, mul_storage, half);
    }
    Rotation rotation;
    const Rotation* rot = nullptr;
    std::vector<float> mul_rot;
    const float* mul_rot_data = nullptr;
    if constexpr (Rotate) {
      Ort::ConstValue hl = ctx.GetInput(2);
      Ort::ConstValue hr = ctx.GetInput(3);
      if (constant_rotation && constant_rotation->rotation.K * constant_rotation->rotation.M == d &&
          ctx.GetInput(1).GetTensorRawData() == constant_rotation->mul_data) {
        rot = &constant_rotation->rotation;
        mul_rot_data = constant_rotation->mul_rot.data();
      } else {
        rotation = make_rotation(float_data(hl, Half, left_storage, half), shape_of(hl),
                                 float_data(hr, Half, right_storage, half), shape_of(hr), d);
        rot = &rotation;
        mul_rot = mul_rot_of(mul, rotation, d);
        mul_rot_data = mul_rot.data();
      }
    }

    const int64_t total = element_count(x_shape);
    const int64_t rows = d > 0 ? total / d : 0;
    Modulation modulation;
    if constexpr (Modulate) modulation = modulation_inputs(ctx, x_shape);
    Outputs out;
    if constexpr (Quant) {
      std::vector<int64_t> row_shape = x_shape;
      row_shape[rank - 1] = 1;
      out.codes = ctx.GetOutput(0, x_shape).GetTensorMutableData<uint8_t>();
      out.scale = static_cast<T*>(ctx.GetOutput(1, row_shape).GetTensorMutableRawData());
      out.zero_point = ctx.GetOutput(2, row_shape).GetTensorMutableData<uint8_t>();
    } else {
      out.y = static_cast<T*>(ctx.GetOutput(0, x_shape).GetTensorMutableRawData());
    }

    const int64_t n = Center ? x_shape[rank - 2] : 1;
    std::vector<float> mean;
    T* mean_y = nullptr;
    if constexpr (Center) {
      std::vector<int64_t> mean_shape = x_shape;
      mean_shape[rank - 2] = 1;
      mean_y = static_cast<T*>(ctx.GetOutput(kOutputs - 1, mean_shape).GetTensorMutableRawData());
      int64_t mean_groups = 1;
      for (int64_t i = 0; i < rank - 2; ++i) mean_groups *= x_shape[i];
      mean.assign(static_cast<size_t>(mean_groups * d), 0.0f);
      if (n == 0) std::fill(mean.begin(), mean.end(), std::nanf(""));  // as ReduceMean over no tokens
      compute_means(ctx, kernels->transform, x, n > 0 ? rows / n : 0, n, d, mean.data(), modulation);
    }
    const int64_t tokens = Center || rank < 2 ? n : x_shape[rank - 2];
    if (rows > 0 && d > 0)
      transform_rows(ctx, x, mean.data(), mul, mul_rot_data, rot, out, d, tokens, rows, modulation);

    if constexpr (Center) {
      Scratch scratch(rot, d);
      std::vector<float> row(static_cast<size_t>(d));
      const int64_t mean_groups = d > 0 ? static_cast<int64_t>(mean.size()) / d : 0;
      for (int64_t g = 0; g < mean_groups; ++g) {
        float* dst = Half ? row.data() : reinterpret_cast<float*>(mean_y + g * d);
        transform_row(kernels->transform, mean.data() + g * d, nullptr, mul, mul_rot_data, rot, dst, scratch, d);
        if constexpr (Half) half.to_halves(row.data(), mean_y + g * d, d);
      }
    }
  }

  // x_scale and x_shift of the Modulate ops: group g's rows (g = row / tokens) read scale + g * stride, shift + g *
  // stride (stride 0: one row for every token)
  struct Modulation {
    const float* scale = nullptr;
    const float* shift = nullptr;
    int64_t scale_stride = 0, shift_stride = 0;
  };

  static Modulation modulation_inputs(const Ort::KernelContext& ctx, const std::vector<int64_t>& x_shape) {
    const int64_t rank = static_cast<int64_t>(x_shape.size());
    if (rank < 2) fail("x must have shape [..., N, d] (rank >= 2) for the modulation, got ", shape_string(x_shape));
    const int64_t d = x_shape[rank - 1];
    std::vector<int64_t> per_group = x_shape;
    per_group[rank - 2] = 1;
    Modulation m;
    const char* names[2] = {"x_scale", "x_shift"};
    for (int i = 0; i < 2; ++i) {
      Ort::ConstValue value = ctx.GetInput(kInputs - 2 + i);
      const std::vector<int64_t> shape = shape_of(value);
      int64_t stride;
      if (shape == std::vector<int64_t>{d})
        stride = 0;
      else if (shape == per_group)
        stride = d;
      else
        fail(names[i], " must have shape [", d, "] or ", shape_string(per_group), " (x ", shape_string(x_shape),
             " with one token), got ", shape_string(shape));
      (i == 0 ? m.scale : m.shift) = value.GetTensorData<float>();
      (i == 0 ? m.scale_stride : m.shift_stride) = stride;
    }
    return m;
  }

  struct Outputs {
    T* y = nullptr;
    uint8_t* codes = nullptr;
    T* scale = nullptr;
    uint8_t* zero_point = nullptr;
  };

  // n: the tokens of a group (rows r and r' share a mean and a modulation row when r / n == r' / n)
  void transform_rows(const Ort::KernelContext& ctx, const T* x, const float* mean, const float* mul,
                      const float* mul_rot, const Rotation* rot, const Outputs& out, int64_t d, int64_t n,
                      int64_t rows, const Modulation& modulation) const {
    const int64_t per_chunk = rows_per_chunk(d);
    const HalfKernels& half = kernels->half;
    // float32 quantize ops rotating with h_right's fast transform alone (--hadamard block): one pass a token
    // (IsaKernels::fwht_quantize_row), where the path has it, the same bits
    const bool one_pass = Quant && Mul && !Half && rot && rot->left_identity && rot->right_fwht &&
                          kernels->fwht_quantize_row != nullptr;
    parallel_for(ctx, static_cast<size_t>(ceil_div(rows, per_chunk)), [&](size_t chunk) {
      Scratch scratch(rot, d);
      std::vector<float> xbuf((Half || Modulate) ? d : 0), ybuf((Half || Quant) ? d : 0);
      const int64_t r0 = static_cast<int64_t>(chunk) * per_chunk;
      const int64_t r1 = std::min(rows, r0 + per_chunk);
      for (int64_t r = r0; r < r1; ++r) {
        if constexpr (Quant && Mul && !Half) {
          if (one_pass) {
            const int64_t g = r / std::max<int64_t>(n, 1);
            const float* x_scale = Modulate ? modulation.scale + g * modulation.scale_stride : nullptr;
            const float* x_shift = Modulate ? modulation.shift + g * modulation.shift_stride : nullptr;
            float scale;
            if (kernels->fwht_quantize_row(x + r * d, x_scale, x_shift, Center ? mean + g * d : nullptr, mul_rot,
                                           rot->K, rot->M, qmax, false, ybuf.data(), out.codes + r * d, &scale,
                                           out.zero_point + r)) {
              out.scale[r] = scale;
              continue;
            }
          }
        }
        const float* xr;
        if constexpr (Half) {
          half.to_floats(x + r * d, xbuf.data(), d);
          xr = xbuf.data();
        } else {
          xr = x + r * d;
        }
        if constexpr (Modulate) {
          const int64_t g = r / std::max<int64_t>(n, 1);
          kernels->transform.affine(xr, modulation.scale + g * modulation.scale_stride,
                                    modulation.shift + g * modulation.shift_stride, xbuf.data(), d);
          xr = xbuf.data();
        }
        const float* yr;
        if constexpr (Mul) {
          float* dst = (Half || Quant) ? ybuf.data() : reinterpret_cast<float*>(out.y + r * d);
          const float* row_mean = Center ? mean + (r / std::max<int64_t>(n, 1)) * d : nullptr;
          transform_row(kernels->transform, xr, row_mean, mul, mul_rot, rot, dst, scratch, d);
          yr = dst;
        } else {
          yr = xr;  // Quantize: y = x
        }
        if constexpr (Quant) {
          float scale;
          kernels->quantize_row(yr, d, qmax, Half, out.codes + r * d, &scale, out.zero_point + r);
          if constexpr (Half)
            out.scale[r] = float_to_half(scale);
          else
            out.scale[r] = scale;
        } else if constexpr (Half) {
          half.to_halves(yr, out.y + r * d, d);
        }
      }
    });
  }

  // The column means of x (of x' for the Modulate ops, computed as the means run and not written: per channel the
  // same values summed in the same order, so the bits of the unfused Mul, Add and quantize op), 256 channels a chunk.
  // The Modulate ops wrote x' into a per-thread buffer of n x width floats first, width 16..256 channels to hold about
  // 64 K floats: at 4096 tokens 16 channels, each row's 64 bytes on another 4 KB page, which the prefetchers do not
  // follow. One op, one thread, [2, 4096, 1152] (`python benchmarks/bench_ops_ab.py modulate --tokens 4096`):
  // 21.96 -> 10.76 ms; the 5 Modulate nodes of the 2-block 1024 px call 62.7 -> 27.6 ms (benchmarks/profile_ops.py).
  static void compute_means(const Ort::KernelContext& ctx, const TransformKernels& rows, const T* x, int64_t groups,
                            int64_t n, int64_t d, float* mean, const Modulation& modulation) {
    if (groups == 0 || n == 0 || d == 0) return;
    constexpr int64_t width = 256;
    const int64_t blocks = ceil_div(d, width);
    parallel_for(ctx, static_cast<size_t>(groups * blocks), [&](size_t chunk) {
      const int64_t g = static_cast<int64_t>(chunk) / blocks;
      const int64_t c0 = (static_cast<int64_t>(chunk) % blocks) * width, c1 = std::min(d, c0 + width);
      if constexpr (Modulate)
        rows.column_mean_affine(x + g * n * d, n, d, c0, c1, modulation.scale + g * modulation.scale_stride,
                                modulation.shift + g * modulation.shift_stride, mean + g * d);
      else if constexpr (Half)
        rows.column_mean_half(x + g * n * d, n, d, c0, c1, mean + g * d);
      else
        rows.column_mean(x + g * n * d, n, d, c0, c1, mean + g * d);
    });
  }
};

template <bool Mul, bool Center, bool Rotate, bool Quant, bool Half, bool Modulate = false>
struct TransformOp : Ort::CustomOpBase<TransformOp<Mul, Center, Rotate, Quant, Half, Modulate>,
                                       TransformKernel<Mul, Center, Rotate, Quant, Half, Modulate>, true> {
  using Kernel = TransformKernel<Mul, Center, Rotate, Quant, Half, Modulate>;

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return status_of(Kernel::kName, [&] { *kernel = new Kernel(Ort::ConstKernelInfo(info)); });
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return Kernel::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return float_type(Half); }
  size_t GetOutputTypeCount() const { return Kernel::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    if (Quant && (i == 0 || i == 2)) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    return float_type(Half);
  }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    const Ort::ShapeInferContext::Shape& x = ctx.GetInputShape(0);
    if (x.size() < 2) return Ort::Status(nullptr);  // unknown rank: leave the outputs unknown
    ctx.SetOutputShape(0, x);
    if (Quant) {
      Ort::ShapeInferContext::Shape row = x;
      row.back() = Ort::ShapeInferContext::SymbolicInteger(int64_t{1});
      ctx.SetOutputShape(1, row);
      ctx.SetOutputShape(2, row);
    }
    if (Center) {
      Ort::ShapeInferContext::Shape mean = x;
      mean[mean.size() - 2] = Ort::ShapeInferContext::SymbolicInteger(int64_t{1});
      ctx.SetOutputShape(Kernel::kOutputs - 1, mean);
    }
    return Ort::Status(nullptr);
  }
};

template <bool Half>
struct TransformOps {
  TransformOp<true, false, false, false, Half> scale;
  TransformOp<true, false, true, false, Half> scale_rotate;
  TransformOp<true, true, false, false, Half> center_scale;
  TransformOp<true, true, true, false, Half> center_scale_rotate;
  TransformOp<false, false, false, true, Half> quantize;
  TransformOp<true, false, false, true, Half> scale_quantize;
  TransformOp<true, false, true, true, Half> scale_rotate_quantize;
  TransformOp<true, true, false, true, Half> center_scale_quantize;
  TransformOp<true, true, true, true, Half> center_scale_rotate_quantize;

  void add_to(Ort::CustomOpDomain& domain) {
    for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{
             &scale, &scale_rotate, &center_scale, &center_scale_rotate, &quantize, &scale_quantize,
             &scale_rotate_quantize, &center_scale_quantize, &center_scale_rotate_quantize})
      domain.Add(op);
  }
};

TransformOps<false> g_float_ops;
TransformOps<true> g_half_ops;

struct ModulateOps {
  TransformOp<true, false, false, true, false, true> scale_quantize;
  TransformOp<true, false, true, true, false, true> scale_rotate_quantize;
  TransformOp<true, true, false, true, false, true> center_scale_quantize;
  TransformOp<true, true, true, true, false, true> center_scale_rotate_quantize;

  void add_to(Ort::CustomOpDomain& domain) {
    for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{&scale_quantize, &scale_rotate_quantize,
                                                               &center_scale_quantize, &center_scale_rotate_quantize})
      domain.Add(op);
  }
} g_modulate_ops;

}  // namespace

void add_transform_ops(Ort::CustomOpDomain& domain) {
  g_float_ops.add_to(domain);
  g_half_ops.add_to(domain);
  g_modulate_ops.add_to(domain);
}

}  // namespace hadanorm
