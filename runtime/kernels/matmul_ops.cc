// onnxruntime kernels of IntMatMul4 / IntMatMul8 (quantized activation codes x packed weight; IntMatMul{4,8}LowRank:
// plus t @ right; IntMatMul{4,8}[LowRank]Gelu: then gelu with the tanh approximation; IntMatMul{4,8}[LowRank]Residual:
// then residual + y; IntMatMul{4,8}[LowRank]GatedResidual: then residual + gate * y) and FloatMatMul4 / FloatMatMul8
// (float activation x packed weight), attribute block_size, for float32 and float16 T.
//
//   IntMatMul:   codes uint8 [..., M, K], a_scale T [..., M, 1], a_zero_point uint8 [..., M, 1], b, scales T
//                [k_blocks, N], zero_points [k_blocks, N], bias T [N] or [..., 1, N]  ->  y T [..., M, N]
//   FloatMatMul: x T [..., M, K], b, scales, zero_points  ->  y T [..., M, N]
//
// b: uint8 [ceil(N/16), K_pad/8, 64] (4-bit, zero points uint8) or int8 [ceil(N/16), K_pad/4, 64] (8-bit, zero
// points int8), K_pad = k_blocks * block_size, k_blocks = ceil(K / block_size) (graph_passes/int_packing.py). The
// maths is in int_kernels.h. When b, scales and zero_points are constant initializers, the per-weight sums are
// computed once when the kernel is created; otherwise on every run. Every CPU-dependent function comes from the
// kernel's path table (isa_kernels(select_isa()): HADANORM_KERNELS_ISA).

#include <memory>

#include "int_kernels.h"
#include "ort_util.h"

namespace hadanorm {

namespace {

// What an integer matmul adds after its product (and low-rank term): nothing, the residual stream, or the residual
// stream plus a gate times the product (a DiT block's attention and feed-forward outputs).
enum class Residual { kNone, kAdd, kGated };

template <int Bits, bool IntInput, bool Gelu, bool LowRank, Residual Res>
constexpr const char* matmul_name() {
  if constexpr (Res == Residual::kAdd)
    return LowRank ? (Bits == 4 ? "IntMatMul4LowRankResidual" : "IntMatMul8LowRankResidual")
                   : (Bits == 4 ? "IntMatMul4Residual" : "IntMatMul8Residual");
  if constexpr (Res == Residual::kGated)
    return LowRank ? (Bits == 4 ? "IntMatMul4LowRankGatedResidual" : "IntMatMul8LowRankGatedResidual")
                   : (Bits == 4 ? "IntMatMul4GatedResidual" : "IntMatMul8GatedResidual");
  if constexpr (IntInput && LowRank && Gelu) return Bits == 4 ? "IntMatMul4LowRankGelu" : "IntMatMul8LowRankGelu";
  if constexpr (IntInput && LowRank) return Bits == 4 ? "IntMatMul4LowRank" : "IntMatMul8LowRank";
  if constexpr (IntInput && Gelu) return Bits == 4 ? "IntMatMul4Gelu" : "IntMatMul8Gelu";
  if constexpr (IntInput) return Bits == 4 ? "IntMatMul4" : "IntMatMul8";
  return Bits == 4 ? "FloatMatMul4" : "FloatMatMul8";
}

// The epilogues of IntMatMul{4,8}[LowRank][Gelu], on each task's output rows while they are in this core's cache:
// LowRank: y += t @ right (inputs 7 and 8: t [..., M, r], right [r, N]; IsaKernels::low_rank_add), then Gelu: gelu with
// the tanh approximation (IsaKernels::gelu_tanh); Residual: y = residual + y (input 7, or 9 after the low-rank
// inputs), GatedResidual: y = residual + gate * y (gate [N] or [..., 1, N] as the bias, then residual;
// IsaKernels::residual_add).
template <int Bits, bool IntInput, bool Half, bool Gelu = false, bool LowRank = false, Residual Res = Residual::kNone>
struct MatMulKernel {
  static_assert(IntInput || !(Gelu || LowRank || Res != Residual::kNone), "only the integer matmuls take an epilogue");
  static_assert(!(Gelu && Res != Residual::kNone), "no residual after an activation");
  static constexpr const char* kName = matmul_name<Bits, IntInput, Gelu, LowRank, Res>();
  static constexpr size_t kResidualInputs = Res == Residual::kGated ? 2 : (Res == Residual::kAdd ? 1 : 0);
  static constexpr size_t kResidualFirst = LowRank ? 9 : 7;  // index of gate (GatedResidual) or residual
  static constexpr size_t kWeight = IntInput ? 3 : 1;  // index of b; scales and zero_points follow
  static constexpr size_t kInputs = IntInput ? (LowRank ? 9 : 7) + kResidualInputs : 4;
  static constexpr int64_t kGranule = Bits == 4 ? 8 : 4;  // k rows per 64-byte row
  using T = std::conditional_t<Half, uint16_t, float>;

  int64_t block = 0;
  const IsaKernels* kernels = nullptr;
  std::unique_ptr<WeightInfo> constant_weight;

  explicit MatMulKernel(const Ort::ConstKernelInfo& info) {
    block = info.GetAttribute<int64_t>("block_size");
    if (block <= 0 || block % kGranule || block > kMaxBlock)
      fail("attribute block_size=", block, " must be a positive multiple of ", kGranule, " up to ", kMaxBlock,
           " for the ", Bits, "-bit packed layout; re-quantize with hn-export");
    kernels = &isa_kernels(select_isa());
    int constant[3] = {0, 0, 0};
    Ort::ConstValue values[3] = {Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}};
    for (size_t i = 0; i < 3; ++i) values[i] = info.GetTensorConstantInput(kWeight + i, &constant[i]);
    if (constant[0] && constant[1] && constant[2]) {
      const std::vector<int64_t> scales_shape = shape_of(values[1]);
      if (scales_shape.size() != 2) return;  // reported with the run's shapes
      WeightInfo w = weight_geometry(Bits, scales_shape[1], scales_shape[0], block);
      if (!weight_matches(w, shape_of(values[0]), shape_of(values[2]))) return;
      std::vector<float> storage;
      kernels->fill_weight_info(w, static_cast<const uint8_t*>(values[0].GetTensorRawData()),
                                float_data(values[1], Half, storage, kernels->half), values[2].GetTensorRawData());
      trim_weight(w, static_cast<const uint8_t*>(values[0].GetTensorRawData()), /*constant=*/true);
      constant_weight = std::make_unique<WeightInfo>(std::move(w));
    }
  }

  static std::vector<int64_t> b_shape_for(const WeightInfo& w) { return {w.tiles, w.k_pad / kGranule, 64}; }

  static bool weight_matches(const WeightInfo& w, const std::vector<int64_t>& b_shape,
                             const std::vector<int64_t>& zp_shape) {
    return b_shape == b_shape_for(w) && zp_shape == std::vector<int64_t>{w.k_blocks, w.n};
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return status_of(kName, [&] { Compute(context); });
  }

  // The weight of this run: the one cached at creation, or built into `storage` after checking the shapes.
  const WeightInfo& weight(const Ort::KernelContext& ctx, int64_t k, WeightInfo& storage) const {
    Ort::ConstValue b = ctx.GetInput(kWeight), scales = ctx.GetInput(kWeight + 1), zps = ctx.GetInput(kWeight + 2);
    const std::vector<int64_t> scales_shape = shape_of(scales);
    if (scales_shape.size() != 2)
      fail("scales must have shape [k_blocks, N], got ", shape_string(scales_shape), "; re-quantize with hn-export");
    const int64_t k_blocks = scales_shape[0], n = scales_shape[1];
    if (k_blocks != ceil_div(k, block))
      fail("scales has shape ", shape_string(scales_shape), " but K=", k, ", block_size=", block, " need ",
           ceil_div(k, block), " blocks; re-quantize with hn-export");
    WeightInfo geometry = weight_geometry(Bits, n, k_blocks, block);
    const std::vector<int64_t> b_shape = shape_of(b);
    if (b_shape != b_shape_for(geometry))
      fail("b has shape ", shape_string(b_shape), " but N=", n, ", K=", k, ", block_size=", block, " need ",
           shape_string(b_shape_for(geometry)), "; re-quantize with hn-export");
    const std::vector<int64_t> zp_shape = shape_of(zps);
    if (zp_shape != std::vector<int64_t>{k_blocks, n})
      fail("zero_points has shape ", shape_string(zp_shape), " but scales has ", shape_string(scales_shape),
           "; re-quantize with hn-export");
    if (constant_weight && constant_weight->n == n && constant_weight->k_blocks == k_blocks)
      return *constant_weight;
    storage = std::move(geometry);
    std::vector<float> scale_storage;
    kernels->fill_weight_info(storage, static_cast<const uint8_t*>(b.GetTensorRawData()),
                              float_data(scales, Half, scale_storage, kernels->half), zps.GetTensorRawData());
    trim_weight(storage, static_cast<const uint8_t*>(b.GetTensorRawData()), /*constant=*/false);
    return storage;
  }

  // IntMatMul4 and FloatMatMul4: the two-level form of the weight, when its scales have it (int_kernels.h, TwoLevel,
  // one for both kernels of a constant weight); the block route's per-block scales and sums are then dropped (12 and
  // 4 bytes per block and column: IntMatMul4's two-level route reads the ratios, 1 byte, and one unit and sum per
  // column; FloatMatMul4 rebuilds each task's block scales c r from them).
  // Otherwise FloatMatMul drops the int32 sums sv, which only IntMatMul reads, and zw when every column has the same
  // zero point (WeightInfo::zw_uniform).
  void trim_weight(WeightInfo& w, const uint8_t* b, bool constant) const {
    if constexpr (Bits == 4) {
      w.two_level = detect_two_level(w, b, constant);
      if (w.two_level) {
        std::vector<float>().swap(w.scales);
        std::vector<int32_t>().swap(w.zw);
        std::vector<int32_t>().swap(w.sv);
        return;
      }
    }
    if constexpr (!IntInput) {  // the float products read scales and zw only; zw alone when it is uniform
      std::vector<int32_t>().swap(w.sv);
      bool uniform = w.n > 0;
      for (int64_t blk = 0; uniform && blk < w.k_blocks; ++blk)
        for (int64_t n = 0; uniform && n < w.n; ++n) uniform = w.zw[blk * w.n_pad + n] == w.zw[0];
      if (uniform) {
        w.zw_uniform = w.zw[0];
        std::vector<int32_t>().swap(w.zw);
      }
    }
  }

  void Compute(OrtKernelContext* context) {
    log_call(kName, isa_name(kernels->isa));
    Ort::KernelContext ctx(context);
    Ort::ConstValue a_value = ctx.GetInput(0);
    const std::vector<int64_t> a_shape = shape_of(a_value);
    const int64_t rank = static_cast<int64_t>(a_shape.size());
    if (rank < 2)
      fail(IntInput ? "codes" : "x", " must have shape [..., M, K] (rank >= 2), got ", shape_string(a_shape));
    const int64_t k = a_shape[rank - 1];
    const int64_t rows = element_count(a_shape) / std::max<int64_t>(k, 1);
    WeightInfo storage;
    const WeightInfo& w = weight(ctx, k, storage);
    std::vector<int64_t> y_shape = a_shape;
    y_shape[rank - 1] = w.n;
    void* y = ctx.GetOutput(0, y_shape).GetTensorMutableRawData();
    if (rows == 0 || w.n == 0) return;
    const uint8_t* b = static_cast<const uint8_t*>(ctx.GetInput(kWeight).GetTensorRawData());
    if constexpr (IntInput)
      int_matmul(ctx, a_value, a_shape, rows, k, b, w, y);
    else
      float_matmul(ctx, a_value, rows, k, b, w, y);
  }

  void int_matmul(const Ort::KernelContext& ctx, const Ort::ConstValue& codes_value,
                  const std::vector<int64_t>& a_shape, int64_t rows, int64_t k, const uint8_t* b,
                  const WeightInfo& w, void* y) const {
    const int64_t rank = static_cast<int64_t>(a_shape.size());
    std::vector<int64_t> row_shape = a_shape;
    row_shape[rank - 1] = 1;
    Ort::ConstValue scale_value = ctx.GetInput(1), zp_value = ctx.GetInput(2), bias_value = ctx.GetInput(6);
    for (auto [name, value] : {std::pair<const char*, const Ort::ConstValue*>{"a_scale", &scale_value},
                               std::pair<const char*, const Ort::ConstValue*>{"a_zero_point", &zp_value}})
      if (shape_of(*value) != row_shape)
        fail(name, " must have shape ", shape_string(row_shape), " (codes ", shape_string(a_shape),
             " with the last axis 1), got ", shape_string(shape_of(*value)));
    // bias [N] (every row) or [..., 1, N] (one row per leading index of codes)
    const std::vector<int64_t> bias_shape = shape_of(bias_value);
    std::vector<int64_t> per_batch = a_shape;
    per_batch[rank - 2] = 1;
    per_batch[rank - 1] = w.n;
    GemmArgs args;
    if (bias_shape == std::vector<int64_t>{w.n} || (element_count(bias_shape) == w.n && bias_shape.back() == w.n &&
                                                    bias_shape.size() <= a_shape.size())) {
      args.bias_stride = 0;
    } else if (bias_shape == per_batch) {
      args.bias_stride = w.n;
    } else {
      fail("bias must have shape [", w.n, "] or ", shape_string(per_batch), ", got ", shape_string(bias_shape));
    }
    args.rows_per_bias = std::max<int64_t>(a_shape[rank - 2], 1);
    std::vector<float> bias_storage, scale_storage;
    args.bias = float_data(bias_value, Half, bias_storage, kernels->half);
    const float* a_scale = float_data(scale_value, Half, scale_storage, kernels->half);
    const uint8_t* codes = codes_value.GetTensorData<uint8_t>();
    const uint8_t* a_zp = zp_value.GetTensorData<uint8_t>();

    // a two-level weight runs as the 8-bit weight of one block (TwoLevel), each task's tiles expanded on the fly
    const TwoLevel* two_level = w.two_level.get();
    const WeightInfo& wk = two_level ? two_level->w8 : w;
    ActInfo act;
    act_init(act, codes, rows, k, wk);
    const int64_t prep_rows = std::max<int64_t>(1, 262144 / std::max<int64_t>(w.k_pad, 1));
    parallel_for(ctx, static_cast<size_t>(ceil_div(rows, prep_rows)), [&](size_t chunk) {
      const int64_t r0 = static_cast<int64_t>(chunk) * prep_rows;
      act_prepare_rows(act, codes, a_zp, a_scale, k, wk, r0, std::min(rows, r0 + prep_rows));
    });

    args.act = &act;
    args.b = b;
    args.w = &wk;
    args.y = y;
    args.y_half = Half;
    args.n = w.n;
    LowRankTerm term;
    if constexpr (LowRank) term = low_rank_term(ctx, a_shape, w.n);
    ResidualTerm residual;
    if constexpr (Res != Residual::kNone) residual = residual_term(ctx, a_shape, w.n);
    const IntGemmFn gemm = Bits == 4 && !two_level ? kernels->int_gemm4 : kernels->int_gemm8;
    // A two-level weight whose tiles more than one row task would each expand (rows over one task: 512 tokens at
    // 256 px make 2 row tasks, 8192 at 1024 px 32) is expanded once for the call instead, in parallel over its tile
    // groups, into scratch from the session's arena (K x N bytes: 5.3 MB for 1152 x 4608); every task reads it. The
    // 4-block 256 px call: 57.1 -> 53.6 ms, medians of 5 alternated processes (benchmarks/bench_call_ab.py).
    std::unique_ptr<OrtScratch> whole;
    if (two_level && row_task_count(rows) > 1) {
      whole = std::make_unique<OrtScratch>(ctx, static_cast<size_t>(w.tiles * two_level->w8.tile_stride));
      const int64_t tb = kernels->tiles_per_task;
      parallel_for(ctx, static_cast<size_t>(ceil_div(w.tiles, tb)), [&](size_t group) {
        const int64_t t0 = static_cast<int64_t>(group) * tb, t1 = std::min(w.tiles, t0 + tb);
        kernels->expand_two_level(w, two_level->ratio.data(), b, t0, t1,
                                  whole->data() + t0 * two_level->w8.tile_stride);
      });
      args.b = whole->data();
    }
    run_tasks(ctx, rows, w.tiles, [&](int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
      if (two_level && !whole) {
        GemmArgs task = args;
        task.b = expanded_tiles(*two_level, w, b, t0, t1);
        gemm(task, m0, m1, t0, t1);
      } else {
        gemm(args, m0, m1, t0, t1);
      }
      if constexpr (Gelu || LowRank || Res != Residual::kNone)
        epilogue(y, w.n, m0, m1, t0 * kTile, std::min(w.n, t1 * kTile), term, residual);
    });
  }

  // Tiles t0..t1 of a two-level weight in the 8-bit layout, in a per-thread buffer, addressed as the whole weight
  // (tile t at + t * tile_stride; only t0..t1 may be read).
  const uint8_t* expanded_tiles(const TwoLevel& tl, const WeightInfo& w4, const uint8_t* b, int64_t t0,
                                int64_t t1) const {
    thread_local std::vector<uint8_t> buffer;
    const int64_t stride = tl.w8.tile_stride;
    buffer.resize(static_cast<size_t>((t1 - t0) * stride + 64));
    uint8_t* out = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
    kernels->expand_two_level(w4, tl.ratio.data(), b, t0, t1, out);
    return reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(out) - static_cast<uintptr_t>(t0 * stride));
  }

  struct LowRankTerm {
    std::vector<float> t_storage, right_storage;
    const float* t = nullptr;      // [rows, r]
    const float* right = nullptr;  // [r, n]
    int64_t r = 0;
  };

  LowRankTerm low_rank_term(const Ort::KernelContext& ctx, const std::vector<int64_t>& a_shape, int64_t n) const {
    LowRankTerm term;
    Ort::ConstValue t_value = ctx.GetInput(7), right_value = ctx.GetInput(8);
    const std::vector<int64_t> right_shape = shape_of(right_value);
    if (right_shape.size() != 2 || right_shape[1] != n)
      fail("right must have shape [r, ", n, "] (N of the weight), got ", shape_string(right_shape));
    term.r = right_shape[0];
    std::vector<int64_t> t_shape = a_shape;
    t_shape.back() = term.r;
    if (shape_of(t_value) != t_shape)
      fail("t must have shape ", shape_string(t_shape), " (codes ", shape_string(a_shape), " with r = ", term.r,
           " columns), got ", shape_string(shape_of(t_value)));
    term.t = float_data(t_value, Half, term.t_storage, kernels->half);
    term.right = float_data(right_value, Half, term.right_storage, kernels->half);
    return term;
  }

  struct ResidualTerm {
    std::vector<float> gate_storage;
    const float* gate = nullptr;  // GatedResidual: [N] (gate_stride 0) or one row of N per leading index of codes
    int64_t gate_stride = 0, rows_per_gate = 1;
    const void* residual = nullptr;  // T [..., M, N], y's shape
  };

  ResidualTerm residual_term(const Ort::KernelContext& ctx, const std::vector<int64_t>& a_shape, int64_t n) const {
    ResidualTerm term;
    const int64_t rank = static_cast<int64_t>(a_shape.size());
    std::vector<int64_t> y_shape = a_shape;
    y_shape[rank - 1] = n;
    if constexpr (Res == Residual::kGated) {
      Ort::ConstValue gate_value = ctx.GetInput(kResidualFirst);
      const std::vector<int64_t> gate_shape = shape_of(gate_value);
      std::vector<int64_t> per_batch = y_shape;
      per_batch[rank - 2] = 1;
      if (gate_shape == std::vector<int64_t>{n} || (element_count(gate_shape) == n && !gate_shape.empty() &&
                                                    gate_shape.back() == n && gate_shape.size() <= a_shape.size()))
        term.gate_stride = 0;
      else if (gate_shape == per_batch)
        term.gate_stride = n;
      else
        fail("gate must have shape [", n, "] or ", shape_string(per_batch), ", got ", shape_string(gate_shape));
      term.rows_per_gate = std::max<int64_t>(a_shape[rank - 2], 1);
      term.gate = float_data(gate_value, Half, term.gate_storage, kernels->half);
    }
    Ort::ConstValue residual_value = ctx.GetInput(kResidualFirst + kResidualInputs - 1);
    if (shape_of(residual_value) != y_shape)
      fail("residual must have the output's shape ", shape_string(y_shape), ", got ",
           shape_string(shape_of(residual_value)));
    term.residual = residual_value.GetTensorRawData();
    return term;
  }

  // rows [m0, m1) x columns [c0, c1) of y [rows, n]: y += t @ right (LowRank), then gelu (Gelu), then y = residual +
  // [gate *] y (Residual)
  void epilogue(void* y, int64_t n, int64_t m0, int64_t m1, int64_t c0, int64_t c1, const LowRankTerm& term,
                const ResidualTerm& residual) const {
    if (c1 <= c0) return;
    const int64_t width = c1 - c0;
    // rows m0 .. m0 + rows of y as floats: y itself (float32), else a float copy (ld = width); res_rows: the residual's
    // rows as floats (the same ld), when there is one
    auto apply = [&](float* rows_y, int64_t ld, int64_t m, int64_t rows, const float* res_rows) {
      if constexpr (LowRank)
        kernels->low_rank_add(rows_y, ld, term.t + m * term.r, term.r, rows, term.right + c0, term.r, n, width);
      if constexpr (Gelu)
        for (int64_t i = 0; i < rows; ++i) kernels->gelu_tanh(rows_y + i * ld, width);
      if constexpr (Res != Residual::kNone)
        for (int64_t i = 0; i < rows; ++i) {
          const float* gate =
              residual.gate ? residual.gate + ((m + i) / residual.rows_per_gate) * residual.gate_stride + c0 : nullptr;
          kernels->residual_add(rows_y + i * ld, res_rows + i * ld, gate, width);
        }
    };
    if constexpr (Half) {
      std::vector<float> row(static_cast<size_t>(width)), res_row(Res != Residual::kNone ? width : 0);
      uint16_t* yh = static_cast<uint16_t*>(y);
      for (int64_t m = m0; m < m1; ++m) {
        kernels->half.to_floats(yh + m * n + c0, row.data(), width);
        if constexpr (Res != Residual::kNone)
          kernels->half.to_floats(static_cast<const uint16_t*>(residual.residual) + m * n + c0, res_row.data(), width);
        apply(row.data(), width, m, 1, res_row.data());
        kernels->half.to_halves(row.data(), yh + m * n + c0, width);
      }
    } else {
      const float* res_rows = Res != Residual::kNone ? static_cast<const float*>(residual.residual) + m0 * n + c0
                                                     : nullptr;
      apply(static_cast<float*>(y) + m0 * n + c0, n, m0, m1 - m0, res_rows);
    }
  }

  void float_matmul(const Ort::KernelContext& ctx, const Ort::ConstValue& x_value, int64_t rows, int64_t k,
                    const uint8_t* b, const WeightInfo& w, void* y) const {
    std::vector<float> x(static_cast<size_t>(rows * w.k_pad), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      if constexpr (Half)
        kernels->half.to_floats(static_cast<const uint16_t*>(x_value.GetTensorRawData()) + r * k,
                                x.data() + r * w.k_pad, k);
      else
        std::copy_n(x_value.GetTensorData<float>() + r * k, k, x.data() + r * w.k_pad);
    }
    FloatGemmArgs args;
    args.x = x.data();
    args.ldx = w.k_pad;
    args.b = b;
    args.w = &w;
    args.y = y;
    args.y_half = Half;
    args.n = w.n;
    const FloatGemmFn gemm = Bits == 4 ? kernels->float_gemm4 : kernels->float_gemm8;
    const TwoLevel* two_level = Bits == 4 ? w.two_level.get() : nullptr;
    run_tasks(ctx, rows, w.tiles, [&](int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
      if (!two_level) return gemm(args, m0, m1, t0, t1);
      // a two-level weight keeps no block scales: the task's are c r, exactly the quantizer's (detect_two_level
      // checked c r == scale), so the float product is the block route's, bit for bit (a per-thread buffer of the
      // weight's k_blocks x n_pad floats, of which float_gemm4 reads the task's columns: 166 KB for 4608 x 1152)
      thread_local std::vector<float> scales;
      WeightInfo task_w = weight_geometry(Bits, w.n, w.k_blocks, w.block);
      scales.resize(static_cast<size_t>(w.k_blocks * w.n_pad));
      const int64_t c0 = t0 * kTile, c1 = t1 * kTile;
      for (int64_t blk = 0; blk < w.k_blocks; ++blk)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = blk * w.n_pad + c;
          scales[i] = c < w.n ? two_level->w8.scales[c] * static_cast<float>(two_level->ratio[i]) : 0.0f;
        }
      task_w.scales.swap(scales);
      task_w.zw_uniform = 8;
      FloatGemmArgs task = args;
      task.w = &task_w;
      gemm(task, m0, m1, t0, t1);
      task_w.scales.swap(scales);  // the buffer stays with the thread
    });
  }

  int64_t row_task_count(int64_t rows) const { return ceil_div(rows, balanced_row_tasks(*kernels, rows)); }

  // Splits rows x column tiles into tasks of the path's preferred size, consecutive tasks on the same column tiles.
  template <typename Fn>
  void run_tasks(const Ort::KernelContext& ctx, int64_t rows, int64_t tiles, Fn&& fn) const {
    const int64_t rb = balanced_row_tasks(*kernels, rows), tb = kernels->tiles_per_task;
    const int64_t row_tasks = ceil_div(rows, rb), tile_tasks = ceil_div(tiles, tb);
    parallel_for(ctx, static_cast<size_t>(row_tasks * tile_tasks), [&](size_t task) {
      const int64_t i = static_cast<int64_t>(task) % row_tasks, j = static_cast<int64_t>(task) / row_tasks;
      fn(i * rb, std::min(rows, (i + 1) * rb), j * tb, std::min(tiles, (j + 1) * tb));
    });
  }
};

template <int Bits, bool IntInput, bool Half, bool Gelu = false, bool LowRank = false, Residual Res = Residual::kNone>
struct MatMulOp : Ort::CustomOpBase<MatMulOp<Bits, IntInput, Half, Gelu, LowRank, Res>,
                                    MatMulKernel<Bits, IntInput, Half, Gelu, LowRank, Res>, true> {
  using Kernel = MatMulKernel<Bits, IntInput, Half, Gelu, LowRank, Res>;

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return status_of(Kernel::kName, [&] { *kernel = new Kernel(Ort::ConstKernelInfo(info)); });
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return Kernel::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    const ONNXTensorElementDataType packed =
        Bits == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    if (IntInput && (i == 0 || i == 2)) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;  // codes, a_zero_point
    if (i == Kernel::kWeight || i == Kernel::kWeight + 2) return packed;           // b, zero_points
    return float_type(Half);
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return float_type(Half); }

  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape a = ctx.GetInputShape(0);
    const Ort::ShapeInferContext::Shape& scales = ctx.GetInputShape(Kernel::kWeight + 1);
    if (a.size() < 2 || scales.size() != 2) return Ort::Status(nullptr);
    a.back() = scales[1];
    ctx.SetOutputShape(0, a);
    return Ort::Status(nullptr);
  }
};

template <bool Half>
struct MatMulOps {
  MatMulOp<4, true, Half> int4;
  MatMulOp<8, true, Half> int8;
  MatMulOp<4, false, Half> float4;
  MatMulOp<8, false, Half> float8;
  MatMulOp<4, true, Half, true> int4_gelu;
  MatMulOp<8, true, Half, true> int8_gelu;
  MatMulOp<4, true, Half, false, true> int4_low_rank;
  MatMulOp<8, true, Half, false, true> int8_low_rank;
  MatMulOp<4, true, Half, true, true> int4_low_rank_gelu;
  MatMulOp<8, true, Half, true, true> int8_low_rank_gelu;
  MatMulOp<4, true, Half, false, false, Residual::kAdd> int4_residual;
  MatMulOp<8, true, Half, false, false, Residual::kAdd> int8_residual;
  MatMulOp<4, true, Half, false, false, Residual::kGated> int4_gated;
  MatMulOp<8, true, Half, false, false, Residual::kGated> int8_gated;
  MatMulOp<4, true, Half, false, true, Residual::kAdd> int4_low_rank_residual;
  MatMulOp<8, true, Half, false, true, Residual::kAdd> int8_low_rank_residual;
  MatMulOp<4, true, Half, false, true, Residual::kGated> int4_low_rank_gated;
  MatMulOp<8, true, Half, false, true, Residual::kGated> int8_low_rank_gated;

  void add_to(Ort::CustomOpDomain& domain) {
    for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{
             &int4, &int8, &float4, &float8, &int4_gelu, &int8_gelu, &int4_low_rank, &int8_low_rank,
             &int4_low_rank_gelu, &int8_low_rank_gelu, &int4_residual, &int8_residual, &int4_gated, &int8_gated,
             &int4_low_rank_residual, &int8_low_rank_residual, &int4_low_rank_gated, &int8_low_rank_gated})
      domain.Add(op);
  }
};

MatMulOps<false> g_float_ops;
MatMulOps<true> g_half_ops;

}  // namespace

void add_matmul_ops(Ort::CustomOpDomain& domain) {
  g_float_ops.add_to(domain);
  g_half_ops.add_to(domain);
}

}  // namespace hadanorm
