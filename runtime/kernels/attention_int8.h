// The int8 codes of the fused attention at precision kInt8 (attention.h), shared by every path that computes it: each
// path lays the same codes out its own way, so their integer sums are equal, and does the float steps around them
// (scales, online softmax, p's codes, output) with the same operations in the same order: the paths agree bit for bit.
//
// HadaNorm's transform, applied to attention (issue 18). For one head, queries q_i, keys k_j, values v_j:
//
//   keys:    k~_j = H (k_j - mean_j k_j)    subtracting the keys' mean changes every score of query i by the same
//                                           q_i . mean, which softmax ignores; H (the block Hadamard below) is
//                                           orthogonal up to a factor: (H q) . (H k) = hb (q . k)
//            codes ck_j = round(k~_j / sk_j), sk_j = max|k~_j| / 127         (per key, symmetric)
//   queries: q~_i = H q_i,  cq_i = round(q~_i / sq_i), sq_i = max|q~_i| / 127 (per query row, symmetric)
//   scores:  s_ij = (scale / hb * sq_i * log2 e) * sk_j * (cq_i . ck_j)     (the dot product exact in int32; in
//            log2 units: the mask is added times log2 e, and the online softmax runs on powers of 2)
//   values:  v~_j = v_j - mean_j v_j        (the rows of softmax sum to 1: sum_j p_j v_j = sum_j p_j v~_j + mean v)
//            codes cv_jc = round(v~_jc / sv_c), sv_c = max_j |v~_jc| / 127  (per value channel, symmetric)
//   p:       p_ij = 2^(s_ij - mx_i) in [0, 1], codes cp_ij = round(255 p_ij) (unsigned; 255 for the running max),
//            computed as attention_int8_p_code does (every path the same operations: the same codes)
//   output:  o_ic = sum_j cp_ij cv_jc and l_i = sum_j cp_ij (int32 a key block; across blocks the online softmax's
//            o = alpha o + block sum in fp32),  y_ic = (o_ic * (1 / l_i)) * sv_c + mean_c
//
// H: the Hadamard matrix (entries +-1, no normalisation) on consecutive blocks of hb channels, hb = the largest power
// of two dividing d, at most 128 (d = 72: nine blocks of 8; 64 and 128: one block; odd d: no rotation). It spreads a
// channel's outlier over its block before the per-row int8 scale is taken (QuaRot / HadaNorm's reason for H).
#pragma once

#include <cstddef>
#include <cstdint>

#include "attention.h"

namespace hadanorm {

inline constexpr float kInt8Log2e = 1.44269504088896341f;

// 255 * 2^r for r in [-1/2, 1/2]: a degree-4 polynomial (coefficients of the highest power first, Horner's rule with
// fused multiply-adds), relative error 8.5e-6 (0.002 of a code at most).
inline constexpr float kInt8P255[5] = {2.360015869140625f, 14.243287086486816f, 61.27968978881836f,
                                       176.74830627441406f, 254.9994354248047f};

// A mask element in log2 units: mask * log2 e, clamped to +-FLT_MAX where the mask is finite (a finite mask under
// -2.36e38, e.g. -FLT_MAX padding, stays finite as in the float maths; +-inf and NaN stay as they are).
float attention_int8_mask(float mask);

// The code round(255 * 2^t) of t = s - mx <= 0 (log2 units): t clamped at -30 (-inf and anything under -9 give 0),
// n = round(t) (ties to even, by adding and subtracting 1.5 * 2^23), r = t - n, then kInt8P255 at r times 2^n,
// rounded to the nearest integer (ties to even). The reference of the vector paths' 16-lane version.
int32_t attention_int8_p_code(float t);

// hb: the rotation's block (see above).
int64_t attention_int8_rotation_block(int64_t d);

// d rounded up to a multiple of 4 (VNNI quads): the codes' padded width (padding codes are 0).
inline int64_t attention_int8_d_pad(int64_t d) { return (d + 3) / 4 * 4; }

// Key codes of one head: codes [nk][code_stride] (code_stride >= d_pad; codes past d are 0) and scales sk [nk].
void attention_int8_keys(const AttentionShape& s, const float* k, int8_t* codes, int64_t code_stride, float* scales);

// Value codes of one head: codes [nk][code_stride] (code_stride >= dv), scales sv [dv], means [dv].
void attention_int8_values(const AttentionShape& s, const float* v, int8_t* codes, int64_t code_stride,
                           float* scales, float* means);

// The factor of a query row's scores, scale / hb * sq_i * log2 e (sq_i: the row's int8 scale; 0 for a zero row).
inline float attention_int8_query_factor(const AttentionShape& s, int64_t hb, float sq) {
  return s.scale / static_cast<float>(hb) * sq * kInt8Log2e;
}

// One query row q [d]: codes [d_pad] (0 past d) and attention_int8_query_factor of its scale.
float attention_int8_query(const AttentionShape& s, const float* q, int8_t* codes);

// The AVX-512 path's kInt8 (attention_vnni_int8.cc: AVX512-VNNI), called by attention_avx512.cc's path functions.
size_t attention_int8_avx512_packed_bytes(const AttentionShape& s);
void attention_int8_avx512_pack(const AttentionShape& s, const float* k, const float* v, void* packed);
void attention_int8_avx512_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0,
                                int64_t q1);

}  // namespace hadanorm
