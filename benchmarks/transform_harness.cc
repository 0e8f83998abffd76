// The online transform of one token (runtime/kernels/transform.h) on its own, no onnxruntime: centering, scale, the
// h_right fast Walsh-Hadamard transform and the 36 x 36 Paley factor h_left of the full Hadamard rotation of 1152 or
// 4608 (graph_passes/hadamard.py's construction: Paley II of q = 17), one thread, best of 200 runs over the tokens.
//
//   g++ -O3 -std=c++20 -ffp-contract=off -pthread -Iruntime/kernels benchmarks/transform_harness.cc \
//     runtime/kernels/{half,isa,int_common,int_scalar,int_avx2,int_avxvnni,int_avx512,int_amx,int_neon,int_two_level,transform}.cc -o th
//   taskset -c 1 ./th WIDTH TOKENS LEFT      (WIDTH 1152 or 4608; LEFT: dense, paley (the Paley II factored product)
//                                             or none (h_left skipped: what the rest of the transform costs))
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "int_kernels.h"
#include "transform.h"
using namespace hadanorm;

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Paley II of q = 17, normalised: H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], C = [[0, 1^T], [1, Q]],
// Q[i, j] = chi(j - i mod 17) (hadamard.py's _paley2)
static std::vector<float> paley36() {
  const int q = 17, n = 2 * (q + 1);
  std::vector<int> chi(q, -1);
  chi[0] = 0;
  for (int x = 1; x < q; ++x) chi[(x * x) % q] = 1;
  std::vector<float> h(n * n);
  for (int i = 0; i <= q; ++i)
    for (int j = 0; j <= q; ++j) {
      const int c = i == 0 ? (j == 0 ? 0 : 1) : (j == 0 ? 1 : chi[((j - i) % q + q) % q]);
      const int blk[2][2] = {{c + (i == j), c - (i == j)}, {c - (i == j), -c - (i == j)}};
      for (int e = 0; e < 2; ++e)
        for (int f = 0; f < 2; ++f) h[(2 * i + e) * n + 2 * j + f] = blk[e][f] / 6.0f;
    }
  return h;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s WIDTH TOKENS dense|paley|none\n", argv[0]);
    return 2;
  }
  const int64_t d = std::atoi(argv[1]), tokens = std::atoi(argv[2]), m = d / 36;
  const std::vector<float> hl = paley36();
  std::vector<float> hr(m * m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) hr[i * m + j] = (__builtin_popcountll(i & j) & 1 ? -1.f : 1.f) / std::sqrt(float(m));
  Rotation rot = make_rotation(hl.data(), {36, 36}, hr.data(), {m, m}, d);
  if (!rot.left_paley2) {
    std::fprintf(stderr, "h_left not of Paley II form\n");
    return 1;
  }
  if (!std::strcmp(argv[3], "dense")) rot.left_paley2 = false;
  if (!std::strcmp(argv[3], "none")) rot.left_paley2 = false, rot.left_identity = true;
  const IsaKernels& k = isa_kernels(Isa::kAvx512Vnni);
  std::vector<float> x(tokens * d), mul(d, 1.f), mul_rot(d, rot.right_scale), mean(d, 0.1f), out(d);
  std::mt19937 rng(1);
  for (auto& v : x) v = (rng() % 1000) / 500.f - 1.f;
  Scratch scratch(&rot, d);
  double best = 1e9, sum = 0;
  for (int rep = 0; rep < 200; ++rep) {
    const double t = now();
    for (int64_t r = 0; r < tokens; ++r) {
      transform_row(k.transform, x.data() + r * d, mean.data(), mul.data(), mul_rot.data(), &rot, out.data(), scratch, d);
      sum += out[r % d];
    }
    best = std::min(best, now() - t);
  }
  std::printf("width %ld, %ld tokens, h_left %s: %.3f ms (%.3f ns an element)  checksum %g\n", (long)d, (long)tokens,
              argv[3], best * 1e3, best * 1e9 / double(tokens * d), sum);
}
