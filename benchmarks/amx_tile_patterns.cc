// AMX tile-loop patterns (2026-12-06 investigation, benchmarks/int_linear.md): tdpbusd throughput with and without
// tile loads / stores, 64-byte-aligned buffers in L1. One core:
//   g++ -O2 -mamx-tile -mamx-int8 -mavx512f -Iruntime/kernels benchmarks/amx_tile_patterns.cc -o patterns
//   taskset -c 0 ./patterns PATTERN 200000     (PATTERN 0..8, see the branches below)
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <chrono>
#include <vector>
#include <sys/syscall.h>
#include <unistd.h>
#include "amx_tile_config.h"
using namespace hadanorm;
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(int argc,char**argv){
  syscall(SYS_arch_prctl, 0x1023, 18);
  int pat=atoi(argv[1]); long iters=atol(argv[2]);
  alignas(64) static uint8_t A[65536]; alignas(64) static uint8_t B[65536]; alignas(64) static int32_t Cb[4096];
  TileConfig cfg; for(int i=0;i<8;i++) cfg.set(i,16,64);
  _tile_loadconfig(&cfg);
  for(int i=0;i<1;i++){_tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);}
  double best=1e9; long dps=0;
  for(int rep=0;rep<5;rep++){
  double t=now(); dps=0;
  const uint8_t* a=A; const uint8_t* b=B;
  for(long i=0;i<iters;i++){
    long o=(i&7)*2048;
    if(pat==0){ _tile_dpbusd(0,4,6);_tile_dpbusd(1,4,7);_tile_dpbusd(2,5,6);_tile_dpbusd(3,5,7); dps+=4;}
    if(pat==1){ _tile_loadd(4,a+o,64); _tile_loadd(6,b+o,64); _tile_dpbusd(0,4,6); _tile_loadd(7,b+o+1024,64); _tile_dpbusd(1,4,7);
      _tile_loadd(5,a+o+1024,64); _tile_dpbusd(2,5,6); _tile_dpbusd(3,5,7); dps+=4;}
    if(pat==2){ _tile_loadd(4,a+o,64); _tile_loadd(5,b+o,64); _tile_dpbusd(0,4,5); _tile_loadd(6,b+o+1024,64); _tile_dpbusd(1,4,6);
      _tile_loadd(7,b+o+2048,64); _tile_dpbusd(2,4,7); _tile_loadd(5,b+o+3072,64); _tile_dpbusd(3,4,5); dps+=4;}
    if(pat==3){ // C0..2, A 3/4 alternate, B 5,6,7
      _tile_loadd(3,a+o,64); _tile_loadd(5,b+o,64); _tile_dpbusd(0,3,5); _tile_loadd(6,b+o+1024,64); _tile_dpbusd(1,3,6); _tile_loadd(7,b+o+2048,64); _tile_dpbusd(2,3,7);
      _tile_loadd(4,a+o+1024,64); _tile_loadd(5,b+o+3072,64); _tile_dpbusd(0,4,5); _tile_loadd(6,b+o+4096,64); _tile_dpbusd(1,4,6); _tile_loadd(7,b+o+5120,64); _tile_dpbusd(2,4,7); dps+=6;}
    if(pat==4){ // 2x2 with loads only of B (A resident)
      _tile_loadd(6,b+o,64); _tile_dpbusd(0,4,6); _tile_loadd(7,b+o+1024,64); _tile_dpbusd(1,4,7); _tile_dpbusd(2,5,6); _tile_dpbusd(3,5,7); dps+=4;}
    if(pat==6){ _tile_zero(0); _tile_loadd(4,b+o,64); _tile_loadd(5,b+o+1024,64); _tile_dpbusd(0,2,4); _tile_dpbusd(0,3,5); _tile_stored(0,Cb,64);
       _tile_zero(1); _tile_loadd(6,b+o+2048,64); _tile_loadd(7,b+o+3072,64); _tile_dpbusd(1,2,6); _tile_dpbusd(1,3,7); _tile_stored(1,Cb+256,64); dps+=4;}
    if(pat==7){ _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
      for(int s=0;s<2;s++){ _tile_loadd(4,a+o+s*2048,64); _tile_loadd(6,b+o+s*2048,64); _tile_dpbusd(0,4,6); _tile_loadd(7,b+o+1024+s*2048,64); _tile_dpbusd(1,4,7);
      _tile_loadd(5,a+o+1024+s*2048,64); _tile_dpbusd(2,5,6); _tile_dpbusd(3,5,7);} 
      _tile_stored(0,Cb,128);_tile_stored(1,Cb+16,128);_tile_stored(2,Cb+512,128);_tile_stored(3,Cb+528,128); dps+=8;}
    if(pat==8){ // 1x4 rotating B, A alternating, 2 ksteps, store after
      _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
      for(int s=0;s<2;s++){ _tile_loadd(4,a+o+s*1024,64); _tile_loadd(5,b+o+s*4096,64); _tile_dpbusd(0,4,5); _tile_loadd(6,b+o+1024+s*4096,64); _tile_dpbusd(1,4,6);
      _tile_loadd(7,b+o+2048+s*4096,64); _tile_dpbusd(2,4,7); _tile_loadd(5,b+o+3072+s*4096,64); _tile_dpbusd(3,4,5);}
      _tile_stored(0,Cb,256);_tile_stored(1,Cb+16,256);_tile_stored(2,Cb+32,256);_tile_stored(3,Cb+48,256); dps+=8;}
    if(pat==5){ // 2x1 : C0,C1 rows; A4,A5 ; B 6/7 alternate per iter ; C2,C3 unused -> 2 dps per 3 loads
      int bt = (i&1); if(bt){_tile_loadd(4,a+o,64);_tile_loadd(5,a+o+1024,64);_tile_loadd(6,b+o,64);_tile_dpbusd(0,4,6);_tile_dpbusd(1,5,6);} else {_tile_loadd(2,a+o,64);_tile_loadd(3,a+o+1024,64);_tile_loadd(7,b+o,64);_tile_dpbusd(0,2,7);_tile_dpbusd(1,3,7);} dps+=2;}
  }
  alignas(64) int32_t c[256]; _tile_stored(0,c,64);
  t=now()-t; if(t<best)best=t;}
  double macs=16.0*16*64*dps;
  printf("pattern %d: %.1f GOP/s  %.2f cycles/tdpbusd@3.9GHz\n",pat,2*macs/best/1e9, best*3.9e9/dps);
}
