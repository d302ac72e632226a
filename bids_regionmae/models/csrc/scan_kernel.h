// Fused selective scan: the per-block kernels, in plain C++ with GCC/Clang vector extensions (no ATen).
//
// Each kernels_<isa>.cpp includes this header inside its own namespace
// (SCAN_KERNEL_NS), with its vector width (SCAN_EB lanes) and, on x86-64 with
// GCC, its target options (baseline, AVX2+FMA, AVX-512); mamba_cpu.cpp picks
// the copy the CPU supports at run time. It includes nothing itself (kernels.h
// comes first, outside the target options).
//
// Per channel e and state n (time-major rows r = t * Bw + b):
//   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = <C_t, h_t> + D u_t,   out_t = y_t silu(z_t)
// Layouts: u, delta, z, out: rows of E values, row stride ld_u, ld_delta, ld_z, E;
// B, C: rows of N values, row strides ld_B, ld_C; At: (N, E), the transposed A;
// ckpt: (nchunk, Bw, N, E), the state before each chunk of `chunk` steps.
// A block is one sequence b and EB consecutive channels of it (fewer at the end
// of E); its N states are EB-wide vectors (channels in the lanes). A tile is up
// to KMAX consecutive blocks, stepped through time together: at each step it
// reads one contiguous stretch of every (L, Bw, E) row (time-major rows of
// adjacent sequences are adjacent), which keeps memory access sequential.
// forward_items and backward_items run a thread's share of the work.

namespace SCAN_KERNEL_NS {

typedef ::RegionmaeScanArgs Args;
constexpr int64_t EB = SCAN_EB;  // channels per block: one vector register of float (SSE2/NEON 4, AVX2 8, AVX-512 16)
constexpr int64_t MAXN = kRegionmaeMaxState;  // largest state size N handled (a multiple of EB)
#ifndef SCAN_TILE_FWD
#define SCAN_TILE_FWD 512
#endif
#ifndef SCAN_TILE_BWD
#define SCAN_TILE_BWD 128
#endif
// Bytes of channel values a tile reads from one row per step (at most), forward and backward
// (the backward keeps chunk x tile states and factors: a small tile keeps them in L1/L2).
constexpr int64_t TILE_FWD = SCAN_TILE_FWD, TILE_BWD = SCAN_TILE_BWD;

// Element-aligned vector types: memory may hold them anywhere.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(EB * sizeof(float)), aligned(sizeof(float))));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(EB * sizeof(double)), aligned(sizeof(double))));
};
typedef int32_t vint __attribute__((vector_size(EB * sizeof(int32_t))));

// 2^x of float lanes: x = k + f with k an integer, |f| <= 1/2; 2^f by a degree-5 polynomial
// (relative error 1e-7, fitted for this), 2^k in the exponent bits. Callers pass x = y * log2(e)
// to get exp(y); the kernels fold log2(e) into A once per block.
inline Vec<float>::type vexp2(Vec<float>::type x) {
  typedef Vec<float>::type V;
  const V lo = V{} - 126.0f, hi = V{} + 127.0f;
  x = x > lo ? x : lo;  // max and min instructions
  x = x < hi ? x : hi;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V kf = x + magic;
  const vint bits = (reinterpret_cast<vint>(kf) - 0x4B400000 + 127) << 23;  // 2^round(x)
  const V f = x - (kf - magic);
  V p = V{} + 1.326472731307149e-3f;
  p = p * f + 9.671512991189957e-3f;
  p = p * f + 5.550733581185341e-2f;
  p = p * f + 2.402224242687225e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.0f;
  return p * reinterpret_cast<V>(bits);
}

// 2^x of double lanes (float64 is for tests and gradient checks: the C library's exp2).
inline Vec<double>::type vexp2(Vec<double>::type x) {
  for (int64_t j = 0; j < EB; ++j) x[j] = __builtin_exp2(x[j]);
  return x;
}

template <typename T>
constexpr T kLog2e = T(1.44269504088896340735992468100189214);
template <typename T>
constexpr T kLn2 = T(0.69314718055994530941723212145817657);

template <typename T>
inline typename Vec<T>::type sigmoid(typename Vec<T>::type x) {
  const typename Vec<T>::type one = typename Vec<T>::type{} + 1;
  return one / (one + vexp2(x * -kLog2e<T>));
}

// Load n (<= EB) values into a vector, zero in the other lanes.
template <typename T>
inline typename Vec<T>::type load(const T* src, int64_t n) {
  typename Vec<T>::type v{};
  if (n == EB) {
    __builtin_memcpy(&v, src, sizeof(v));
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = src[j];
  }
  return v;
}

template <typename T>
inline void store(T* dst, typename Vec<T>::type v, int64_t n) {
  if (n == EB) {
    __builtin_memcpy(dst, &v, sizeof(v));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = v[j];
  }
}

// Sums of the lanes of p[0..EB-1], as the lanes of one vector: log2(EB) rounds of
// "add the even lanes to the odd lanes of two vectors, packed side by side".
template <typename V>
inline V lane_sums(const V* p) {
#if SCAN_EB == 4
#define EVENS 0, 2, 4, 6
#define ODDS 1, 3, 5, 7
#elif SCAN_EB == 8
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15
#elif SCAN_EB == 16
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#error "SCAN_EB must be 4, 8 or 16"
#endif
  V q[EB];
  for (int64_t i = 0; i < EB; ++i) q[i] = p[i];
  for (int64_t m = EB / 2; m >= 1; m /= 2)
    for (int64_t i = 0; i < m; ++i)
      q[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], EVENS) +
             __builtin_shufflevector(q[2 * i], q[2 * i + 1], ODDS);
  return q[0];
#undef EVENS
#undef ODDS
}

// dst[n] += sum of the lanes of p[n], n < N (p holds a multiple of EB vectors, zero past N).
template <typename T>
inline void add_lane_sums(T* dst, const typename Vec<T>::type* p, int64_t N) {
  for (int64_t n0 = 0; n0 < N; n0 += EB) {
    const int64_t m = (N - n0) < EB ? (N - n0) : EB;
    store(dst + n0, load(dst + n0, m) + lane_sums(p + n0), m);
  }
}

// A tile: blocks j < K of sequence b[j], first channel e0[j], channel count ne[j]. In the
// backward, gB[j] and gC[j] are the partial-sum buffers block j adds into, and last[j] says
// that block j + 1 adds elsewhere (another sequence or buffer), so sums over lanes are due.
struct Tile {
  int64_t K;
  int64_t b[64], e0[64], ne[64];
  bool last[64];
};

template <typename T>
constexpr int64_t kmax(int64_t bytes) {
  return bytes / (EB * (int64_t)sizeof(T)) > 1 ? bytes / (EB * (int64_t)sizeof(T)) : 1;
}

// Forward through one tile: writes out and, when ckpt is not null, the state before every chunk.
// Scratch: 2 * K * N vectors.
template <typename T>
void forward_tile(const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C, const T* D,
                  const T* z, T* out, T* ckpt, const Tile& tl, typename Vec<T>::type* scratch) {
  typedef typename Vec<T>::type V;
  const int64_t N = d.N, E = d.E, K = tl.K;
  V* a = scratch;       // a[j * N + n]: A of block j
  V* h = a + K * N;     // h[j * N + n]: state of block j
  V Dv[64];
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t n = 0; n < N; ++n) {
      a[j * N + n] = load(At + n * E + tl.e0[j], tl.ne[j]) * kLog2e<T>;  // A log2(e)
      h[j * N + n] = V{};
    }
    Dv[j] = D != nullptr ? load(D + tl.e0[j], tl.ne[j]) : V{};
  }
  for (int64_t t = 0, k = 0; t < d.L; ++t, ++k) {
    if (k == d.chunk) k = 0;
    if (ckpt != nullptr && k == 0) {
      for (int64_t j = 0; j < K; ++j) {
        T* ck = ckpt + ((t / d.chunk) * d.Bw + tl.b[j]) * N * E + tl.e0[j];
        for (int64_t n = 0; n < N; ++n) store(ck + n * E, h[j * N + n], tl.ne[j]);
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = t * d.Bw + tl.b[j], e0 = tl.e0[j], ne = tl.ne[j];
      const V dt = load(delta + row * d.ld_delta + e0, ne);
      const V uu = load(u + row * d.ld_u + e0, ne);
      const V du = dt * uu;
      const T* Bt = B + row * d.ld_B;
      const T* Ct = C + row * d.ld_C;
      const V* aj = a + j * N;
      V* hj = h + j * N;
      V acc = Dv[j] * uu;
      for (int64_t n = 0; n < N; ++n) {
        hj[n] = vexp2(dt * aj[n]) * hj[n] + du * Bt[n];
        acc += Ct[n] * hj[n];
      }
      if (z != nullptr) {
        const V zz = load(z + row * d.ld_z + e0, ne);
        acc *= zz * sigmoid<T>(zz);
      }
      store(out + row * E + e0, acc, ne);
    }
  }
}

// Backward through one tile. For each chunk, from the last: a forward pass recomputes the
// states from the chunk's checkpoint (keeping exp(delta A) and exp(delta A) h_{t-1}) and
// everything that needs only states and dL/dout (g_z, dL/dy, g_C); a reverse pass carries
// dL/dh back through the chunk (g_u, g_delta, g_A, g_B, g_D). Writes g_u, g_delta and g_z
// (row stride E) of the tile's channels; adds into gB[j] and gC[j] (rows of N), gA (K * N
// vectors, laid out like At) and gD (K vectors).
template <typename T>
inline int64_t backward_scratch(const Args& d, int64_t K) {
  return K * ((2 * d.chunk + 3) * d.N + d.chunk + 1) + MAXN;
}

template <typename T>
void backward_tile(const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C, const T* D,
                   const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* const* gB, T* const* gC,
                   typename Vec<T>::type* gA, typename Vec<T>::type* gD, const Tile& tl,
                   typename Vec<T>::type* scratch) {
  typedef typename Vec<T>::type V;
  const int64_t N = d.N, E = d.E, L = d.L, K = tl.K, KN = tl.K * d.N;
  const V one = V{} + 1;
  V* a = scratch;                   // a[j * N + n]
  V* carry = a + KN;                // carry[j * N + n]: dL/dh_t through h_{t+1}
  V* h = carry + KN;                // h[j * N + n]: the state, in the recompute pass
  V* Dv = h + KN;                   // Dv[j]
  V* ebuf = Dv + K;                 // ebuf[(k * K + j) * N + n]: exp(delta A) at step k of the chunk
  V* qbuf = ebuf + d.chunk * KN;    // qbuf[...]: exp(delta A) h_{t-1} at step k
  V* gbuf = qbuf + d.chunk * KN;    // gbuf[k * K + j]: dL/dy at step k
  V* acc = gbuf + d.chunk * K;      // acc[n]: lane-wise terms of gB or gC, summed over a row's blocks
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t n = 0; n < N; ++n) {
      a[j * N + n] = load(At + n * E + tl.e0[j], tl.ne[j]) * kLog2e<T>;  // A log2(e)
      carry[j * N + n] = V{};
    }
    Dv[j] = D != nullptr ? load(D + tl.e0[j], tl.ne[j]) : V{};
  }
  for (int64_t n = 0; n < MAXN; ++n) acc[n] = V{};
  const int64_t nchunk = (L + d.chunk - 1) / d.chunk;
  for (int64_t c = nchunk - 1; c >= 0; --c) {
    const int64_t t0 = c * d.chunk;
    const int64_t len = (L - t0) < d.chunk ? (L - t0) : d.chunk;
    for (int64_t j = 0; j < K; ++j) {
      const T* ck = ckpt + (c * d.Bw + tl.b[j]) * N * E + tl.e0[j];
      for (int64_t n = 0; n < N; ++n) h[j * N + n] = load(ck + n * E, tl.ne[j]);
    }
    for (int64_t k = 0; k < len; ++k) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = (t0 + k) * d.Bw + tl.b[j], e0 = tl.e0[j], ne = tl.ne[j];
        const V dt = load(delta + row * d.ld_delta + e0, ne);
        const V uu = load(u + row * d.ld_u + e0, ne);
        V g = load(gout + row * E + e0, ne);  // dL/dout, then dL/dy
        const V du = dt * uu;
        const T* Bt = B + row * d.ld_B;
        const T* Ct = C + row * d.ld_C;
        const V* aj = a + j * N;
        V* hj = h + j * N;
        V* ek = ebuf + (k * K + j) * N;
        V* qk = qbuf + (k * K + j) * N;
        V y = Dv[j] * uu;
        for (int64_t n = 0; n < N; ++n) {
          const V e = vexp2(dt * aj[n]);
          const V q = e * hj[n];
          ek[n] = e;
          qk[n] = q;
          hj[n] = q + du * Bt[n];
          y += Ct[n] * hj[n];
        }
        if (z != nullptr) {
          const V zz = load(z + row * d.ld_z + e0, ne);
          const V sg = sigmoid<T>(zz);
          store(gz + row * E + e0, g * y * sg * (one + zz * (one - sg)), ne);  // silu' = sg (1 + z (1 - sg))
          g *= zz * sg;
        }
        for (int64_t n = 0; n < N; ++n) acc[n] += hj[n] * g;
        gbuf[k * K + j] = g;
        if (tl.last[j]) {  // g_C of this row: sum over the lanes of its blocks
          add_lane_sums(gC[j] + row * N, acc, N);
          for (int64_t n = 0; n < N; ++n) acc[n] = V{};
        }
      }
    }
    for (int64_t k = len - 1; k >= 0; --k) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = (t0 + k) * d.Bw + tl.b[j], e0 = tl.e0[j], ne = tl.ne[j];
        const V dt = load(delta + row * d.ld_delta + e0, ne);
        const V uu = load(u + row * d.ld_u + e0, ne);
        const V g = gbuf[k * K + j];
        const V du = dt * uu;
        const T* Bt = B + row * d.ld_B;
        const T* Ct = C + row * d.ld_C;
        const V* aj = a + j * N;
        const V* ek = ebuf + (k * K + j) * N;
        const V* qk = qbuf + (k * K + j) * N;
        V* cj = carry + j * N;
        V* gAj = gA + j * N;
        V gd{}, s{};
        for (int64_t n = 0; n < N; ++n) {
          const V gh = cj[n] + Ct[n] * g;  // dL/dh_t
          const V G = gh * qk[n];          // dL/d(delta_t A)
          gAj[n] += G * dt;
          gd += G * aj[n];  // with A log2(e): times ln 2 below
          s += Bt[n] * gh;
          cj[n] = ek[n] * gh;
          acc[n] += gh * du;
        }
        if (tl.last[j]) {  // g_B of this row
          add_lane_sums(gB[j] + row * N, acc, N);
          for (int64_t n = 0; n < N; ++n) acc[n] = V{};
        }
        gD[j] += g * uu;
        store(gdelta + row * E + e0, gd * kLn2<T> + s * uu, ne);
        store(gu + row * E + e0, s * dt + g * Dv[j], ne);
      }
    }
  }
}

// Forward work items [begin, end): item = b * nblk + channel block; tiles of consecutive items.
template <typename T>
void forward_items(const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C, const T* D,
                   const T* z, T* out, T* ckpt, int64_t begin, int64_t end) {
  typedef typename Vec<T>::type V;
  const int64_t nblk = (d.E + EB - 1) / EB, K = kmax<T>(TILE_FWD);
  V* scratch = new V[2 * K * d.N];
  Tile tl;
  for (int64_t first = begin; first < end; first += K) {
    tl.K = (end - first) < K ? (end - first) : K;
    for (int64_t j = 0; j < tl.K; ++j) {
      tl.b[j] = (first + j) / nblk;
      tl.e0[j] = ((first + j) % nblk) * EB;
      tl.ne[j] = (d.E - tl.e0[j]) < EB ? (d.E - tl.e0[j]) : EB;
    }
    forward_tile(d, u, delta, At, B, C, D, z, out, ckpt, tl, scratch);
  }
  delete[] scratch;
}

// Backward work items [begin, end): item = b * groups + g, group g being the channel blocks
// [g * per_group, (g + 1) * per_group). gB and gC: (groups, L, Bw, N) partial sums over the
// groups (zero-initialised); gA_part: (Bw, N, E) and gD_part: (Bw, E), sums over time.
template <typename T>
void backward_items(const Args& d, const T* u, const T* delta, const T* At, const T* B, const T* C, const T* D,
                    const T* z, const T* ckpt, const T* gout, T* gu, T* gdelta, T* gz, T* gB, T* gC, T* gA_part,
                    T* gD_part, int64_t groups, int64_t per_group, int64_t begin, int64_t end) {
  typedef typename Vec<T>::type V;
  const int64_t N = d.N, E = d.E, nblk = (E + EB - 1) / EB, K = kmax<T>(TILE_BWD);
  V* scratch = new V[backward_scratch<T>(d, K) + K * (N + 1)];
  V* gA = scratch + backward_scratch<T>(d, K);
  V* gD = gA + K * N;
  T* gBj[64];
  T* gCj[64];
  Tile tl;
  tl.K = 0;
  auto flush = [&]() {
    if (tl.K == 0) return;
    for (int64_t i = 0; i < tl.K * N; ++i) gA[i] = V{};
    for (int64_t j = 0; j < tl.K; ++j) gD[j] = V{};
    backward_tile(d, u, delta, At, B, C, D, z, ckpt, gout, gu, gdelta, gz, gBj, gCj, gA, gD, tl, scratch);
    for (int64_t j = 0; j < tl.K; ++j) {
      for (int64_t n = 0; n < N; ++n) store(gA_part + (tl.b[j] * N + n) * E + tl.e0[j], gA[j * N + n], tl.ne[j]);
      store(gD_part + tl.b[j] * E + tl.e0[j], gD[j], tl.ne[j]);
    }
    tl.K = 0;
  };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / groups, g = item % groups;
    const int64_t blk_end = (g + 1) * per_group < nblk ? (g + 1) * per_group : nblk;
    for (int64_t blk = g * per_group; blk < blk_end; ++blk) {
      const int64_t j = tl.K++;
      tl.b[j] = b;
      tl.e0[j] = blk * EB;
      tl.ne[j] = (E - tl.e0[j]) < EB ? (E - tl.e0[j]) : EB;
      gBj[j] = gB + g * d.L * d.Bw * N;
      gCj[j] = gC + g * d.L * d.Bw * N;
      if (j > 0) tl.last[j - 1] = tl.b[j - 1] != b || gBj[j - 1] != gBj[j];
      tl.last[j] = true;
      if (tl.K == K) flush();
    }
  }
  flush();
  delete[] scratch;
}

}  // namespace SCAN_KERNEL_NS
