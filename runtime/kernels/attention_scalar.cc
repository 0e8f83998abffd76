// The scalar reference of the fused attention (attention.h) and the choice of path.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention_int8.h"
#include "util.h"

namespace hadanorm {

namespace {

constexpr int64_t kRowsPerTask = 16;  // query rows per task (one row at a time)

// Round-to-nearest-even float -> bfloat16 -> float (NaN stays NaN; denormals become signed zero, as AVX512-BF16's
// vcvtne2ps2bf16 and AMX's tdpbf16ps treat them).
float round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return x;  // NaN
  if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;  // denormal: signed zero (what AVX512-BF16 and AMX do)
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  float y;
  std::memcpy(&y, &bits, 4);
  return y;
}

// kInt8, packed (attention_int8.h): key codes [nk][d_pad], value codes [nk][dv], then the floats sk [nk], sv [dv]
// and the value means [dv].
struct Int8Packed {
  int64_t d_pad, v, sk, sv, vmean, bytes;  // byte offsets of each part; bytes in all
  explicit Int8Packed(const AttentionShape& s) : d_pad(attention_int8_d_pad(s.d)) {
    v = s.nk * d_pad;
    sk = (v + s.nk * s.dv + 3) / 4 * 4;
    sv = sk + 4 * s.nk;
    vmean = sv + 4 * s.dv;
    bytes = vmean + 4 * s.dv;
  }
};

template <class T, class P>
auto* part(P* packed, int64_t offset) {
  using Byte = std::conditional_t<std::is_const_v<P>, const uint8_t, uint8_t>;
  using Out = std::conditional_t<std::is_const_v<P>, const T, T>;
  return reinterpret_cast<Out*>(static_cast<Byte*>(packed) + offset);
}

void int8_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  const Int8Packed l(s);
  attention_int8_keys(s, k, part<int8_t>(packed, 0), l.d_pad, part<float>(packed, l.sk));
  attention_int8_values(s, v, part<int8_t>(packed, l.v), s.dv, part<float>(packed, l.sv),
                        part<float>(packed, l.vmean));
}

void int8_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  const Int8Packed lay(s);
  const int8_t* kc = part<int8_t>(packed, 0);
  const int8_t* vc = part<int8_t>(packed, lay.v);
  const float* sk = part<float>(packed, lay.sk);
  const float* sv = part<float>(packed, lay.sv);
  const float* vmean = part<float>(packed, lay.vmean);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<int8_t> q(static_cast<size_t>(lay.d_pad));
  std::vector<float> scores(kAttentionKeyBlock), o(static_cast<size_t>(s.dv));
  std::vector<int32_t> p(kAttentionKeyBlock);
  for (int64_t i = q0; i < q1; ++i) {
    const float qf = attention_int8_query(s, h.q + i * s.q_stride, q.data());
    std::fill(o.begin(), o.end(), 0.0f);
    float mx = neg_inf, l = 0.0f;
    for (int64_t j0 = 0; j0 < s.nk; j0 += kAttentionKeyBlock) {
      const int64_t nb = std::min(kAttentionKeyBlock, s.nk - j0);
      float block_max = neg_inf;
      for (int64_t j = 0; j < nb; ++j) {
        const int8_t* kj = kc + (j0 + j) * lay.d_pad;
        int32_t dot = 0;
        for (int64_t c = 0; c < s.d; ++c) dot += int32_t{q[c]} * int32_t{kj[c]};
        const float f = qf * sk[j0 + j];
        float acc = f * static_cast<float>(dot);
        if (h.mask) acc += attention_int8_mask(h.mask[i * h.mask_row + (j0 + j) * h.mask_col]);
        scores[j] = acc;
        block_max = std::max(block_max, acc);
      }
      const float new_max = std::max(mx, block_max);
      if (new_max == neg_inf) continue;  // every score so far is -inf: nothing to add
      const float alpha = std::exp2(mx - new_max);  // log2 units
      int32_t sum = 0;
      for (int64_t j = 0; j < nb; ++j) {
        p[j] = attention_int8_p_code(scores[j] - new_max);
        sum += p[j];
      }
      l = alpha * l + static_cast<float>(sum);
      for (int64_t c = 0; c < s.dv; ++c) {
        int32_t acc = 0;
        for (int64_t j = 0; j < nb; ++j) acc += p[j] * int32_t{vc[(j0 + j) * s.dv + c]};
        o[c] = alpha * o[c] + static_cast<float>(acc);
      }
      mx = new_max;
    }
    const float inv = l > 0.0f ? 1.0f / l : std::numeric_limits<float>::quiet_NaN();
    for (int64_t c = 0; c < s.dv; ++c) h.out[i * s.out_stride + c] = o[c] * inv * sv[c] + vmean[c];
  }
}

// Packed: k [nk, d] then v [nk, dv], floats (rounded to bf16 values for kBf16).
size_t scalar_packed_bytes(const AttentionShape& s) {
  if (s.precision == AttentionPrecision::kInt8) return static_cast<size_t>(Int8Packed(s).bytes);
  return static_cast<size_t>(s.nk * (s.d + s.dv)) * sizeof(float);
}

void scalar_pack(const AttentionShape& s, const float* k, const float* v, void* packed) {
  if (s.precision == AttentionPrecision::kInt8) return int8_pack(s, k, v, packed);
  float* out = static_cast<float*>(packed);
  const bool bf16 = s.precision == AttentionPrecision::kBf16;
  const int64_t nk_d = s.nk * s.d, nk_dv = s.nk * s.dv;
  for (int64_t i = 0; i < nk_d; ++i) {
    const float x = k[i / s.d * s.k_stride + i % s.d];
    out[i] = bf16 ? round_bf16(x) : x;
  }
  for (int64_t i = 0; i < nk_dv; ++i) {
    const float x = v[i / s.dv * s.v_stride + i % s.dv];
    out[nk_d + i] = bf16 ? round_bf16(x) : x;
  }
}

void scalar_rows(const AttentionShape& s, const AttentionHead& h, const void* packed, int64_t q0, int64_t q1) {
  if (s.precision == AttentionPrecision::kInt8) return int8_rows(s, h, packed, q0, q1);
  const float* k = static_cast<const float*>(packed);
  const float* v = k + s.nk * s.d;
  const bool bf16 = s.precision == AttentionPrecision::kBf16;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> q(static_cast<size_t>(s.d)), scores(kAttentionKeyBlock), o(static_cast<size_t>(s.dv));
  for (int64_t i = q0; i < q1; ++i) {
    for (int64_t c = 0; c < s.d; ++c) {
      const float scaled = s.scale * h.q[i * s.q_stride + c];
      q[c] = bf16 ? round_bf16(scaled) : scaled;
    }
    std::fill(o.begin(), o.end(), 0.0f);
    float mx = neg_inf, l = 0.0f;
    for (int64_t j0 = 0; j0 < s.nk; j0 += kAttentionKeyBlock) {
      const int64_t nb = std::min(kAttentionKeyBlock, s.nk - j0);
      float block_max = neg_inf;
      for (int64_t j = 0; j < nb; ++j) {
        const float* kj = k + (j0 + j) * s.d;
        float acc = 0.0f;
        for (int64_t c = 0; c < s.d; ++c) acc += q[c] * kj[c];
        if (h.mask) acc += h.mask[i * h.mask_row + (j0 + j) * h.mask_col];
        scores[j] = acc;
        block_max = std::max(block_max, acc);
      }
      const float new_max = std::max(mx, block_max);
      if (new_max == neg_inf) continue;  // every score so far is -inf: nothing to add
      const float alpha = std::exp(mx - new_max);
      float sum = 0.0f;
      for (int64_t j = 0; j < nb; ++j) {
        const float p = std::exp(scores[j] - new_max);
        scores[j] = bf16 ? round_bf16(p) : p;
        sum += scores[j];
      }
      l = alpha * l + sum;
      for (int64_t c = 0; c < s.dv; ++c) {
        float acc = 0.0f;
        for (int64_t j = 0; j < nb; ++j) acc += scores[j] * v[(j0 + j) * s.dv + c];
        o[c] = alpha * o[c] + acc;
      }
      mx = new_max;
    }
    const float inv = l > 0.0f ? 1.0f / l : std::numeric_limits<float>::quiet_NaN();
    for (int64_t c = 0; c < s.dv; ++c) h.out[i * s.out_stride + c] = o[c] * inv;
  }
}

}  // namespace

const AttentionPath& attention_scalar_path() {
  static const AttentionPath path{.name = "scalar",
                                  .packed_bytes = scalar_packed_bytes,
                                  .pack = scalar_pack,
                                  .rows = scalar_rows,
                                  .rows_per_task = kRowsPerTask,
                                  .computes_bf16 = true,
                                  .computes_int8 = true};
  return path;
}

AttentionPrecision parse_attention_precision(const std::string& value, Isa isa) {
  if (value == "float") return AttentionPrecision::kFloat;
  if (value == "bf16") return AttentionPrecision::kBf16;
  if (value == "int8") return AttentionPrecision::kInt8;
  if (value == "fast") {
    if (isa == Isa::kAmx && attention_amx_path()) return AttentionPrecision::kBf16;
    if ((isa == Isa::kAmx || isa == Isa::kAvx512Vnni) && attention_avx512_path()) return AttentionPrecision::kInt8;
    return AttentionPrecision::kFloat;
  }
  fail("attribute precision=\"", value, "\" is not one of float, bf16, int8, fast; re-export with hn-export");
}

AttentionPrecision attention_precision(AttentionPrecision precision, const AttentionPath& path) {
  if (precision == AttentionPrecision::kBf16 && !path.computes_bf16) return AttentionPrecision::kFloat;
  if (precision == AttentionPrecision::kInt8 && !path.computes_int8) return AttentionPrecision::kFloat;
  return precision;
}

const AttentionPath& attention_path(AttentionPrecision precision, Isa isa) {
  if (isa == Isa::kAmx) {
    if (precision == AttentionPrecision::kBf16)
      if (const AttentionPath* amx = attention_amx_path()) return *amx;
    if (const AttentionPath* avx512 = attention_avx512_path()) return *avx512;
  }
  if (isa == Isa::kAvx512Vnni)
    if (const AttentionPath* avx512 = attention_avx512_path()) return *avx512;
  if (isa == Isa::kAvx2 || isa == Isa::kAvxVnni)
    if (const AttentionPath* avx2 = attention_avx2_path()) return *avx2;
  return attention_scalar_path();
}

}  // namespace hadanorm
