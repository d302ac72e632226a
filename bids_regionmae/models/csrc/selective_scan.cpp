// Fused CPU selective scan (forward and backward) for bids_regionmae.models.mamba.
//
// Registered as the torch operators regionmae_scan::forward and
// regionmae_scan::backward; built on first use by torch.utils.cpp_extension
// (see bids_regionmae/models/fused_scan.py). Nothing of size (L, Bw, N, E) is
// ever allocated: the states of each (sequence, channel block) live in local
// vectors, the forward keeps the state at the start of every `chunk` steps, and
// the backward recomputes the states of one chunk at a time from those.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// One copy of the kernels per instruction set; the best one the CPU supports runs.
#define SCAN_EB 4
#define SCAN_KERNEL_NS scan_generic
#include "selective_scan_kernel.h"
#undef SCAN_KERNEL_NS
#undef SCAN_EB

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REGIONMAE_SCAN_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SCAN_EB 8
#define SCAN_KERNEL_NS scan_avx2
#include "selective_scan_kernel.h"
#undef SCAN_KERNEL_NS
#undef SCAN_EB
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define SCAN_EB 16
#define SCAN_KERNEL_NS scan_avx512
#include "selective_scan_kernel.h"
#undef SCAN_KERNEL_NS
#undef SCAN_EB
#pragma GCC pop_options
#endif

namespace {

using at::Tensor;
typedef RegionmaeScanArgs Args;
constexpr int64_t MAXN = scan_generic::MAXN;

enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

bool isa_supported(int64_t isa) {
#ifdef REGIONMAE_SCAN_X86
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kGeneric;
}

std::atomic<int64_t>& current_isa() {
  static std::atomic<int64_t> isa{isa_supported(kAvx512) ? kAvx512 : isa_supported(kAvx2) ? kAvx2 : kGeneric};
  return isa;
}

int64_t lanes(int64_t isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 4; }

// The instruction set in use; `force` >= 0 selects another one the CPU supports (tests, benchmarks).
std::string scan_isa(int64_t force) {
  if (force >= 0) {
    TORCH_CHECK(force <= kAvx512 && isa_supported(force), "regionmae_scan: instruction set ", force,
                " is not supported here");
    current_isa() = force;
  }
  return kIsaNames[current_isa().load()];
}

// The kernels of instruction set `isa` on work items [begin, end) (see selective_scan_kernel.h).
template <typename T>
void forward_items(int64_t isa, const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C,
                   const T* D, const T* z, T* out, T* ckpt, int64_t begin, int64_t end) {
#ifdef REGIONMAE_SCAN_X86
  if (isa == kAvx512) return scan_avx512::forward_items(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
  if (isa == kAvx2) return scan_avx2::forward_items(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
#endif
  scan_generic::forward_items(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
}

template <typename T>
void backward_items(int64_t isa, const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C,
                    const T* D, const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* gB, T* gC,
                    T* gA_part, T* gD_part, int64_t groups, int64_t per_group, int64_t begin, int64_t end) {
#ifdef REGIONMAE_SCAN_X86
  if (isa == kAvx512)
    return scan_avx512::backward_items(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part,
                                       gD_part, groups, per_group, begin, end);
  if (isa == kAvx2)
    return scan_avx2::backward_items(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part,
                                     gD_part, groups, per_group, begin, end);
#endif
  scan_generic::backward_items(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part, gD_part,
                               groups, per_group, begin, end);
}

// Row stride of an (L, Bw, X) tensor whose rows t * Bw + b are evenly spaced with contiguous values.
int64_t row_stride(const Tensor& t, int64_t L, int64_t Bw, int64_t X, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == L && t.size(1) == Bw && t.size(2) == X, "regionmae_scan: ", name,
              " must have shape (", L, ", ", Bw, ", ", X, "), got ", t.sizes());
  const int64_t ld = Bw > 1 ? t.stride(1) : t.stride(0);
  TORCH_CHECK((X <= 1 || t.stride(2) == 1) && (L <= 1 || Bw <= 1 || t.stride(0) == Bw * ld), "regionmae_scan: ",
              name, " must have evenly spaced rows of contiguous values");
  return ld;
}

void check_dtype(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == ref.scalar_type(), "regionmae_scan: ", name,
              " must be a CPU tensor of dtype ", ref.scalar_type());
}

Args make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
               const std::optional<Tensor>& D, const std::optional<Tensor>& z, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "regionmae_scan: u must be (L, Bw, E) and A (E, N)");
  const int64_t L = u.size(0), Bw = u.size(1), E = u.size(2), N = A.size(1);
  TORCH_CHECK(A.size(0) == E, "regionmae_scan: A must be (E, N) with E = ", E);
  TORCH_CHECK(N >= 1 && N <= MAXN, "regionmae_scan: state size N must be in [1, ",
              MAXN, "], got ", N);
  TORCH_CHECK(chunk > 0, "regionmae_scan: chunk must be positive");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "regionmae_scan: float32 or float64 only, got ", u.scalar_type());
  check_dtype(u, u, "u");
  for (auto [t, name] : {std::pair{&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}}) check_dtype(u, *t, name);
  Args d{L, Bw, E, N, chunk, 0, 0, 0, 0, 0};
  d.ld_u = row_stride(u, L, Bw, E, "u");
  d.ld_delta = row_stride(delta, L, Bw, E, "delta");
  d.ld_B = row_stride(B, L, Bw, N, "B");
  d.ld_C = row_stride(C, L, Bw, N, "C");
  if (D.has_value()) {
    check_dtype(u, *D, "D");
    TORCH_CHECK(D->dim() == 1 && D->size(0) == E && D->is_contiguous(), "regionmae_scan: D must be (E,)");
  }
  if (z.has_value()) {
    check_dtype(u, *z, "z");
    d.ld_z = row_stride(*z, L, Bw, E, "z");
  }
  return d;
}

template <typename T>
const T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor> scan_forward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                        const Tensor& C, const std::optional<Tensor>& D,
                                        const std::optional<Tensor>& z, int64_t chunk, bool save_checkpoints) {
  const Args d = make_args(u, delta, A, B, C, D, z, chunk);
  const int64_t L = d.L, Bw = d.Bw, E = d.E, N = d.N;
  const int64_t isa = current_isa().load(), nblk = (E + lanes(isa) - 1) / lanes(isa);
  const int64_t nchunk = (L + chunk - 1) / chunk;
  Tensor out = at::empty({L, Bw, E}, u.options());
  Tensor ckpt = at::empty({save_checkpoints ? nchunk : 0, Bw, N, E}, u.options());
  Tensor At = A.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "regionmae_scan::forward", [&] {
    const scalar_t *pu = u.const_data_ptr<scalar_t>(), *pd = delta.const_data_ptr<scalar_t>(),
                   *pA = At.const_data_ptr<scalar_t>(), *pB = B.const_data_ptr<scalar_t>(),
                   *pC = C.const_data_ptr<scalar_t>(), *pD = ptr<scalar_t>(D), *pz = ptr<scalar_t>(z);
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    scalar_t* pk = save_checkpoints ? ckpt.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, Bw * nblk, 1, [&](int64_t begin, int64_t end) {
      forward_items(isa, d, pu, pd, pA, pB, pC, pD, pz, po, pk, begin, end);
    });
  });
  return {out, ckpt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> scan_backward(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const std::optional<Tensor>& D, const std::optional<Tensor>& z, const Tensor& ckpt, const Tensor& gout,
    int64_t chunk) {
  const Args d = make_args(u, delta, A, B, C, D, z, chunk);
  const int64_t L = d.L, Bw = d.Bw, E = d.E, N = d.N;
  const int64_t isa = current_isa().load(), nblk = (E + lanes(isa) - 1) / lanes(isa);
  const int64_t nchunk = (L + chunk - 1) / chunk;
  check_dtype(u, ckpt, "ckpt");
  TORCH_CHECK(ckpt.sizes() == at::IntArrayRef({nchunk, Bw, N, E}) && ckpt.is_contiguous(),
              "regionmae_scan: checkpoints do not match the inputs (forward run without save_checkpoints?)");
  check_dtype(u, gout, "gout");
  TORCH_CHECK(gout.sizes() == u.sizes() && gout.is_contiguous(), "regionmae_scan: gout must be contiguous like u");
  // Work items: (sequence, group of channel blocks). gB and gC sum over channels, so each group
  // writes its own partial sums; with enough sequences one group (no partials) fills the threads.
  const int64_t threads = at::get_num_threads();
  int64_t groups = Bw >= 2 * threads ? 1 : std::min(nblk, (2 * threads + Bw - 1) / Bw);
  const int64_t per_group = (nblk + groups - 1) / groups;
  groups = (nblk + per_group - 1) / per_group;
  Tensor gu = at::empty({L, Bw, E}, u.options());
  Tensor gdelta = at::empty({L, Bw, E}, u.options());
  Tensor gz = at::empty({z.has_value() ? L : 0, Bw, E}, u.options());
  Tensor gB = at::zeros({groups, L, Bw, N}, u.options());
  Tensor gC = at::zeros({groups, L, Bw, N}, u.options());
  Tensor gA_part = at::empty({Bw, N, E}, u.options());
  Tensor gD_part = at::empty({Bw, E}, u.options());
  Tensor At = A.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "regionmae_scan::backward", [&] {
    const scalar_t *pu = u.const_data_ptr<scalar_t>(), *pd = delta.const_data_ptr<scalar_t>(),
                   *pA = At.const_data_ptr<scalar_t>(), *pB = B.const_data_ptr<scalar_t>(),
                   *pC = C.const_data_ptr<scalar_t>(), *pD = ptr<scalar_t>(D), *pz = ptr<scalar_t>(z),
                   *pk = ckpt.const_data_ptr<scalar_t>(), *pg = gout.const_data_ptr<scalar_t>();
    scalar_t *pgu = gu.mutable_data_ptr<scalar_t>(), *pgd = gdelta.mutable_data_ptr<scalar_t>(),
             *pgz = z.has_value() ? gz.mutable_data_ptr<scalar_t>() : nullptr,
             *pgB = gB.mutable_data_ptr<scalar_t>(), *pgC = gC.mutable_data_ptr<scalar_t>(),
             *pgA = gA_part.mutable_data_ptr<scalar_t>(), *pgD = gD_part.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, Bw * groups, 1, [&](int64_t begin, int64_t end) {
      backward_items(isa, d, pu, pd, pA, pB, pC, pD, pz, pk, pg, pgu, pgd, pgz, pgB, pgC, pgA, pgD, groups,
                     per_group, begin, end);
    });
  });
  Tensor gA = gA_part.sum(0).t().contiguous();  // (E, N)
  Tensor gD = D.has_value() ? gD_part.sum(0) : at::empty({0}, u.options());
  return {gu, gdelta, gA, groups == 1 ? gB[0] : gB.sum(0), groups == 1 ? gC[0] : gC.sum(0), gD, gz};
}

}  // namespace

TORCH_LIBRARY(regionmae_scan, m) {
  m.def(
      "forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, int chunk, "
      "bool save_checkpoints) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor ckpt, "
      "Tensor gout, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("isa(int force=-1) -> str", &scan_isa);
}

TORCH_LIBRARY_IMPL(regionmae_scan, CPU, m) {
  m.impl("forward", &scan_forward);
  m.impl("backward", &scan_backward);
}
