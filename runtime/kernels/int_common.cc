// Shared parts of the integer kernels: weight geometry, per-row activation sums, the choice of path table.

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && !defined(HADANORM_SCALAR_ONLY)
#include <emmintrin.h>
#endif

#include "half.h"
#include "int_kernels.h"
#include "util.h"

namespace hadanorm {

namespace {

uint32_t int16_pair(int32_t low, int32_t high) {
  return static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(low))) |
         (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(high))) << 16);
}

}  // namespace

WeightInfo weight_geometry(int bits, int64_t n, int64_t k_blocks, int64_t block) {
  WeightInfo w;
  w.bits = bits;
  w.n = n;
  w.tiles = ceil_div(n, kTile);
  w.n_pad = w.tiles * kTile;
  w.block = block;
  w.k_blocks = k_blocks;
  w.k_pad = k_blocks * block;
  w.groups = w.k_pad / (bits == 4 ? 8 : 4);
  w.tile_stride = w.groups * 64;
  w.small_block = block <= kSmallBlock;
  return w;
}

void act_init(ActInfo& act, const uint8_t* codes, int64_t rows, int64_t k, const WeightInfo& w) {
  act.lda = w.k_pad;
  if (k == w.k_pad) {
    act.a = codes;
    act.padded.clear();
  } else {
    act.padded.assign(static_cast<size_t>(rows * w.k_pad), 0);
    act.a = act.padded.data();
  }
  act.sc.assign(static_cast<size_t>(rows * w.k_blocks), 0);
  act.pair.assign(w.small_block ? static_cast<size_t>(rows * w.k_blocks) : 0, 0);
  act.z.assign(static_cast<size_t>(rows), 0);
  act.scale.assign(static_cast<size_t>(rows), 0.0f);
}

// Sum of n codes: SSE2 psadbw (16 bytes an instruction; x86-64's baseline) where there is one, else a plain loop.
static int32_t sum_codes(const uint8_t* c, int64_t n) {
  int64_t s = 0, i = 0;
#if defined(__x86_64__) && !defined(HADANORM_SCALAR_ONLY)
  __m128i acc = _mm_setzero_si128();
  for (; i + 16 <= n; i += 16)
    acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)), _mm_setzero_si128()));
  s = _mm_cvtsi128_si64(acc) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc, acc));
#endif
  for (; i < n; ++i) s += c[i];
  return static_cast<int32_t>(s);
}

void act_prepare_rows(ActInfo& act, const uint8_t* codes, const uint8_t* zero_points, const float* scales, int64_t k,
                      const WeightInfo& w, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = codes + r * k;
    if (!act.padded.empty()) {
      std::memcpy(act.padded.data() + r * w.k_pad, row, static_cast<size_t>(k));
      row = act.padded.data() + r * w.k_pad;
    }
    const int32_t z = zero_points[r];
    act.z[r] = z;
    act.scale[r] = scales[r];
    for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
      const int32_t sc = sum_codes(row + blk * w.block, w.block);
      act.sc[r * w.k_blocks + blk] = sc;
      if (w.small_block) act.pair[r * w.k_blocks + blk] = static_cast<int32_t>(int16_pair(-sc, -z));
    }
  }
}

void store_output(void* y, bool y_half, int64_t index, float value) {
  if (y_half)
    static_cast<uint16_t*>(y)[index] = float_to_half(value);
  else
    static_cast<float*>(y)[index] = value;
}

namespace {

template <typename T>
void take(T& field, T base) {
  if (!field) field = base;
}

// Every function and task size set (a table that inherits from an incomplete one would crash only when called).
bool complete(const IsaKernels& k) {
  const TransformKernels& t = k.transform;
  return k.quantize_row && k.int_gemm4 && k.int_gemm8 && k.float_gemm4 && k.float_gemm8 && k.fill_weight_info &&
         k.expand_two_level && k.gelu_tanh && k.low_rank_add && k.residual_add &&
         t.center_scale_fwht && t.dense_left && t.column_mean && t.column_mean_half && t.column_mean_affine &&
         t.affine && t.center_scale && t.dense_right && t.fwht_across_rows && k.half.to_floats && k.half.to_halves &&
         k.rows_per_task > 0 && k.tiles_per_task > 0;
}

}  // namespace

IsaKernels inherit(IsaKernels own, const IsaKernels& base) {
  take(own.quantize_row, base.quantize_row);
  take(own.fwht_quantize_row, base.fwht_quantize_row);  // optional
  take(own.int_gemm4, base.int_gemm4);
  take(own.int_gemm8, base.int_gemm8);
  take(own.float_gemm4, base.float_gemm4);
  take(own.float_gemm8, base.float_gemm8);
  take(own.fill_weight_info, base.fill_weight_info);
  take(own.expand_two_level, base.expand_two_level);
  take(own.gelu_tanh, base.gelu_tanh);
  take(own.low_rank_add, base.low_rank_add);
  take(own.residual_add, base.residual_add);
  TransformKernels& t = own.transform;
  take(t.center_scale_fwht, base.transform.center_scale_fwht);
  take(t.dense_left, base.transform.dense_left);
  take(t.paley2_left, base.transform.paley2_left);  // optional (null: dense_left)
  take(t.column_mean, base.transform.column_mean);
  take(t.column_mean_half, base.transform.column_mean_half);
  take(t.column_mean_affine, base.transform.column_mean_affine);
  take(t.affine, base.transform.affine);
  take(t.center_scale, base.transform.center_scale);
  take(t.dense_right, base.transform.dense_right);
  take(t.fwht_across_rows, base.transform.fwht_across_rows);
  take(own.half.to_floats, base.half.to_floats);
  take(own.half.to_halves, base.half.to_halves);
  take(own.rows_per_task, base.rows_per_task);
  take(own.tiles_per_task, base.tiles_per_task);
  take(own.row_task_unit, base.row_task_unit);
  return own;
}

int64_t balanced_row_tasks(const IsaKernels& k, int64_t rows) {
  if (k.row_task_unit <= 0 || rows <= 0) return k.rows_per_task;
  // the nearest whole number of tasks, and two as soon as the rows exceed one task (383 rows: 192 + 191, not one task
  // that leaves the second thread idle when the weight has few column tiles)
  const int64_t tasks = std::max<int64_t>(rows > k.rows_per_task ? 2 : 1,
                                          (rows + k.rows_per_task / 2) / k.rows_per_task);
  const int64_t per = (rows + tasks - 1) / tasks;
  return (per + k.row_task_unit - 1) / k.row_task_unit * k.row_task_unit;
}

const IsaKernels& isa_kernels(Isa isa) {
  const IsaKernels* k = nullptr;
  switch (isa) {
    case Isa::kAmx: k = amx_kernels(); break;
    case Isa::kAvx512Vnni: k = avx512vnni_kernels(); break;
    case Isa::kAvxVnni: k = avxvnni_kernels(); break;
    case Isa::kAvx2: k = avx2_kernels(); break;
    case Isa::kNeonDot: k = neondot_kernels(); break;
    case Isa::kScalar: break;
  }
  if (!k) k = scalar_kernels();
  if (!complete(*k)) fail("the kernel table of path ", isa_name(k->isa), " is incomplete (a bug in this build)");
  return *k;
}

}  // namespace hadanorm
