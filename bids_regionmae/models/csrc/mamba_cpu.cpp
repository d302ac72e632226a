// Fused CPU kernels of the Mamba block (bids_regionmae.models.mamba): the selective scan and the
// causal depthwise convolution, forward and backward.
//
// Registered as the torch operators regionmae_mamba::{scan_forward, scan_backward, conv_forward,
// conv_backward, isa}; built on first use by torch.utils.cpp_extension (see
// bids_regionmae/models/cpu_kernels.py). The scan never allocates anything of size (L, Bw, N, E):
// the states of each (sequence, channel block) live in local vectors, the forward keeps the state
// at the start of every `chunk` steps, and the backward recomputes one chunk at a time from those.

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
#include <utility>

#include "kernels.h"

namespace {

using at::Tensor;
typedef RegionmaeScanArgs Args;
constexpr int64_t MAXN = kRegionmaeMaxState;

enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

bool isa_supported(int64_t isa) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kGeneric;
}

std::atomic<int64_t>& current_isa() {
  static std::atomic<int64_t> isa{isa_supported(kAvx512) ? kAvx512 : isa_supported(kAvx2) ? kAvx2 : kGeneric};
  return isa;
}

int64_t lanes(int64_t isa) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return scan_avx512::lanes();
  if (isa == kAvx2) return scan_avx2::lanes();
#endif
  return scan_generic::lanes();
}

// The instruction set in use; `force` >= 0 selects another one the CPU supports (tests, benchmarks).
std::string scan_isa(int64_t force) {
  if (force >= 0) {
    TORCH_CHECK(force <= kAvx512 && isa_supported(force), "regionmae_mamba: instruction set ", force,
                " is not supported here");
    current_isa() = force;
  }
  return kIsaNames[current_isa().load()];
}

// The kernels of instruction set `isa` on work items [begin, end) (see selective_scan_kernel.h).
template <typename T>
void forward_items(int64_t isa, const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C,
                   const T* D, const T* z, T* out, T* ckpt, int64_t begin, int64_t end) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return scan_avx512::scan_forward(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
  if (isa == kAvx2) return scan_avx2::scan_forward(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
#endif
  scan_generic::scan_forward(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);
}

template <typename T>
void backward_items(int64_t isa, const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C,
                    const T* D, const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* gB, T* gC,
                    T* gA_part, T* gD_part, int64_t groups, int64_t per_group, int64_t begin, int64_t end) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512)
    return scan_avx512::scan_backward(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part,
                                       gD_part, groups, per_group, begin, end);
  if (isa == kAvx2)
    return scan_avx2::scan_backward(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part,
                                     gD_part, groups, per_group, begin, end);
#endif
  scan_generic::scan_backward(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part, gD_part,
                               groups, per_group, begin, end);
}

template <typename T>
void conv_forward_rows(int64_t isa, const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias, T* out,
                       int64_t r0, int64_t r1) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return scan_avx512::conv_forward(c, x, wt, bias, out, r0, r1);
  if (isa == kAvx2) return scan_avx2::conv_forward(c, x, wt, bias, out, r0, r1);
#endif
  scan_generic::conv_forward(c, x, wt, bias, out, r0, r1);
}

template <typename T>
void conv_backward_pre_rows(int64_t isa, const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias,
                            const T* gout, T* gpre, T* gw_part, T* gb_part, int64_t r0, int64_t r1) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return scan_avx512::conv_backward_pre(c, x, wt, bias, gout, gpre, gw_part, gb_part, r0, r1);
  if (isa == kAvx2) return scan_avx2::conv_backward_pre(c, x, wt, bias, gout, gpre, gw_part, gb_part, r0, r1);
#endif
  scan_generic::conv_backward_pre(c, x, wt, bias, gout, gpre, gw_part, gb_part, r0, r1);
}

template <typename T>
void conv_backward_input_rows(int64_t isa, const RegionmaeConvArgs& c, const T* wt, const T* gpre, T* gx, int64_t r0,
                              int64_t r1) {
#ifdef REGIONMAE_X86
  if (isa == kAvx512) return scan_avx512::conv_backward_input(c, wt, gpre, gx, r0, r1);
  if (isa == kAvx2) return scan_avx2::conv_backward_input(c, wt, gpre, gx, r0, r1);
#endif
  scan_generic::conv_backward_input(c, wt, gpre, gx, r0, r1);
}

// Row stride of an (L, Bw, X) tensor whose rows t * Bw + b are evenly spaced with contiguous values.
int64_t row_stride(const Tensor& t, int64_t L, int64_t Bw, int64_t X, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == L && t.size(1) == Bw && t.size(2) == X, "regionmae_mamba: ", name,
              " must have shape (", L, ", ", Bw, ", ", X, "), got ", t.sizes());
  const int64_t ld = Bw > 1 ? t.stride(1) : t.stride(0);
  TORCH_CHECK((X <= 1 || t.stride(2) == 1) && (L <= 1 || Bw <= 1 || t.stride(0) == Bw * ld), "regionmae_mamba: ",
              name, " must have evenly spaced rows of contiguous values");
  return ld;
}

void check_dtype(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == ref.scalar_type(), "regionmae_mamba: ", name,
              " must be a CPU tensor of dtype ", ref.scalar_type());
}

Args make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
               const std::optional<Tensor>& D, const std::optional<Tensor>& z, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "regionmae_mamba: u must be (L, Bw, E) and A (E, N)");
  const int64_t L = u.size(0), Bw = u.size(1), E = u.size(2), N = A.size(1);
  TORCH_CHECK(A.size(0) == E, "regionmae_mamba: A must be (E, N) with E = ", E);
  TORCH_CHECK(N >= 1 && N <= MAXN, "regionmae_mamba: state size N must be in [1, ",
              MAXN, "], got ", N);
  TORCH_CHECK(chunk > 0, "regionmae_mamba: chunk must be positive");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "regionmae_mamba: float32 or float64 only, got ", u.scalar_type());
  check_dtype(u, u, "u");
  for (auto [t, name] : {std::pair{&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}}) check_dtype(u, *t, name);
  Args d{L, Bw, E, N, chunk, 0, 0, 0, 0, 0};
  d.ld_u = row_stride(u, L, Bw, E, "u");
  d.ld_delta = row_stride(delta, L, Bw, E, "delta");
  d.ld_B = row_stride(B, L, Bw, N, "B");
  d.ld_C = row_stride(C, L, Bw, N, "C");
  if (D.has_value()) {
    check_dtype(u, *D, "D");
    TORCH_CHECK(D->dim() == 1 && D->size(0) == E && D->is_contiguous(), "regionmae_mamba: D must be (E,)");
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
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "regionmae_mamba::scan_forward", [&] {
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
              "regionmae_mamba: checkpoints do not match the inputs (forward run without save_checkpoints?)");
  check_dtype(u, gout, "gout");
  TORCH_CHECK(gout.sizes() == u.sizes() && gout.is_contiguous(), "regionmae_mamba: gout must be contiguous like u");
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
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "regionmae_mamba::scan_backward", [&] {
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

// ------------------------------------------------------------------ causal depthwise convolution

typedef RegionmaeConvArgs ConvArgs;

ConvArgs conv_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, bool silu) {
  TORCH_CHECK(x.dim() == 3, "regionmae_mamba: x must be (L, Bw, E)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "regionmae_mamba: float32 or float64 only, got ", x.scalar_type());
  const int64_t L = x.size(0), Bw = x.size(1), E = x.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == E && weight.size(1) >= 1,
              "regionmae_mamba: weight must be (E, K) with E = ", E);
  check_dtype(x, x, "x");
  check_dtype(x, weight, "weight");
  if (bias.has_value()) {
    check_dtype(x, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E && bias->is_contiguous(), "regionmae_mamba: bias must be (E,)");
  }
  return ConvArgs{L, Bw, E, weight.size(1), row_stride(x, L, Bw, E, "x"), silu};
}

// Rows per thread at least: about 32768 values, the grain of ATen's elementwise kernels.
int64_t conv_grain(const ConvArgs& c) { return std::max<int64_t>(1, 32768 / c.E); }

// Row ranges for the weight and bias gradients: fixed pieces of at least a grain each, one partial sum
// per piece (the sums depend on the sizes only, not on the thread count).
int64_t conv_parts(const ConvArgs& c) {
  return std::max<int64_t>(1, std::min<int64_t>(64, c.L * c.Bw / conv_grain(c)));
}

Tensor conv_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, bool silu) {
  const ConvArgs c = conv_args(x, weight, bias, silu);
  const int64_t isa = current_isa().load(), rows = c.L * c.Bw;
  Tensor out = at::empty({c.L, c.Bw, c.E}, x.options());
  Tensor wt = weight.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "regionmae_mamba::conv_forward", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pw = wt.const_data_ptr<scalar_t>(),
                   *pb = ptr<scalar_t>(bias);
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, conv_grain(c), [&](int64_t begin, int64_t end) {
      conv_forward_rows(isa, c, px, pw, pb, po, begin, end);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& x, const Tensor& weight,
                                                 const std::optional<Tensor>& bias, bool silu, const Tensor& gout) {
  const ConvArgs c = conv_args(x, weight, bias, silu);
  const int64_t isa = current_isa().load(), rows = c.L * c.Bw, parts = conv_parts(c);
  check_dtype(x, gout, "gout");
  TORCH_CHECK(gout.sizes() == x.sizes() && gout.is_contiguous(), "regionmae_mamba: gout must be contiguous like x");
  Tensor gpre = at::empty({c.L, c.Bw, c.E}, x.options());
  Tensor gx = at::empty({c.L, c.Bw, c.E}, x.options());
  Tensor gw_part = at::zeros({parts, c.K, c.E}, x.options());
  Tensor gb_part = at::zeros({parts, c.E}, x.options());
  Tensor wt = weight.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "regionmae_mamba::conv_backward", [&] {
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pw = wt.const_data_ptr<scalar_t>(),
                   *pb = ptr<scalar_t>(bias), *pg = gout.const_data_ptr<scalar_t>();
    scalar_t *pgp = gpre.mutable_data_ptr<scalar_t>(), *pgx = gx.mutable_data_ptr<scalar_t>(),
             *pgw = gw_part.mutable_data_ptr<scalar_t>(), *pgb = gb_part.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        conv_backward_pre_rows(isa, c, px, pw, pb, pg, pgp, pgw + p * c.K * c.E, pgb + p * c.E, rows * p / parts,
                               rows * (p + 1) / parts);
    });
    at::parallel_for(0, rows, conv_grain(c), [&](int64_t begin, int64_t end) {
      conv_backward_input_rows(isa, c, pw, pgp, pgx, begin, end);
    });
  });
  Tensor gw = gw_part.sum(0).t().contiguous();  // (E, K)
  Tensor gb = bias.has_value() ? gb_part.sum(0) : at::empty({0}, x.options());
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY(regionmae_mamba, m) {
  m.def(
      "scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, int chunk, "
      "bool save_checkpoints) -> (Tensor, Tensor)");
  m.def(
      "scan_backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor ckpt, "
      "Tensor gout, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_forward(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def("conv_backward(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor gout) -> (Tensor, Tensor, Tensor)");
  m.def("isa(int force=-1) -> str", &scan_isa);
}

TORCH_LIBRARY_IMPL(regionmae_mamba, CPU, m) {
  m.impl("scan_forward", &scan_forward);
  m.impl("scan_backward", &scan_backward);
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
