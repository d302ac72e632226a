// The AVX2 + FMA (8 lanes) copy of the CPU kernels (see kernels.h).
#include "kernels.h"
#ifdef REGIONMAE_X86
#pragma GCC target("avx2,fma")
#define SCAN_EB 8
#define SCAN_KERNEL_NS scan_avx2
#include "scan_kernel.h"
#include "conv_kernel.h"
#endif
