// The online transform of one token (see transform.h): the rotation plan, and one token through the row kernels of
// the kernel's instruction-set path (TransformKernels: portable_loops.h, transform_avx512.h).

#include "transform.h"

#include <cmath>

#include "util.h"

namespace hadanorm {

// ---------------------------------------------------------------------------------------------------------------
// The rotation plan: which fast paths h_left and h_right allow
// ---------------------------------------------------------------------------------------------------------------

bool is_identity(const float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (h[i * n + j] != (i == j ? 1.0f : 0.0f)) return false;
  return true;
}

// Exactly c * H_M with H_M = H_2 (x) ... (x) H_2, H_2 = [[1, 1], [1, -1]]: entry (i, j) is c * (-1)^popcount(i & j).
bool sylvester_scale(const float* h, int64_t m, float* scale) {
  if (m < 1 || (m & (m - 1)) != 0) return false;
  const float c = h[0];
  if (!(c != 0.0f) || !std::isfinite(c)) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const float expected = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -c : c;
      if (h[i * m + j] != expected) return false;
    }
  *scale = c;
  return true;
}

// The Paley II block form of h (see transform.h): blocks (i, j) = a_ij [[1, 1], [1, -1]] for i != j and
// g_i [[1, -1], [-1, -1]] for i == j, exactly; fills a (zero diagonal) and g.
bool paley2_factors(const float* h, int64_t k, std::vector<float>* a, std::vector<float>* g) {
  if (k < 4 || k % 2 != 0) return false;
  const int64_t half = k / 2;
  a->assign(static_cast<size_t>(half * half), 0.0f);
  g->assign(static_cast<size_t>(half), 0.0f);
  for (int64_t i = 0; i < half; ++i)
    for (int64_t j = 0; j < half; ++j) {
      const float* top = h + 2 * i * k + 2 * j;
      const float* bottom = top + k;
      const float x = top[0];
      if (i == j) {
        if (!(top[1] == -x && bottom[0] == -x && bottom[1] == -x)) return false;
        (*g)[i] = x;
      } else {
        if (!(top[1] == x && bottom[0] == x && bottom[1] == -x)) return false;
        (*a)[i * half + j] = x;
      }
    }
  return true;
}

Rotation make_rotation(const float* h_left, const std::vector<int64_t>& left_shape, const float* h_right,
                       const std::vector<int64_t>& right_shape, int64_t d) {
  if (left_shape.size() != 2 || left_shape[0] != left_shape[1])
    fail("h_left must be a square matrix [K, K], got ", shape_string(left_shape));
  if (right_shape.size() != 2 || right_shape[0] != right_shape[1])
    fail("h_right must be a square matrix [M, M], got ", shape_string(right_shape));
  Rotation r;
  r.K = left_shape[0];
  r.M = right_shape[0];
  if (r.K * r.M != d)
    fail("h_left ", shape_string(left_shape), " and h_right ", shape_string(right_shape),
         " do not factor the channel width ", d, " (K * M must equal d)");
  r.left_identity = is_identity(h_left, r.K);
  if (!r.left_identity) {
    r.left_fwht = sylvester_scale(h_left, r.K, &r.left_scale);
    if (!r.left_fwht) {
      r.left.assign(h_left, h_left + r.K * r.K);
      r.left_paley2 = paley2_factors(h_left, r.K, &r.paley_a, &r.paley_g);
    }
  }
  r.right_fwht = sylvester_scale(h_right, r.M, &r.right_scale);
  if (!r.right_fwht) {
    r.right_t.resize(static_cast<size_t>(r.M * r.M));
    for (int64_t i = 0; i < r.M; ++i)
      for (int64_t j = 0; j < r.M; ++j) r.right_t[j * r.M + i] = h_right[i * r.M + j];
  }
  return r;
}

Scratch::Scratch(const Rotation* rot, int64_t d) {
  if (rot) {
    if (!rot->left_identity) block.resize(static_cast<size_t>(d));
    if (rot->left_paley2) pairs.resize(static_cast<size_t>(d + 16));  // + 16: room to align to 64 bytes
    if (!rot->right_fwht) tmp.resize(static_cast<size_t>(rot->M));
  }
}

void transform_row(const TransformKernels& k, const float* x, const float* mean, const float* mul,
                   const float* mul_rot, const Rotation* rot, float* out, Scratch& scratch, int64_t d) {
  if (!rot) {
    k.center_scale(x, mean, mul, out, d);
    return;
  }
  float* v = rot->left_identity ? out : scratch.block.data();
  if (rot->right_fwht) {
    k.center_scale_fwht(x, mean, mul_rot, v, rot->K, rot->M);
  } else {
    k.center_scale(x, mean, mul, v, d);
    k.dense_right(v, rot->K, rot->M, rot->right_t.data(), scratch.tmp.data());
  }
  if (rot->left_fwht)
    k.fwht_across_rows(v, rot->K, rot->M, rot->left_scale, out);
  else if (rot->left_paley2 && k.paley2_left)
    k.paley2_left(v, rot->left.data(), rot->paley_a.data(), rot->paley_g.data(), rot->K, rot->M,
                  scratch.pairs.data(), out);
  else if (!rot->left_identity)
    k.dense_left(v, rot->left.data(), rot->K, rot->M, out);
}

}  // namespace hadanorm
