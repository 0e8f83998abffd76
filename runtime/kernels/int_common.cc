// Shared parts of the integer kernels: per-weight sums, per-row activation sums, the path table.

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

HN_HOT void fill_weight_info(WeightInfo& w, const uint8_t* b, const float* scales, const void* zero_points) {
  const size_t size = static_cast<size_t>(w.k_blocks * w.n_pad);
  w.scales.assign(size, 0.0f);
  w.zw.assign(size, 0);
  w.sv.assign(size, 0);
  for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
    for (int64_t n = 0; n < w.n; ++n) {
      const int64_t i = blk * w.n + n;
      w.scales[blk * w.n_pad + n] = scales[i];
      w.zw[blk * w.n_pad + n] = w.bits == 4 ? static_cast<const uint8_t*>(zero_points)[i]
                                            : static_cast<const int8_t*>(zero_points)[i];
    }
  }
  const int64_t groups_per_block = w.block / (w.bits == 4 ? 8 : 4);
  for (int64_t t = 0; t < w.tiles; ++t) {
    for (int64_t blk = 0; blk < w.k_blocks; ++blk) {
      int32_t su[kTile] = {};
      const uint8_t* rows = b + t * w.tile_stride + blk * groups_per_block * 64;
      for (int64_t g = 0; g < groups_per_block; ++g) {
        const uint8_t* row = rows + g * 64;
        for (int c = 0; c < kTile; ++c) {
          int32_t s = 0;
          for (int j = 0; j < 4; ++j) {
            const uint8_t v = row[4 * c + j];
            s += w.bits == 4 ? (v & 0x0F) + (v >> 4) : static_cast<int8_t>(v);
          }
          su[c] += s;
        }
      }
      for (int c = 0; c < kTile; ++c) {
        const int64_t i = blk * w.n_pad + t * kTile + c;
        w.sv[i] = su[c] - w.zw[i] * static_cast<int32_t>(w.block);
      }
    }
  }
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
  return k ? *k : *scalar_kernels();
}

}  // namespace hadanorm
