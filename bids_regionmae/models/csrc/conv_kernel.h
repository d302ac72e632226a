// Causal depthwise convolution along time (+ bias, + optional SiLU) of the Mamba block, in plain C++
// with the vector types of scan_kernel.h (included right before, in the same namespace and way).
//
//   pre[t, b, e] = w[e, K-1] x[t, b, e] + sum_{k < K-1} w[e, k] x[t - (K-1) + k, b, e] + bias[e]
//   out = silu(pre) or pre
//
// x: rows r = t * Bw + b of E values, row stride ld_x; wt: (K, E), the transposed weight; out, gout,
// gpre, gx: rows of E values. Work is split by rows (independent outputs) and, for the weight and
// bias gradients, into `parts` fixed row ranges with one partial sum each.

namespace SCAN_KERNEL_NS {

typedef ::RegionmaeConvArgs ConvArgs;

// pre-activation of row r, channels [e0, e0 + ne)
template <typename T>
inline typename Vec<T>::type conv_pre(const ConvArgs& c, const T* x, const T* wt, const T* bias, int64_t r,
                                      int64_t e0, int64_t ne) {
  typedef typename Vec<T>::type V;
  const int64_t t = r / c.Bw, K = c.K;
  V acc = load(wt + (K - 1) * c.E + e0, ne) * load(x + r * c.ld_x + e0, ne);
  for (int64_t k = 0; k < K - 1; ++k) {
    const int64_t back = K - 1 - k;  // steps back in time
    if (t >= back) acc += load(wt + k * c.E + e0, ne) * load(x + (r - back * c.Bw) * c.ld_x + e0, ne);
  }
  if (bias != nullptr) acc += load(bias + e0, ne);
  return acc;
}

template <typename T>
void conv_forward_rows_t(const ConvArgs& c, const T* x, const T* wt, const T* bias, T* out, int64_t r0, int64_t r1) {
  typedef typename Vec<T>::type V;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t e0 = 0; e0 < c.E; e0 += EB) {
      const int64_t ne = (c.E - e0) < EB ? (c.E - e0) : EB;
      V v = conv_pre(c, x, wt, bias, r, e0, ne);
      if (c.silu) v *= sigmoid<T>(v);
      store(out + r * c.E + e0, v, ne);
    }
  }
}

// Backward, first pass over rows [r0, r1): dL/dpre into gpre; adds sum(dL/dpre * x shifted) into gw_part
// (K, E) and sum(dL/dpre) into gb_part (E).
template <typename T>
void conv_backward_pre_rows_t(const ConvArgs& c, const T* x, const T* wt, const T* bias, const T* gout, T* gpre,
                            T* gw_part, T* gb_part, int64_t r0, int64_t r1) {
  typedef typename Vec<T>::type V;
  const V one = V{} + 1;
  const int64_t K = c.K;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / c.Bw;
    for (int64_t e0 = 0; e0 < c.E; e0 += EB) {
      const int64_t ne = (c.E - e0) < EB ? (c.E - e0) : EB;
      V g = load(gout + r * c.E + e0, ne);
      if (c.silu) {
        const V pre = conv_pre(c, x, wt, bias, r, e0, ne);
        const V sg = sigmoid<T>(pre);
        g *= sg * (one + pre * (one - sg));
      }
      store(gpre + r * c.E + e0, g, ne);
      store(gb_part + e0, load(gb_part + e0, ne) + g, ne);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t back = K - 1 - k;
        if (t >= back) {
          T* gw = gw_part + k * c.E + e0;
          store(gw, load(gw, ne) + g * load(x + (r - back * c.Bw) * c.ld_x + e0, ne), ne);
        }
      }
    }
  }
}

// Backward, second pass over rows [r0, r1): gx[t] = sum_k w[k] gpre[t + (K-1) - k].
template <typename T>
void conv_backward_input_rows_t(const ConvArgs& c, const T* wt, const T* gpre, T* gx, int64_t r0, int64_t r1) {
  typedef typename Vec<T>::type V;
  const int64_t K = c.K;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / c.Bw;
    for (int64_t e0 = 0; e0 < c.E; e0 += EB) {
      const int64_t ne = (c.E - e0) < EB ? (c.E - e0) : EB;
      V acc = load(wt + (K - 1) * c.E + e0, ne) * load(gpre + r * c.E + e0, ne);
      for (int64_t k = 0; k < K - 1; ++k) {
        const int64_t ahead = K - 1 - k;
        if (t + ahead < c.L) acc += load(wt + k * c.E + e0, ne) * load(gpre + (r + ahead * c.Bw) * c.E + e0, ne);
      }
      store(gx + r * c.E + e0, acc, ne);
    }
  }
}

// ------------------------------------------------------------------ entry points (kernels.h)

int64_t lanes() { return EB; }

#define REGIONMAE_KERNEL_DEFINE(T)                                                                                  \
  void scan_forward(const RegionmaeScanArgs& d, const T* u, const T* delta, const T* At, const T* B, const T* C,     \
                    const T* D, const T* z, T* out, T* ckpt, int64_t begin, int64_t end) {                          \
    forward_items(d, u, delta, At, B, C, D, z, out, ckpt, begin, end);                                              \
  }                                                                                                                 \
  void scan_backward(const RegionmaeScanArgs& d, const T* u, const T* delta, const T* At, const T* B, const T* C,    \
                     const T* D, const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* gB, T* gC,    \
                     T* gA_part, T* gD_part, int64_t groups, int64_t per_group, int64_t begin, int64_t end) {       \
    backward_items(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gB, gC, gA_part, gD_part, groups,       \
                   per_group, begin, end);                                                                          \
  }                                                                                                                 \
  void conv_forward(const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias, T* out, int64_t r0,         \
                    int64_t r1) {                                                                                   \
    conv_forward_rows_t(c, x, wt, bias, out, r0, r1);                                                               \
  }                                                                                                                 \
  void conv_backward_pre(const RegionmaeConvArgs& c, const T* x, const T* wt, const T* bias, const T* gout,         \
                         T* gpre, T* gw_part, T* gb_part, int64_t r0, int64_t r1) {                                 \
    conv_backward_pre_rows_t(c, x, wt, bias, gout, gpre, gw_part, gb_part, r0, r1);                                 \
  }                                                                                                                 \
  void conv_backward_input(const RegionmaeConvArgs& c, const T* wt, const T* gpre, T* gx, int64_t r0, int64_t r1) { \
    conv_backward_input_rows_t(c, wt, gpre, gx, r0, r1);                                                            \
  }

REGIONMAE_KERNEL_DEFINE(float)
REGIONMAE_KERNEL_DEFINE(double)
#undef REGIONMAE_KERNEL_DEFINE

}  // namespace SCAN_KERNEL_NS
