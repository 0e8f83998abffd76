// One IntMatMul with the hadanorm kernels, no onnxruntime: the task split of matmul_ops.cc, run by NTH std::threads
// claiming tasks dynamically (as onnxruntime's pool does); best of 25 wall times.
//
//   g++ -O3 -std=c++20 -ffp-contract=off -pthread -Iruntime/kernels benchmarks/int_gemm_harness.cc \
//     runtime/kernels/{half,isa,int_common,int_scalar,int_avx2,int_avxvnni,int_avx512,int_amx,int_neon,int_two_level}.cc -o harness
//   NTH=2 ./harness M K N bits path [rows_per_task tiles_per_task]     (path: amx, avx512vnni or scalar)
//   FLOAT=1 ./harness M K N 4 path: FloatMatMul4 instead (the float mean token's product)
//   TL=1 ./harness M K N 4 path: two-level scales (column unit x 1..16 per block), run as IntMatMul4 runs them: each
//   task's tiles expanded to the 8-bit layout, then the path's 8-bit matmul over one block (int_kernels.h, TwoLevel);
//   TL=0 with the same scales: the block route (the weights are the same; only the route differs)
//   BLOCK=B ./harness ...: weight blocks of B along K (default 128; BLOCK=K: one block per column, as
//   --outer-weight-block 0 writes)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <cstring>
#include <thread>
#include <atomic>
#include "int_kernels.h"
using namespace hadanorm;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main(int argc, char** argv) {
  int64_t M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]); int bits = atoi(argv[4]); const char* isa = argv[5];
  int64_t rpt = argc > 6 ? atoi(argv[6]) : 0, tpt = argc > 7 ? atoi(argv[7]) : 0;
  int64_t block = getenv("BLOCK") ? atoi(getenv("BLOCK")) : 128, kb = K / block;
  WeightInfo w = weight_geometry(bits, N, kb, block);
  std::mt19937 rng(1);
  std::vector<uint8_t> b(w.tiles * w.tile_stride);
  for (auto& v : b) v = bits == 4 ? rng() & 0xFF : (rng() % 15) - 7;
  std::vector<float> sc(kb * N, 0.01f); std::vector<uint8_t> zp(kb * N, bits == 4 ? 8 : 0);
  const bool tl_scales = getenv("TL") != nullptr && bits == 4;
  if (tl_scales) for (auto& v : sc) v = 0.00125f * static_cast<float>(8 + rng() % 9);  // c = 0.00125, r in 8..16
  fill_weight_info(w, b.data(), sc.data(), zp.data());
  // codes 64-byte aligned, as onnxruntime's arena gives a tensor (16-byte-aligned tile rows cost the AMX path ~8%)
  std::vector<uint8_t> codes_store(M * K + 64);
  uint8_t* codes = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(codes_store.data()) + 63) & ~uintptr_t(63));
  for (int64_t i = 0; i < M * K; ++i) codes[i] = rng() & 15;
  std::vector<uint8_t> az(M, 8); std::vector<float> as(M, 0.1f), bias(N, 0.f), y(M * N);
  Isa which = !strcmp(isa, "amx") ? Isa::kAmx : !strcmp(isa, "scalar") ? Isa::kScalar : Isa::kAvx512Vnni;
  if (which == Isa::kAmx && !isa_supported(Isa::kAmx)) { printf("no amx\n"); return 1; }
  const IsaKernels& k = isa_kernels(which);
  std::shared_ptr<const TwoLevel> tl;
  if (tl_scales && atoi(getenv("TL")) != 0) {
    tl = detect_two_level(w, b.data());
    if (!tl) { printf("not two-level\n"); return 1; }
  }
  const WeightInfo& wk = tl ? tl->w8 : w;
  ActInfo act; act_init(act, codes, M, K, wk); act_prepare_rows(act, codes, az.data(), as.data(), K, wk, 0, M);
  GemmArgs g; g.act = &act; g.b = b.data(); g.w = &wk; g.bias = bias.data(); g.y = y.data(); g.n = N;
  IntGemmFn fn = bits == 4 && !tl ? k.int_gemm4 : k.int_gemm8;
  std::vector<float> xf(M * w.k_pad, 0.5f);
  FloatGemmArgs fg;
  fg.x = xf.data(); fg.ldx = w.k_pad; fg.b = b.data(); fg.w = &w; fg.y = y.data(); fg.n = N;
  const FloatGemmFn ffn = bits == 4 ? k.float_gemm4 : k.float_gemm8;
  if (getenv("FLOAT")) fn = [](const GemmArgs&, int64_t, int64_t, int64_t, int64_t) {};
  rpt = rpt ? rpt : balanced_row_tasks(k, M); tpt = tpt ? tpt : k.tiles_per_task;
  double best = 1e9;
  for (int rep = 0; rep < 25; ++rep) {
    double t = now();
    int64_t rt = (M + rpt - 1) / rpt, ct = (w.tiles + tpt - 1) / tpt, ntask = rt * ct;
    std::atomic<int64_t> next{0};
    auto worker = [&] { for (int64_t task; (task = next++) < ntask;) { int64_t i = task % rt, j = task / rt;
      const int64_t t0 = j * tpt, t1 = std::min(w.tiles, (j + 1) * tpt);
      GemmArgs ga = g;
      if (tl) {  // matmul_ops.cc's expanded_tiles
        thread_local std::vector<uint8_t> buf;
        buf.resize((t1 - t0) * tl->w8.tile_stride + 64);
        uint8_t* out = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
        k.expand_two_level(w, tl->ratio.data(), b.data(), t0, t1, out);
        ga.b = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(out) - t0 * tl->w8.tile_stride);
      }
      fn(ga, i * rpt, std::min(M, (i + 1) * rpt), t0, t1);
      if (getenv("FLOAT")) ffn(fg, i * rpt, std::min(M, (i + 1) * rpt), j * tpt, std::min(w.tiles, (j + 1) * tpt)); } };
    int nth = getenv("NTH") ? atoi(getenv("NTH")) : 1;
    std::vector<std::thread> ths; for (int q = 1; q < nth; ++q) ths.emplace_back(worker); worker(); for (auto& th : ths) th.join();
    t = now() - t; if (t < best) best = t;
  }
  double sum = 0; for (float v : y) sum += v;
  const int nth = getenv("NTH") ? atoi(getenv("NTH")) : 1;
  printf("%s%s M%ld K%ld N%ld w%d: %.2f ms  %.1f GOP/s (%d threads)  checksum %.3f\n", isa, tl ? " two-level" : "",
         (long)M, (long)K, (long)N, bits, best * 1e3, 2.0 * M * K * N / best / 1e9, nth, sum);
}
