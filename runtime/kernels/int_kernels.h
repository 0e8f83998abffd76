// Integer-execution maths of the fused W4A4 format: per-token activation quantization, the int8 x int4/int8 GEMM
// with per-block weight scales, and float x packed-weight products. No onnxruntime API, so a standalone test binary
// builds on any target (benchmarks/check_aarch64_build.sh).
//
// Packed weights (graph_passes/int_packing.py, the contract): tiles of 16 output columns; 4-bit b [tiles, K_pad/8,
// 64] with byte [t, g, 4c + j] = u[8g + j, 16t + c] (low nibble) | u[8g + 4 + j, 16t + c] << 4; 8-bit b [tiles,
// K_pad/4, 64] int8 with byte [t, g, 4c + j] = u[4g + j, 16t + c]. w[k, n] = scales[k / bs, n] (u - zw[k / bs, n]).
//
// IntMatMul: y[m, n] = a_scale[m] * sum_blk scales[blk, n] * I[m, n, blk] + bias[n] with the exact int32
//   I = sum_{k in blk} (c - z)(u - zw) = sum c u - zw * sum_blk c - z * sum_blk (u - zw)
// (c: activation codes padded with 0 to K_pad; padding rows of b hold zw, so they add nothing). Every path computes
// I exactly and the same float epilogue in the same order, F = fmaf(scales, float(I), F) block by block, then
// y = fmaf(a_scale, F, bias): the paths agree bit for bit.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "half.h"
#include "isa.h"
#include "transform.h"

namespace hadanorm {

constexpr int64_t kTile = 16;  // output columns per 64-byte row of the packed layout

// Largest block whose corrections zw * sum c and z * sum (u - zw) fit int16 pairs (one vpmaddwd per block).
constexpr int64_t kSmallBlock = 128;
// Largest block whose int32 sums cannot overflow (255 * 255 * block < 2^31).
constexpr int64_t kMaxBlock = 32768;

struct TwoLevel;
struct WeightInfo;
using FillWeightFn = void (*)(WeightInfo& info, const uint8_t* b, const float* scales, const void* zero_points);

// Per-weight data, derived once from (b, scales, zero_points); columns padded to n_pad = tiles * 16 with zeros.
struct WeightInfo {
  int bits = 4;              // container: 4 (uint8 nibbles 0..15) or 8 (int8)
  int64_t n = 0, n_pad = 0, tiles = 0;
  int64_t block = 0, k_blocks = 0, k_pad = 0;
  int64_t groups = 0;        // 64-byte rows per tile: k_pad / 8 (4-bit) or k_pad / 4 (8-bit)
  int64_t tile_stride = 0;   // bytes per tile: groups * 64
  bool small_block = true;   // block <= kSmallBlock
  std::vector<float> scales;   // [k_blocks, n_pad]
  std::vector<int32_t> zw;     // [k_blocks, n_pad]
  std::vector<int32_t> sv;     // [k_blocks, n_pad]: sum over the (padded) block of (u - zw)
  // (small blocks: the vector paths pack zw and sv as int16 pairs, zw low | sv high, for one vpmaddwd per block)
  std::shared_ptr<const TwoLevel> two_level;  // set when the block scales are two-level (detect_two_level)
  // FloatMatMul drops zw when every real column's zero point is the same (symmetric weights: 8 or 0) and keeps it
  // here; the float products read zw_at (int paths: zw as filled)
  int32_t zw_uniform = 0;
  int32_t zw_at(int64_t i) const { return zw.empty() ? zw_uniform : zw[i]; }
};

// Two-level weight scales (hn-export --weight-scales two-level): a symmetric 4-bit weight (zw = 8 everywhere) whose
// block scales are scales[blk, n] = c[n] * r[blk, n] exactly, r an integer in 1..16. Then w[k, n] = c[n] * r (u - 8)
// with r (u - 8) in [-128, 112]: the matmul is the 8-bit one over a single block of the whole K (scales c, zw 0),
//   y[m, n] = fmaf(a_scale[m], fmaf(c[n], float(I), 0), bias[n]),  I = sum_k (a - z) r (u - 8)  (exact int32),
// with no per-block fold. IntMatMul4 runs such a weight that way (HADANORM_KERNELS_TWO_LEVEL=0: the block path), each task
// expanding its column tiles into the 8-bit packed layout (IsaKernels::expand_two_level) for the path's int_gemm8:
// every path gives the same bits, as for any 8-bit weight. The result is the block path's within float rounding
// (the same real number: sum_blk c r_blk I_blk = c sum_blk r_blk I_blk). FloatMatMul4 keeps no per-block scales of
// such a weight either: each task rebuilds its columns' c r (the block scales exactly) for the path's float_gemm4.
struct TwoLevel {
  WeightInfo w8;               // bits 8, one block of k_pad rows; scales c, zw 0, sv = sum_k r (u - 8)
  std::vector<uint8_t> ratio;  // [k_blocks, n_pad] (padding columns 1)
};
// Bytes [t, g, 4c + j] of tiles t0..t1 of the 8-bit layout, = r[k / block, 16t + c] * (u[k, 16t + c] - 8) with
// k = 4g + j, from the packed 4-bit b; `out` holds (t1 - t0) tiles of w8.tile_stride bytes.
using ExpandTwoLevelFn = void (*)(const WeightInfo& w4, const uint8_t* ratio, const uint8_t* b, int64_t t0,
                                  int64_t t1, uint8_t* out);
// The two-level form of a filled 4-bit weight (null when its scales are not two-level, or HADANORM_KERNELS_TWO_LEVEL=0).
// shared: b is a constant initializer that lives as long as the kernels built from it; then the kernels of one weight
// (IntMatMul4 and the FloatMatMul4 of its mean token) share one TwoLevel, found by b's address while any of them holds
// it (and its units and ratios reproduce w4's scales, checked).
std::shared_ptr<const TwoLevel> detect_two_level(const WeightInfo& w4, const uint8_t* b, bool shared = false);

// The geometry of a weight from N, block size and bits (no data).
WeightInfo weight_geometry(int bits, int64_t n, int64_t k_blocks, int64_t block);
// Fill scales / zero points / sums of `info` (geometry set) from the packed codes b, float scales [k_blocks, n] and
// zero points [k_blocks, n] (uint8 for 4-bit, int8 for 8-bit). Integers: every path's build gives the same
// (FillWeightFn, declared above).
// The scalar path's build (the ops call IsaKernels::fill_weight_info).
void fill_weight_info(WeightInfo& info, const uint8_t* b, const float* scales, const void* zero_points);
// The scalar expansion of a two-level weight (the reference of IsaKernels::expand_two_level).
void expand_two_level_scalar(const WeightInfo& w4, const uint8_t* ratio, const uint8_t* b, int64_t t0, int64_t t1,
                             uint8_t* out);

// Per-run activation data of rows [r0, r1): sums of codes per block and the correction pairs.
struct ActInfo {
  const uint8_t* a = nullptr;  // rows of k_pad codes, zero padded (the input itself when K == K_pad)
  int64_t lda = 0;
  std::vector<uint8_t> padded;   // storage when K != K_pad
  std::vector<int32_t> sc;       // [rows, k_blocks]
  std::vector<int32_t> pair;     // [rows, k_blocks]: int16 -sc (low) | int16 -z (high), small blocks only
  std::vector<int32_t> z;        // [rows]
  std::vector<float> scale;      // [rows]
};
// Size the buffers of `act` for `rows` rows (and point act.a at codes or at the padded copy).
void act_init(ActInfo& act, const uint8_t* codes, int64_t rows, int64_t k, const WeightInfo& w);
// Rows [r0, r1): pad, sum, and read z (uint8) and the float scale.
void act_prepare_rows(ActInfo& act, const uint8_t* codes, const uint8_t* zero_points, const float* scales,
                      int64_t k, const WeightInfo& w, int64_t r0, int64_t r1);

struct GemmArgs {
  const ActInfo* act;
  const uint8_t* b;
  const WeightInfo* w;
  const float* bias;       // row for output row m: bias + (m / rows_per_bias) * bias_stride
  int64_t bias_stride = 0, rows_per_bias = 1;
  void* y;                 // [rows, n] float or IEEE half
  bool y_half = false;
  int64_t n = 0;
};
// Output rows [m0, m1), column tiles [t0, t1).
using IntGemmFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t t0, int64_t t1);

struct FloatGemmArgs {
  const float* x;          // rows of k_pad floats, zero padded
  int64_t ldx = 0;
  const uint8_t* b;
  const WeightInfo* w;
  void* y;
  bool y_half = false;
  int64_t n = 0;
};
// y = x @ w: per column and block acc = sum_k fmaf(x_k, float(u) - float(zw), acc) in k order, then
// y = fmaf(scales, acc, y) block by block (bit-identical on every path).
using FloatGemmFn = void (*)(const FloatGemmArgs&, int64_t m0, int64_t m1, int64_t t0, int64_t t1);

// One token: qmax = 2^bits - 1; hi = max(max y, 0); lo = min(min y, 0); scale = max((hi - lo) / qmax, FLT_MIN)
// (rounded to half when half_scale); zp = clamp(nearbyint(-(lo / scale)), 0, qmax);
// codes = clamp(nearbyint(y / scale) + zp, 0, qmax). IEEE divisions, round half to even.
using QuantizeRowFn = void (*)(const float* y, int64_t d, float qmax, bool half_scale, uint8_t* codes, float* scale,
                               uint8_t* zero_point);

// Optional (null on paths without it): one token of a quantize op whose rotation is h_right's fast transform alone
// (h_left the identity), in one pass over x: x' = x * x_scale + x_shift when x_scale is not null (the product rounded,
// then the sum; the Modulate ops), y = Sylvester(M) @ ((x' - mean) * mul) row by row for y [K, M] (mean may be null;
// mul with h_right's scale folded in), then quantize_row(y, K * M, ...), the row's range taken while y is in registers:
// the bits of TransformKernels::affine, center_scale_fwht and quantize_row one after another. y: K x M floats of
// scratch (left holding y). Returns false, doing nothing, for a row length M it does not handle.
using FwhtQuantizeRowFn = bool (*)(const float* x, const float* x_scale, const float* x_shift, const float* mean,
                                   const float* mul, int64_t k, int64_t m, float qmax, bool half_scale, float* y,
                                   uint8_t* codes, float* scale, uint8_t* zero_point);

// In place on n floats: the matmul epilogue's activation (portable_loops.h, GeluTanh).
using ActivationFn = void (*)(float* y, int64_t n);
// For rows i in [0, rows) and c in [0, n): y[i * ldy + c] += sum_j t[i * ldt + j] right[j * ldr + c], the sum in j order
// with fmas from 0, then one add: the low-rank epilogue (portable_loops.h, low_rank_add_rows).
using LowRankAddFn = void (*)(float* y, int64_t ldy, const float* t, int64_t ldt, int64_t rows, const float* right,
                              int64_t r, int64_t ldr, int64_t n);

// In place on n floats of one output row: y = residual + y, or residual + gate * y when gate is not null (the product
// rounded, then the sum; portable_loops.h, residual_add_row).
using ResidualAddFn = void (*)(float* y, const float* residual, const float* gate, int64_t n);

// Everything an op runs that depends on the instruction set, for one path. Every kernel takes its table once, when it
// is created, from isa_kernels(select_isa()): HADANORM_KERNELS_ISA picks every function below, and nothing outside
// these tables chooses code by CPU. The tables name their fields (designated initializers); a path that shares
// functions with another lists its own and inherits the rest (inherit).
struct IsaKernels {
  Isa isa = Isa::kScalar;
  QuantizeRowFn quantize_row = nullptr;
  FwhtQuantizeRowFn fwht_quantize_row = nullptr;  // optional (null: the transform's row kernels, then quantize_row)
  IntGemmFn int_gemm4 = nullptr, int_gemm8 = nullptr;
  FloatGemmFn float_gemm4 = nullptr, float_gemm8 = nullptr;
  FillWeightFn fill_weight_info = nullptr;
  ExpandTwoLevelFn expand_two_level = nullptr;  // IntMatMul4 on two-level weights (TwoLevel)
  ActivationFn gelu_tanh = nullptr;  // IntMatMul{4,8}[LowRank]Gelu's epilogue
  LowRankAddFn low_rank_add = nullptr;  // IntMatMul{4,8}LowRank[Gelu]'s epilogue
  ResidualAddFn residual_add = nullptr;  // IntMatMul{4,8}[LowRank][Gated]Residual's epilogue
  TransformKernels transform;  // the transform ops' row kernels (transform.h)
  HalfKernels half;            // float16 tensors in and out
  // the matmuls' work split that suits the micro-kernels: rows x column tiles per task
  int64_t rows_per_task = 0, tiles_per_task = 0;
  // 0: row tasks of rows_per_task rows (the last one shorter); else the rows are cut into the nearest whole number of
  // rows_per_task tasks, each a multiple of this many rows (balanced_row_tasks)
  int64_t row_task_unit = 0;
};

// Rows per task for `rows` rows with the path's split: rows_per_task, or with a row_task_unit the rows over
// round(rows / rows_per_task) tasks (at least 1, and 2 when rows > rows_per_task), rounded up to the unit. AMX, 600 rows (a 300-token caption, batch 2):
// 320 + 280 instead of 256 + 256 + 88 (the short task repeats the weights' per-task preparation for few rows).
int64_t balanced_row_tasks(const IsaKernels& k, int64_t rows);

// `own` with every field it leaves unset (null, 0) taken from `base` (own.isa stays).
IsaKernels inherit(IsaKernels own, const IsaKernels& base);

// The kernels of a path (isa_supported(isa) must hold).
const IsaKernels& isa_kernels(Isa isa);

// Per-path tables (null when the path is not compiled for this target).
const IsaKernels* scalar_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels* avxvnni_kernels();     // IntMatMul with AVX-VNNI; the rest from avx2
const IsaKernels* avx512vnni_kernels();  // the rest (portable loops, conversions, per-weight sums) from avx2
const IsaKernels* amx_kernels();         // IntMatMul on AMX tiles; the rest from avx512vnni
const IsaKernels* neondot_kernels();     // IntMatMul with sdot; the rest from scalar

// Store helpers shared by the scalar paths: y[i] = value as float or half.
void store_output(void* y, bool y_half, int64_t index, float value);

}  // namespace hadanorm
