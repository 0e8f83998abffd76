// The online transform of one token (centering, channel scale, Kronecker Hadamard rotation); no onnxruntime API.
//
// rotate(v) = h_left @ V @ h_right^T for v viewed row-major as V [K, M], K * M = d. h_right is applied as a fast
// Walsh-Hadamard transform when it is exactly c * Sylvester(M) (checked on every kernel run: O(M^2) compares), else
// as a dense matmul; h_left is skipped when it is exactly the identity, applied as butterflies across the K rows when
// it is exactly c * Sylvester(K) (power-of-two widths: Sylvester(d / 256) (x) Sylvester(256)), else as a dense K x K
// matmul, which paths with a paley2_left entry factor when h_left has the 2 x 2 block form of a Paley II matrix (the
// 36 x 36 factor of 1152 and 4608, graph_passes/hadamard.py): blocks (i, j) = a_ij [[1, 1], [1, -1]] for i != j and
// g_i [[1, -1], [-1, -1]] on the diagonal, so with u_j = v_2j + v_2j+1 and w_j = v_2j - v_2j+1 (rows of V)
//   out_2i = sum_{j != i} a_ij u_j + g_i w_i,   out_2i+1 = sum_{j != i} a_ij w_j - g_i u_i:
// K / 2 + 1 multiply-adds an output element instead of K.
#pragma once

#include <cstdint>
#include <vector>

namespace hadanorm {

struct Rotation {
  int64_t K = 1, M = 1;
  bool left_identity = true;
  bool left_fwht = false;      // h_left = left_scale * Sylvester(K): butterflies across the K rows
  float left_scale = 1.0f;
  std::vector<float> left;     // K x K row-major (when not the identity nor Sylvester)
  bool left_paley2 = false;    // left has the Paley II block form (see the top): paley_a, paley_g hold its factors
  std::vector<float> paley_a;  // a: K/2 x K/2 row-major, zero diagonal
  std::vector<float> paley_g;  // g: K/2
  bool right_fwht = true;
  float right_scale = 1.0f;    // h_right = right_scale * Sylvester(M) when right_fwht
  std::vector<float> right_t;  // h_right^T, M x M row-major (dense fallback)
};

// Throws OpError when the shapes do not factor d.
Rotation make_rotation(const float* h_left, const std::vector<int64_t>& left_shape, const float* h_right,
                       const std::vector<int64_t>& right_shape, int64_t d);

// The row kernels of the transform for one instruction-set path (IsaKernels::transform): the portable loops of
// portable_loops.h compiled for the path (scalar: baseline; avx2, avxvnni: AVX2 + FMA + F16C), and on the
// avx512vnni and amx paths AVX-512 code for the first three below (transform_avx512.h; the others are the avx2
// build). Every entry gives the scalar path's bits except dense_left and paley2_left on the AVX-512 paths, which use
// fused multiply-adds (the loops multiply, then add) and, for paley2_left, another order of the sums: within float32
// rounding of it.
struct TransformKernels {
  // v = Sylvester(M) @ ((x - mean) * mul) row by row for v [K, M], M a power of two (mean may be null)
  void (*center_scale_fwht)(const float* x, const float* mean, const float* mul, float* v, int64_t k,
                            int64_t m) = nullptr;
  // out = h_left @ v for v, out [K, M] row-major
  void (*dense_left)(const float* v, const float* left, int64_t k, int64_t m, float* out) = nullptr;
  // the same for an h_left of Paley II block form (`left`), from its factors a [K/2, K/2] and g [K/2] (see the top;
  // uw: K x M floats of scratch). Optional: null on paths without it, which run dense_left.
  void (*paley2_left)(const float* v, const float* left, const float* a, const float* g, int64_t k, int64_t m,
                      float* uw, float* out) = nullptr;
  // mean[c] = mean over the n rows (stride d) of column c, for c in [c0, c1); accumulated in double
  void (*column_mean)(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) = nullptr;
  // the same for float16 input (raw IEEE half bits)
  void (*column_mean_half)(const uint16_t* x, int64_t n, int64_t d, int64_t c0, int64_t c1, float* mean) = nullptr;
  // the same over x' = x * scale + shift (scale, shift: d floats, indexed by channel; the product rounded, then the
  // sum, as affine): the Modulate ops' means without writing x'
  void (*column_mean_affine)(const float* x, int64_t n, int64_t d, int64_t c0, int64_t c1, const float* scale,
                             const float* shift, float* mean) = nullptr;
  // out = x * scale + shift for d floats (the product rounded, then the sum: a graph's Mul, then its Add; the
  // Modulate* ops' adaLN modulation)
  void (*affine)(const float* x, const float* scale, const float* shift, float* out, int64_t d) = nullptr;
  // out = (x - mean) * mul for d floats (mean may be null)
  void (*center_scale)(const float* x, const float* mean, const float* mul, float* out, int64_t d) = nullptr;
  // each of the K rows of v [K, M]: row <- row @ h_right^T (tmp: M floats)
  void (*dense_right)(float* v, int64_t k, int64_t m, const float* right_t, float* tmp) = nullptr;
  // out = scale * Sylvester(K) @ v for v [K, M] (butterflies across the rows, in place on v, then the scale)
  void (*fwht_across_rows)(float* v, int64_t k, int64_t m, float scale, float* out) = nullptr;
};

// Per-thread scratch: the [K, M] intermediate when h_left is dense (and K x M floats of u, w for a Paley II h_left),
// plus M floats for a dense h_right.
struct Scratch {
  std::vector<float> block, pairs, tmp;
  Scratch(const Rotation* rot, int64_t d);
};

// One token with the row kernels `kernels`: out = rotate((x - mean) * mul); mean may be null (no centering), rot may
// be null (no rotation). `mul_rot` is mul with the Sylvester scale folded in (used when rotating with the fast
// transform).
void transform_row(const TransformKernels& kernels, const float* x, const float* mean, const float* mul,
                   const float* mul_rot, const Rotation* rot, float* out, Scratch& scratch, int64_t d);

}  // namespace hadanorm
