// AMX path of the fused attention (attention.h), precision kBf16 only: Intel AMX bf16 tiles (tdpbf16ps) for q k^T and
// p v, AVX-512 (with AVX512-BF16 for the round-to-nearest-even conversions) for the online softmax around them.
//
// Tiles (palette 1, every tile 16 rows x 64 bytes): tmm0..3 the fp32 sums C [16 rows x 16 columns] of row tile r and
// column tile i (tmm 2r + i), tmm4 / tmm5 the A tiles of row tiles 0 / 1 [16 rows x 32 bf16], tmm6 / tmm7 the B tiles
// of column tiles 0 / 1 in the VNNI layout [16 rows x 16 columns x 2 bf16] (bf16 2n + e of row g = b[2g + e, n]): the
// 2 x 2 blocking that loads each A and B tile once for two tdpbf16ps. For s = q k^T: A = (scale q) rounded to bf16
// [rows x 32 of d], B = 16 keys x 32 of d; for p v: A = p rounded to bf16 [rows x 32 keys], B = 32 keys x 16 of dv.
//
// Packed (per head, pack()): k rounded to bf16 as B tiles, key tile by key tile (16 keys, zeros beyond nk), each the
// d_pad / 32 tiles of its d steps (zeros beyond d); then v rounded to bf16 as B tiles, key step by key step (32 keys,
// zeros beyond nk), each the dv_pad / 16 tiles of its column tiles (zeros beyond dv). 1 KiB a tile.
//
// Per task (rows q0..q1), per group of 32 query rows (the last <= 16 rows: one row tile; rows beyond q1 are zero q,
// computed and never stored), with per-thread buffers: Q (scale q rounded to bf16, row-major), for two consecutive key
// blocks S (fp32 scores) and P (bf16 p, row-major: the A tiles of p v), O (fp32 output sums), the lanes of l, the
// running maxima and the alphas. Key blocks of kAttentionKeyBlock = 128 keys, pipelined: phase b runs the AVX-512 work
//   - the softmax of block b: a first pass over all rows adds the mask (keys beyond nk: -inf) and takes the block
//     maxima, then, 16 rows a vector, mx' = max(mx, block maximum) and alpha = exp(mx - mx') (exp_ps: within 1 ulp of
//     the scalar path's std::exp; alpha scales o and l alike),
//   - O = alpha O of block b - 1 (rows where it is not 1), before the tiles of P V of block b - 1 add to O,
//   - row by row, p = exp(s - mx') = 2^((s - mx') log2 e) (exp2_bf16_ps), rounded to bf16 into P, and l = alpha l + the
//     rounded p (vdpbf16ps against ones: exact products, fp32 sums),
// and, between the rows of the last, chunks of the tile work (one d step or key step of a pair of column tiles: 2 or 4
// tdpbf16ps; the C tiles of S zeroed before the first step, those of O loaded from O, and stored after the last) of
// S = Q K^T of block b + 1, then O += P V of block b - 1 (the scalar path's o = alpha o + acc, its fp32 sums in another
// order). At the end out = o * (1 / l) (NaN where l == 0: every score -inf). On the AMX Xeon measured, tdpbf16ps
// and the AVX-512 arithmetic do not run side by side (their times add), but a switch between long runs of either costs
// about 0.4 us, which the interleaving avoids (15-20% faster than the phases one after the other).
//
// The tile configuration is loaded at the start of every task and released at its end: onnxruntime's own AMX kernels
// (MLAS) run on the same pool threads with their own configurations.
//
// Rounding: vcvtne2ps2bf16 rounds to nearest even and flushes denormal inputs to zero, as the scalar path's round_bf16
// does, and tdpbf16ps treats denormal bf16 inputs as zero; p under FLT_MIN is 0 here (exp2_bf16_ps) and rounds to 0 in
// the scalar path. So the products are those of the scalar path and only the order of the fp32 sums and exp's last
// bits differ. exp2_bf16_ps instead of exp_ps for p (both within about 1 ulp): one op alone, one thread, 100 / 20
// interleaved calls (`python benchmarks/bench_ops_ab.py attention --tokens T --keys K --rounds R --tolerance 1e-4
// OLD.so NEW.so`, outputs 1.4e-5 apart): 256 x 256 keys 1.710 -> 1.661 ms, 256 x 300 2.086 -> 2.028, 1024 x 1024
// 24.35 -> 23.73 (medians, 2.5-3%; min 1.584 -> 1.581, 1.933 -> 1.876, 23.12 -> 22.30).

#include "attention.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// The standard headers come before the target pragma: the library code they instantiate here (std::vector's growth,
// weak symbols shared with the other sources) stays baseline x86-64.
#include <cpuid.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_tile_config.h"
#include "util.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "attention_exp512.h"  // exp_ps, exp2_bf16_ps (compiled for this file's targets)
#include "attention_row512.h"  // lanes

namespace hadanorm {

namespace {

constexpr int64_t kTile = 16;                   // rows of every tile; keys of a k tile; columns of a v / C tile
constexpr int64_t kGroup = 2 * kTile;           // query rows per group: two row tiles
constexpr int64_t kDStep = 32;                  // d per q k^T step (an A tile row: 32 bf16)
constexpr int64_t kKeyStep = 32;                // keys per p v step
constexpr int64_t kBlock = kAttentionKeyBlock;  // keys per softmax block
constexpr int64_t kTileBytes = 1024;            // 16 rows x 64 bytes
constexpr int64_t kRowsPerTask = 2 * kGroup;        // query rows per task

static_assert(kBlock % kKeyStep == 0 && kKeyStep % kTile == 0, "a key block is whole key steps and key tiles");

void load_tile_config() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.set(i, kTile, 64);  // C, A and B tiles alike: 16 rows x 64 bytes
  _tile_loadconfig(&cfg);
}

// The padded sizes of one head.
struct Layout {
  int64_t d_steps, d_pad;     // q k^T steps of 32 over d
  int64_t v_tiles, dv_pad;    // column tiles of 16 over dv
  int64_t k_tiles, v_steps;   // key tiles of 16, key steps of 32
  int64_t k_bytes, v_bytes;   // packed k, packed v
};

Layout layout(const AttentionShape& s) {
  Layout l;
  l.d_steps = ceil_div(s.d, kDStep);
  l.d_pad = l.d_steps * kDStep;
  l.v_tiles = ceil_div(s.dv, kTile);
  l.dv_pad = l.v_tiles * kTile;
  l.k_tiles = ceil_div(s.nk, kTile);
  l.v_steps = ceil_div(s.nk, kKeyStep);
  l.k_bytes = l.k_tiles * l.d_steps * kTileBytes;
  l.v_bytes = l.v_steps * l.v_tiles * kTileBytes;
  return l;
}

// 32 floats (lo: elements 0..15, hi: 16..31) rounded to bf16 (nearest even), in order.
HN_INLINE __m512i bf16x32(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// The dwords lo[n] | hi[n] << 16 in bf16 (a VNNI pair per lane).
HN_INLINE __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, bf16x32(lo, hi));
}

// rows[i] dword j -> rows[j] dword i: the 16 x 16 transpose of 32-bit elements (unpack 32, unpack 64, then two
// rounds of 128-bit lane shuffles).
HN_INLINE void transpose16x16_epi32(__m512i* r) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[q + m] (q = 0, 4, 8, 12), lane j: element 4 j + m of rows q .. q + 3
  for (int q = 0; q < 16; q += 4) {
    b[q] = _mm512_unpacklo_epi64(a[q], a[q + 2]);
    b[q + 1] = _mm512_unpackhi_epi64(a[q], a[q + 2]);
    b[q + 2] = _mm512_unpacklo_epi64(a[q + 1], a[q + 3]);
    b[q + 3] = _mm512_unpackhi_epi64(a[q + 1], a[q + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44), c1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xEE);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44),
                  d1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xEE);
    r[m] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[8 + m] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[12 + m] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

size_t amx_packed_bytes(const AttentionShape& s) {
  const Layout l = layout(s);
  return static_cast<size_t>(l.k_bytes + l.v_bytes);
}

void amx_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  assert(s.precision == AttentionPrecision::kBf16);
  const Layout l = layout(s);
  uint8_t* kp = static_cast<uint8_t*>(packed);
  uint8_t* vp = kp + l.k_bytes;
  const __m512 zero = _mm512_setzero_ps();
  // k: tile (t, step) row g, dword n = k[16 t + n, 32 step + 2 g (+ 1)]: each key's 32 d rounded to 16 bf16 pairs
  // (dword g of key row n), then the 16 x 16 dword transpose (64 shuffles instead of 32 gathers a tile)
  for (int64_t t = 0; t < l.k_tiles; ++t) {
    const int64_t keys = std::min(kTile, s.nk - t * kTile);
    const float* base = k + t * kTile * s.k_stride;
    for (int64_t step = 0; step < l.d_steps; ++step) {
      const int64_t c = step * kDStep;
      const __mmask16 lo_lanes = lanes(s.d - c), hi_lanes = lanes(s.d - c - 16);
      __m512i rows[kTile];
      for (int64_t n = 0; n < kTile; ++n) {
        rows[n] = _mm512_setzero_si512();
        if (n < keys) {
          const float* row = base + n * s.k_stride + c;
          rows[n] = bf16x32(_mm512_maskz_loadu_ps(lo_lanes, row), _mm512_maskz_loadu_ps(hi_lanes, row + 16));
        }
      }
      transpose16x16_epi32(rows);
      uint8_t* dst = kp + (t * l.d_steps + step) * kTileBytes;
      for (int64_t g = 0; g < kTile; ++g) _mm512_store_si512(dst + g * 64, rows[g]);
    }
  }
  // v: tile (step, ct) row g, lane n = v[32 step + 2 g (+ 1), 16 ct + n]
  for (int64_t step = 0; step < l.v_steps; ++step) {
    for (int64_t ct = 0; ct < l.v_tiles; ++ct) {
      uint8_t* dst = vp + (step * l.v_tiles + ct) * kTileBytes;
      const __mmask16 cols = lanes(s.dv - ct * kTile);
      for (int64_t g = 0; g < kTile; ++g) {
        const int64_t j = step * kKeyStep + 2 * g;
        const __m512 lo = j < s.nk ? _mm512_maskz_loadu_ps(cols, v + j * s.v_stride + ct * kTile) : zero;
        const __m512 hi = j + 1 < s.nk ? _mm512_maskz_loadu_ps(cols, v + (j + 1) * s.v_stride + ct * kTile) : zero;
        _mm512_store_si512(dst + g * 64, bf16_pairs(lo, hi));
      }
    }
  }
}

// Per-thread buffers of one row group (64-byte aligned); [2]: for two consecutive key blocks.
struct Scratch {
  uint16_t* q;      // [32, d_pad] bf16 (scale q)
  float* s[2];      // [32, 128] scores of a key block
  uint16_t* p[2];   // [32, 128] bf16 p of a key block
  float* o;         // [32, dv_pad] output sums
  float* l;         // [32, 16] lanes of the row sums l
  float* mx;        // [32] running maxima
  float* alpha[2];  // [32] alpha of a key block (two blocks: key block b % 2)
};

Scratch scratch(const Layout& lay) {
  const int64_t q_bytes = kGroup * lay.d_pad * 2, s_bytes = kGroup * kBlock * 4, p_bytes = kGroup * kBlock * 2,
                o_bytes = kGroup * lay.dv_pad * 4, l_bytes = kGroup * 16 * 4, row_bytes = kGroup * 4;
  const int64_t bytes = q_bytes + 2 * s_bytes + 2 * p_bytes + o_bytes + l_bytes + 3 * row_bytes;  // each x 64
  thread_local std::vector<uint8_t> storage;
  if (static_cast<int64_t>(storage.size()) < bytes + 64) storage.resize(static_cast<size_t>(bytes + 64));
  const uintptr_t a = reinterpret_cast<uintptr_t>(storage.data());
  uint8_t* at = reinterpret_cast<uint8_t*>((a + 63) & ~static_cast<uintptr_t>(63));
  auto take = [&at](int64_t n) {
    uint8_t* p = at;
    at += n;
    return p;
  };
  Scratch sc;
  sc.q = reinterpret_cast<uint16_t*>(take(q_bytes));
  for (int i = 0; i < 2; ++i) {
    sc.s[i] = reinterpret_cast<float*>(take(s_bytes));
    sc.p[i] = reinterpret_cast<uint16_t*>(take(p_bytes));
  }
  for (int i = 0; i < 2; ++i) sc.alpha[i] = reinterpret_cast<float*>(take(row_bytes));
  sc.o = reinterpret_cast<float*>(take(o_bytes));
  sc.l = reinterpret_cast<float*>(take(l_bytes));
  sc.mx = reinterpret_cast<float*>(take(row_bytes));
  return sc;
}

// One d step of s[:, 16 t .. 16 (t + NK)) = Q K^T (key tiles t and t + 1 of the block at kb): the C tiles start at
// zero on the first step and are stored after the last.
template <int RT, int NK>
HN_INLINE void qk_step(const Scratch& sc, const Layout& lay, const uint8_t* kb, float* s, int64_t t, int64_t step) {
  const int64_t q_stride = lay.d_pad * 2;
  if (step == 0) {
    _tile_zero(0);
    if constexpr (NK == 2) _tile_zero(1);
    if constexpr (RT == 2) {
      _tile_zero(2);
      if constexpr (NK == 2) _tile_zero(3);
    }
  }
  _tile_loadd(4, sc.q + step * kDStep, q_stride);
  _tile_loadd(6, kb + (t * lay.d_steps + step) * kTileBytes, 64);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (NK == 2) {
    _tile_loadd(7, kb + ((t + 1) * lay.d_steps + step) * kTileBytes, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if constexpr (RT == 2) {
    _tile_loadd(5, sc.q + kTile * lay.d_pad + step * kDStep, q_stride);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NK == 2) _tile_dpbf16ps(3, 5, 7);
  }
  if (step == lay.d_steps - 1) {
    constexpr int64_t s_stride = kBlock * 4;
    float* s0 = s + t * kTile;
    _tile_stored(0, s0, s_stride);
    if constexpr (NK == 2) _tile_stored(1, s0 + kTile, s_stride);
    if constexpr (RT == 2) {
      _tile_stored(2, s0 + kTile * kBlock, s_stride);
      if constexpr (NK == 2) _tile_stored(3, s0 + kTile * kBlock + kTile, s_stride);
    }
  }
}

// One key step of o[:, 16 c .. 16 (c + NC)) += P V (column tiles c and c + 1 of the block at vb, `steps` key steps):
// the C tiles are loaded from O on the first step and stored back after the last.
template <int RT, int NC>
HN_INLINE void pv_step(const Layout& lay, const uint16_t* p, const uint8_t* vb, float* t, int64_t c, int64_t step,
                       int64_t steps) {
  const int64_t t_stride = lay.dv_pad * 4;
  float* t0 = t + c * kTile;
  if (step == 0) {
    _tile_loadd(0, t0, t_stride);
    if constexpr (NC == 2) _tile_loadd(1, t0 + kTile, t_stride);
    if constexpr (RT == 2) {
      _tile_loadd(2, t0 + kTile * lay.dv_pad, t_stride);
      if constexpr (NC == 2) _tile_loadd(3, t0 + kTile * lay.dv_pad + kTile, t_stride);
    }
  }
  constexpr int64_t p_stride = kBlock * 2;
  _tile_loadd(4, p + step * kKeyStep, p_stride);
  _tile_loadd(6, vb + (step * lay.v_tiles + c) * kTileBytes, 64);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (NC == 2) {
    _tile_loadd(7, vb + (step * lay.v_tiles + c + 1) * kTileBytes, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if constexpr (RT == 2) {
    _tile_loadd(5, p + kTile * kBlock + step * kKeyStep, p_stride);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC == 2) _tile_dpbf16ps(3, 5, 7);
  }
  if (step == steps - 1) {
    _tile_stored(0, t0, t_stride);
    if constexpr (NC == 2) _tile_stored(1, t0 + kTile, t_stride);
    if constexpr (RT == 2) {
      _tile_stored(2, t0 + kTile * lay.dv_pad, t_stride);
      if constexpr (NC == 2) _tile_stored(3, t0 + kTile * lay.dv_pad + kTile, t_stride);
    }
  }
}

// The tile work of one phase, in chunks (one d step of a key tile pair, one key step of a column tile pair; 1 to 4
// tdpbf16ps each) that the softmax loop runs between its rows: S = Q K^T of one block, then O += P V of another.
template <int RT>
class TileJobs {
 public:
  TileJobs(const Scratch& sc, const Layout& lay) : sc_(sc), lay_(lay) {}

  // kb == nullptr: no Q K^T; vb == nullptr: no P V.
  void start(const uint8_t* kb, int64_t key_tiles, float* s, const uint8_t* vb, int64_t key_steps, const uint16_t* p,
             float* t) {
    kb_ = kb, key_tiles_ = key_tiles, s_ = s, vb_ = vb, key_steps_ = key_steps, p_ = p, t_ = t;
    qk_pairs_ = kb ? ceil_div(key_tiles, 2) : 0;
    qk_chunks_ = qk_pairs_ * lay_.d_steps;
    total_ = qk_chunks_ + (vb ? ceil_div(lay_.v_tiles, 2) * key_steps : 0);
    done_ = pair_ = step_ = 0;
  }
  int64_t total() const { return total_; }

  // Runs the chunks up to `target` (of total()).
  HN_INLINE void run_until(int64_t target) {
    for (; done_ < target; ++done_) {
      if (done_ < qk_chunks_) {
        const int64_t t = 2 * pair_;
        if (t + 1 < key_tiles_)
          qk_step<RT, 2>(sc_, lay_, kb_, s_, t, step_);
        else
          qk_step<RT, 1>(sc_, lay_, kb_, s_, t, step_);
        if (++step_ == lay_.d_steps) step_ = 0, pair_ = pair_ + 1 == qk_pairs_ ? 0 : pair_ + 1;
      } else {
        const int64_t c = 2 * pair_;
        if (c + 1 < lay_.v_tiles)
          pv_step<RT, 2>(lay_, p_, vb_, t_, c, step_, key_steps_);
        else
          pv_step<RT, 1>(lay_, p_, vb_, t_, c, step_, key_steps_);
        if (++step_ == key_steps_) step_ = 0, ++pair_;
      }
    }
  }

 private:
  const Scratch& sc_;
  const Layout& lay_;
  const uint8_t *kb_ = nullptr, *vb_ = nullptr;
  const uint16_t* p_ = nullptr;
  float *s_ = nullptr, *t_ = nullptr;
  int64_t key_tiles_ = 0, key_steps_ = 0, qk_pairs_ = 0, qk_chunks_ = 0, total_ = 0, done_ = 0, pair_ = 0, step_ = 0;
};

// The first softmax pass of row r of the group (query row i) over the block of nb keys from j0 whose scores are in
// S[buf]: adds the mask and sets the keys beyond nb to -inf in S (up to the next key step), bmax[r] = the block
// maximum.
HN_INLINE void row_max(const AttentionHead& h, const Scratch& sc, int64_t r, int64_t i, int64_t j0, int64_t nb,
                       int buf, float* bmax) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 vneg_inf = _mm512_set1_ps(neg_inf);
  float* srow = sc.s[buf] + r * kBlock;
  const int64_t vecs = ceil_div(nb, kKeyStep) * 2;  // whole key steps of 16-lane vectors
  __m512 vmax = vneg_inf;
  if (h.mask) {
    const float* m = h.mask + i * h.mask_row;
    alignas(64) float mrow[kBlock];
    if (h.mask_col == 1) {
      m += j0;
    } else if (h.mask_col != 0) {
      for (int64_t j = 0; j < nb; ++j) mrow[j] = m[(j0 + j) * h.mask_col];
      m = mrow;
    }
    const __m512 m0 = _mm512_set1_ps(*m);
    for (int64_t v = 0; v < vecs; ++v) {
      const __mmask16 k = lanes(nb - v * 16);
      __m512 x = _mm512_mask_loadu_ps(vneg_inf, k, srow + v * 16);
      x = _mm512_mask_add_ps(x, k, x, h.mask_col == 0 ? m0 : _mm512_maskz_loadu_ps(k, m + v * 16));
      _mm512_store_ps(srow + v * 16, x);
      vmax = _mm512_max_ps(vmax, x);
    }
  } else if (nb < kBlock) {
    for (int64_t v = 0; v < vecs; ++v) {
      const __m512 x = _mm512_mask_loadu_ps(vneg_inf, lanes(nb - v * 16), srow + v * 16);
      _mm512_store_ps(srow + v * 16, x);
      vmax = _mm512_max_ps(vmax, x);
    }
  } else {
    __m512 m1 = vneg_inf;
    for (int64_t v = 0; v < kBlock / 16; v += 2) {
      vmax = _mm512_max_ps(vmax, _mm512_load_ps(srow + v * 16));
      m1 = _mm512_max_ps(m1, _mm512_load_ps(srow + v * 16 + 16));
    }
    vmax = _mm512_max_ps(vmax, m1);
  }
  bmax[r] = _mm512_reduce_max_ps(vmax);
}

// For the n rows of the group, 16 at a time: mx' = max(mx, bmax), alpha = exp(mx - mx') (exp_ps; 1 when the maximum
// stays or was -inf: O and l are still 0), sub = mx' (0 when every score so far is -inf: p = 0), mx = mx'.
HN_INLINE void rows_alpha(const Scratch& sc, int64_t n, const float* bmax, float* alpha, float* sub) {
  const __m512 vneg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < n; r += 16) {
    const __mmask16 k = lanes(n - r);
    const __m512 mx = _mm512_maskz_loadu_ps(k, sc.mx + r);
    const __m512 new_max = _mm512_max_ps(_mm512_maskz_loadu_ps(k, bmax + r), mx);  // mx where bmax is NaN
    const __mmask16 keep = _mm512_cmp_ps_mask(new_max, mx, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(mx, vneg_inf, _CMP_EQ_OQ);
    _mm512_mask_storeu_ps(alpha + r, k, _mm512_mask_blend_ps(keep, exp_ps(_mm512_sub_ps(mx, new_max)), one));
    _mm512_mask_storeu_ps(sc.mx + r, k, new_max);
    const __mmask16 none = _mm512_cmp_ps_mask(new_max, vneg_inf, _CMP_EQ_OQ);
    _mm512_mask_storeu_ps(sub + r, k, _mm512_mask_blend_ps(none, new_max, _mm512_setzero_ps()));
  }
}

// The second pass of row r: P[buf] = p = exp(s - sub) rounded to bf16, l = alpha l + the rounded p.
HN_INLINE void row_exp(const Scratch& sc, int64_t r, int64_t nb, int buf, float alpha, float sub) {
  const float* srow = sc.s[buf] + r * kBlock;
  uint16_t* prow = sc.p[buf] + r * kBlock;
  float* lrow = sc.l + r * 16;
  __m512 lsum = _mm512_load_ps(lrow);
  if (alpha != 1.0f) lsum = _mm512_mul_ps(lsum, _mm512_set1_ps(alpha));
  // p = 2^((s - sub) log2 e): s - sub first, exact as the scalar path's (a fused s log2 e - (sub log2 e) would carry
  // sub log2 e's rounding, 5e-4 at a mask of -10000, into p's bf16 rounding and across key blocks with other maxima)
  const __m512 vlog2e = _mm512_set1_ps(1.44269504088896341f), vsub = _mm512_set1_ps(sub);
  const __m512bh ones = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f));
  const int64_t n = ceil_div(nb, kKeyStep) * kKeyStep;
#pragma GCC unroll 4
  for (int64_t j = 0; j < n; j += 32) {
    const __m512 p0 = exp2_bf16_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(srow + j), vsub), vlog2e));
    const __m512 p1 = exp2_bf16_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(srow + j + 16), vsub), vlog2e));
    const __m512bh p = _mm512_cvtne2ps_pbh(p1, p0);
    _mm512_store_si512(prow + j, (__m512i)p);
    lsum = _mm512_dpbf16_ps(lsum, p, ones);
  }
  _mm512_store_ps(lrow, lsum);
}

// Query rows [i0, i0 + n) (n <= 16 RT) of one head, of a task ending at row q1: RT row tiles, rows beyond n
// zero-padded. After S of block 0, phase b runs the softmax of block b and O = alpha O of block b - 1, with the tile
// chunks of S of block b + 1 and O += P V of block b - 1 between the rows of its exp pass (see the top).
template <int RT>
void row_group(const AttentionShape& s, const AttentionHead& h, const Layout& lay, const uint8_t* kp,
               const uint8_t* vp, const Scratch& sc, int64_t i0, int64_t n, int64_t q1) {
  constexpr int64_t rows = RT * kTile;
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int64_t r = 0; r < rows; ++r) {  // Q = bf16(scale q), zeros beyond d and beyond n
    uint16_t* qrow = sc.q + r * lay.d_pad;
    const float* src = h.q + (i0 + r) * s.q_stride;
    for (int64_t c = 0; c < lay.d_pad; c += 32) {
      __m512i x = _mm512_setzero_si512();
      if (r < n)
        x = bf16x32(_mm512_mul_ps(scale, _mm512_maskz_loadu_ps(lanes(s.d - c), src + c)),
                    _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(lanes(s.d - c - 16), src + c + 16)));
      _mm512_store_si512(qrow + c, x);
    }
  }
  std::fill(sc.o, sc.o + rows * lay.dv_pad, 0.0f);
  std::fill(sc.l, sc.l + rows * 16, 0.0f);
  std::fill(sc.mx, sc.mx + rows, -std::numeric_limits<float>::infinity());
  for (int i = 0; i < 2; ++i) std::fill(sc.p[i] + n * kBlock, sc.p[i] + rows * kBlock, uint16_t{0});  // padded rows
  const int64_t blocks = ceil_div(s.nk, kBlock);
  auto keys = [&s](int64_t b) { return std::min(kBlock, s.nk - b * kBlock); };
  auto k_block = [&](int64_t b) { return kp + b * (kBlock / kTile) * lay.d_steps * kTileBytes; };
  auto v_block = [&](int64_t b) { return vp + b * (kBlock / kKeyStep) * lay.v_tiles * kTileBytes; };
  TileJobs<RT> jobs(sc, lay);
  jobs.start(k_block(0), ceil_div(keys(0), kTile), sc.s[0], nullptr, 0, nullptr, nullptr);
  jobs.run_until(jobs.total());
  for (int64_t b = 0; b <= blocks; ++b) {
    const bool next = b + 1 < blocks, prev = b >= 1 && b <= blocks;
    jobs.start(next ? k_block(b + 1) : nullptr, next ? ceil_div(keys(b + 1), kTile) : 0, sc.s[(b + 1) & 1],
               prev ? v_block(b - 1) : nullptr, prev ? ceil_div(keys(b - 1), kKeyStep) : 0, sc.p[(b + 1) & 1], sc.o);
    const int64_t total = jobs.total();
    alignas(64) float sub[kGroup], bmax[kGroup];
    if (b < blocks) {
      for (int64_t r = 0; r < n; ++r) row_max(h, sc, r, i0 + r, b * kBlock, keys(b), b & 1, bmax);
      rows_alpha(sc, n, bmax, sc.alpha[b % 2], sub);
    }
    if (prev) {  // O = alpha O (alpha of block b - 1) before P V of block b - 1 adds to it
      const float* alpha = sc.alpha[(b - 1) % 2];
      for (int64_t r = 0; r < n; ++r) {
        if (alpha[r] == 1.0f) continue;
        const __m512 va = _mm512_set1_ps(alpha[r]);
        float* o = sc.o + r * lay.dv_pad;
        for (int64_t c = 0; c < lay.dv_pad; c += 16) _mm512_store_ps(o + c, _mm512_mul_ps(va, _mm512_load_ps(o + c)));
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      if (b < blocks) row_exp(sc, r, keys(b), b & 1, sc.alpha[b % 2][r], sub[r]);
      // the rows of a head are heads * d apart in the bnhd layout, one miss each for the hardware prefetchers: the next
      // group's q row of this task (rows < q1) in the first phase, this group's output row (for writing) in the phase
      // before the last
      if (b == 0 && i0 + rows + r < q1) prefetch_row(h.q + (i0 + rows + r) * s.q_stride, s.d, false);
      if (b == std::max<int64_t>(0, blocks - 1)) prefetch_row(h.out + (i0 + r) * s.out_stride, s.dv, true);
      jobs.run_until((r + 1) * total / n);
    }
  }
  for (int64_t r = 0; r < n; ++r) {  // out = o / l
    const float l = _mm512_reduce_add_ps(_mm512_load_ps(sc.l + r * 16));
    const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : std::numeric_limits<float>::quiet_NaN());
    const float* orow = sc.o + r * lay.dv_pad;
    float* out = h.out + (i0 + r) * s.out_stride;
    for (int64_t c = 0; c < s.dv; c += 16)
      _mm512_mask_storeu_ps(out + c, lanes(s.dv - c), _mm512_mul_ps(_mm512_load_ps(orow + c), inv));
  }
}

void amx_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  assert(s.precision == AttentionPrecision::kBf16);
  if (q0 >= q1) return;
  const Layout lay = layout(s);
  const uint8_t* kp = static_cast<const uint8_t*>(packed);
  const uint8_t* vp = kp + lay.k_bytes;
  const Scratch sc = scratch(lay);
  load_tile_config();
  for (int64_t i0 = q0; i0 < q1; i0 += kGroup) {
    const int64_t n = std::min(kGroup, q1 - i0);
    if (n > kTile)
      row_group<2>(s, h, lay, kp, vp, sc, i0, n, q1);
    else
      row_group<1>(s, h, lay, kp, vp, sc, i0, n, q1);
  }
  _tile_release();
}

// AMX-BF16: CPUID.(EAX=7, ECX=0):EDX bit 22; AVX512-BF16: CPUID.(EAX=7, ECX=1):EAX bit 5. isa_supported(kAmx) has
// the tiles (AMX-TILE, the process's permission for the tile state) and AVX-512 F/BW/VL.
bool amx_bf16_usable() {
  if (!isa_supported(Isa::kAmx)) return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22))) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;
  return __builtin_cpu_supports("avx512dq");
}

}  // namespace

const AttentionPath* attention_amx_path() {
  static const bool usable = amx_bf16_usable();
  if (!usable) return nullptr;
  static const AttentionPath path{.name = "amx",
                                  .packed_bytes = amx_packed_bytes,
                                  .pack = amx_pack,
                                  .rows = amx_rows,
                                  .rows_per_task = kRowsPerTask,
                                  .computes_bf16 = true};
  return &path;
}

}  // namespace hadanorm

#pragma GCC pop_options

#else

namespace hadanorm {

const AttentionPath* attention_amx_path() { return nullptr; }

}  // namespace hadanorm

#endif
