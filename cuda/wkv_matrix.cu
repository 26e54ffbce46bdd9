// Matrix-state WKV on CUDA: RWKV-6 (causal, and the reversed scan of the bidirectional form) and RWKV-7, forward
// and backward, with state in and out.
//
// WKV-6 per head (float64 reference: blocks/wkv6.py), S [N, N] with rows = key channels i, columns = value channels j:
//   y_t = S_{t-1}^T r_t + v_t (r_t . (u * k_t)),   S_t = diag(w_t) S_{t-1} + k_t v_t^T,   w_t = exp(-exp(d_t))
// WKV-7 per head (float64 reference: blocks/wkv7.py), S with rows = value channels i, columns = key channels j:
//   S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t,   w_t = exp(log_w_t)
//
// One block walks one (batch, head) through the sequence; each row or column of S (or of its gradient dS) is held in
// the registers of kParts threads (each holding kRows of them), which sum their partial dot products with warp
// shuffles. The per-token vectors a step reads are staged in shared memory kChunk tokens at a time, read from global
// memory in 16-byte words, the next chunk's loads in flight meanwhile.
//
// The backward steps no state back (no division by a decay). Every gradient but the decay's needs either the states
// (a walk forward in time) or their gradients (a walk backward), each in one layout:
//   WKV-6: S rows (forward) give dr; dS rows (backward) dk, du and dS_0; dS columns (backward) dv; three independent
//          walks, one launch.
//   WKV-7: the forward keeps sa_t = S_{t-1} a_t; dS rows (backward) give dv, dsa_t = dS_t b_t and dS_0; then S columns
//          (forward, from sa) give dr and da, and dS columns (backward, from dsa) dk and db, in one launch.
// The decay's gradient: scaling the key axis of S_t by e^{-c_t}, c_t = sum_{m<=t} log w_m, removes the decays and
// scales r, k (and a, b) by e^{+-c} instead, so dL/dc_m is a sum of x dL/dx over those, and dL/dlog w_t =
// sum_{m>=t} dL/dc_m, a suffix sum (accumulated in fp64):
//   WKV-6: dL/dc_m = r_{m+1} dr'_{m+1} - k_m dk'_m (+ sum_j dS_T S_T over the row at m = T-1; ' = without the bonus)
//   WKV-7: dL/dc_m = r_m dr_m - k_m dk_m - b_m db_m + a_{m+1} da_{m+1} (+ sum_i dS_T S_T over the column at m = T-1)
// Inputs [B, T, H, N] in fp32, bf16 or fp16 (fp32 arithmetic and state) or fp64 (fp64, for gradcheck); any B, T >= 1;
// head sizes N = 32, 64, 80, 128 (fp64: 32, 64).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int kChunk = 8;  // tokens staged per shared-memory round

// Each thread holds a tile of a state: kRows consecutive rows, and of each row the elements in groups of 4 consecutive
// ones, the groups dealt out over the row's kParts threads in turn (so that they read consecutive 16-byte words of a
// shared vector together, free of bank conflicts); a step reads each shared vector element once for its kRows rows.
// Head size 64: of 1 x 2, 1 x 4, 2 x 2, 2 x 4, 4 x 4 and 4 x 8, 2 x 2 was the fastest tile for WKV-7 and the WKV-6
// backward, 4 x 4 for the WKV-6 forward (BENCHMARKS.md, issue 9); other sizes keep about as many elements a thread
// (not measured).
constexpr int kRows = 2;
template <int N>
constexpr int kParts = N <= 64 ? 2 : 4;
template <int N>
constexpr int kRows6 = N == 64 ? 4 : kRows;  // the WKV-6 forward's tile
template <int N>
constexpr int kParts6 = N == 64 ? 4 : kParts<N>;
template <int N, int R = kRows, int P = kParts<N>>
constexpr int kThreads = N / R * P;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Element 0 of head h at logical token t in a [B, T, H, N] tensor; reverse: logical time runs from the last token.
template <int N>
struct Tokens {
  int64_t T, H;
  bool reverse;
  __device__ __forceinline__ int64_t at(int64_t b, int64_t h, int64_t t) const {
    return ((b * T + (reverse ? T - 1 - t : t)) * H + h) * N;
  }
};

template <int N, int R = kRows, int P = kParts<N>>
struct Part {  // R rows a thread, P threads a row
  static constexpr int L = N / P, Q = L / 4;  // elements of each row held, groups of 4
  static_assert(N % (4 * P) == 0 && N % R == 0 && kThreads<N, R, P> % 32 == 0, "no tile for this size");
  int row0, part;  // rows row0 .. row0 + R - 1
  __device__ __forceinline__ static Part self() {
    return {int(threadIdx.x) / P * R, int(threadIdx.x) % P};
  }
  // f(m, e, i) for each held element: row row0 + m, e its register index in the row, i its index in the row
  template <typename F>
  __device__ __forceinline__ void each(F f) const {
#pragma unroll
    for (int q = 0; q < Q; ++q)
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int m = 0; m < R; ++m) f(m, 4 * q + c, 4 * (part + P * q) + c);
  }
  // f(m) for each held row row0 + m
  template <typename F>
  __device__ __forceinline__ static void rows(F f) {
#pragma unroll
    for (int m = 0; m < R; ++m) f(m);
  }
  // out[m] = x[row0 + m]
  template <typename A>
  __device__ __forceinline__ void of_rows(const A* x, A (&out)[R]) const {
    rows([&](int m) { out[m] = x[row0 + m]; });
  }
  // whether this thread, of the row's P, writes row row0 + m's outputs
  __device__ __forceinline__ bool writes(int m) const { return m % P == part; }
  // x[m] summed over the P threads of each row (consecutive lanes of one warp)
  template <typename A>
  __device__ __forceinline__ static void sum(A (&x)[R]) {
#pragma unroll
    for (int o = 1; o < P; o <<= 1) rows([&](int m) { x[m] += __shfl_xor_sync(0xffffffffu, x[m], o); });
  }
};

// Elements of T in one 16-byte load.
template <typename T>
constexpr int kLoadWidth = 16 / sizeof(T);

// K consecutive elements of T read with 16-byte loads from a 16-byte-aligned address. They are kept as the loaded
// words and unpacked where an element is read, so that a prefetch stays in flight until its data is staged.
template <typename T, int K = kLoadWidth<T>>
struct Vec {
  static constexpr int kWords = K * sizeof(T) / 16;
  static_assert(kWords * 16 == K * sizeof(T), "a whole number of 16-byte words");
  uint4 words[kWords];
  __device__ __forceinline__ static Vec at(const T* p) {
    Vec v;
#pragma unroll
    for (int w = 0; w < kWords; ++w) v.words[w] = __ldg(reinterpret_cast<const uint4*>(p) + w);
    return v;
  }
  __device__ __forceinline__ uint32_t bits(int i) const {  // the i-th 32 bits
    const uint4& w = words[i / 4];
    return i % 4 == 0 ? w.x : i % 4 == 1 ? w.y : i % 4 == 2 ? w.z : w.w;
  }
  __device__ __forceinline__ T operator[](int c) const {
    if constexpr (std::is_same_v<T, double>) return __hiloint2double(bits(2 * c + 1), bits(2 * c));
    else if constexpr (std::is_same_v<T, float>) return __uint_as_float(bits(c));
    else return T(static_cast<uint16_t>(c % 2 ? bits(c / 2) >> 16 : bits(c / 2)), T::from_bits());  // Half, BFloat16
  }
};

// x[0 .. K-1] to p (16-byte aligned) in 16-byte words.
template <typename A, int K>
__device__ __forceinline__ void store_words(A* p, const A (&x)[K]) {
  if constexpr (std::is_same_v<A, double>) {
#pragma unroll
    for (int w = 0; w < K / 2; ++w) reinterpret_cast<double2*>(p)[w] = make_double2(x[2 * w], x[2 * w + 1]);
  } else {
#pragma unroll
    for (int w = 0; w < K / 4; ++w)
      reinterpret_cast<float4*>(p)[w] = make_float4(x[4 * w], x[4 * w + 1], x[4 * w + 2], x[4 * w + 3]);
  }
}

// Walks logical tokens 0..T-1 (or T-1..0 when backward), kChunk at a time. load(t, n, raw) starts this thread's loads
// of elements n .. n + Raw::kWidth - 1 of token t (kept raw, so they stay in flight while the previous chunk is
// processed); stage(raw, c, n + c, slots) sets slots[v][c] to the c-th of them (channel n + c) in the token's shared
// vector v, and walk stores the slots to shared memory in 16-byte words; step(t, vectors, dot) processes token t,
// where dot = sum_n vectors[kDot][n] (kDot < 0: none). The kBlock threads share the chunk's kChunk * N / kWidth
// pieces of kWidth elements.
template <int N, int V, int kDot, typename A, typename Raw, int kBlock = kThreads<N>, typename Load, typename Stage,
          typename Step>
__device__ __forceinline__ void walk(int64_t T, bool backward, A (*smem)[V][N], Load load, Stage stage, Step step) {
  constexpr int kWidth = Raw::kWidth, kPieces = N / kWidth, kPer = (kChunk * kPieces + kBlock - 1) / kBlock;
  static_assert(N % kWidth == 0 && kWidth * sizeof(A) % 16 == 0, "whole pieces of 16-byte words");
  __shared__ A partial[kChunk][kPieces], dots[kChunk];  // kDot's sums: each piece's, each token's
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  auto token = [&](int64_t i) { return backward ? T - 1 - i : i; };
  auto piece = [](int m) { return m * kBlock + int(threadIdx.x); };  // this thread's m-th piece of a chunk
  Raw raw[kPer];
  auto fetch = [&](int64_t c) {
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
      const int j = piece(m) / kPieces;
      if (j < kChunk && c * kChunk + j < T) load(token(c * kChunk + j), piece(m) % kPieces * kWidth, raw[m]);
    }
  };
  fetch(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int len = static_cast<int>(T - c * kChunk < kChunk ? T - c * kChunk : kChunk);
    __syncthreads();  // the previous chunk's readers are done
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
      const int j = piece(m) / kPieces, n = piece(m) % kPieces * kWidth;
      if (j < len) {
        A slots[V][kWidth];
#pragma unroll
        for (int e = 0; e < kWidth; ++e) stage(raw[m], e, n + e, slots);
#pragma unroll
        for (int v = 0; v < V; ++v) store_words(&smem[j][v][n], slots[v]);
        if constexpr (kDot >= 0) {
          A sum = 0;
#pragma unroll
          for (int e = 0; e < kWidth; ++e) sum += slots[kDot][e];
          partial[j][n / kWidth] = sum;
        }
      }
    }
    __syncthreads();
    if (c + 1 < chunks) fetch(c + 1);
    if constexpr (kDot >= 0) {
      if (threadIdx.x < len) {
        A sum = 0;
#pragma unroll
        for (int i = 0; i < kPieces; ++i) sum += partial[threadIdx.x][i];
        dots[threadIdx.x] = sum;
      }
      __syncthreads();
    }
    for (int j = 0; j < len; ++j) step(token(c * kChunk + j), smem[j], kDot >= 0 ? dots[j] : A(0));
  }
}

// ---------------------------------------------------------------------------------------------------- WKV-6

template <typename scalar_t>
struct Wkv6Raw {
  static constexpr int kWidth = kLoadWidth<scalar_t>;
  Vec<scalar_t> r, k, d, v;
};

template <typename scalar_t>
struct Wkv6Grad {
  static constexpr int kWidth = kLoadWidth<scalar_t>;
  Vec<scalar_t> r, k, d, v, dy;
};

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads<N, kRows6<N>, kParts6<N>>) wkv6_forward_kernel(
    Tokens<N> g, const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ d, const acc_t<scalar_t>* u, const acc_t<scalar_t>* s0, scalar_t* __restrict__ y,
    acc_t<scalar_t>* s_out) {
  using A = acc_t<scalar_t>;
  enum { R, K, W, V, RUK, kSlots };
  __shared__ __align__(16) A smem[kChunk][kSlots][N];
  __shared__ A us[N];
  using Tile = Part<N, kRows6<N>, kParts6<N>>;
  constexpr int kBlock = kThreads<N, kRows6<N>, kParts6<N>>;
  const auto p = Tile::self();  // rows: value channels j; elements: key channels i of S[:, j]
  const int64_t b = blockIdx.x / g.H, h = blockIdx.x % g.H, head = blockIdx.x * int64_t(N * N);
  for (int i = threadIdx.x; i < N; i += kBlock) us[i] = u[h * N + i];  // read after walk's first barrier
  A S[kRows6<N>][Tile::L];
  p.each([&](int m, int e, int i) { S[m][e] = s0[head + i * N + p.row0 + m]; });
  walk<N, kSlots, RUK, A, Wkv6Raw<scalar_t>, kBlock>(
      g.T, false, smem,
      [&](int64_t t, int n, Wkv6Raw<scalar_t>& x) {
        const int64_t o = g.at(b, h, t) + n;
        x = {Vec<scalar_t>::at(r + o), Vec<scalar_t>::at(k + o), Vec<scalar_t>::at(d + o), Vec<scalar_t>::at(v + o)};
      },
      [&](const Wkv6Raw<scalar_t>& x, int c, int n, auto& s) {
        s[R][c] = A(x.r[c]);
        s[K][c] = A(x.k[c]);
        s[W][c] = exp(-exp(A(x.d[c])));
        s[V][c] = A(x.v[c]);
        s[RUK][c] = A(x.r[c]) * us[n] * A(x.k[c]);
      },
      [&](int64_t t, const A (*s)[N], A ruk) {
        A vj[kRows6<N>], out[kRows6<N>] = {};
        p.of_rows(s[V], vj);
        p.each([&](int m, int e, int i) {
          out[m] += s[R][i] * S[m][e];
          S[m][e] = s[W][i] * S[m][e] + s[K][i] * vj[m];
        });
        Tile::sum(out);
        p.rows([&](int m) {
          if (p.writes(m)) y[g.at(b, h, t) + p.row0 + m] = static_cast<scalar_t>(out[m] + vj[m] * ruk);
        });
      });
  p.each([&](int m, int e, int i) { s_out[head + i * N + p.row0 + m] = S[m][e]; });
}

// Role 0: S rows, forward (dr; shifted[t] = r_{t+1} dr'_{t+1}). Role 1: dS rows, backward (dk, du, dS_0;
// decay_terms[t] = -k_t dk'_t, plus the final state's term at T-1). Role 2: dS columns, backward (dv).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads<N>) wkv6_backward_kernel(
    Tokens<N> g, const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ d, const acc_t<scalar_t>* u, const acc_t<scalar_t>* s0,
    const acc_t<scalar_t>* s_out, const scalar_t* __restrict__ gy, const acc_t<scalar_t>* gs_out,
    scalar_t* __restrict__ gr, scalar_t* __restrict__ gk, scalar_t* __restrict__ gv, acc_t<scalar_t>* gu_part,
    acc_t<scalar_t>* gs0, acc_t<scalar_t>* shifted, acc_t<scalar_t>* decay_terms) {
  using A = acc_t<scalar_t>;
  enum { R, K, W, V, DY, P, kSlots };  // P: dy * v (rows), r * u * k (columns)
  __shared__ __align__(16) A smem[kChunk][kSlots][N];
  __shared__ A us[N];
  const int role = blockIdx.y;
  const auto p = Part<N>::self();  // rows: key channels i (roles 0, 1) or value channels j (role 2)
  const int64_t b = blockIdx.x / g.H, h = blockIdx.x % g.H, head = blockIdx.x * int64_t(N * N);
  for (int i = threadIdx.x; i < N; i += kThreads<N>) us[i] = u[h * N + i];  // read after walk's first barrier
  A u_row[kRows];
  p.of_rows(u + h * N, u_row);
  auto load = [&](int64_t t, int n, Wkv6Grad<scalar_t>& x) {
    const int64_t o = g.at(b, h, t) + n;
    x = {Vec<scalar_t>::at(r + o), Vec<scalar_t>::at(k + o), Vec<scalar_t>::at(d + o), Vec<scalar_t>::at(v + o),
         Vec<scalar_t>::at(gy + o)};
  };
  auto stage = [&](const Wkv6Grad<scalar_t>& x, int c, int n, auto& s) {
    s[R][c] = A(x.r[c]);
    s[K][c] = A(x.k[c]);
    s[W][c] = exp(-exp(A(x.d[c])));
    s[V][c] = A(x.v[c]);
    s[DY][c] = A(x.dy[c]);
    s[P][c] = role == 2 ? A(x.r[c]) * us[n] * A(x.k[c]) : A(x.dy[c]) * A(x.v[c]);
  };
  A M[kRows][Part<N>::L];  // S or dS: parts of rows (roles 0, 1) or of columns (role 2) row0 .. row0 + kRows - 1
  // Roles 0 and 1, a token: out = S s[read] (each row), then S <- diag(w) S + x s[add]^T.
  auto row_step = [&](A (&S)[kRows][Part<N>::L], const A (*s)[N], int read, int add, const A (&w)[kRows],
                      const A (&x)[kRows], A (&out)[kRows]) {
    p.each([&](int m, int e, int j) {
      out[m] += S[m][e] * s[read][j];
      S[m][e] = w[m] * S[m][e] + x[m] * s[add][j];
    });
    Part<N>::sum(out);
  };
  if (role == 0) {
    p.each([&](int m, int e, int j) { M[m][e] = s0[head + (p.row0 + m) * N + j]; });
    walk<N, kSlots, P, A, Wkv6Grad<scalar_t>>(g.T, false, smem, load, stage,
                                             [&](int64_t t, const A (*s)[N], A dyv) {
                                               A wi[kRows], ki[kRows], drn[kRows] = {};
                                               p.of_rows(s[W], wi);
                                               p.of_rows(s[K], ki);
                                               row_step(M, s, DY, V, wi, ki, drn);
                                               p.rows([&](int m) {
                                                 if (!p.writes(m)) return;
                                                 const int64_t o = g.at(b, h, t) + p.row0 + m;
                                                 gr[o] = static_cast<scalar_t>(drn[m] + u_row[m] * ki[m] * dyv);
                                                 if (t > 0) shifted[g.at(b, h, t - 1) + p.row0 + m] =
                                                     s[R][p.row0 + m] * drn[m];
                                               });
                                             });
    p.rows([&](int m) {
      if (p.writes(m)) shifted[g.at(b, h, g.T - 1) + p.row0 + m] = A(0);
    });
  } else if (role == 1) {
    A fin[kRows] = {}, du[kRows] = {};
    p.each([&](int m, int e, int j) {
      M[m][e] = gs_out[head + (p.row0 + m) * N + j];
      fin[m] += M[m][e] * s_out[head + (p.row0 + m) * N + j];
    });
    Part<N>::sum(fin);
    walk<N, kSlots, P, A, Wkv6Grad<scalar_t>>(g.T, true, smem, load, stage,
                                             [&](int64_t t, const A (*s)[N], A dyv) {
                                               A wi[kRows], ri[kRows], ki[kRows], dkn[kRows] = {};
                                               p.of_rows(s[W], wi);
                                               p.of_rows(s[R], ri);
                                               p.of_rows(s[K], ki);
                                               row_step(M, s, V, DY, wi, ri, dkn);
                                               p.rows([&](int m) {
                                                 du[m] += ri[m] * ki[m] * dyv;
                                                 if (!p.writes(m)) return;
                                                 const int64_t o = g.at(b, h, t) + p.row0 + m;
                                                 gk[o] = static_cast<scalar_t>(dkn[m] + u_row[m] * ri[m] * dyv);
                                                 decay_terms[o] = -ki[m] * dkn[m] + (t == g.T - 1 ? fin[m] : A(0));
                                               });
                                             });
    p.each([&](int m, int e, int j) { gs0[head + (p.row0 + m) * N + j] = M[m][e]; });
    p.rows([&](int m) {
      if (p.writes(m)) gu_part[blockIdx.x * int64_t(N) + p.row0 + m] = du[m];
    });
  } else {
    p.each([&](int m, int e, int i) { M[m][e] = gs_out[head + i * N + p.row0 + m]; });
    walk<N, kSlots, P, A, Wkv6Grad<scalar_t>>(g.T, true, smem, load, stage,
                                             [&](int64_t t, const A (*s)[N], A ruk) {
                                               A dyj[kRows], dv[kRows] = {};
                                               p.of_rows(s[DY], dyj);
                                               p.each([&](int m, int e, int i) {
                                                 dv[m] += M[m][e] * s[K][i];
                                                 M[m][e] = s[W][i] * M[m][e] + s[R][i] * dyj[m];
                                               });
                                               Part<N>::sum(dv);
                                               p.rows([&](int m) {
                                                 if (p.writes(m))
                                                   gv[g.at(b, h, t) + p.row0 + m] =
                                                       static_cast<scalar_t>(dv[m] + dyj[m] * ruk);
                                               });
                                             });
  }
}

// ---------------------------------------------------------------------------------------------------- WKV-7

template <typename scalar_t>
struct Wkv7Raw {
  static constexpr int kWidth = kLoadWidth<scalar_t>;
  Vec<scalar_t> r, lw, k, a, b, x;  // x: v (forward) or dy (backward rows)
  // elements o .. o + kWidth - 1 of each
  __device__ __forceinline__ static Wkv7Raw at(const scalar_t* r, const scalar_t* lw, const scalar_t* k,
                                               const scalar_t* a, const scalar_t* b, const scalar_t* x, int64_t o) {
    return {Vec<scalar_t>::at(r + o), Vec<scalar_t>::at(lw + o), Vec<scalar_t>::at(k + o),
            Vec<scalar_t>::at(a + o), Vec<scalar_t>::at(b + o), Vec<scalar_t>::at(x + o)};
  }
  // the c-th elements as slots of a token's shared vectors r, w = exp(log w), k, a, b, x (slots 0 to 5)
  template <typename A, int W>
  __device__ __forceinline__ void stage(int c, A (&s)[6][W]) const {
    s[0][c] = A(r[c]);
    s[1][c] = exp(A(lw[c]));
    s[2][c] = A(k[c]);
    s[3][c] = A(a[c]);
    s[4][c] = A(b[c]);
    s[5][c] = A(x[c]);
  }
};

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads<N>) wkv7_forward_kernel(
    Tokens<N> g, const scalar_t* __restrict__ r, const scalar_t* __restrict__ lw, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ a, const scalar_t* __restrict__ bb,
    const acc_t<scalar_t>* s0, scalar_t* __restrict__ y, acc_t<scalar_t>* s_out, acc_t<scalar_t>* sa_out) {
  using A = acc_t<scalar_t>;
  enum { R, W, K, AA, BB, V, kSlots };  // Wkv7Raw::stage's order
  __shared__ __align__(16) A smem[kChunk][kSlots][N];
  const auto p = Part<N>::self();  // rows: value channels i; elements: key channels j of S[i, :]
  const int64_t b = blockIdx.x / g.H, h = blockIdx.x % g.H, head = blockIdx.x * int64_t(N * N);
  A S[kRows][Part<N>::L];
  p.each([&](int m, int e, int j) { S[m][e] = s0[head + (p.row0 + m) * N + j]; });
  walk<N, kSlots, -1, A, Wkv7Raw<scalar_t>>(
      g.T, false, smem,
      [&](int64_t t, int n, Wkv7Raw<scalar_t>& x) {
        x = Wkv7Raw<scalar_t>::at(r, lw, k, a, bb, v, g.at(b, h, t) + n);
      },
      [&](const Wkv7Raw<scalar_t>& x, int c, int, auto& s) { x.stage(c, s); },
      [&](int64_t t, const A (*s)[N], A) {
        A sa[kRows] = {}, vi[kRows], out[kRows] = {};
        p.each([&](int m, int e, int j) { sa[m] += S[m][e] * s[AA][j]; });
        Part<N>::sum(sa);
        p.of_rows(s[V], vi);
        p.each([&](int m, int e, int j) {
          S[m][e] = S[m][e] * s[W][j] + (sa[m] * s[BB][j] + vi[m] * s[K][j]);
          out[m] += S[m][e] * s[R][j];
        });
        Part<N>::sum(out);
        p.rows([&](int m) {
          if (!p.writes(m)) return;
          const int64_t o = g.at(b, h, t) + p.row0 + m;
          y[o] = static_cast<scalar_t>(out[m]);
          if (sa_out) sa_out[o] = sa[m];
        });
      });
  p.each([&](int m, int e, int j) { s_out[head + (p.row0 + m) * N + j] = S[m][e]; });
}

// dS rows, backward: dv, dsa_t = dS_t b_t and dS_0.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads<N>) wkv7_backward_rows_kernel(
    Tokens<N> g, const scalar_t* __restrict__ r, const scalar_t* __restrict__ lw, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ bb, const scalar_t* __restrict__ gy,
    const acc_t<scalar_t>* gs_out, scalar_t* __restrict__ gv, acc_t<scalar_t>* dsa_out, acc_t<scalar_t>* gs0) {
  using A = acc_t<scalar_t>;
  enum { R, W, K, AA, BB, DY, kSlots };  // Wkv7Raw::stage's order
  __shared__ __align__(16) A smem[kChunk][kSlots][N];
  const auto p = Part<N>::self();  // rows: value channels i
  const int64_t b = blockIdx.x / g.H, h = blockIdx.x % g.H, head = blockIdx.x * int64_t(N * N);
  A dS[kRows][Part<N>::L];
  p.each([&](int m, int e, int j) { dS[m][e] = gs_out[head + (p.row0 + m) * N + j]; });
  walk<N, kSlots, -1, A, Wkv7Raw<scalar_t>>(
      g.T, true, smem,
      [&](int64_t t, int n, Wkv7Raw<scalar_t>& x) {
        x = Wkv7Raw<scalar_t>::at(r, lw, k, a, bb, gy, g.at(b, h, t) + n);
      },
      [&](const Wkv7Raw<scalar_t>& x, int c, int, auto& s) { x.stage(c, s); },
      [&](int64_t t, const A (*s)[N], A) {
        A dyi[kRows], dsa[kRows] = {}, dv[kRows] = {};
        p.of_rows(s[DY], dyi);
        p.each([&](int m, int e, int j) {
          dS[m][e] += dyi[m] * s[R][j];
          dsa[m] += dS[m][e] * s[BB][j];
          dv[m] += dS[m][e] * s[K][j];
        });
        Part<N>::sum(dsa);
        Part<N>::sum(dv);
        p.each([&](int m, int e, int j) { dS[m][e] = dS[m][e] * s[W][j] + dsa[m] * s[AA][j]; });
        p.rows([&](int m) {
          if (!p.writes(m)) return;
          const int64_t o = g.at(b, h, t) + p.row0 + m;
          gv[o] = static_cast<scalar_t>(dv[m]);
          dsa_out[o] = dsa[m];
        });
      });
  p.each([&](int m, int e, int j) { gs0[head + (p.row0 + m) * N + j] = dS[m][e]; });
}

template <typename scalar_t>
struct Wkv7Cols {
  static constexpr int kWidth = kLoadWidth<scalar_t>;
  Vec<acc_t<scalar_t>, kWidth> sa, dsa;
  Vec<scalar_t> v, dy, r, lw, k, a, b;
};

// Role 0: S columns, forward from sa (dr, da; shifted[t] = r_t dr_t + a_{t+1} da_{t+1}). Role 1: dS columns,
// backward from dsa (dk, db; decay_terms[t] = -k_t dk_t - b_t db_t, plus the final state's term at T-1).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads<N>) wkv7_backward_columns_kernel(
    Tokens<N> g, const scalar_t* __restrict__ r, const scalar_t* __restrict__ lw, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ a, const scalar_t* __restrict__ bb,
    const acc_t<scalar_t>* s0, const acc_t<scalar_t>* s_out, const acc_t<scalar_t>* sa,
    const acc_t<scalar_t>* dsa, const scalar_t* __restrict__ gy, const acc_t<scalar_t>* gs_out,
    scalar_t* __restrict__ gr, scalar_t* __restrict__ gk, scalar_t* __restrict__ ga, scalar_t* __restrict__ gb,
    acc_t<scalar_t>* shifted, acc_t<scalar_t>* decay_terms) {
  using A = acc_t<scalar_t>;
  enum { SA, DSA, V, DY, R, W, K, AA, BB, kSlots };
  __shared__ __align__(16) A smem[kChunk][kSlots][N];
  const auto p = Part<N>::self();  // rows: key channels j; elements: value channels i of columns j of S or dS
  const int64_t b = blockIdx.x / g.H, h = blockIdx.x % g.H, head = blockIdx.x * int64_t(N * N);
  auto load = [&](int64_t t, int n, Wkv7Cols<scalar_t>& x) {
    const int64_t o = g.at(b, h, t) + n;
    using Sums = Vec<A, Wkv7Cols<scalar_t>::kWidth>;
    x = {Sums::at(sa + o),         Sums::at(dsa + o),       Vec<scalar_t>::at(v + o),
         Vec<scalar_t>::at(gy + o), Vec<scalar_t>::at(r + o), Vec<scalar_t>::at(lw + o),
         Vec<scalar_t>::at(k + o),  Vec<scalar_t>::at(a + o), Vec<scalar_t>::at(bb + o)};
  };
  auto stage = [&](const Wkv7Cols<scalar_t>& x, int c, int, auto& s) {
    s[SA][c] = x.sa[c];
    s[DSA][c] = x.dsa[c];
    s[V][c] = A(x.v[c]);
    s[DY][c] = A(x.dy[c]);
    s[R][c] = A(x.r[c]);
    s[W][c] = exp(A(x.lw[c]));
    s[K][c] = A(x.k[c]);
    s[AA][c] = A(x.a[c]);
    s[BB][c] = A(x.b[c]);
  };
  A M[kRows][Part<N>::L];
  if (blockIdx.y == 0) {
    p.each([&](int m, int e, int i) { M[m][e] = s0[head + i * N + p.row0 + m]; });
    A r_dr[kRows] = {};  // r_{t-1} dr_{t-1}
    walk<N, kSlots, -1, A, Wkv7Cols<scalar_t>>(g.T, false, smem, load, stage,
                                              [&](int64_t t, const A (*s)[N], A) {
                                                A wj[kRows], kj[kRows], bj[kRows];
                                                A da[kRows] = {}, dr[kRows] = {};
                                                p.of_rows(s[W], wj);
                                                p.of_rows(s[K], kj);
                                                p.of_rows(s[BB], bj);
                                                p.each([&](int m, int e, int i) {
                                                  da[m] += M[m][e] * s[DSA][i];
                                                  M[m][e] = M[m][e] * wj[m] + (s[SA][i] * bj[m] + s[V][i] * kj[m]);
                                                  dr[m] += M[m][e] * s[DY][i];
                                                });
                                                Part<N>::sum(da);
                                                Part<N>::sum(dr);
                                                p.rows([&](int m) {
                                                  const int j = p.row0 + m;
                                                  if (p.writes(m)) {
                                                    const int64_t o = g.at(b, h, t) + j;
                                                    gr[o] = static_cast<scalar_t>(dr[m]);
                                                    ga[o] = static_cast<scalar_t>(da[m]);
                                                    if (t > 0)
                                                      shifted[g.at(b, h, t - 1) + j] = r_dr[m] + s[AA][j] * da[m];
                                                  }
                                                  r_dr[m] = s[R][j] * dr[m];
                                                });
                                              });
    p.rows([&](int m) {
      if (p.writes(m)) shifted[g.at(b, h, g.T - 1) + p.row0 + m] = r_dr[m];
    });
  } else {
    A fin[kRows] = {};
    p.each([&](int m, int e, int i) {
      M[m][e] = gs_out[head + i * N + p.row0 + m];
      fin[m] += M[m][e] * s_out[head + i * N + p.row0 + m];
    });
    Part<N>::sum(fin);
    walk<N, kSlots, -1, A, Wkv7Cols<scalar_t>>(g.T, true, smem, load, stage,
                                              [&](int64_t t, const A (*s)[N], A) {
                                                A rj[kRows], wj[kRows], aj[kRows];
                                                A dk[kRows] = {}, db[kRows] = {};
                                                p.of_rows(s[R], rj);
                                                p.of_rows(s[W], wj);
                                                p.of_rows(s[AA], aj);
                                                p.each([&](int m, int e, int i) {
                                                  M[m][e] += s[DY][i] * rj[m];
                                                  dk[m] += M[m][e] * s[V][i];
                                                  db[m] += M[m][e] * s[SA][i];
                                                  M[m][e] = M[m][e] * wj[m] + s[DSA][i] * aj[m];
                                                });
                                                Part<N>::sum(dk);
                                                Part<N>::sum(db);
                                                p.rows([&](int m) {
                                                  const int j = p.row0 + m;
                                                  if (!p.writes(m)) return;
                                                  const int64_t o = g.at(b, h, t) + j;
                                                  gk[o] = static_cast<scalar_t>(dk[m]);
                                                  gb[o] = static_cast<scalar_t>(db[m]);
                                                  decay_terms[o] = -(s[K][j] * dk[m] + s[BB][j] * db[m]) +
                                                                   (t == g.T - 1 ? fin[m] : A(0));
                                                });
                                              });
  }
}

// out_t = scale_t sum_{m >= t} (x_m + y_m) over logical time in fp64; scale_t = log w_t = -exp(d_t) when the decay
// logits d are given (WKV-6: dL/dd = dL/dlog w * log w), else 1. A block takes 32 channels of one batch row, its
// kScanSegments warps consecutive segments of time: each warp sums its segment, the warps share their sums, and each
// walks its segment back from the sum of the segments after it.
constexpr int kScanSegments = 32;

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kScanSegments) suffix_sum_kernel(int64_t T, int64_t C, bool reverse,
                                                                        const acc_t<scalar_t>* x,
                                                                        const acc_t<scalar_t>* y,
                                                                        const scalar_t* __restrict__ d,
                                                                        scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  __shared__ double sums[kScanSegments][32];
  const int lane = threadIdx.x % 32, segment = threadIdx.x / 32;
  const int64_t groups = (C + 31) / 32, b = blockIdx.x / groups, c = blockIdx.x % groups * 32 + lane;
  const int64_t length = (T + kScanSegments - 1) / kScanSegments, start = segment * length;
  const int64_t end = start + length < T ? start + length : T;
  auto at = [&](int64_t t) { return (b * T + (reverse ? T - 1 - t : t)) * C + c; };
  double acc = 0;
  if (c < C) {
#pragma unroll 8
    for (int64_t t = start; t < end; ++t) acc += double(x[at(t)]) + double(y[at(t)]);
  }
  sums[segment][lane] = acc;
  __syncthreads();
  acc = 0;
  for (int later = segment + 1; later < kScanSegments; ++later) acc += sums[later][lane];
  if (c >= C) return;
#pragma unroll 8
  for (int64_t t = end - 1; t >= start; --t) {
    const int64_t o = at(t);
    acc += double(x[o]) + double(y[o]);
    out[o] = static_cast<scalar_t>(d ? A(acc) * -exp(A(d[o])) : A(acc));
  }
}

// ---------------------------------------------------------------------------------------------------- host side

template <typename scalar_t_, int N_>
struct Kernel {
  using scalar_t = scalar_t_;
  static constexpr int N = N_;
};

// Calls f(Kernel<scalar_t, N>{}) for x's dtype and head size N, or says which head sizes have kernels.
template <typename F>
void dispatch(const char* op, const at::Tensor& x, int64_t N, F&& f) {
  const bool wide = x.scalar_type() == at::kDouble;
  TORCH_CHECK(N == 32 || N == 64 || (!wide && (N == 80 || N == 128)), op, ": no kernel for head size ",
              std::to_string(N), " in ", x.scalar_type(),
              "; head sizes with kernels: 32, 64, 80, 128 (float64: 32, 64)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wkv_matrix", [&] {
    constexpr bool fp64 = std::is_same_v<scalar_t, double>;  // (80 and 128 never reach here in float64)
    if (N == 32) {
      f(Kernel<scalar_t, 32>{});
    } else if (N == 64) {
      f(Kernel<scalar_t, 64>{});
    } else if (N == 80) {
      f(Kernel<scalar_t, fp64 ? 64 : 80>{});
    } else {
      f(Kernel<scalar_t, fp64 ? 64 : 128>{});
    }
  });
}

// Messages format numbers with std::to_string: an integer streamed into TORCH_CHECK's message from this extension
// crashed (a segmentation fault in std::ostream's number formatting, seen on the device machine).
std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x contiguous at a 16-byte-aligned address (the kernels read tokens in 16-byte words; a view may start anywhere).
at::Tensor aligned(const at::Tensor& x) {
  at::Tensor out = x.contiguous();
  return reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 ? out : out.clone();
}

// Checks the [B, T, H, N] token tensors (same shape, dtype and CUDA device, T >= 1) and returns them contiguous and
// aligned.
std::vector<at::Tensor> tokens(const char* op, std::initializer_list<std::pair<const char*, at::Tensor>> named) {
  const at::Tensor& first = named.begin()->second;
  TORCH_CHECK(first.dim() == 4, op, ": token tensors must be [B, T, H, N], got ", shape(first.sizes()));
  TORCH_CHECK(first.size(0) >= 1 && first.size(1) >= 1 && first.size(2) >= 1, op, ": B, T and H must be >= 1, got ",
              shape(first.sizes()));
  TORCH_CHECK(first.is_cuda(), op, ": tensors must be on a CUDA device, got ", first.device().str());
  std::vector<at::Tensor> out;
  for (const auto& [name, x] : named) {
    TORCH_CHECK(x.sizes() == first.sizes(), op, ": ", name, " must have shape ", shape(first.sizes()), ", got ",
                shape(x.sizes()));
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), op, ": ", name, " is ", x.scalar_type(), " but ",
                named.begin()->first, " is ", first.scalar_type());
    TORCH_CHECK(x.device() == first.device(), op, ": ", name, " is on ", x.device().str(), ", not ",
                first.device().str());
    out.push_back(aligned(x));
  }
  return out;
}

// A [B, H, N, N] state (or [H, N] bonus) on the tokens' device, in the arithmetic dtype, contiguous.
at::Tensor side(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef expected,
                const at::Tensor& like) {
  TORCH_CHECK(x.sizes() == expected, op, ": ", name, " must have shape ", shape(expected), ", got ",
              shape(x.sizes()));
  TORCH_CHECK(x.is_floating_point(), op, ": ", name, " must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device() == like.device(), op, ": ", name, " is on ", x.device().str(), ", not ",
              like.device().str());
  return x.to(acc_type(like)).contiguous();
}

void launch_suffix_sum(const at::Tensor& x, const at::Tensor& y, const at::Tensor* d, at::Tensor& out, bool reverse) {
  const int64_t B = out.size(0), T = out.size(1), C = out.size(2) * out.size(3);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "wkv suffix sum", [&] {
    using A = acc_t<scalar_t>;
    suffix_sum_kernel<scalar_t><<<B * ((C + 31) / 32), 32 * kScanSegments, 0, stream>>>(
        T, C, reverse, x.data_ptr<A>(), y.data_ptr<A>(), d ? d->data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> wkv6_forward(const at::Tensor& r_, const at::Tensor& k_, const at::Tensor& v_,
                                                const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& s0_,
                                                bool reverse) {
  const char* op = "wkv6_forward";
  auto in = tokens(op, {{"r", r_}, {"k", k_}, {"v", v_}, {"w", w_}});
  const at::Tensor &r = in[0], &k = in[1], &v = in[2], &w = in[3];
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor u = side(op, "u", u_, {H, N}, r), s0 = side(op, "state", s0_, {B, H, N, N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  auto y = at::empty_like(v);
  auto s_out = at::empty({B, H, N, N}, s0.options());
  dispatch(op, r, N, [&](auto kernel) {
    using K = decltype(kernel);
    using scalar_t = typename K::scalar_t;
    using A = acc_t<scalar_t>;
    constexpr int kBlock = kThreads<K::N, kRows6<K::N>, kParts6<K::N>>;
    wkv6_forward_kernel<scalar_t, K::N><<<B * H, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        Tokens<K::N>{T, H, reverse}, r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), u.data_ptr<A>(), s0.data_ptr<A>(), y.data_ptr<scalar_t>(), s_out.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv6_backward(
    const at::Tensor& r_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& w_, const at::Tensor& u_,
    const at::Tensor& s0_, const at::Tensor& s_out_, const at::Tensor& gy_, const at::Tensor& gs_out_, bool reverse) {
  const char* op = "wkv6_backward";
  auto in = tokens(op, {{"r", r_}, {"k", k_}, {"v", v_}, {"w", w_}, {"gy", gy_}});
  const at::Tensor &r = in[0], &k = in[1], &v = in[2], &w = in[3], &gy = in[4];
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor u = side(op, "u", u_, {H, N}, r), s0 = side(op, "state", s0_, {B, H, N, N}, r);
  const at::Tensor s_out = side(op, "s_out", s_out_, {B, H, N, N}, r);
  const at::Tensor gs_out = side(op, "gs_out", gs_out_, {B, H, N, N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  auto gr = at::empty_like(r), gk = at::empty_like(k), gv = at::empty_like(v), gw = at::empty_like(w);
  auto gu_part = at::empty({B, H, N}, s0.options()), gs0 = at::empty_like(s0);
  auto shifted = at::empty(r.sizes(), s0.options()), decay_terms = at::empty(r.sizes(), s0.options());
  dispatch(op, r, N, [&](auto kernel) {
    using K = decltype(kernel);
    using scalar_t = typename K::scalar_t;
    using A = acc_t<scalar_t>;
    wkv6_backward_kernel<scalar_t, K::N><<<dim3(B * H, 3), kThreads<K::N>, 0, at::cuda::getCurrentCUDAStream()>>>(
        Tokens<K::N>{T, H, reverse}, r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), u.data_ptr<A>(), s0.data_ptr<A>(), s_out.data_ptr<A>(), gy.data_ptr<scalar_t>(),
        gs_out.data_ptr<A>(), gr.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
        gu_part.data_ptr<A>(), gs0.data_ptr<A>(), shifted.data_ptr<A>(), decay_terms.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_suffix_sum(decay_terms, shifted, &w, gw, reverse);
  return {gr, gk, gv, gw, gu_part.sum(0), gs0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wkv7_forward(const at::Tensor& r_, const at::Tensor& lw_,
                                                            const at::Tensor& k_, const at::Tensor& v_,
                                                            const at::Tensor& a_, const at::Tensor& b_,
                                                            const at::Tensor& s0_, bool keep_sa) {
  const char* op = "wkv7_forward";
  auto in = tokens(op, {{"r", r_}, {"log_w", lw_}, {"k", k_}, {"v", v_}, {"a", a_}, {"b", b_}});
  const int64_t B = in[0].size(0), T = in[0].size(1), H = in[0].size(2), N = in[0].size(3);
  const at::Tensor s0 = side(op, "state", s0_, {B, H, N, N}, in[0]);
  const c10::cuda::CUDAGuard guard(in[0].device());
  auto y = at::empty_like(in[3]);
  auto s_out = at::empty({B, H, N, N}, s0.options());
  auto sa = keep_sa ? at::empty(in[0].sizes(), s0.options()) : at::empty({0}, s0.options());
  dispatch(op, in[0], N, [&](auto kernel) {
    using K = decltype(kernel);
    using scalar_t = typename K::scalar_t;
    using A = acc_t<scalar_t>;
    wkv7_forward_kernel<scalar_t, K::N><<<B * H, kThreads<K::N>, 0, at::cuda::getCurrentCUDAStream()>>>(
        Tokens<K::N>{T, H, false}, in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(),
        in[2].data_ptr<scalar_t>(), in[3].data_ptr<scalar_t>(), in[4].data_ptr<scalar_t>(),
        in[5].data_ptr<scalar_t>(), s0.data_ptr<A>(), y.data_ptr<scalar_t>(), s_out.data_ptr<A>(),
        keep_sa ? sa.data_ptr<A>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s_out, sa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv7_backward(
    const at::Tensor& r_, const at::Tensor& lw_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& a_,
    const at::Tensor& b_, const at::Tensor& s0_, const at::Tensor& s_out_, const at::Tensor& sa_,
    const at::Tensor& gy_, const at::Tensor& gs_out_) {
  const char* op = "wkv7_backward";
  auto in = tokens(op, {{"r", r_}, {"log_w", lw_}, {"k", k_}, {"v", v_}, {"a", a_}, {"b", b_}, {"gy", gy_}});
  const at::Tensor &r = in[0], &lw = in[1], &k = in[2], &v = in[3], &a = in[4], &b = in[5], &gy = in[6];
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor s0 = side(op, "state", s0_, {B, H, N, N}, r);
  const at::Tensor s_out = side(op, "s_out", s_out_, {B, H, N, N}, r);
  const at::Tensor gs_out = side(op, "gs_out", gs_out_, {B, H, N, N}, r);
  TORCH_CHECK(sa_.sizes() == r.sizes() && sa_.scalar_type() == acc_type(r) && sa_.device() == r.device(), op,
              ": sa must be what wkv7_forward(keep_sa=True) returned, ", shape(r.sizes()), " in ", acc_type(r),
              ", got ", shape(sa_.sizes()), " in ", sa_.scalar_type());
  const at::Tensor sa = aligned(sa_);
  const c10::cuda::CUDAGuard guard(r.device());
  auto gr = at::empty_like(r), glw = at::empty_like(lw), gk = at::empty_like(k), gv = at::empty_like(v);
  auto ga = at::empty_like(a), gb = at::empty_like(b), gs0 = at::empty_like(s0);
  auto dsa = at::empty(r.sizes(), s0.options()), shifted = at::empty(r.sizes(), s0.options());
  auto decay_terms = at::empty(r.sizes(), s0.options());
  dispatch(op, r, N, [&](auto kernel) {
    using K = decltype(kernel);
    using scalar_t = typename K::scalar_t;
    using A = acc_t<scalar_t>;
    const Tokens<K::N> g{T, H, false};
    auto stream = at::cuda::getCurrentCUDAStream();
    wkv7_backward_rows_kernel<scalar_t, K::N><<<B * H, kThreads<K::N>, 0, stream>>>(
        g, r.data_ptr<scalar_t>(), lw.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
        b.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), gs_out.data_ptr<A>(), gv.data_ptr<scalar_t>(),
        dsa.data_ptr<A>(), gs0.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    wkv7_backward_columns_kernel<scalar_t, K::N><<<dim3(B * H, 2), kThreads<K::N>, 0, stream>>>(
        g, r.data_ptr<scalar_t>(), lw.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), s0.data_ptr<A>(), s_out.data_ptr<A>(), sa.data_ptr<A>(),
        dsa.data_ptr<A>(), gy.data_ptr<scalar_t>(), gs_out.data_ptr<A>(), gr.data_ptr<scalar_t>(),
        gk.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), shifted.data_ptr<A>(),
        decay_terms.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_suffix_sum(decay_terms, shifted, nullptr, glw, false);
  return {gr, glw, gk, gv, ga, gb, gs0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo, m) {
  m.def("wkv6_forward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor state, bool reverse) "
        "-> (Tensor, Tensor)");
  m.def("wkv6_backward(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor state, Tensor state_out, "
        "Tensor gy, Tensor gstate_out, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("wkv7_forward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state, bool keep_sa) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("wkv7_backward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state, "
        "Tensor state_out, Tensor sa, Tensor gy, Tensor gstate_out) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zoo, CUDA, m) {
  m.impl("wkv6_forward", &wkv6_forward);
  m.impl("wkv6_backward", &wkv6_backward);
  m.impl("wkv7_forward", &wkv7_forward);
  m.impl("wkv7_backward", &wkv7_backward);
}
