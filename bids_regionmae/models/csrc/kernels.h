// Entry points of the CPU kernels, one set per instruction set (namespaces scan_generic, scan_avx2,
// scan_avx512), each compiled in its own translation unit (kernels_<isa>.cpp) with that instruction
// set enabled; mamba_cpu.cpp picks one at run time. Only plain types cross this boundary.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REGIONMAE_X86 1  // AVX2 and AVX-512 copies (GCC's target pragmas)
#endif

// Largest state size N the scan handles.
constexpr int64_t kRegionmaeMaxState = 64;

// Selective scan: sizes and row strides (see scan_kernel.h).
struct RegionmaeScanArgs {
  int64_t L, Bw, E, N, chunk;
  int64_t ld_u, ld_delta, ld_B, ld_C, ld_z;
};

// Causal convolution: sizes, row stride of x, SiLU or not (see conv_kernel.h).
struct RegionmaeConvArgs {
  int64_t L, Bw, E, K, ld_x;
  bool silu;
};

#define REGIONMAE_KERNEL_API(T)                                                                                 \
  void scan_forward(const RegionmaeScanArgs& d, const T* u, const T* delta, const T* At, const T* B, const T* C, \
                    const T* D, const T* z, T* out, T* ckpt, int64_t begin, int64_t end);                       \
  void scan_backward(const RegionmaeScanArgs& d, const T* u, const T* delta, const T* At, const T* B, const T* C,\
                     const T* D, const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* gB, T* gC, \
                     T* gA_part, T* gD_part, int64_t groups, int64_t per_group, int64_t begin, int64_t end);    \
  void conv_forward(const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias, T* out, int64_t r0,     \
                    int64_t r1);                                                                                \
  void conv_backward_pre(const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias, const T* gout,     \
                         T* gpre, T* gw_part, T* gb_part, int64_t r0, int64_t r1);                              \
  void conv_backward_input(const RegionmaeConvArgs& c, const T* wt, const T* gpre, T* gx, int64_t r0, int64_t r1);

#define REGIONMAE_DECLARE_ISA(ns) \
  namespace ns {                  \
  int64_t lanes();                \
  REGIONMAE_KERNEL_API(float)     \
  REGIONMAE_KERNEL_API(double)    \
  }

REGIONMAE_DECLARE_ISA(scan_generic)
#ifdef REGIONMAE_X86
REGIONMAE_DECLARE_ISA(scan_avx2)
REGIONMAE_DECLARE_ISA(scan_avx512)
#endif
