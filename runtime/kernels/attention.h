// Fused softmax attention (hadanorm::Attention) for one (batch, head) at a time; no onnxruntime API.
//
// For one head: q [nq, d], k [nk, d], v [nk, dv], an optional additive mask m [nq, nk] (broadcast strides),
//
//     out = softmax(scale * q k^T + m) v        (softmax over the keys)
//
// computed flash-attention style: the keys in blocks of kAttentionKeyBlock, a running row maximum mx, row sum l and
// output o per query row, never more than one key block of scores per row:
//
//     s_j   = sum_d (scale q_d) k_jd + m_j                    (fp32 accumulation)
//     mx'   = max(mx, max_j s_j);  alpha = exp(mx - mx')
//     p_j   = exp(s_j - mx')
//     l     = alpha l + sum_j p_j;   o = alpha o + sum_j p_j v_j;   mx = mx'
//     out   = o / l                                           (NaN where every score is -inf, as softmax gives)
//
// Precision kFloat: everything in fp32 (the exact op; only the summation order differs from MatMul -> Softmax ->
// MatMul). Precision kBf16: (scale q), k, v and p are rounded to bfloat16 (round to nearest even) before their
// products, which are then exact in fp32 and summed in fp32 (what AMX's tdpbf16ps computes); l sums the rounded p.
// Every path computes these same formulas per key block; paths differ only in the order of fp32 sums and in exp's
// last bits (the scalar path, std::exp, is the reference). Precision kInt8: HadaNorm's transform on attention
// (attention_int8.h): the keys centered and, with the queries, rotated by a block Hadamard and quantized to int8 per
// row, q k^T exact in int32; the values centered and quantized per channel, p quantized to unsigned 8 bits (p <= 1),
// p v exact in int32 per key block (VNNI's vpdpbusd: unsigned x signed bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "isa.h"

namespace hadanorm {

inline constexpr int64_t kAttentionKeyBlock = 128;

enum class AttentionPrecision { kFloat, kBf16, kInt8 };

// The op's precision attribute on instruction set `isa` (select_isa()): "float", "bf16", "int8", or "fast": the
// fastest this CPU computes, measured (benchmarks/attention.md, benchmarks/peers/): bf16 on AMX tiles, int8 on
// AVX512-VNNI without them, float elsewhere (AVX2, NEON, scalar). Anything else fails with a one-line reason.
AttentionPrecision parse_attention_precision(const std::string& value, Isa isa);

struct AttentionShape {
  int64_t nq = 0, nk = 0, d = 0, dv = 0;
  float scale = 1.0f;
  AttentionPrecision precision = AttentionPrecision::kFloat;
  // Row strides (elements) of q, k, v and out: d, d, dv, dv for [..., N, D] tensors; heads * d ... for a
  // [B, N, heads, D] layout (each head's rows interleaved with the other heads').
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, out_stride = 0;
};

// One head's query rows, mask and output. The mask element for query row i and key j is
// mask[i * mask_row + j * mask_col] (strides 0 broadcast); mask == nullptr: no mask.
struct AttentionHead {
  const float* q = nullptr;  // [nq, d], row stride q_stride
  const float* mask = nullptr;
  int64_t mask_row = 0, mask_col = 0;
  float* out = nullptr;  // [nq, dv], row stride out_stride
};

// One implementation: packs a head's k [nk, d] and v [nk, dv] (row strides k_stride, v_stride) once (any layout it likes, packed_bytes(shape) bytes, 64-byte
// aligned), then computes output rows [q0, q1) of that head from the packed keys and values. rows() may be called
// concurrently for different row ranges and heads (scratch is per thread).
struct AttentionPath {
  const char* name = nullptr;
  size_t (*packed_bytes)(const AttentionShape& shape) = nullptr;
  void (*pack)(const AttentionShape& shape, const float* k, const float* v, void* packed) = nullptr;
  void (*rows)(const AttentionShape& shape, const AttentionHead& head, const void* packed, int64_t q0,
               int64_t q1) = nullptr;
  int64_t rows_per_task = 0;   // a good task size (a multiple of the path's row group)
  bool computes_bf16 = false;  // false: the path computes a kBf16 op in fp32 (attention_precision)
  bool computes_int8 = false;  // false: the path computes a kInt8 op in fp32 (attention_precision)
};

const AttentionPath& attention_scalar_path();
const AttentionPath* attention_avx512_path();   // nullptr when this build or CPU has no AVX-512 VNNI
const AttentionPath* attention_amx_path();      // bf16 only; nullptr when AMX-BF16 is unavailable
const AttentionPath* attention_avx2_path();     // nullptr when this build or CPU has no AVX2 + FMA

// The path for `precision` on instruction set `isa` (select_isa()): amx -> the AMX bf16 tiles for kBf16, AVX-512 for
// kFloat and kInt8 (VNNI); avx512vnni -> AVX-512; avx2, avxvnni -> AVX2; anything else -> scalar.
const AttentionPath& attention_path(AttentionPrecision precision, Isa isa);

// What `path` computes for an op of `precision`: kBf16 and kInt8 are ceilings, not promises. kBf16: the AMX tiles
// and the scalar reference compute bf16; the AVX-512 and AVX2 paths compute fp32 (exact, and faster there than fp32
// FMAs on operands rounded to bf16: measured 10% at 1024 px without AMX). kInt8: the AVX-512 (VNNI) path and the
// scalar reference compute int8; AVX2 computes fp32.
AttentionPrecision attention_precision(AttentionPrecision precision, const AttentionPath& path);

}  // namespace hadanorm
