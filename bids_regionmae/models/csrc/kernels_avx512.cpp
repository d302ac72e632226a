// The AVX-512 (16 lanes) copy of the CPU kernels (see kernels.h).
#include "kernels.h"
#ifdef REGIONMAE_X86
#pragma GCC target("avx512f,avx2,fma")
#define SCAN_EB 16
#define SCAN_KERNEL_NS scan_avx512
#include "scan_kernel.h"
#include "conv_kernel.h"
#endif
