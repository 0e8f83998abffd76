// The AMX IntMatMul4 kernel's loop structure alone (benchmarks/int_linear.md): per 32-row panel, block by block, pair
// by pair: zero 4 C tiles, 2 k-steps of 2x2 tdpbusd, store, fold the previous micro-tile into F (optional).
//   g++ -O2 -mamx-tile -mamx-int8 -mavx512f -mavx512bw -Iruntime/kernels benchmarks/amx_tile_loop.cc -o loop
//   taskset -c 0 ./loop K_BLOCKS PAIRS PANELS FOLD(0|1) STRIDED_A(0|1) REPS [ZERO_BY_LOAD(0|1)]   (RND=1: random data)
// kernel-structure microbench: panel 32 rows x task cols (pairs), K = kb blocks of 128
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <sys/syscall.h>
#include <unistd.h>
#include "amx_tile_config.h"
using namespace hadanorm;
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(int argc,char**argv){
  syscall(SYS_arch_prctl, 0x1023, 18);
  int kb=atoi(argv[1]); int pairs=atoi(argv[2]); int panels=atoi(argv[3]); int fold=atoi(argv[4]); int astride_mode=atoi(argv[5]); int reps=atoi(argv[6]);
  int zero_mode = argc>7 ? atoi(argv[7]) : 0;
  long K=kb*128; long lda = astride_mode ? K : 64;
  uint8_t* A=(uint8_t*)aligned_alloc(64, 32*K*panels+4096); for(long i=0;i<32*K*panels+4096;i++) A[i]=(getenv("RND")? (rand()&15):1);
  long bbytes=(long)kb*pairs*2*2048; uint8_t* B=(uint8_t*)aligned_alloc(64,bbytes); for(long i=0;i<bbytes;i++) B[i]=(getenv("RND")? (rand()&15):1);
  alignas(64) static int32_t C[2][1024]; float* F=(float*)aligned_alloc(64,pairs*1024*4);
  alignas(64) static int32_t Z[256];
  float sc[32]; for(int i=0;i<32;i++) sc[i]=0.01f;
  TileConfig cfg; for(int i=0;i<8;i++) cfg.set(i,16,64); _tile_loadconfig(&cfg);
  double best=1e9; long dps=0;
  for(int rep=0;rep<reps;rep++){
    double t=now(); dps=0;
    for(int p=0;p<panels;p++){
      const uint8_t* a = A + (astride_mode ? p*32*K : p*32*K);
      memset(F,0,pairs*4096);
      int parity=0; int pend=-1;
      for(int blk=0;blk<kb;blk++) for(int pr=0;pr<pairs;pr++){
        const uint8_t* b0=B+((long)(blk*pairs+pr)*2)*2048; const uint8_t* b1=b0+2048;
        if(zero_mode==0){_tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);} else {_tile_loadd(0,Z,64);_tile_loadd(1,Z,64);_tile_loadd(2,Z,64);_tile_loadd(3,Z,64);}
        for(int s=0;s<2;s++){
          long k0=blk*128+s*64;
          const uint8_t* a0 = astride_mode ? a+k0 : a + (k0/64)*2048;
          long st = astride_mode ? lda : 64;
          _tile_loadd(4,a0,st); _tile_loadd(6,b0+s*1024,64); _tile_dpbusd(0,4,6); _tile_loadd(7,b1+s*1024,64); _tile_dpbusd(1,4,7);
          _tile_loadd(5,a0+16*st,st); _tile_dpbusd(2,5,6); _tile_dpbusd(3,5,7);
        }
        dps+=8;
        if(fold && pend>=0){
          const int32_t* c=C[parity^1]; float* f=F+pend*1024;
          __m512 s0=_mm512_loadu_ps(sc), s1=_mm512_loadu_ps(sc+16);
          #pragma GCC unroll 4
          for(int r=0;r<32;r++){ float* fr=f+r*32;
            _mm512_store_ps(fr,_mm512_fmadd_ps(s0,_mm512_cvtepi32_ps(_mm512_load_si512(c+r*32)),_mm512_load_ps(fr)));
            _mm512_store_ps(fr+16,_mm512_fmadd_ps(s1,_mm512_cvtepi32_ps(_mm512_load_si512(c+r*32+16)),_mm512_load_ps(fr+16)));}
        }
        int32_t* cp=C[parity]; _tile_stored(0,cp,128); _tile_stored(1,cp+16,128); _tile_stored(2,cp+512,128); _tile_stored(3,cp+528,128);
        pend=pr; parity^=1;
      }
    }
    t=now()-t; if(t<best) best=t;
  }
  printf("kb %d pairs %d panels %d fold %d strideA %d zero %d: %.2f cycles/dp (3.9GHz)  %.0f GOP/s\n",kb,pairs,panels,fold,astride_mode,zero_mode,best*3.9e9/dps, 2.0*dps*16384/best/1e9);
}
