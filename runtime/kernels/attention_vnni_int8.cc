// The AVX-512 path's int8 attention (precision kInt8, attention_int8.h): q k^T and p v by AVX512-VNNI's vpdpbusd
// (unsigned x signed bytes, 4 products a 32-bit lane, summed exactly in int32), the online softmax in fp32 as the float
// path does it (attention_avx512.cc).
//
// Packed per head (byte offsets in Int8Layout): the key codes in key blocks of 128, each [d_pad / 4 quads][128 keys][4]
// (a quad: 4 consecutive channels of one key); the value codes in key quads, [nk_pad / 4][dv_pad][4] (4 consecutive
// keys of one channel); then sk [nk_pad] (0 past nk), 128 * sum of each key's codes [nk_pad] (int32), sv [dv_pad]
// and the value means [dv_pad]. The codes are attention_int8.h's, laid out.
//
// Queries go in as unsigned bytes cq + 128 (vpdpbusd's first operand is unsigned): (cq + 128) . ck - 128 sum ck is
// cq . ck exactly. p's codes are unsigned already (0..255) and the value codes signed: p v needs no correction.
//
// A task (query rows q0..q1) walks the key blocks once with its rows' state in per-thread buffers; a group of 4 rows:
//   S [4 x 128] = (qf_i sk_j) (cq_i . ck_j)   4 rows x 4 key vectors of 16 per pass (16 accumulators), 2 passes
//   softmax step per row (log2 units)          mask (times log2 e), -inf past nk, block max, alpha = 2^(mx - mx'),
//                                              cp = round(255 2^(s - mx')) (p_codes: attention_int8_p_code's
//                                              operations, the polynomial with 255 folded in), l += sum cp (int32)
//   O [4 x dv_pad] = alpha O + cp cv           4 rows x up to 6 column vectors per pass (int32 sums, added to O)

#include "attention.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(HADANORM_SCALAR_ONLY)

// Standard headers before the target pragma (see attention_avx512.cc).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_int8.h"
#include "util.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's _mm512_reduce_* start from an undefined vector
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "attention_exp512.h"  // horner (compiled for this file's targets)
#include "attention_row512.h"  // lanes, masked_row_max, column_passes, store_rows

namespace hadanorm {

namespace {

constexpr int64_t kBlock = kAttentionKeyBlock;  // keys per block (8 vectors)
constexpr int kRows = 4;                        // query rows per group
constexpr int kMaxColVectors = 6;               // output column vectors per p v pass
constexpr int64_t kQuadBytes = 4;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Int8Layout {
  int64_t d_pad, quads, blocks, nk_pad, dv_pad;
  int64_t v, sk, kcorr, sv, vmean, bytes;  // byte offsets; bytes in all
  explicit Int8Layout(const AttentionShape& s)
      : d_pad(attention_int8_d_pad(s.d)), quads(d_pad / 4), blocks(ceil_div(s.nk, kBlock)),
        nk_pad(blocks * kBlock), dv_pad(round_up(s.dv, 16)) {
    v = nk_pad * d_pad;
    sk = v + nk_pad * dv_pad;
    kcorr = sk + 4 * nk_pad;
    sv = kcorr + 4 * nk_pad;
    vmean = sv + 4 * dv_pad;
    bytes = vmean + 4 * dv_pad;
  }
};

template <class T>
const T* part(const void* packed, int64_t offset) {
  return reinterpret_cast<const T*>(static_cast<const uint8_t*>(packed) + offset);
}
template <class T>
T* part(void* packed, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(packed) + offset);
}

// acc += dot4(a (u8), w (s8)) per int32 lane, as tied inline assembly (as int_avx512.cc found for IntMatMul): with
// the intrinsic GCC 12 kept each accumulator in two registers and copied it every step (two vmovdqa a vpdpbusd: 36%
// of the int8 attention's samples at 1024 tokens). The passes below are not inlined into group_block: inlined (with
// the assembly) their accumulators lived on the stack. One op alone, one thread (`python benchmarks/bench_ops_ab.py
// attention --precision int8 --tokens T --keys T`): 1024 tokens 56.0 -> 45.2 ms, 256 tokens 4.36 -> 3.77 ms.
HN_INLINE void dpbusd(__m512i& acc, __m512i a, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
}

HN_INLINE __m512i broadcast_quad(const uint8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, 4);
  return _mm512_set1_epi32(quad);
}

// S[r][64 h .. 64 h + 64) for R rows: 4 key vectors of the block's half h.
template <int R>
__attribute__((noinline)) void scores_pass(const uint8_t* q, int64_t d_pad, const float* qf, const uint8_t* kblock,
                                           int64_t quads, const int32_t* kcorr, const float* sk, float* S) {
  __m512i acc[R][4];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t c = 0; c < quads; ++c) {
    const uint8_t* row = kblock + c * kBlock * kQuadBytes;
    __m512i kv[4];
#pragma GCC unroll 16
    for (int v = 0; v < 4; ++v) kv[v] = _mm512_loadu_si512(row + 64 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i b = broadcast_quad(q + r * d_pad + 4 * c);
#pragma GCC unroll 16
      for (int v = 0; v < 4; ++v) dpbusd(acc[r][v], b, kv[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < 4; ++v) {
    const __m512i corr = _mm512_loadu_si512(kcorr + 16 * v);
    const __m512 scales = _mm512_loadu_ps(sk + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr));
      _mm512_storeu_ps(S + r * kBlock + 16 * v, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(qf[r]), scales), dot));
    }
  }
}

// O[r][cols] += sum_j cp[r][j] cv[j][cols] for NV column vectors, over `quads` key quads.
template <int R, int NV>
__attribute__((noinline)) void pv_pass(const uint8_t* P, const uint8_t* v, int64_t dv_pad, int64_t quads, float* O) {
  __m512i acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t t = 0; t < quads; ++t) {
    __m512i vv[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(v + t * dv_pad * kQuadBytes + 64 * c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i p = broadcast_quad(P + r * kBlock + 4 * t);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) dpbusd(acc[r][c], p, vv[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) {
      float* o = O + r * dv_pad + 16 * c;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_cvtepi32_ps(acc[r][c])));
    }
}

template <int R>
void pv(const uint8_t* P, const uint8_t* v, int64_t dv_pad, int64_t quads, float* O) {
  column_passes<kMaxColVectors>(
      dv_pad, [&]<int NV>(int64_t c0) { pv_pass<R, NV>(P, v + c0 * kQuadBytes, dv_pad, quads, O + c0); });
}

// ---- the codes (attention_int8.cc's arithmetic, element for element: the same bits, 16 lanes at a time) ----

// Channels [c0, c0 + 8 U) of channel_means: U chains of double sums side by side (one chain waits 4 cycles an add).
template <int U>
void channel_means_pass(const float* x, int64_t n, int64_t width, int64_t stride, int64_t c0, float* means) {
  __m512d sum[U];
  __mmask8 m[U];
  for (int u = 0; u < U; ++u) {
    sum[u] = _mm512_setzero_pd();
    m[u] = static_cast<__mmask8>(lanes(width - c0 - 8 * u));
  }
  for (int64_t j = 0; j < n; ++j)
    for (int u = 0; u < U; ++u)
      sum[u] = _mm512_add_pd(sum[u], _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m[u], x + j * stride + c0 + 8 * u)));
  for (int u = 0; u < U; ++u)
    _mm256_mask_storeu_ps(means + c0 + 8 * u, m[u],
                          _mm512_cvtpd_ps(_mm512_div_pd(sum[u], _mm512_set1_pd(static_cast<double>(n)))));
}

// The mean over n rows of each of `width` channels, summed in double in row order (as channel_means). Up to 72
// channels (9 chains: a head of PixArt's 72) in one pass over the rows: with passes of 32 channels a 72-wide head read
// its rows three times and kept 4 chains of adds in flight, not 9.
void channel_means(const float* x, int64_t n, int64_t width, int64_t stride, float* means) {
  for (int64_t c0 = 0; c0 < width; c0 += 72) {
    switch (ceil_div(width - c0, 8)) {
      case 1: channel_means_pass<1>(x, n, width, stride, c0, means); break;
      case 2: channel_means_pass<2>(x, n, width, stride, c0, means); break;
      case 3: channel_means_pass<3>(x, n, width, stride, c0, means); break;
      case 4: channel_means_pass<4>(x, n, width, stride, c0, means); break;
      case 5: channel_means_pass<5>(x, n, width, stride, c0, means); break;
      case 6: channel_means_pass<6>(x, n, width, stride, c0, means); break;
      case 7: channel_means_pass<7>(x, n, width, stride, c0, means); break;
      case 8: channel_means_pass<8>(x, n, width, stride, c0, means); break;
      default: channel_means_pass<9>(x, n, width, stride, c0, means); break;
    }
  }
}

// The largest |x - mean| over the n rows of each of `width` channels (vmax [ceil(width / 16) * 16], 0 past width).
void centered_absmax(const float* x, const float* mean, int64_t n, int64_t width, int64_t stride, float* vmax) {
  constexpr int U = 4;
  for (int64_t c0 = 0; c0 < width; c0 += 16 * U) {
    __m512 acc[U], mc[U];
    __mmask16 m[U];
    for (int u = 0; u < U; ++u) {
      m[u] = lanes(width - c0 - 16 * u);
      mc[u] = _mm512_maskz_loadu_ps(m[u], mean + c0 + 16 * u);
      acc[u] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; ++j)
      for (int u = 0; u < U; ++u)
        if (m[u])
          acc[u] = _mm512_max_ps(acc[u], _mm512_abs_ps(_mm512_sub_ps(
                                             _mm512_maskz_loadu_ps(m[u], x + j * stride + c0 + 16 * u), mc[u])));
    for (int u = 0; u < U; ++u)
      if (m[u]) _mm512_storeu_ps(vmax + c0 + 16 * u, acc[u]);
  }
}

// Codes round(y * inv) clamped to [-127, 127] (vcvtps2dq: nearest even), as int32 lanes.
HN_INLINE __m512i codes_of(__m512 y, __m512 inv) {
  const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(y, inv));
  return _mm512_min_epi32(_mm512_max_epi32(c, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
}

// +1 in the lanes i with i & h == 0, -1 in the others (h = 1, 2, 4, 8)
HN_INLINE __m512 butterfly_signs(int h) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(lane, _mm512_set1_epi32(h)), _mm512_set1_ps(1.0f),
                              _mm512_set1_ps(-1.0f));
}

// Vector t of a row x [d] (minus mean when given), with the block Hadamard's butterflies within the vector (h < 16,
// h < hb): lane i gets x[i] + x[i ^ h] where i & h is 0, x[i ^ h] - x[i] else, as fma(x[i], +-1, x[i ^ h]) (x[i] *
// +-1 is exact: the add's or the subtraction's bits) with x[i ^ h] from an immediate shuffle (in-lane for h = 1, 2:
// one cycle), not a blend of both and a lane permute. One op, one thread (`bench_ops_ab.py attention --precision
// int8 --tokens 256 --keys K`, busy host, bits checked): 256 keys 4.02 -> 3.80 and 4.77 -> 4.70 ms (two runs), 300
// keys 5.19 -> 5.04 ms; 1024 tokens a tie.
HN_INLINE __m512 rotated_vector(const float* x, const float* mean, int64_t d, int64_t t, int64_t hb) {
  const __mmask16 m = lanes(d - 16 * t);
  __m512 v = _mm512_maskz_loadu_ps(m, x + 16 * t);
  if (mean) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, mean + 16 * t));
  if (hb > 1) v = _mm512_fmadd_ps(v, butterfly_signs(1), _mm512_permute_ps(v, 0xB1));
  if (hb > 2) v = _mm512_fmadd_ps(v, butterfly_signs(2), _mm512_permute_ps(v, 0x4E));
  if (hb > 4) v = _mm512_fmadd_ps(v, butterfly_signs(4), _mm512_shuffle_f32x4(v, v, 0xB1));
  if (hb > 8) v = _mm512_fmadd_ps(v, butterfly_signs(8), _mm512_shuffle_f32x4(v, v, 0x4E));
  return v;
}

// 127 / amax, or 0 for a row under 127 / FLT_MAX (as symmetric_codes: such a row gets codes 0)
HN_INLINE __m512 inverse_scale(float amax) {
  float inv_amax = amax > 0.0f ? 127.0f / amax : 0.0f;
  if (!(inv_amax <= FLT_MAX)) inv_amax = 0.0f;
  return _mm512_set1_ps(inv_amax);
}

// Vector t's codes stored (each xor `flip`, d_pad bytes in all) and added to *sum
HN_INLINE void store_codes(__m512 v, __m512 inv, int64_t t, int64_t d_pad, uint8_t flip, uint8_t* out, __m512i* sum) {
  const __m512i c = codes_of(v, inv);
  *sum = _mm512_add_epi32(*sum, c);
  const __m128i bytes = _mm_xor_si128(_mm512_cvtsepi32_epi8(c), _mm_set1_epi8(static_cast<char>(flip)));
  _mm_mask_storeu_epi8(out + 16 * t, lanes(d_pad - 16 * t), bytes);
}

// rotate_quantize_row for a row of V vectors (d in (16 (V - 1), 16 V]) held in registers: the same operations in the
// same order (the same bits) without the buffer's stores and reloads. One op, one thread (`bench_ops_ab.py attention
// --precision int8 --tokens 256 --keys K`, busy host, bits checked; also checked at d = 8 .. 128): 256 keys 4.08 ->
// 3.83 and 4.93 -> 4.77 ms (two runs), 300 keys 4.73 -> 4.35 ms.
template <int V>
float rotate_quantize_row_in_registers(const float* x, const float* mean, int64_t d, int64_t d_pad, int64_t hb,
                                       uint8_t* out, uint8_t flip, int32_t* code_sum) {
  __m512 v[V];
#pragma GCC unroll 8
  for (int t = 0; t < V; ++t) v[t] = rotated_vector(x, mean, d, t, hb);
  // butterflies between vectors (hb >= 32 divides d: whole vectors, blocks of hb / 16 of them)
  for (int h = 1; 16 * h < hb; h *= 2)
#pragma GCC unroll 8
    for (int t = 0; t < V; ++t)
      if (!(t & h) && t + h < V) {
        const __m512 a = v[t], c = v[t + h];
        v[t] = _mm512_add_ps(a, c);
        v[t + h] = _mm512_sub_ps(a, c);
      }
  __m512 vmax = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int t = 0; t < V; ++t) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v[t]));
  const float amax = _mm512_reduce_max_ps(vmax);
  const __m512 inv = inverse_scale(amax);
  __m512i sum = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int t = 0; t < V; ++t) store_codes(v[t], inv, t, d_pad, flip, out, &sum);
  if (code_sum) *code_sum = _mm512_reduce_add_epi32(sum);
  return amax / 127.0f;
}

// One row x [d] (minus mean [d] when given) rotated by the block Hadamard (hb) and quantized: d_pad code bytes
// (each code xor `flip`: 0x80 gives the unsigned cq + 128), the sum of the codes in *code_sum; returns the scale
// max|x~| / 127. Rows of up to 128 in registers; longer ones through buf (ceil(d / 16) * 16 floats).
float rotate_quantize_row(const float* x, const float* mean, int64_t d, int64_t d_pad, int64_t hb, float* buf,
                          uint8_t* out, uint8_t flip, int32_t* code_sum) {
  const int64_t vecs = ceil_div(d, 16);
  switch (vecs) {
    case 1: return rotate_quantize_row_in_registers<1>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 2: return rotate_quantize_row_in_registers<2>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 3: return rotate_quantize_row_in_registers<3>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 4: return rotate_quantize_row_in_registers<4>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 5: return rotate_quantize_row_in_registers<5>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 6: return rotate_quantize_row_in_registers<6>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 7: return rotate_quantize_row_in_registers<7>(x, mean, d, d_pad, hb, out, flip, code_sum);
    case 8: return rotate_quantize_row_in_registers<8>(x, mean, d, d_pad, hb, out, flip, code_sum);
    default: break;
  }
  for (int64_t t = 0; t < vecs; ++t) _mm512_storeu_ps(buf + 16 * t, rotated_vector(x, mean, d, t, hb));
  for (int64_t h = 16; h < hb; h *= 2)  // butterflies between vectors
    for (int64_t b = 0; b < d; b += hb)
      for (int64_t i = b; i < b + hb; i += 2 * h)
        for (int64_t j = i; j < i + h; j += 16) {
          const __m512 a = _mm512_loadu_ps(buf + j), c = _mm512_loadu_ps(buf + j + h);
          _mm512_storeu_ps(buf + j, _mm512_add_ps(a, c));
          _mm512_storeu_ps(buf + j + h, _mm512_sub_ps(a, c));
        }
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t t = 0; t < vecs; ++t) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(buf + 16 * t)));
  const float amax = _mm512_reduce_max_ps(vmax);
  const __m512 inv = inverse_scale(amax);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t t = 0; t < vecs; ++t) store_codes(_mm512_loadu_ps(buf + 16 * t), inv, t, d_pad, flip, out, &sum);
  if (code_sum) *code_sum = _mm512_reduce_add_epi32(sum);
  return amax / 127.0f;
}

// attention_int8_p_code for 16 lanes, operation for operation: round(255 * 2^t) for t <= 0 (log2 units).
HN_INLINE __m512i p_codes(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-30.0f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(t, shifter), shifter);
  const __m512 r = _mm512_sub_ps(t, n);
  return _mm512_cvtps_epi32(_mm512_scalef_ps(horner(r, kInt8P255), n));  // nearest even (MXCSR default)
}

struct Scratch {
  std::vector<uint8_t> q, P;  // queries cq + 128 [rows][d_pad]; p codes [kRows][kBlock]
  std::vector<float> buf, qf, S, O, mx, l;  // buf: one query row, rotated
};

// One key block for a group of R rows starting at query row i (rows' state at offset g in the scratch).
template <int R>
void group_block(const AttentionShape& s, const AttentionHead& h, const Int8Layout& lay, const void* packed,
                 int64_t block, int64_t nb, int64_t i, Scratch& w, int64_t g) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t j0 = block * kBlock;
  const uint8_t* kblock = part<uint8_t>(packed, 0) + j0 * lay.d_pad;
  const int32_t* kcorr = part<int32_t>(packed, lay.kcorr) + j0;
  const float* sk = part<float>(packed, lay.sk) + j0;
  const uint8_t* q = w.q.data() + g * lay.d_pad;
  float* S = w.S.data();
  scores_pass<R>(q, lay.d_pad, w.qf.data() + g, kblock, lay.quads, kcorr, sk, S);
  if (nb > 64)
    scores_pass<R>(q, lay.d_pad, w.qf.data() + g, kblock + 64 * kQuadBytes, lay.quads, kcorr + 64, sk + 64, S + 64);
  const int64_t vecs = ceil_div(nb, 16);
  for (int r = 0; r < R; ++r) {
    float* srow = S + r * kBlock;
    uint8_t* prow = w.P.data() + r * kBlock;
    const float old_max = w.mx[g + r];
    const float new_max = std::max(old_max, masked_row_max<true>(h, srow, i + r, j0, nb));
    float* o = w.O.data() + (g + r) * lay.dv_pad;
    if (new_max == neg_inf) {  // every score so far is -inf: p = 0
      std::memset(prow, 0, static_cast<size_t>(vecs * 16));
      continue;
    }
    const float alpha = std::exp2(old_max - new_max);  // log2 units
    const __m512 m = _mm512_set1_ps(new_max);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t t = 0; t < vecs; ++t) {
      const __m512i code = p_codes(_mm512_sub_ps(_mm512_loadu_ps(srow + 16 * t), m));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(prow + 16 * t), _mm512_cvtusepi32_epi8(code));
      sum = _mm512_add_epi32(sum, code);
    }
    w.l[g + r] = alpha * w.l[g + r] + static_cast<float>(_mm512_reduce_add_epi32(sum));
    w.mx[g + r] = new_max;
    if (alpha != 1.0f) {
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t c = 0; c < lay.dv_pad; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(a, _mm512_loadu_ps(o + c)));
    }
  }
  const uint8_t* vblock = part<uint8_t>(packed, lay.v) + j0 * lay.dv_pad;
  pv<R>(w.P.data(), vblock, lay.dv_pad, ceil_div(nb, 4), w.O.data() + g * lay.dv_pad);
}

}  // namespace

size_t attention_int8_avx512_packed_bytes(const AttentionShape& s) {
  return static_cast<size_t>(Int8Layout(s).bytes);
}

void attention_int8_avx512_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  const Int8Layout lay(s);
  std::memset(packed, 0, static_cast<size_t>(lay.bytes));
  const int64_t hb = attention_int8_rotation_block(s.d);
  thread_local std::vector<float> mean, buf;
  thread_local std::vector<uint8_t> row;
  mean.resize(static_cast<size_t>(std::max(s.d, s.dv) + 16));
  buf.resize(static_cast<size_t>(ceil_div(std::max(s.d, s.dv), 16) * 16 + 64));
  row.resize(static_cast<size_t>(lay.d_pad + 16));
  // keys: centered, rotated, int8 per key, laid out in quads of channels per key block
  channel_means(k, s.nk, s.d, s.k_stride, mean.data());
  int8_t* kp = part<int8_t>(packed, 0);
  float* sk = part<float>(packed, lay.sk);
  int32_t* kcorr = part<int32_t>(packed, lay.kcorr);
  for (int64_t j = 0; j < s.nk; ++j) {
    int32_t sum = 0;
    sk[j] = rotate_quantize_row(k + j * s.k_stride, mean.data(), s.d, lay.d_pad, hb, buf.data(), row.data(), 0, &sum);
    kcorr[j] = 128 * sum;
    int8_t* block = kp + (j / kBlock) * kBlock * lay.d_pad + (j % kBlock) * kQuadBytes;
    for (int64_t c = 0; c < lay.d_pad; c += 4) std::memcpy(block + c * kBlock, &row[c], 4);
  }
  // values: centered, int8 per channel, laid out in quads of keys per channel
  channel_means(v, s.nk, s.dv, s.v_stride, mean.data());
  float* sv = part<float>(packed, lay.sv);
  std::memcpy(part<float>(packed, lay.vmean), mean.data(), static_cast<size_t>(s.dv) * 4);
  centered_absmax(v, mean.data(), s.nk, s.dv, s.v_stride, buf.data());
  for (int64_t c0 = 0; c0 < lay.dv_pad; c0 += 16) {
    const __mmask16 m = lanes(s.dv - c0);
    const __m512 mc = _mm512_maskz_loadu_ps(m, mean.data() + c0);
    const __m512 vmax = _mm512_loadu_ps(buf.data() + c0);
    const __mmask16 nonzero = _mm512_cmp_ps_mask(vmax, _mm512_setzero_ps(), _CMP_GT_OQ);
    __m512 inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(127.0f), vmax);
    inv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(inv, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ), inv);  // as the scalar
    _mm512_mask_storeu_ps(sv + c0, m, _mm512_div_ps(vmax, _mm512_set1_ps(127.0f)));
    for (int64_t j0 = 0; j0 < s.nk; j0 += 4) {
      __m128i key[4];
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + e;
        key[e] = j < s.nk ? _mm512_cvtsepi32_epi8(codes_of(
                                _mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + j * s.v_stride + c0), mc), inv))
                          : _mm_setzero_si128();
      }
      const __m128i a_lo = _mm_unpacklo_epi8(key[0], key[1]), a_hi = _mm_unpackhi_epi8(key[0], key[1]);
      const __m128i b_lo = _mm_unpacklo_epi8(key[2], key[3]), b_hi = _mm_unpackhi_epi8(key[2], key[3]);
      uint8_t* dst = part<uint8_t>(packed, lay.v) + (j0 / 4) * lay.dv_pad * kQuadBytes + c0 * kQuadBytes;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(a_lo, b_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_unpackhi_epi16(a_lo, b_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm_unpacklo_epi16(a_hi, b_hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 48), _mm_unpackhi_epi16(a_hi, b_hi));
    }
  }
}

void attention_int8_avx512_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0,
                                int64_t q1) {
  const Int8Layout lay(s);
  const int64_t rows = q1 - q0;
  thread_local Scratch w;
  w.q.resize(static_cast<size_t>(rows * lay.d_pad));
  w.buf.resize(static_cast<size_t>(ceil_div(s.d, 16) * 16));
  w.P.resize(static_cast<size_t>(kRows * kBlock));
  w.qf.resize(static_cast<size_t>(rows));
  w.S.resize(static_cast<size_t>(kRows * kBlock));
  w.O.assign(static_cast<size_t>(rows * lay.dv_pad), 0.0f);
  w.mx.assign(static_cast<size_t>(rows), -std::numeric_limits<float>::infinity());
  w.l.assign(static_cast<size_t>(rows), 0.0f);
  const int64_t hb = attention_int8_rotation_block(s.d);
  // query rows prefetched 4 ahead of their codes (strided in the bnhd layout: one miss each for the hardware
  // prefetchers). One op, one thread (`bench_ops_ab.py attention --precision int8 --tokens 256 --keys K`, busy host,
  // bits checked, two runs): 256 keys 3.77 -> 3.71 and 3.73 -> 3.61 ms, 300 keys 4.49 -> 4.28 and 4.58 -> 4.32 ms.
  // The output rows prefetched for writing before the last key block (as the AMX path does): a tie, not kept
  constexpr int64_t kAhead = 4;
  for (int64_t r = 0; r < std::min(rows, kAhead); ++r) prefetch_row(h.q + (q0 + r) * s.q_stride, s.d, false);
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kAhead < rows) prefetch_row(h.q + (q0 + r + kAhead) * s.q_stride, s.d, false);
    const float sq = rotate_quantize_row(h.q + (q0 + r) * s.q_stride, nullptr, s.d, lay.d_pad, hb, w.buf.data(),
                                         w.q.data() + r * lay.d_pad, 0x80, nullptr);
    w.qf[r] = attention_int8_query_factor(s, hb, sq);
  }
  for (int64_t b = 0; b < lay.blocks; ++b) {
    const int64_t nb = std::min(kBlock, s.nk - b * kBlock);
    int64_t g = 0;
    for (; g + kRows <= rows; g += kRows) group_block<kRows>(s, h, lay, packed, b, nb, q0 + g, w, g);
    switch (rows - g) {
      case 1: group_block<1>(s, h, lay, packed, b, nb, q0 + g, w, g); break;
      case 2: group_block<2>(s, h, lay, packed, b, nb, q0 + g, w, g); break;
      case 3: group_block<3>(s, h, lay, packed, b, nb, q0 + g, w, g); break;
      default: break;
    }
  }
  store_rows(s, h, q0, rows, w.O.data(), lay.dv_pad, w.l.data(), part<float>(packed, lay.sv),
             part<float>(packed, lay.vmean));
}

}  // namespace hadanorm

#pragma GCC pop_options

#endif
