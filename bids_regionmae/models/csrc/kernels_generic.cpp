// The baseline (SSE2 / NEON, 4 lanes) copy of the CPU kernels (see kernels.h).
#include "kernels.h"
#define SCAN_EB 4
#define SCAN_KERNEL_NS scan_generic
#include "scan_kernel.h"
#include "conv_kernel.h"
