// AVX-512 path of the fused attention (attention.h): fp32 FMAs, precision kFloat (also what a kBf16 op runs on a CPU
// without AMX tiles: fp32 FMAs on operands rounded to bf16, or AVX512-BF16's vdpbf16ps, measured slower than this on
// the AMX Xeon, and fp32 is exact). Precision kInt8: attention_vnni_int8.cc (AVX512-VNNI).
//
// Packed per head: k^T in key blocks of 128 ([d][128] floats, keys past nk zero) followed by v [nk_pad][dv_pad]
// (dv_pad = dv rounded up to 16, zero columns). A task (query rows q0..q1) keeps its rows' running max, sum and
// fp32 output in a per-thread buffer and walks the key blocks once, the block's k and v staying in L1/L2 while
// every row group of 4 queries uses them:
//
//   S [4 x 128] = (scale q) k^T     4 rows x 4 key vectors of 16 per pass (16 accumulators), 2 passes
//   softmax step per row            mask, -inf past nk, block max, p = exp(s - max) (AVX-512 exp), sum, alpha
//   O [4 x dv_pad] = alpha O + P v  4 rows x up to 6 column vectors per pass (24 accumulators)
//
// exp: attention_exp512.h's exp_ps (within 1 ulp of std::exp; 0 below FLT_MIN, where a denormal result would cost a
// microcode assist).

#include "attention.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma: their inline templates must not be compiled for AVX-512 here (the
// linker may keep this copy for the whole library).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_int8.h"
#include "util.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#pragma GCC diagnostic ignored "-Wuninitialized"       // GCC 12's _mm512_reduce_* start from an undefined vector
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "attention_exp512.h"  // exp_ps (compiled for this file's targets)
#include "attention_row512.h"  // masked_row_max, column_passes, store_rows

namespace hadanorm {

namespace {

constexpr int64_t kBlock = kAttentionKeyBlock;  // keys per block (8 vectors)
constexpr int kRows = 4;                        // query rows per group
constexpr int64_t kRowsPerTask = 16 * kRows;    // query rows per task
constexpr int kMaxColVectors = 6;               // output column vectors per P.V pass

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Layout {
  int64_t blocks, nk_pad, dv_pad;
  explicit Layout(const AttentionShape& s)
      : blocks(ceil_div(s.nk, kBlock)), nk_pad(blocks * kBlock), dv_pad(round_up(s.dv, 16)) {}
  size_t kt_floats(const AttentionShape& s) const { return static_cast<size_t>(nk_pad * s.d); }
  size_t v_floats() const { return static_cast<size_t>(nk_pad * dv_pad); }
};

size_t avx512_packed_bytes(const AttentionShape& s) {
  if (s.precision == AttentionPrecision::kInt8) return attention_int8_avx512_packed_bytes(s);
  const Layout l(s);
  return (l.kt_floats(s) + l.v_floats()) * sizeof(float);
}

void avx512_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  if (s.precision == AttentionPrecision::kInt8) return attention_int8_avx512_pack(s, k, v, packed);
  const Layout lay(s);
  float* kt = static_cast<float*>(packed);
  float* vp = kt + lay.kt_floats(s);
  std::memset(packed, 0, avx512_packed_bytes(s));
  for (int64_t j = 0; j < s.nk; ++j) {
    float* block = kt + (j / kBlock) * kBlock * s.d + (j % kBlock);
    const float* kj = k + j * s.k_stride;
    const float* vj = v + j * s.v_stride;
    for (int64_t c = 0; c < s.d; ++c) block[c * kBlock] = kj[c];
    for (int64_t c = 0; c < s.dv; ++c) vp[j * lay.dv_pad + c] = vj[c];
  }
}

// S[r][0..64*half+64) for R rows: 4 key vectors per pass.
template <int R>
HN_INLINE void scores_pass(const float* q, int64_t d, const float* kt, float* S) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    const float* row = kt + c * kBlock;
    __m512 kv[4];
    for (int v = 0; v < 4; ++v) kv[v] = _mm512_loadu_ps(row + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(q[r * d + c]);
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(b, kv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(S + r * kBlock + 16 * v, acc[r][v]);
}

// O[r][cols] += sum_j P[r][j] v[j][cols] for NV column vectors.
template <int R, int NV>
HN_INLINE void pv_pass(const float* P, const float* v, int64_t dv_pad, int64_t nb, float* O) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(O + r * dv_pad + 16 * c);
  for (int64_t j = 0; j < nb; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * dv_pad + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * kBlock + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(O + r * dv_pad + 16 * c, acc[r][c]);
}

template <int R>
void pv(const float* P, const float* v, int64_t dv_pad, int64_t nb, float* O) {
  column_passes<kMaxColVectors>(
      dv_pad, [&]<int NV>(int64_t c0) { pv_pass<R, NV>(P, v + c0, dv_pad, nb, O + c0); });
}

struct Scratch {
  std::vector<float> q, S, O, mx, l;
};

// One key block for a group of R rows starting at query row i (rows' state at offset g in the scratch).
template <int R>
void group_block(const AttentionShape& s, const AttentionHead& h, const Layout& lay, const float* kt_block,
                 const float* v_block, int64_t j0, int64_t nb, int64_t i, Scratch& w, int64_t g) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float* q = w.q.data() + g * s.d;
  float* S = w.S.data();
  scores_pass<R>(q, s.d, kt_block, S);
  if (nb > 64) scores_pass<R>(q, s.d, kt_block + 64, S + 64);
  const int64_t vecs = ceil_div(nb, 16);
  for (int r = 0; r < R; ++r) {
    float* srow = S + r * kBlock;
    const float old_max = w.mx[g + r];
    const float new_max = std::max(old_max, masked_row_max(h, srow, i + r, j0, nb));
    float* o = w.O.data() + (g + r) * lay.dv_pad;
    if (new_max == neg_inf) {  // every score so far is -inf: p = 0
      std::fill(srow, srow + vecs * 16, 0.0f);
      continue;
    }
    const float alpha = std::exp(old_max - new_max);
    const __m512 m = _mm512_set1_ps(new_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < vecs; ++t) {
      const __m512 p = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(srow + 16 * t), m));
      _mm512_storeu_ps(srow + 16 * t, p);
      sum = _mm512_add_ps(sum, p);
    }
    w.l[g + r] = alpha * w.l[g + r] + _mm512_reduce_add_ps(sum);
    w.mx[g + r] = new_max;
    if (alpha != 1.0f) {
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t c = 0; c < lay.dv_pad; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(a, _mm512_loadu_ps(o + c)));
    }
  }
  pv<R>(S, v_block, lay.dv_pad, nb, w.O.data() + g * lay.dv_pad);
}

void avx512_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  if (s.precision == AttentionPrecision::kInt8) return attention_int8_avx512_rows(s, h, packed, q0, q1);
  const Layout lay(s);
  const float* kt = static_cast<const float*>(packed);
  const float* vp = kt + lay.kt_floats(s);
  const int64_t rows = q1 - q0;
  thread_local Scratch w;
  w.q.resize(static_cast<size_t>(rows * s.d));
  w.S.resize(static_cast<size_t>(kRows * kBlock));
  w.O.assign(static_cast<size_t>(rows * lay.dv_pad), 0.0f);
  w.mx.assign(static_cast<size_t>(rows), -std::numeric_limits<float>::infinity());
  w.l.assign(static_cast<size_t>(rows), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < s.d; ++c) {
      const float scaled = s.scale * h.q[(q0 + r) * s.q_stride + c];
      w.q[r * s.d + c] = scaled;
    }
  for (int64_t b = 0; b < lay.blocks; ++b) {
    const int64_t j0 = b * kBlock, nb = std::min(kBlock, s.nk - j0);
    const float* kt_block = kt + b * kBlock * s.d;
    const float* v_block = vp + j0 * lay.dv_pad;
    int64_t g = 0;
    for (; g + kRows <= rows; g += kRows)
      group_block<kRows>(s, h, lay, kt_block, v_block, j0, nb, q0 + g, w, g);
    switch (rows - g) {
      case 1: group_block<1>(s, h, lay, kt_block, v_block, j0, nb, q0 + g, w, g); break;
      case 2: group_block<2>(s, h, lay, kt_block, v_block, j0, nb, q0 + g, w, g); break;
      case 3: group_block<3>(s, h, lay, kt_block, v_block, j0, nb, q0 + g, w, g); break;
      default: break;
    }
  }
  store_rows(s, h, q0, rows, w.O.data(), lay.dv_pad, w.l.data());
}

}  // namespace

const AttentionPath* attention_avx512_path() {
  static const AttentionPath path{.name = "avx512",
                                  .packed_bytes = avx512_packed_bytes,
                                  .pack = avx512_pack,
                                  .rows = avx512_rows,
                                  .rows_per_task = kRowsPerTask,
                                  .computes_bf16 = false,
                                  .computes_int8 = true};
  return isa_supported(Isa::kAvx512Vnni) ? &path : nullptr;
}

}  // namespace hadanorm

#pragma GCC pop_options

#else

namespace hadanorm {
const AttentionPath* attention_avx512_path() { return nullptr; }
}  // namespace hadanorm

#endif
