// WKV on CUDA: the causal WKV of RWKV-4 and the bidirectional Bi-WKV of Vision-RWKV, forward and backward,
// as chunked scans (parallel over batch x chunks of T x channels, not only over batch x channels).
//
// Causal (float64 reference: blocks/wkv.py), w < 0 the per-step decay, u the bonus:
//   wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})
// Bidirectional (float64 reference: blocks/biwkv.py), w and u already divided by T, w of any sign:
//   wkv_t = (sum_{i!=t} e^{-(|t-i|-1)w + k_i} v_i + e^{u+k_t} v_t) / (the same with v = 1)
// i.e. a causal sum from the left plus its mirror from the right, both with the step factor e^{-w}.
//
// Every sum of the form S_n = sum_{i<=n} e^{(n-i)w + x_i} (va_i, vb_i) lives in a Decayed: (a, b) scaled by
// e^m, m the largest exponent, so nothing overflows; (da, db) is the same sum weighted by the distance n-i,
// which the gradient of w needs. Sums over consecutive chunks combine exactly (Decayed::then).
// The causal passes run one direction each, in one launch (decoupled look-back): a block stages its chunk in
// shared memory, sums it, adds the sums published by the chunks before it, publishes its own, and replays its
// tokens from shared memory, so every input is read from DRAM once. Bi-WKV needs sums from both sides, so each
// direction takes three kinds of launch:
//   summaries: each chunk's sums from an empty start (one thread per batch, chunk, channel);
//   scans:     the sums entering every chunk, from the left or the right (runs of chunks per batch, channel);
//   outputs:   each chunk replays its tokens from its entering sums, walking register tiles of kSub tokens,
//              last tile first: forward through the tile, keeping the per-token values in registers, then
//              backward through it; each tile's tokens are copied into shared memory (cp.async) while the
//              tile walked before it is computed.
// Gradients are the same sums run the other way. With alpha_t = dL/dwkv_t / den_t and beta_t = -alpha_t wkv_t,
// the causal case has dL/dv_i = e^{k_i} sum_{t>i} e^{(t-1-i)w} alpha_t plus the bonus term; alpha_t carries
// e^{-P_t}, P_t the largest exponent in den_t, and k_i + (t-1-i)w <= P_t keeps every product <= 1. A Bi-WKV
// forward run for a backward (keep_den) keeps every den_t, so its backward's terms need no forward state; a causal
// one (keep_states) keeps only the state entering every span of kStateSpan tokens, and the causal backward replays
// each span's forward in shared memory before walking it right to left. Only Bi-WKV's passes walk register tiles.
// Inputs are fp32, bf16 or fp16 (fp32 arithmetic) or fp64 (fp64 arithmetic, for gradcheck). Any B, T, C >= 1.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMinChunk = 32;
constexpr int kScanChunksPerRun = 2;                 // chunks each thread of a chunk scan combines
constexpr int kSub = 8;                               // tokens per register tile of the two-way passes
constexpr int64_t kTargetThreads = 1 << 17;           // (batch, chunk, channel group) threads: fastest of 2^16..2^19
constexpr double kEmpty = -1e38;                      // m of an empty sum

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// e^x for x <= 0, as every exponential here is: a term against the largest one it joins. For float, the hardware's
// exp2 (__expf: ex2.approx of x log2(e)), whose rounding of x log2(e) costs |x| 2^-24 of e^x, at most 2^-24 / e
// of the largest term, so the sums stay within a few units in the last place of their largest term; for double
// (gradcheck), exp.
template <typename T>
__device__ __forceinline__ T exp_term(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return __expf(x);
  } else {
    return exp(x);
  }
}

// a / b for a denominator b >= 1 (its largest term is 1): for float, __fdividef (2 units in the last place).
template <typename T>
__device__ __forceinline__ T divide(T a, T b) {
  if constexpr (std::is_same_v<T, float>) {
    return __fdividef(a, b);
  } else {
    return a / b;
  }
}

// Weights that add e^{x_old} A_old and e^{x_new} A_new scaled by the larger exponential, from d = x_new - x_old:
// e^{-|d|} for the smaller side, 1 for the larger. One exp instead of two.
template <typename T>
struct Weights {
  T old_side, new_side;
  bool new_larger;
  __device__ __forceinline__ static Weights of(T d) {
    const T e = exp_term(-abs(d));
    return d > 0 ? Weights{e, T(1), true} : Weights{T(1), e, false};
  }
};

template <typename T>
struct Decayed {
  T a, b, da, db;
  T m, n, w;  // the sum is e^{m + n w} (a, b): m its largest exponent n steps ago, w the per-step exponent

  __device__ __forceinline__ static Decayed empty(T w) { return {T(0), T(0), T(0), T(0), T(kEmpty), T(0), w}; }

  // The scale e^scale of (a, b). Counting steps instead of adding w to m every step keeps m from collecting a
  // rounding error per token (with |w| << |m|, m + w rounds w by up to half an ulp of m). For the same reason
  // exponent differences are taken as (x - m) + steps w, not x - scale(): m and x are close floats, so x - m is
  // exact, and each term keeps its own exponent instead of one rounded at the magnitude of m.
  __device__ __forceinline__ T scale() const { return m + n * w; }

  // One step later, then the next token: S <- e^w S + e^x (va, vb), dS <- e^w (dS + S).
  __device__ __forceinline__ void push(T x, T va, T vb) {
    const auto e = Weights<T>::of((x - m) - (n + 1) * w);
    da = e.old_side * (da + a);
    db = e.old_side * (db + b);
    a = e.old_side * a + e.new_side * va;
    b = e.old_side * b + e.new_side * vb;
    m = e.new_larger ? x : m;
    n = e.new_larger ? T(0) : n + 1;
  }

  // Adds e^{x + t w} (va, vb), a token t steps from the reference point, without decaying what is there:
  // a sum seen from the chunk's other end, whose distance weights count t.
  __device__ __forceinline__ void add(T x, T t, T va, T vb) {
    const auto e = Weights<T>::of((x - m) + (t - n) * w);
    da = e.old_side * da + t * e.new_side * va;
    db = e.old_side * db + t * e.new_side * vb;
    a = e.old_side * a + e.new_side * va;
    b = e.old_side * b + e.new_side * vb;
    m = e.new_larger ? x : m;
    n = e.new_larger ? t : n;
  }

  // This sum `steps` steps later, followed by `next`, the sum over those steps' tokens.
  __device__ __forceinline__ Decayed then(T steps, const Decayed& next) const {
    const auto e = Weights<T>::of((next.m - m) + (next.n - n - steps) * w);
    return {e.old_side * a + e.new_side * next.a, e.old_side * b + e.new_side * next.b,
            e.old_side * (da + steps * a) + e.new_side * next.da, e.old_side * (db + steps * b) + e.new_side * next.db,
            e.new_larger ? next.m : m, e.new_larger ? next.n : n + steps, w};
  }
};

// Decayed sums as five arrays (a, b, da, db, m), each indexed like a [B, rows, C] tensor.
// kDistance = false skips da and db (loaded as 0), for sums whose distance weights nobody reads.
template <typename T>
struct DecayedArray {
  T *a, *b, *da, *db, *m;

  template <bool kDistance>
  __device__ __forceinline__ Decayed<T> load(int64_t j, T w) const {
    return {a[j], b[j], kDistance ? da[j] : T(0), kDistance ? db[j] : T(0), m[j], T(0), w};
  }
  // As load, from L2 (ld.global.cg): a sum another block published while this one ran.
  template <bool kDistance>
  __device__ __forceinline__ Decayed<T> load_published(int64_t j, T w) const {
    return {__ldcg(a + j), __ldcg(b + j), kDistance ? __ldcg(da + j) : T(0), kDistance ? __ldcg(db + j) : T(0),
            __ldcg(m + j), T(0), w};
  }
  // As load, for a sum that may be given without distance weights (da, db null).
  template <bool kDistance>
  __device__ __forceinline__ Decayed<T> load_given(int64_t j, T w) const {
    return {a[j], b[j], kDistance && da ? da[j] : T(0), kDistance && db ? db[j] : T(0), m[j], T(0), w};
  }
  template <bool kDistance>
  __device__ __forceinline__ void store(int64_t j, const Decayed<T>& s) const {
    a[j] = s.a;
    b[j] = s.b;
    m[j] = s.scale();
    if (kDistance) {
      da[j] = s.da;
      db[j] = s.db;
    }
  }
};

template <typename T>
struct Emitted {
  T y, den, p;  // wkv, its denominator scaled by e^{-p}, and p
};

// wkv of token (k, v) against the sum s of the tokens before it; the bonus term e^{u+k} joins s.
template <typename T>
__device__ __forceinline__ Emitted<T> emit(const Decayed<T>& s, T bonus, T v) {
  const auto e = Weights<T>::of((bonus - s.m) - s.n * s.w);
  const T den = e.old_side * s.b + e.new_side;
  return {divide(e.old_side * s.a + e.new_side * v, den), den, e.new_larger ? bonus : s.scale()};
}

struct Layout {
  int64_t B, T, C, L, N;  // N chunks of L tokens (the last may be shorter)
  __device__ __forceinline__ int64_t chunk_len(int64_t n) const { return min(L, T - n * L); }
  __host__ __device__ __forceinline__ int64_t tiles() const { return (L + kSub - 1) / kSub; }  // per chunk
};

// V consecutive channels, loaded and stored in one vector access (C % V == 0 keeps them aligned).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t x[V];
};

template <typename scalar_t, int V, typename T>
__device__ __forceinline__ void load_pack(const scalar_t* p, T (&out)[V]) {
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<T>(pack.x[i]);
}

template <typename scalar_t, int V, typename T>
__device__ __forceinline__ void store_pack(scalar_t* p, const T (&in)[V]) {
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.x[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = pack;
}

// An asynchronous copy of kBytes from global to shared memory (cp.async; larger than 16 bytes in 16-byte parts).
// Two bytes, which cp.async cannot copy, are a plain load and store. copies_commit() closes a group of copies;
// copies_wait<n>() waits until all but the n groups committed last have landed (for this thread's copies).
template <int kBytes>
__device__ __forceinline__ void copy_async(void* to, const void* from) {
  if constexpr (kBytes == 2) {
    *static_cast<int16_t*>(to) = *static_cast<const int16_t*>(from);
  } else if constexpr (kBytes > 16) {
#pragma unroll
    for (int i = 0; i < kBytes; i += 16) copy_async<16>(static_cast<char*>(to) + i, static_cast<const char*>(from) + i);
  } else {
    const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(to));
    if constexpr (kBytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared), "l"(from));
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(shared), "l"(from), "n"(kBytes));
    }
  }
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void copies_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending)); }

// A thread's next register tiles of kInputs [B, T, C] inputs, copied into shared memory kStages - 1 tiles ahead
// of their use, so that the next tile's loads are in flight while the thread computes, without registers to hold
// them (BENCHMARKS.md, issue 3: 3 stages were no faster than 2). kWords values of type S per token and channel;
// the thread owns slot threadIdx.x of each [stage][input][token] row of blockDim.x slots.
constexpr int kStages = 2;

template <typename S, int V, int kInputs, int kWords = 1>
struct Stages {
  using P = Pack<S, kWords * V>;
  static constexpr size_t kBytesPerThread = size_t(kStages) * kInputs * kSub * sizeof(P);
  P* data;

  __device__ __forceinline__ P* slot(int64_t tile, int input, int j) const {
    return data + (((tile % kStages) * kInputs + input) * kSub + j) * blockDim.x + threadIdx.x;
  }
  // Starts copying the first `count` tokens of a tile, token j at offset o + j * stride of each input.
  __device__ __forceinline__ void fetch(int64_t tile, const S* const (&from)[kInputs], int64_t o, int64_t stride,
                                        int count) const {
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      if (j < count) {
#pragma unroll
        for (int i = 0; i < kInputs; ++i) copy_async<sizeof(P)>(slot(tile, i, j), from[i] + kWords * (o + j * stride));
      }
    }
  }
  template <typename T>
  __device__ __forceinline__ void load(int64_t tile, int input, int j, T (&out)[kWords * V]) const {
    load_pack<S, kWords * V>(slot(tile, input, j)->x, out);
  }
};

template <typename T>
struct Term {
  T x, va, vb;  // a token's term e^x (va, vb)
};

// Each token's denominator den_t (kept by a Bi-WKV forward, replayed by the causal backward), where
// alpha_t = dL/dwkv_t / den_t: for fp32/fp64 inputs as the pair (p_t, d_t), den_t = e^{p_t} d_t, so that the
// backward's term exponent -p_t is an exact float (log den_t rounded to fp32, at |log den_t| ~ 20, would put every
// term off by 1e-6, and the signed sums of the gradients amplify that); for 16-bit inputs, whose gradients need
// 1e-2, as log den_t in fp32, half the bytes, taken with the fast __logf, whose error (a few units in the last place)
// is far below that.
template <typename scalar_t>
constexpr int kDenWords = sizeof(scalar_t) >= 4 ? 2 : 1;

template <typename scalar_t, typename T>
__device__ __forceinline__ void den_words(T p, T d, T* words) {
  if constexpr (kDenWords<scalar_t> == 2) {
    words[0] = p, words[1] = d;
  } else {
    words[0] = p + __logf(d);
  }
}

template <typename scalar_t>
struct GradTerms {  // backward terms: (g_t, -g_t y_t) / den_t
  const scalar_t *gy, *y;
  const acc_t<scalar_t>* den;
  static constexpr int W = kDenWords<scalar_t>;
  using T = acc_t<scalar_t>;
  template <int V>
  __device__ __forceinline__ static void of(const T (&gt)[V], const T (&yt)[V], const T (&words)[W * V],
                                            Term<T> (&out)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const T scale = W == 2 ? divide(T(1), words[W * i + 1]) : 1;
      out[i] = {-words[W * i], gt[i] * scale, -gt[i] * yt[i] * scale};
    }
  }
  template <int V>
  __device__ __forceinline__ void load(int64_t o, Term<T> (&out)[V]) const {
    T gt[V], yt[V], words[W * V];
    load_pack<scalar_t, V>(gy + o, gt);
    load_pack<scalar_t, V>(y + o, yt);
    load_pack<T, W * V>(den + W * o, words);
    of(gt, yt, words, out);
  }
};

// Thread idx of a (batch, chunk, channel group) launch: ((b * N) + n) * (C / V) + group.
struct ChunkThread {
  int64_t b, n, c0;
  template <int V>
  __device__ __forceinline__ static ChunkThread of(const Layout& g, int64_t idx) {
    const int64_t groups = g.C / V;
    return ChunkThread{idx / (groups * g.N), (idx / groups) % g.N, (idx % groups) * V};
  }
  __device__ __forceinline__ int64_t token_offset(const Layout& g) const { return (b * g.T + n * g.L) * g.C + c0; }
  __device__ __forceinline__ int64_t chunk_index(const Layout& g) const { return (b * g.N + n) * g.C + c0; }
  __device__ __forceinline__ int64_t tile_index(const Layout& g, int64_t tile) const {
    return ((b * g.N + n) * g.tiles() + tile) * g.C + c0;
  }
};

__device__ __forceinline__ int64_t thread_index() { return blockIdx.x * (int64_t)blockDim.x + threadIdx.x; }

// Walks the register tiles of a chunk, last tile first. fetch(tile, o, count) starts the copies of a tile's count
// tokens from token offset o into its stage (Stages::fetch), kStages - 1 tiles ahead of the walk; once a tile's
// copies have landed, begin(tile, t0) sets up the tile that starts at token t0, then forward(tile, j, offset)
// runs for its tokens in order and backward(tile, j, offset) in reverse. j < kSub is a compile-time index once
// unrolled, so per-token arrays indexed by it stay in registers.
template <typename Fetch, typename Begin, typename Forward, typename Backward>
__device__ __forceinline__ void walk_tiles(const Layout& g, const ChunkThread& th, Fetch fetch, Begin begin,
                                           Forward forward, Backward backward) {
  const int64_t base = th.token_offset(g), len = g.chunk_len(th.n), last = (len - 1) / kSub;
  const auto count = [&](int64_t tile) { return static_cast<int>(min(static_cast<int64_t>(kSub), len - tile * kSub)); };
  const auto start = [&](int64_t tile) {  // one commit group per tile, empty past the first
    if (tile >= 0) fetch(tile, base + tile * kSub * g.C, count(tile));
    copies_commit();
  };
#pragma unroll
  for (int ahead = 0; ahead < kStages - 1; ++ahead) start(last - ahead);
  for (int64_t tile = last; tile >= 0; --tile) {
    start(tile - (kStages - 1));
    copies_wait<kStages - 1>();
    const int64_t t0 = tile * kSub;
    const int tokens = count(tile);
    begin(tile, t0);
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      if (j < tokens) forward(tile, j, base + (t0 + j) * g.C);
    }
#pragma unroll
    for (int j = kSub - 1; j >= 0; --j) {
      if (j < tokens) backward(tile, j, base + (t0 + j) * g.C);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Bi-WKV's scans over chunks.

// The sums entering every chunk of one (batch, channel) row from one side, from an empty start, walking the chunks
// left to right or right to left through `summaries`, each chunk's own sum. A block takes kThreads / segments
// consecutive rows, each in `segments` runs of consecutive chunks: neighbouring threads take neighbouring rows, so
// every load and store is a whole 32-byte sector (the summaries of one chunk are [B, C] arrays). Each thread
// combines its run, the runs meet in shared memory, and each thread walks its run again from the sum of the runs
// before it. Two independent scans (the two sides of Bi-WKV) share a launch: blockIdx.y picks one.
template <typename T>
struct ScanSide {
  DecayedArray<T> summaries, entering;
  bool reverse;
};

template <typename T, bool kDistance>
__global__ void __launch_bounds__(kThreads) chunk_scan(Layout g, const T* __restrict__ w, int segments,
                                                       ScanSide<T> first_side, ScanSide<T> second_side) {
  __shared__ T runs[7][kThreads];  // each thread's run: a, b, da, db, m, n and its length in tokens
  const int rows_per_block = kThreads / segments, segment = threadIdx.x / rows_per_block;
  const int64_t row = blockIdx.x * (int64_t)rows_per_block + threadIdx.x % rows_per_block;  // b * C + c
  const bool valid = row < g.B * g.C;
  const bool first_launch = blockIdx.y == 0;  // each field picked apart: a picked struct would go to local memory
  const auto summaries = first_launch ? first_side.summaries : second_side.summaries;
  const auto entering = first_launch ? first_side.entering : second_side.entering;
  const bool reverse = first_launch ? first_side.reverse : second_side.reverse;
  const int64_t c = row % g.C, b = row / g.C, per_run = (g.N + segments - 1) / segments;
  const int64_t first = valid ? std::min(g.N, segment * per_run) : g.N, last = std::min(g.N, first + per_run);
  const auto chunk = [&](int64_t i) { return reverse ? g.N - 1 - i : i; };
  const auto index = [&](int64_t n) { return (b * g.N + n) * g.C + c; };
  const T wc = valid ? w[c] : T(0);
  Decayed<T> run = Decayed<T>::empty(wc);
  T run_len = 0;
#pragma unroll 4
  for (int64_t i = first; i < last; ++i) {
    const int64_t n = chunk(i);
    const T len = static_cast<T>(g.chunk_len(n));
    run = run.then(len, summaries.template load<kDistance>(index(n), wc));
    run_len += len;
  }
  const T parts[7] = {run.a, run.b, run.da, run.db, run.m, run.n, run_len};
  for (int i = 0; i < 7; ++i) runs[i][threadIdx.x] = parts[i];
  __syncthreads();
  if (!valid) return;
  Decayed<T> s = Decayed<T>::empty(wc);
  for (int j = threadIdx.x % rows_per_block; j < threadIdx.x; j += rows_per_block) {  // the runs before this one
    s = s.then(runs[6][j], Decayed<T>{runs[0][j], runs[1][j], runs[2][j], runs[3][j], runs[4][j], runs[5][j], wc});
  }
  for (int64_t i = first; i < last; ++i) {
    const int64_t n = chunk(i);
    entering.template store<kDistance>(index(n), s);
    s = s.then(static_cast<T>(g.chunk_len(n)), summaries.template load<kDistance>(index(n), wc));
  }
}

// Per chunk, from an empty start, for token terms e^{x_t} (va_t, vb_t): the sum seen from the chunk's left edge,
// token t at distance t, and the sum pushed left to right (stored at every tile start and at the end).
// terms.load(o, out) gives the terms of V channels of the token at offset o.
template <typename T, bool kDistance, int V, typename Terms>
__global__ void chunk_summary(Layout g, const T* __restrict__ w, Terms terms, DecayedArray<T> from_left,
                              DecayedArray<T> from_right, DecayedArray<T> tile_starts) {
  const int64_t idx = thread_index();
  if (idx >= g.B * g.N * (g.C / V)) return;
  const ChunkThread th = ChunkThread::of<V>(g, idx);
  const int64_t base = th.token_offset(g);
  Decayed<T> left[V], right[V];
#pragma unroll
  for (int i = 0; i < V; ++i) left[i] = right[i] = Decayed<T>::empty(w[th.c0 + i]);
#pragma unroll 8  // more loads in flight: 1-4% faster than 4
  for (int64_t t = 0, len = g.chunk_len(th.n); t < len; ++t) {
    Term<T> term[V];
    terms.load(base + t * g.C, term);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (t % kSub == 0) tile_starts.template store<kDistance>(th.tile_index(g, t / kSub) + i, left[i]);
      left[i].push(term[i].x, term[i].va, term[i].vb);
      right[i].add(term[i].x, static_cast<T>(t), term[i].va, term[i].vb);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    from_left.template store<kDistance>(th.chunk_index(g) + i, left[i]);
    from_right.template store<kDistance>(th.chunk_index(g) + i, right[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// One-pass chunked scans (decoupled look-back: Merrill & Garland, "Single-pass Parallel Prefix Scan with
// Decoupled Look-back", 2016), for the causal forward (chunks left to right) and backward (right to left).
// A block takes one chunk of one batch over blockDim.x * V channels (a slice), the chunks in the order the blocks
// start (a ticket), so a block waits only on blocks that started before it. It copies its chunk's inputs into
// shared memory, publishes the chunk's own sum, then adds the sums of the chunks before it, nearest first: a
// chunk's sum through the row's start where that is published (and there it stops), else its own sum. It
// publishes the sum through its chunk and walks its tokens again from shared memory. Every input is read from
// DRAM once, and no scan is launched.

struct LookBack {
  int* status;            // per (batch, chunk, slice): 0, then kOwnSum, then kThroughSum
  unsigned int* tickets;  // blocks started so far
};
constexpr int kOwnSum = 1, kThroughSum = 2;
// One warp a block with 24 KB of staged tokens (nine blocks an SM): of 16, 24 and 32 KB the fastest forward+backward
// (16 KB: the forward up to 2% faster, the backward 10-14% slower), and faster than 64 or 128 threads with 48-96 KB
// (BENCHMARKS.md, issue 3). At most 48 KB a block needs no opt-in (cudaFuncSetAttribute) before each launch.
constexpr int kOnePassThreads = 32;
constexpr size_t kOnePassBlockBytes = 24 * 1024;
static_assert(kOnePassBlockBytes <= 48 * 1024, "one-pass blocks launch without raising the shared-memory limit");
constexpr int kTileWidth = 2;  // channels a thread in the one-pass kernels and the tile passes (see channel_width)

// The causal backward's chunks: spans of kStateSpan tokens, as many as a block holds at kTileWidth channels a thread
// with kBackwardTokenBytes per token and channel (dL/dwkv, k, v and the replayed wkv in the input dtype, and den_t).
// A forward run for a backward (keep_states) keeps the state entering every span (32 tokens for 16-bit inputs).
template <typename scalar_t>
constexpr size_t kBackwardTokenBytes = 4 * sizeof(scalar_t) + kDenWords<scalar_t> * sizeof(acc_t<scalar_t>);
template <typename scalar_t>
constexpr int64_t kStateSpan = kOnePassBlockBytes / (kOnePassThreads * kTileWidth * kBackwardTokenBytes<scalar_t>);

__device__ __forceinline__ int status_acquire(const int* p) {
  int s;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(s) : "l"(p) : "memory");
  return s;
}
__device__ __forceinline__ void status_release(int* p, int s) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(s) : "memory");
}

// A block's chunk in a one-pass launch. `reverse` walks the chunks right to left.
template <int V>
struct OnePass {
  Layout g;
  LookBack look;
  int64_t slices, b, n, slice, c0;
  bool valid, reverse;

  __device__ __forceinline__ static OnePass take(const Layout& g, const LookBack& look, bool reverse) {
    __shared__ unsigned int ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(look.tickets, 1u);
    __syncthreads();
    const int64_t groups = g.C / V, slices = (groups + blockDim.x - 1) / blockDim.x, per_chunk = g.B * slices;
    const int64_t walked = ticket / per_chunk, slice = ticket % slices, group = slice * blockDim.x + threadIdx.x;
    return {g, look, slices, ticket % per_chunk / slices, reverse ? g.N - 1 - walked : walked, slice, group * V,
            group < groups, reverse};
  }
  __device__ __forceinline__ int64_t len() const { return g.chunk_len(n); }
  __device__ __forceinline__ int64_t token_offset(int64_t t) const { return (b * g.T + n * g.L + t) * g.C + c0; }
  __device__ __forceinline__ int64_t chunk_index(int64_t j) const { return (b * g.N + j) * g.C + c0; }
  __device__ __forceinline__ int64_t row_index() const { return b * g.C + c0; }
  __device__ __forceinline__ int* status(int64_t j) const { return look.status + (b * g.N + j) * slices + slice; }
  __device__ __forceinline__ bool walked_first() const { return n == (reverse ? g.N - 1 : 0); }
  __device__ __forceinline__ bool walked_last() const { return n == (reverse ? 0 : g.N - 1); }
  // Slot t of a [input][token][thread] array of staged packs.
  template <typename P>
  __device__ __forceinline__ P* slot(P* first, int input, int64_t t) const {
    return first + (input * g.L + t) * blockDim.x + threadIdx.x;
  }

  // Stores this chunk's sums, then marks them published (every thread of the block calls it).
  template <bool kDistance, typename T>
  __device__ __forceinline__ void publish(const DecayedArray<T>& to, const Decayed<T> (&s)[V], int state) const {
    if (valid) {
#pragma unroll
      for (int i = 0; i < V; ++i) to.template store<kDistance>(chunk_index(n) + i, s[i]);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) status_release(status(n), state);
  }

  // Joins this chunk to its row's scan: publishes its own sum `sum`, looks back for the sums `entering` it, and
  // publishes the sums through it, `total` (for the chunk walked last, the whole row's, which the caller keeps).
  // Every thread of the block calls it.
  template <bool kDistance, typename T>
  __device__ __forceinline__ void join(const DecayedArray<T>& own, const DecayedArray<T>& through,
                                       const DecayedArray<T>& start, const T (&w)[V], const Decayed<T> (&sum)[V],
                                       Decayed<T> (&entering)[V], Decayed<T> (&total)[V]) const {
    if (!walked_first()) publish<kDistance>(own, sum, kOwnSum);
    if (valid) look_back<kDistance>(own, through, start, w, entering);
#pragma unroll
    for (int i = 0; i < V; ++i) total[i] = entering[i].then(static_cast<T>(len()), sum[i]);
    if (!walked_last()) publish<kDistance>(through, total, kThroughSum);
  }

  // The sums entering this chunk: those of the chunks walked before it, from `start` (the row's first sums).
  template <bool kDistance, typename T>
  __device__ __forceinline__ void look_back(const DecayedArray<T>& own, const DecayedArray<T>& through,
                                            const DecayedArray<T>& start, const T (&w)[V],
                                            Decayed<T> (&entering)[V]) const {
    T between_len = 0;  // entering sums the chunks between this one and j, seen from this chunk's edge
#pragma unroll
    for (int i = 0; i < V; ++i) entering[i] = Decayed<T>::empty(w[i]);
    const int64_t step = reverse ? 1 : -1;
    for (int64_t j = n + step; j >= 0 && j < g.N; j += step) {
      int state;
      while ((state = status_acquire(status(j))) == 0) {
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t at = chunk_index(j) + i;
        const Decayed<T> sum = state == kThroughSum ? through.template load_published<kDistance>(at, w[i])
                                                    : own.template load_published<kDistance>(at, w[i]);
        entering[i] = sum.then(between_len, entering[i]);
      }
      if (state == kThroughSum) return;
      between_len += static_cast<T>(g.chunk_len(j));
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      entering[i] = start.template load_given<kDistance>(row_index() + i, w[i]).then(between_len, entering[i]);
    }
  }
};

// The causal forward: each chunk's outputs from the state entering it, and with kKeepStates the state entering each
// of its spans (into `states`, [B, spans, C]); the last chunk's block stores the state after the last token. A chunk
// is whole spans long (or the whole row).
template <typename scalar_t, int V, bool kKeepStates>
__global__ void __launch_bounds__(kOnePassThreads) causal_forward(
    Layout g, LookBack look, const acc_t<scalar_t>* __restrict__ w, const acc_t<scalar_t>* __restrict__ u,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, DecayedArray<acc_t<scalar_t>> start,
    DecayedArray<acc_t<scalar_t>> own, DecayedArray<acc_t<scalar_t>> through, DecayedArray<acc_t<scalar_t>> finish,
    scalar_t* __restrict__ y, DecayedArray<acc_t<scalar_t>> states) {
  using T = acc_t<scalar_t>;
  using Tokens = Pack<scalar_t, V>;
  constexpr int64_t span = kStateSpan<scalar_t>;
  extern __shared__ __align__(16) unsigned char staged[];
  const auto chunk = OnePass<V>::take(g, look, false);
  Tokens* const tokens = reinterpret_cast<Tokens*>(staged);
  const int64_t len = chunk.len();
  if (chunk.valid) {
    for (int64_t t = 0; t < len; ++t) {
      copy_async<sizeof(Tokens)>(chunk.slot(tokens, 0, t), k + chunk.token_offset(t));
      copy_async<sizeof(Tokens)>(chunk.slot(tokens, 1, t), v + chunk.token_offset(t));
    }
  }
  copies_commit();
  T wc[V], uc[V], kt[V], vt[V];
  Decayed<T> sum[V], s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    wc[i] = chunk.valid ? w[chunk.c0 + i] : T(0);
    uc[i] = chunk.valid ? u[chunk.c0 + i] : T(0);
    sum[i] = Decayed<T>::empty(wc[i]);
  }
  copies_wait<0>();
  if (chunk.valid) {
    for (int64_t t = 0; t < len; ++t) {
      load_pack<scalar_t, V>(chunk.slot(tokens, 0, t)->x, kt);
      load_pack<scalar_t, V>(chunk.slot(tokens, 1, t)->x, vt);
#pragma unroll
      for (int i = 0; i < V; ++i) sum[i].push(kt[i], vt[i], T(1));
    }
  }
  Decayed<T> total[V];
  chunk.template join<false>(own, through, start, wc, sum, s, total);
  if (!chunk.valid) return;
  if (chunk.walked_last()) {
#pragma unroll
    for (int i = 0; i < V; ++i) finish.template store<false>(chunk.row_index() + i, total[i]);
  }
  for (int64_t t = 0; t < len; ++t) {
    const int64_t at = chunk.n * g.L + t;
    if (kKeepStates && at % span == 0) {
      const int64_t row_start = chunk.b * ((g.T + span - 1) / span);
#pragma unroll
      for (int i = 0; i < V; ++i) states.template store<false>((row_start + at / span) * g.C + chunk.c0 + i, s[i]);
    }
    T out[V];
    load_pack<scalar_t, V>(chunk.slot(tokens, 0, t)->x, kt);
    load_pack<scalar_t, V>(chunk.slot(tokens, 1, t)->x, vt);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out[i] = emit(s[i], uc[i] + kt[i], vt[i]).y;
      s[i].push(kt[i], vt[i], T(1));
    }
    store_pack<scalar_t, V>(y + chunk.token_offset(t), out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Causal backward. R_i = sum_{t>i} e^{(t-1-i)w} (alpha_t, beta_t), plus the final state's gradient as the
// terms of a token T; dL/dk_i and dL/dv_i read e^{k_i} R_i, dL/dw reads the distance-weighted sums. The terms
// alpha_t, beta_t come from dL/dwkv_t, wkv_t and den_t (GradTerms). causal_backward's chunks are the forward's spans:
// it replays its span's forward from the state the forward kept for it, for wkv_t and den_t (reading neither from
// DRAM), sums the terms over the span, looks back for the sums entering it from the right, then walks its tokens
// right to left.

// Token t's gradients from r, the sum of the terms after it, and its own term e^x (va, vb) = e^{-p_t}
// (alpha_t, beta_t); r then takes that term.
template <typename T>
struct RightGrads {
  T gk, gv, gstep, gbonus;  // dL/dk_t, dL/dv_t, the distance-weighted part of dL/dstep, dL/du's term
};

template <typename T>
__device__ __forceinline__ RightGrads<T> right_step(Decayed<T>& r, T k, T v, T u, const Term<T>& term) {
  const T later = exp_term(k + r.scale()), bonus = exp_term(u + k + term.x);
  const T grad_bonus = bonus * (term.va * v + term.vb);
  const RightGrads<T> out{later * (v * r.a + r.b) + grad_bonus, later * r.a + bonus * term.va,
                          later * (v * r.da + r.db), grad_bonus};
  r.push(term.x, term.va, term.vb);
  return out;
}

// The incoming state (aa, bb, pp), [B, C], and its gradients. It stands for e^pp (aa, bb), which reaches token t as
// e^{tw} e^pp (aa, bb), so its gradients are R_{-1}, the sums entering the first token from the right.
template <typename T>
struct StateGrads {
  const T *aa, *bb, *pp;
  T *gaa, *gbb, *gpp;
  // Stores the gradients at j from r = R_{-1}; returns the state's part of dL/dw.
  __device__ __forceinline__ T store(int64_t j, const Decayed<T>& r) const {
    const T scale = exp(r.scale() + pp[j]), ga = r.a * scale, gb = r.b * scale;
    gaa[j] = ga;
    gbb[j] = gb;
    gpp[j] = aa[j] * ga + bb[j] * gb;
    return scale * (aa[j] * r.da + bb[j] * r.db);
  }
};

// The causal backward: each span's gradients, walking its tokens right to left from the sums entering from the
// right; the first span's block also stores the incoming state's gradients.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kOnePassThreads) causal_backward(
    Layout g, LookBack look, const acc_t<scalar_t>* __restrict__ w, const acc_t<scalar_t>* __restrict__ u,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, const scalar_t* __restrict__ gy,
    DecayedArray<acc_t<scalar_t>> states, DecayedArray<acc_t<scalar_t>> seed, DecayedArray<acc_t<scalar_t>> own,
    DecayedArray<acc_t<scalar_t>> through, StateGrads<acc_t<scalar_t>> state, scalar_t* __restrict__ gk,
    scalar_t* __restrict__ gv, acc_t<scalar_t>* __restrict__ gw, acc_t<scalar_t>* __restrict__ gu) {
  using T = acc_t<scalar_t>;
  constexpr int W = kDenWords<scalar_t>;
  using Tokens = Pack<scalar_t, V>;
  using Dens = Pack<T, W * V>;
  extern __shared__ __align__(16) unsigned char staged[];
  const auto chunk = OnePass<V>::take(g, look, true);
  // den first (the widest packs), then dL/dwkv, k, v (copied in) and wkv; the replay writes den and wkv.
  enum { kGrad, kKey, kValue, kWkv };
  Dens* const dens = reinterpret_cast<Dens*>(staged);
  Tokens* const tokens = reinterpret_cast<Tokens*>(dens + g.L * blockDim.x);
  const int64_t len = chunk.len();
  if (chunk.valid) {
    for (int64_t t = 0; t < len; ++t) {
      const int64_t o = chunk.token_offset(t);
      copy_async<sizeof(Tokens)>(chunk.slot(tokens, kGrad, t), gy + o);
      copy_async<sizeof(Tokens)>(chunk.slot(tokens, kKey, t), k + o);
      copy_async<sizeof(Tokens)>(chunk.slot(tokens, kValue, t), v + o);
    }
  }
  copies_commit();
  const auto load = [&](int input, int64_t t, T (&out)[V]) {
    load_pack<scalar_t, V>(chunk.slot(tokens, input, t)->x, out);
  };
  const auto term_at = [&](int64_t t, Term<T> (&term)[V]) {
    T gt[V], yt[V], words[W * V];
    load(kGrad, t, gt);
    load(kWkv, t, yt);
    load_pack<T, W * V>(chunk.slot(dens, 0, t)->x, words);
    GradTerms<scalar_t>::of(gt, yt, words, term);
  };
  T wc[V], uc[V];
  Decayed<T> sum[V], r[V], s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    wc[i] = chunk.valid ? w[chunk.c0 + i] : T(0);
    uc[i] = chunk.valid ? u[chunk.c0 + i] : T(0);
    sum[i] = Decayed<T>::empty(wc[i]);
    s[i] = chunk.valid ? states.template load<false>(chunk.chunk_index(chunk.n) + i, wc[i]) : sum[i];
  }
  copies_wait<0>();
  if (chunk.valid) {
    for (int64_t t = 0; t < len; ++t) {
      T kt[V], vt[V], out[V], words[W * V];
      load(kKey, t, kt);
      load(kValue, t, vt);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const Emitted<T> e = emit(s[i], uc[i] + kt[i], vt[i]);
        out[i] = e.y;
        den_words<scalar_t>(e.p, e.den, words + W * i);
        s[i].push(kt[i], vt[i], T(1));
      }
      store_pack<scalar_t, V>(chunk.slot(tokens, kWkv, t)->x, out);
      store_pack<T, W * V>(chunk.slot(dens, 0, t)->x, words);
      Term<T> term[V];
      term_at(t, term);
#pragma unroll
      for (int i = 0; i < V; ++i) sum[i].add(term[i].x, static_cast<T>(t), term[i].va, term[i].vb);
    }
  }
  Decayed<T> total[V];
  chunk.template join<true>(own, through, seed, wc, sum, r, total);
  if (!chunk.valid) return;
  T gw_sum[V], gu_sum[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    gw_sum[i] = chunk.walked_last() ? state.store(chunk.row_index() + i, total[i]) : T(0);
    gu_sum[i] = T(0);
  }
  for (int64_t t = len - 1; t >= 0; --t) {
    T kt[V], vt[V], gk_out[V], gv_out[V];
    Term<T> term[V];
    term_at(t, term);
    load(kKey, t, kt);
    load(kValue, t, vt);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const RightGrads<T> d = right_step(r[i], kt[i], vt[i], uc[i], term[i]);
      gk_out[i] = d.gk, gv_out[i] = d.gv;
      gw_sum[i] += d.gstep;
      gu_sum[i] += d.gbonus;
    }
    const int64_t o = chunk.token_offset(t);
    store_pack<scalar_t, V>(gk + o, gk_out);
    store_pack<scalar_t, V>(gv + o, gv_out);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    gw[chunk.chunk_index(chunk.n) + i] = gw_sum[i];
    gu[chunk.chunk_index(chunk.n) + i] = gu_sum[i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Bidirectional forward and backward. Here w is the step exponent -w_user: left and right sums both decay
// by e^w per token.

template <typename scalar_t>
struct TokenTerms {  // forward terms: e^{k_t} (v_t, 1)
  const scalar_t *k, *v;
  template <int V>
  __device__ __forceinline__ void load(int64_t o, Term<acc_t<scalar_t>> (&out)[V]) const {
    acc_t<scalar_t> kt[V], vt[V];
    load_pack<scalar_t, V>(k + o, kt);
    load_pack<scalar_t, V>(v + o, vt);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = {kt[i], vt[i], acc_t<scalar_t>(1)};
  }
};

// The tile passes' staged inputs: k and v (forward); k, v, dL/dwkv and wkv, then the kept den words (backward).
template <typename scalar_t, int V>
using TokenStages = Stages<scalar_t, V, 2>;
template <typename scalar_t, int V>
using GradStages = Stages<scalar_t, V, 4>;
template <typename scalar_t, int V>
using DenStages = Stages<acc_t<scalar_t>, V, 1, kDenWords<scalar_t>>;

template <typename scalar_t, int V, bool kKeepDen>
__global__ void __launch_bounds__(kThreads, 2) bi_output(
    Layout g, const acc_t<scalar_t>* __restrict__ w, const acc_t<scalar_t>* __restrict__ u,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, DecayedArray<acc_t<scalar_t>> entering_left,
    DecayedArray<acc_t<scalar_t>> entering_right, DecayedArray<acc_t<scalar_t>> tile_starts, scalar_t* __restrict__ y,
    acc_t<scalar_t>* __restrict__ den) {
  using T = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char staged[];
  const TokenStages<scalar_t, V> kv{reinterpret_cast<Pack<scalar_t, V>*>(staged)};
  const int64_t idx = thread_index();
  if (idx >= g.B * g.N * (g.C / V)) return;
  const ChunkThread th = ChunkThread::of<V>(g, idx);
  T uc[V];
  Decayed<T> left_in[V], s[V], r[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    uc[i] = u[th.c0 + i];
    left_in[i] = entering_left.template load<false>(th.chunk_index(g) + i, w[th.c0 + i]);
    r[i] = entering_right.template load<false>(th.chunk_index(g) + i, w[th.c0 + i]);
  }
  T la[kSub][V], lb[kSub][V], lm[kSub][V];
  walk_tiles(
      g, th, [&](int64_t tile, int64_t o, int count) { kv.fetch(tile, {k, v}, o, g.C, count); },
      [&](int64_t tile, int64_t t0) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const auto local = tile_starts.template load<false>(th.tile_index(g, tile) + i, w[th.c0 + i]);
          s[i] = left_in[i].then(static_cast<T>(t0), local);
        }
      },
      [&](int64_t tile, int j, int64_t) {
        T kt[V], vt[V];
        kv.load(tile, 0, j, kt);
        kv.load(tile, 1, j, vt);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          la[j][i] = s[i].a, lb[j][i] = s[i].b, lm[j][i] = s[i].scale();
          s[i].push(kt[i], vt[i], T(1));
        }
      },
      [&](int64_t tile, int j, int64_t o) {
        constexpr int W = kDenWords<scalar_t>;
        T kt[V], vt[V], out[V], words[W * V];
        kv.load(tile, 0, j, kt);
        kv.load(tile, 1, j, vt);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const T bonus = uc[i] + kt[i], right = r[i].scale(), top = max(max(lm[j][i], right), bonus);
          const T el = exp_term(lm[j][i] - top), er = exp_term(right - top), eb = exp_term(bonus - top);
          const T d = el * lb[j][i] + er * r[i].b + eb;
          out[i] = divide(el * la[j][i] + er * r[i].a + eb * vt[i], d);
          if constexpr (kKeepDen) den_words<scalar_t>(top, d, words + W * i);
          r[i].push(kt[i], vt[i], T(1));
        }
        store_pack<scalar_t, V>(y + o, out);
        if constexpr (kKeepDen) store_pack<T, W * V>(den + W * o, words);
      });
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, 2) bi_grad_output(
    Layout g, const acc_t<scalar_t>* __restrict__ w, const acc_t<scalar_t>* __restrict__ u,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, GradTerms<scalar_t> terms,
    DecayedArray<acc_t<scalar_t>> entering_left, DecayedArray<acc_t<scalar_t>> entering_right,
    DecayedArray<acc_t<scalar_t>> tile_starts, scalar_t* __restrict__ gk, scalar_t* __restrict__ gv,
    acc_t<scalar_t>* __restrict__ gw, acc_t<scalar_t>* __restrict__ gu) {
  using T = acc_t<scalar_t>;
  constexpr int W = kDenWords<scalar_t>;
  extern __shared__ __align__(16) unsigned char staged[];
  const GradStages<scalar_t, V> inputs{reinterpret_cast<Pack<scalar_t, V>*>(staged)};
  const DenStages<scalar_t, V> dens{reinterpret_cast<Pack<T, W * V>*>(staged + inputs.kBytesPerThread * blockDim.x)};
  const auto load = [&](int64_t tile, int j, T (&kt)[V], T (&vt)[V], Term<T> (&term)[V]) {
    T gt[V], yt[V], words[W * V];
    inputs.load(tile, 0, j, kt);
    inputs.load(tile, 1, j, vt);
    inputs.load(tile, 2, j, gt);
    inputs.load(tile, 3, j, yt);
    dens.load(tile, 0, j, words);
    GradTerms<scalar_t>::of(gt, yt, words, term);
  };
  const int64_t idx = thread_index();
  if (idx >= g.B * g.N * (g.C / V)) return;
  const ChunkThread th = ChunkThread::of<V>(g, idx);
  T uc[V], gstep[V], gu_sum[V];  // gstep: the gradient of the step exponent, -dL/dw
  Decayed<T> left_in[V], s[V], r[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    uc[i] = u[th.c0 + i];
    left_in[i] = entering_left.template load<true>(th.chunk_index(g) + i, w[th.c0 + i]);
    r[i] = entering_right.template load<true>(th.chunk_index(g) + i, w[th.c0 + i]);
    gstep[i] = gu_sum[i] = T(0);
  }
  T gk_left[kSub][V], gv_left[kSub][V];
  walk_tiles(
      g, th,
      [&](int64_t tile, int64_t o, int count) {
        inputs.fetch(tile, {k, v, terms.gy, terms.y}, o, g.C, count);
        dens.fetch(tile, {terms.den}, o, g.C, count);
      },
      [&](int64_t tile, int64_t t0) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const auto local = tile_starts.template load<true>(th.tile_index(g, tile) + i, w[th.c0 + i]);
          s[i] = left_in[i].then(static_cast<T>(t0), local);
        }
      },
      [&](int64_t tile, int j, int64_t) {
        T kt[V], vt[V];
        Term<T> term[V];
        load(tile, j, kt, vt, term);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const T earlier = exp_term(kt[i] + s[i].scale());
          gv_left[j][i] = earlier * s[i].a;
          gk_left[j][i] = earlier * (vt[i] * s[i].a + s[i].b);
          gstep[i] += earlier * (vt[i] * s[i].da + s[i].db);
          s[i].push(term[i].x, term[i].va, term[i].vb);
        }
      },
      [&](int64_t tile, int j, int64_t o) {
        T kt[V], vt[V], gk_out[V], gv_out[V];
        Term<T> term[V];  // e^{-p} (dL/dwkv, -dL/dwkv wkv) / d
        load(tile, j, kt, vt, term);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const RightGrads<T> d = right_step(r[i], kt[i], vt[i], uc[i], term[i]);
          gk_out[i] = gk_left[j][i] + d.gk, gv_out[i] = gv_left[j][i] + d.gv;
          gstep[i] += d.gstep;
          gu_sum[i] += d.gbonus;
        }
        store_pack<scalar_t, V>(gk + o, gk_out);
        store_pack<scalar_t, V>(gv + o, gv_out);
      });
#pragma unroll
  for (int i = 0; i < V; ++i) {
    gw[th.chunk_index(g) + i] = -gstep[i];
    gu[th.chunk_index(g) + i] = gu_sum[i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

int blocks_for(int64_t n, int threads = kThreads) { return static_cast<int>((n + threads - 1) / threads); }

// Launches a tile pass (bi_output, bi_grad_output) over n threads whose Stages take bytes_per_thread of shared
// memory: blocks of kThreads, halved until two blocks fit an SM (kStagedBlockBytes each), as __launch_bounds__
// asks. Only fp64 and the fp32 backward need smaller blocks.
constexpr int kStagedBlockBytes = 112 * 1024;
template <typename Kernel, typename... Args>
void launch_staged(Kernel kernel, int64_t n, size_t bytes_per_thread, const Args&... args) {
  int threads = kThreads;
  while (threads > 32 && threads * bytes_per_thread > kStagedBlockBytes) threads /= 2;
  const int bytes = static_cast<int>(threads * bytes_per_thread);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<blocks_for(n, threads), threads, bytes, at::cuda::getCurrentCUDAStream()>>>(args...);
}

// Chunks long enough to keep the scans short, short enough to give every SM work: about `threads` threads
// of `group` channels each. Chunks longer than a tile are whole tiles.
Layout make_layout(int64_t B, int64_t T, int64_t C, int64_t group, int64_t threads) {
  const int64_t wanted = std::max((T * B * (C / group) + threads - 1) / threads, kMinChunk);
  const int64_t L = std::min(T, (wanted + kSub - 1) / kSub * kSub);
  return Layout{B, T, C, L, (T + L - 1) / L};
}

// Channels per thread: the widest of 4, 2, 1 that divides C and is at most `widest`. More channels give each
// thread independent recurrences to overlap and wider loads; the register tiles of the two-way passes take 2, and
// so do the one-pass causal kernels, whose staged chunks would be half as long at 4 (slower: BENCHMARKS.md).
constexpr int kMaxWidth = 4;
int channel_width(int64_t C, int widest) { return widest >= 4 && C % 4 == 0 ? 4 : widest >= 2 && C % 2 == 0 ? 2 : 1; }

// Calls f(std::bool_constant<flag>{}): a run-time flag as a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  flag ? f(std::true_type{}) : f(std::false_type{});
}

// Calls launch(std::integral_constant<int, V>{}) for V = channel_width(C, kWidest). Widths above kWidest are not
// instantiated (each case's constant is capped at kWidest): the tile passes' kernels for 4 channels would spill.
template <int kWidest, typename F>
void with_width(int64_t C, F&& launch) {
  switch (channel_width(C, kWidest)) {
    case 4: launch(std::integral_constant<int, std::min(4, kWidest)>{}); break;
    case 2: launch(std::integral_constant<int, std::min(2, kWidest)>{}); break;
    default: launch(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Storage for decayed sums: five arrays (a, b, da, db, m), each [B, rows, C]. An undefined array is a null
// pointer in the view: no da, db are zero distance weights (see DecayedArray::load_given).
struct DecayedStorage {
  at::Tensor a, b, da, db, m;
  template <typename T>
  DecayedArray<T> view() const {
    const auto p = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<T>() : nullptr; };
    return {p(a), p(b), p(da), p(db), p(m)};
  }
};

DecayedStorage decayed_storage(int64_t B, int64_t rows, int64_t C, const at::TensorOptions& opts) {
  const auto data = at::empty({5, B, rows, C}, opts);
  return {data[0], data[1], data[2], data[3], data[4]};
}

// A sum given by parts, each [B, C] (contiguous, in the arithmetic dtype), without distance weights.
DecayedStorage decayed_from(const at::Tensor& a, const at::Tensor& b, const at::Tensor& m) { return {a, b, {}, {}, m}; }

at::ScalarType arithmetic_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Messages format numbers with std::to_string, as cuda/wkv_matrix.cu does: an integer streamed into TORCH_CHECK's
// message from that extension crashed (a segmentation fault in std::ostream's number formatting, device machine).
std::string dims(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// The shapes every op checks: k, v (and the like) [B, T, C] of one float dtype; w, u [C].
void check_tokens(const char* op, const at::Tensor& w, const at::Tensor& u, std::initializer_list<at::Tensor> tokens) {
  const at::Tensor& k = *tokens.begin();
  TORCH_CHECK(k.dim() == 3, op, ": k must be [B, T, C], got ", dims(k.sizes()));
  TORCH_CHECK(k.size(0) >= 1 && k.size(1) >= 1 && k.size(2) >= 1, op, ": B, T and C must be >= 1, got ",
              dims(k.sizes()));
  for (const auto& x : tokens) {
    TORCH_CHECK(x.sizes() == k.sizes(), op, ": token tensors must share k's shape ", dims(k.sizes()), ", got ",
                dims(x.sizes()));
    TORCH_CHECK(x.scalar_type() == k.scalar_type(), op, ": token tensors must share k's dtype");
    TORCH_CHECK(x.device() == k.device(), op, ": all tensors must be on ", k.device().str());
  }
  TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), op, ": w and u must have C = ",
              std::to_string(k.size(2)), " elements");
}

at::Tensor as_arithmetic(const at::Tensor& t, at::ScalarType type) { return t.to(type).contiguous(); }

// A scan over chunks: through the chunks' `summaries` (right to left when `reverse`), the sums `entering` every
// chunk.
struct Scan {
  const DecayedStorage &summaries, &entering;
  bool reverse;
  template <typename T>
  ScanSide<T> side() const {
    return {summaries.view<T>(), entering.view<T>(), reverse};
  }
};

// Runs one scan, or two independent ones in one launch.
template <typename T, bool kDistance>
void scan_chunks(const Layout& g, const T* w, const Scan& first, const Scan* second = nullptr) {
  int segments = 1;  // per row: enough for about kScanChunksPerRun chunks a run, at least 8 rows a block
  while (segments < kThreads / 8 && segments * kScanChunksPerRun < g.N) segments *= 2;
  const int64_t rows_per_block = kThreads / segments;
  const dim3 grid((g.B * g.C + rows_per_block - 1) / rows_per_block, second == nullptr ? 1 : 2);
  chunk_scan<T, kDistance><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g, w, segments, first.side<T>(), (second == nullptr ? first : *second).side<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A one-pass launch (causal_forward, causal_backward) over k's [B, T, C] tokens at V channels a thread, in chunks
// of L tokens (or one of T) with token_bytes of staged inputs per token and channel: the published sums, and the
// zeroed status words and ticket.
struct OnePassLaunch {
  Layout g;
  int64_t blocks;
  int bytes;  // of shared memory a block
  DecayedStorage own, through;
  at::Tensor look;  // the ticket, then the status words

  OnePassLaunch(const at::Tensor& k, int V, int64_t L, size_t token_bytes, const at::TensorOptions& opts) {
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    L = std::min(T, L);
    g = Layout{B, T, C, L, (T + L - 1) / L};
    bytes = static_cast<int>(L * kOnePassThreads * V * token_bytes);
    TORCH_INTERNAL_ASSERT(bytes <= static_cast<int>(kOnePassBlockBytes), "one-pass chunk of ", std::to_string(bytes),
                          " bytes");
    blocks = B * g.N * ((C / V + kOnePassThreads - 1) / kOnePassThreads);
    own = decayed_storage(B, g.N, C, opts);
    through = decayed_storage(B, g.N, C, opts);
    look = at::zeros({blocks + 1}, opts.dtype(at::kInt));
  }
  LookBack view() const {
    int* words = look.data_ptr<int>();
    return {words + 1, reinterpret_cast<unsigned int*>(words)};
  }
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, const Args&... args) const {
    kernel<<<blocks, kOnePassThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(g, view(), args...);
  }
};

// The shape of the denominators a Bi-WKV forward keeps for its backward (see kDenWords).
std::vector<int64_t> den_shape(const at::Tensor& k) {
  const int64_t words = k.element_size() >= 4 ? 2 : 1;
  return {k.size(0), k.size(1), k.size(2), words};
}

at::Tensor kept_den(const at::Tensor& k, bool keep_den, const at::TensorOptions& opts) {
  return keep_den ? at::empty(den_shape(k), opts) : at::empty({0}, opts);
}

// The shape of the states a causal forward keeps for its backward: a, b and m (the sum's scale) of the state entering
// every span of kStateSpan tokens, [3, B, spans, C].
std::vector<int64_t> states_shape(const at::Tensor& k) {
  const int64_t span = AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "states_shape",
                                                       [&] { return kStateSpan<scalar_t>; });
  return {3, k.size(0), (k.size(1) + span - 1) / span, k.size(2)};
}

// Kept states (states_shape) as the sums they hold, without distance weights.
DecayedStorage kept_sums(const at::Tensor& states) { return decayed_from(states[0], states[1], states[2]); }

// What a backward reads from its forward (`what`, kept with `flag`) must have the forward's shape and dtype.
void check_kept(const char* op, const char* what, const char* flag, const at::Tensor& kept,
                const std::vector<int64_t>& shape, at::ScalarType type) {
  TORCH_CHECK(kept.sizes() == at::IntArrayRef(shape) && kept.scalar_type() == type, op, ": ", what, " must be ",
              dims(shape), " ", type, " (the forward's, with ", flag, "), got ", dims(kept.sizes()), " ",
              kept.scalar_type());
}

// wkv, the state after the last token (aa, bb, pp) and, when keep_states, the states the backward starts its spans
// from (states_shape; else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_forward(
    const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& aa_,
    const at::Tensor& bb_, const at::Tensor& pp_, bool keep_states) {
  check_tokens("wkv4_forward", w_, u_, {k_, v_});
  const int64_t B = k_.size(0), C = k_.size(2);
  for (const auto* s : {&aa_, &bb_, &pp_}) {
    TORCH_CHECK(s->dim() == 2 && s->size(0) == B && s->size(1) == C, "wkv4_forward: state tensors must be [B, C]");
  }
  const c10::cuda::CUDAGuard guard(k_.device());
  const auto type = arithmetic_type(k_.scalar_type());
  const auto opts = k_.options().dtype(type);
  const auto w = as_arithmetic(w_, type), u = as_arithmetic(u_, type), k = k_.contiguous(), v = v_.contiguous();
  const auto start = decayed_from(as_arithmetic(aa_, type), as_arithmetic(bb_, type), as_arithmetic(pp_, type));
  const DecayedStorage finish{at::empty({B, C}, opts), at::empty({B, C}, opts), {}, {}, at::empty({B, C}, opts)};
  auto y = at::empty_like(k);
  const auto states = keep_states ? at::empty(states_shape(k), opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "wkv4_forward", [&] {
    using T = acc_t<scalar_t>;
    const auto kept = keep_states ? kept_sums(states).view<T>() : DecayedArray<T>{};
    with_flag(keep_states, [&](auto keep) {
      with_width<kTileWidth>(C, [&](auto width) {
        constexpr int V = decltype(width)::value;
        constexpr size_t token_bytes = 2 * sizeof(scalar_t);  // k and v
        constexpr int64_t span = kStateSpan<scalar_t>, L = kOnePassBlockBytes / (kOnePassThreads * V * token_bytes);
        static_assert(L >= span, "a forward chunk holds at least one span");
        const OnePassLaunch launch(k, V, L / span * span, token_bytes, opts);
        launch(causal_forward<scalar_t, V, keep>, w.data_ptr<T>(), u.data_ptr<T>(), k.data_ptr<scalar_t>(),
               v.data_ptr<scalar_t>(), start.view<T>(), launch.own.view<T>(), launch.through.view<T>(),
               finish.view<T>(), y.data_ptr<scalar_t>(), kept);
      });
    });
  });
  return {y, finish.a, finish.b, finish.m, states};
}

// Gradients of wkv4_forward. The output pp is a normalisation (the state stands for e^pp (aa, bb)): its
// gradient is taken as 0, exact whenever the loss sees the state through e^pp aa and e^pp bb, as the next
// call (which differentiates pp_in that way) and the wkv outputs do.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward(
    const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& aa_,
    const at::Tensor& bb_, const at::Tensor& pp_, const at::Tensor& pp_out, const at::Tensor& states_,
    const at::Tensor& gy_, const at::Tensor& gaa, const at::Tensor& gbb) {
  check_tokens("wkv4_backward", w_, u_, {k_, v_, gy_});
  const int64_t B = k_.size(0), C = k_.size(2);
  const c10::cuda::CUDAGuard guard(k_.device());
  const auto type = arithmetic_type(k_.scalar_type());
  const auto opts = k_.options().dtype(type);
  check_kept("wkv4_backward", "states", "keep_states", states_, states_shape(k_), type);
  const auto w = as_arithmetic(w_, type), u = as_arithmetic(u_, type);
  const auto k = k_.contiguous(), v = v_.contiguous(), gy = gy_.contiguous(), states = states_.contiguous();
  const auto aa = as_arithmetic(aa_, type), bb = as_arithmetic(bb_, type), pp = as_arithmetic(pp_, type);
  const auto seed = decayed_from(as_arithmetic(gaa, type), as_arithmetic(gbb, type), as_arithmetic(-pp_out, type));
  auto gk = at::empty_like(k), gv = at::empty_like(v);
  const auto gaa_in = at::empty({B, C}, opts), gbb_in = at::empty({B, C}, opts), gpp_in = at::empty({B, C}, opts);
  at::Tensor gwu;  // per-chunk w and u gradients side by side, so that one reduction sums both
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "wkv4_backward", [&] {
    using T = acc_t<scalar_t>;
    with_width<kTileWidth>(C, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const OnePassLaunch launch(k, V, kStateSpan<scalar_t>, kBackwardTokenBytes<scalar_t>, opts);
      gwu = at::empty({2, B, launch.g.N, C}, opts);
      launch(causal_backward<scalar_t, V>, w.data_ptr<T>(), u.data_ptr<T>(), k.data_ptr<scalar_t>(),
             v.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), kept_sums(states).view<T>(),
             seed.view<T>(), launch.own.view<T>(), launch.through.view<T>(),
             StateGrads<T>{aa.data_ptr<T>(), bb.data_ptr<T>(), pp.data_ptr<T>(), gaa_in.data_ptr<T>(),
                           gbb_in.data_ptr<T>(), gpp_in.data_ptr<T>()},
             gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), gwu[0].data_ptr<T>(), gwu[1].data_ptr<T>());
    });
  });
  const auto gwu_sum = gwu.sum(at::IntArrayRef{1, 2});  // the state's part of dL/dw is in its first span's partial
  return {gwu_sum[0], gwu_sum[1], gk, gv, gaa_in, gbb_in, gpp_in};
}

// wkv and, when keep_den, the denominators the backward needs (else an empty tensor: inference writes less).
std::tuple<at::Tensor, at::Tensor> biwkv_forward(const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& k_,
                                                 const at::Tensor& v_, bool keep_den) {
  check_tokens("biwkv_forward", w_, u_, {k_, v_});
  const int64_t B = k_.size(0), T = k_.size(1), C = k_.size(2);
  const c10::cuda::CUDAGuard guard(k_.device());
  const auto type = arithmetic_type(k_.scalar_type());
  const auto opts = k_.options().dtype(type);
  const auto step = as_arithmetic(-w_, type), u = as_arithmetic(u_, type), k = k_.contiguous(), v = v_.contiguous();
  const Layout g = make_layout(B, T, C, channel_width(C, kTileWidth), kTargetThreads);
  const auto from_left = decayed_storage(B, g.N, C, opts), from_right = decayed_storage(B, g.N, C, opts);
  const auto entering_left = decayed_storage(B, g.N, C, opts), entering_right = decayed_storage(B, g.N, C, opts);
  const auto tile_starts = decayed_storage(B, g.N * g.tiles(), C, opts);
  auto y = at::empty_like(k);
  auto den = kept_den(k, keep_den, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "biwkv_forward", [&] {
    using T = acc_t<scalar_t>;
    auto stream = at::cuda::getCurrentCUDAStream();
    const T* wp = step.data_ptr<T>();
    const scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    with_width<kMaxWidth>(C, [&](auto width) {
      constexpr int V = decltype(width)::value;
      chunk_summary<T, false, V><<<blocks_for(B * g.N * (C / V)), kThreads, 0, stream>>>(
          g, wp, TokenTerms<scalar_t>{kp, vp}, from_left.view<T>(), from_right.view<T>(), tile_starts.view<T>());
    });
    const Scan right{from_right, entering_right, true};
    scan_chunks<T, false>(g, wp, Scan{from_left, entering_left, false}, &right);
    with_width<kTileWidth>(C, [&](auto width) {
      constexpr int V = decltype(width)::value;
      with_flag(keep_den, [&](auto keep) {
        launch_staged(bi_output<scalar_t, V, keep>, B * g.N * (C / V), TokenStages<scalar_t, V>::kBytesPerThread, g,
                      wp, u.data_ptr<T>(), kp, vp, entering_left.view<T>(), entering_right.view<T>(),
                      tile_starts.view<T>(), y.data_ptr<scalar_t>(), keep ? den.data_ptr<T>() : nullptr);
      });
    });
  });
  return {y, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> biwkv_backward(
    const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& y_,
    const at::Tensor& den_, const at::Tensor& gy_) {
  check_tokens("biwkv_backward", w_, u_, {k_, v_, y_, gy_});
  const int64_t B = k_.size(0), T = k_.size(1), C = k_.size(2);
  const c10::cuda::CUDAGuard guard(k_.device());
  const auto type = arithmetic_type(k_.scalar_type());
  const auto opts = k_.options().dtype(type);
  check_kept("biwkv_backward", "den", "keep_den", den_, den_shape(k_), type);
  const auto step = as_arithmetic(-w_, type), u = as_arithmetic(u_, type);
  const auto k = k_.contiguous(), v = v_.contiguous(), y = y_.contiguous(), gy = gy_.contiguous();
  const auto den = den_.contiguous();
  const Layout g = make_layout(B, T, C, channel_width(C, kTileWidth), kTargetThreads);
  const auto from_left = decayed_storage(B, g.N, C, opts), from_right = decayed_storage(B, g.N, C, opts);
  const auto entering_left = decayed_storage(B, g.N, C, opts), entering_right = decayed_storage(B, g.N, C, opts);
  const auto tile_starts = decayed_storage(B, g.N * g.tiles(), C, opts);
  auto gk = at::empty_like(k), gv = at::empty_like(v);
  const auto gwu = at::empty({2, B, g.N, C}, opts);  // as in wkv4_backward
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "biwkv_backward", [&] {
    using T = acc_t<scalar_t>;
    auto stream = at::cuda::getCurrentCUDAStream();
    const T* wp = step.data_ptr<T>();
    const GradTerms<scalar_t> terms{gy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), den.data_ptr<T>()};
    with_width<kMaxWidth>(C, [&](auto width) {
      constexpr int V = decltype(width)::value;
      chunk_summary<T, true, V><<<blocks_for(B * g.N * (C / V)), kThreads, 0, stream>>>(
          g, wp, terms, from_left.view<T>(), from_right.view<T>(), tile_starts.view<T>());
    });
    const Scan right{from_right, entering_right, true};
    scan_chunks<T, true>(g, wp, Scan{from_left, entering_left, false}, &right);
    with_width<kTileWidth>(C, [&](auto width) {
      constexpr int V = decltype(width)::value;
      constexpr size_t bytes = GradStages<scalar_t, V>::kBytesPerThread + DenStages<scalar_t, V>::kBytesPerThread;
      launch_staged(bi_grad_output<scalar_t, V>, B * g.N * (C / V), bytes, g, wp, u.data_ptr<T>(),
                    k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), terms, entering_left.view<T>(),
                    entering_right.view<T>(), tile_starts.view<T>(), gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
                    gwu[0].data_ptr<T>(), gwu[1].data_ptr<T>());
    });
  });
  const auto gwu_sum = gwu.sum(at::IntArrayRef{1, 2});
  return {gwu_sum[0], gwu_sum[1], gk, gv};
}

}  // namespace

TORCH_LIBRARY(zoo, m) {
  m.def("wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp, bool keep_states) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("wkv4_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp, Tensor pp_out, "
        "Tensor states, Tensor gy, Tensor gaa, Tensor gbb) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("biwkv_forward(Tensor w, Tensor u, Tensor k, Tensor v, bool keep_den) -> (Tensor, Tensor)");
  m.def("biwkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor y, Tensor den, Tensor gy) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zoo, CUDA, m) {
  m.impl("wkv4_forward", &wkv4_forward);
  m.impl("wkv4_backward", &wkv4_backward);
  m.impl("biwkv_forward", &biwkv_forward);
  m.impl("biwkv_backward", &biwkv_backward);
}
