// RWKV-4 WKV forward on CUDA as a chunked scan (parallel over B x T-chunks x C, not only B x C).
//
// Per channel, with w < 0 and u the bonus (see blocks/wkv.py for the float64 reference):
//   wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})
// The state (a, b, p) stands for (e^p a, e^p b) = sum_{i<=t} e^{(t-i)w + k_i} (v_i, 1); p is the running
// maximum of the exponents, so nothing overflows. Three launches:
//   1. chunk_summary: each chunk's state from an empty start (one thread per batch, chunk, channel);
//   2. chunk_scan:    the state entering every chunk, and the final state (one thread per batch, channel);
//   3. chunk_output:  each chunk replays its tokens from its entering state and writes wkv.
// Passes 1 and 3 give each thread 4 (or 2) adjacent channels when C allows, for vector loads and
// independent recurrences to overlap. Inputs are fp32, bf16 or fp16; all arithmetic is fp32.
// Any B, T >= 1, C >= 1.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kTargetThreads = 1 << 17;  // (batch, chunk, channel group) threads: fastest of 2^16..2^19 on an H100
constexpr int64_t kMinChunk = 32;

struct State {
  float a, b, p;
};

// Take token (k, v) into a state one step older: S <- e^w S + e^k (v, 1).
__device__ __forceinline__ void absorb(State& s, float w, float k, float v) {
  const float decayed = s.p + w;
  const float p = fmaxf(decayed, k);
  const float e1 = expf(decayed - p), e2 = expf(k - p);
  s.a = e1 * s.a + e2 * v;
  s.b = e1 * s.b + e2;
  s.p = p;
}

// wkv of token (k, v) read against the state of the tokens before it.
__device__ __forceinline__ float emit(const State& s, float u, float k, float v) {
  const float bonus = u + k;
  const float p = fmaxf(s.p, bonus);
  const float e1 = expf(s.p - p), e2 = expf(bonus - p);
  return (e1 * s.a + e2 * v) / (e1 * s.b + e2);
}

struct Layout {
  int64_t B, T, C, L, N;  // L tokens per chunk, N chunks
  __device__ __forceinline__ int64_t chunk_len(int64_t n) const { return min(L, T - n * L); }
};

// V consecutive channels, loaded and stored in one vector access (C % V == 0 keeps them aligned).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t x[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ void load(const scalar_t* p, float (&out)[V]) {
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pack.x[i]);
}

// Thread idx of a (batch, chunk, channel group) launch: ((b * N) + n) * (C / V) + group.
struct ChunkThread {
  int64_t b, n, c0;
  template <int V>
  __device__ __forceinline__ static ChunkThread of(const Layout& g, int64_t idx) {
    const int64_t groups = g.C / V;
    return ChunkThread{idx / (groups * g.N), (idx / groups) % g.N, (idx % groups) * V};
  }
  __device__ __forceinline__ int64_t token_offset(const Layout& g) const { return (b * g.T + n * g.L) * g.C + c0; }
  __device__ __forceinline__ int64_t state_offset(const Layout& g) const { return (b * g.N + n) * g.C + c0; }
};

template <typename scalar_t, int V>
__global__ void chunk_summary(Layout g, const float* __restrict__ w, const scalar_t* __restrict__ k,
                              const scalar_t* __restrict__ v, float* __restrict__ sa, float* __restrict__ sb,
                              float* __restrict__ sp) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= g.B * g.N * (g.C / V)) return;
  const ChunkThread th = ChunkThread::of<V>(g, idx);
  const scalar_t* kp = k + th.token_offset(g);
  const scalar_t* vp = v + th.token_offset(g);
  float wc[V];
  State s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    wc[i] = w[th.c0 + i];
    s[i] = State{0.f, 0.f, -1e38f};
  }
  for (int64_t t = 0, len = g.chunk_len(th.n); t < len; ++t, kp += g.C, vp += g.C) {
    float kt[V], vt[V];
    load<scalar_t, V>(kp, kt);
    load<scalar_t, V>(vp, vt);
#pragma unroll
    for (int i = 0; i < V; ++i) absorb(s[i], wc[i], kt[i], vt[i]);
  }
  const int64_t j = th.state_offset(g);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sa[j + i] = s[i].a;
    sb[j + i] = s[i].b;
    sp[j + i] = s[i].p;
  }
}

// Walks the chunks of one (batch, channel): reads the chunk summaries sa/sb/sp, writes the state entering
// each chunk to ea/eb/ep and the state after the last chunk to the *_out tensors. Summaries and entering
// states live in separate buffers so that the unrolled loop can issue its loads ahead of the recurrence.
__global__ void chunk_scan(Layout g, const float* __restrict__ w, const float* __restrict__ aa_in,
                           const float* __restrict__ bb_in, const float* __restrict__ pp_in,
                           const float* __restrict__ sa, const float* __restrict__ sb, const float* __restrict__ sp,
                           float* __restrict__ ea, float* __restrict__ eb, float* __restrict__ ep,
                           float* __restrict__ aa_out, float* __restrict__ bb_out, float* __restrict__ pp_out) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // b * C + c
  if (idx >= g.B * g.C) return;
  const int64_t c = idx % g.C, b = idx / g.C;
  const float wc = w[c];
  State s{aa_in[idx], bb_in[idx], pp_in[idx]};
#pragma unroll 8
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t j = (b * g.N + n) * g.C + c;
    const State local{sa[j], sb[j], sp[j]};
    ea[j] = s.a;
    eb[j] = s.b;
    ep[j] = s.p;
    const float decayed = s.p + static_cast<float>(g.chunk_len(n)) * wc;
    const float p = fmaxf(decayed, local.p);
    const float e1 = expf(decayed - p), e2 = expf(local.p - p);
    s = State{e1 * s.a + e2 * local.a, e1 * s.b + e2 * local.b, p};
  }
  aa_out[idx] = s.a;
  bb_out[idx] = s.b;
  pp_out[idx] = s.p;
}

template <typename scalar_t, int V>
__global__ void chunk_output(Layout g, const float* __restrict__ w, const float* __restrict__ u,
                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                             const float* __restrict__ sa, const float* __restrict__ sb,
                             const float* __restrict__ sp, scalar_t* __restrict__ y) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= g.B * g.N * (g.C / V)) return;
  const ChunkThread th = ChunkThread::of<V>(g, idx);
  const int64_t offset = th.token_offset(g), j = th.state_offset(g);
  float wc[V], uc[V];
  State s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    wc[i] = w[th.c0 + i];
    uc[i] = u[th.c0 + i];
    s[i] = State{sa[j + i], sb[j + i], sp[j + i]};
  }
  for (int64_t t = 0, len = g.chunk_len(th.n); t < len; ++t) {
    float kt[V], vt[V];
    load<scalar_t, V>(k + offset + t * g.C, kt);
    load<scalar_t, V>(v + offset + t * g.C, vt);
    Pack<scalar_t, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out.x[i] = static_cast<scalar_t>(emit(s[i], uc[i], kt[i], vt[i]));
      absorb(s[i], wc[i], kt[i], vt[i]);
    }
    *reinterpret_cast<Pack<scalar_t, V>*>(y + offset + t * g.C) = out;
  }
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Chunks long enough to keep the scan short, short enough to give every SM work.
Layout make_layout(int64_t B, int64_t T, int64_t C, int vec) {
  const int64_t wanted = (T * B * (C / vec) + kTargetThreads - 1) / kTargetThreads;
  const int64_t L = std::min(T, std::max(wanted, kMinChunk));
  return Layout{B, T, C, L, (T + L - 1) / L};
}

struct Buffers {
  at::Tensor w, u, k, v, aa, bb, pp;     // inputs: w, u and the state in fp32
  at::Tensor y, sa, sb, sp, ea, eb, ep;  // output, chunk summaries, states entering each chunk
  at::Tensor aa_out, bb_out, pp_out;     // state after the last token
};

template <typename scalar_t, int V>
void launch(const Layout& g, Buffers& t) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const float *w = t.w.data_ptr<float>(), *u = t.u.data_ptr<float>();
  const scalar_t *k = t.k.data_ptr<scalar_t>(), *v = t.v.data_ptr<scalar_t>();
  float *sa = t.sa.data_ptr<float>(), *sb = t.sb.data_ptr<float>(), *sp = t.sp.data_ptr<float>();
  chunk_summary<scalar_t, V><<<blocks_for(g.B * g.N * (g.C / V)), kThreads, 0, stream>>>(g, w, k, v, sa, sb, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chunk_scan<<<blocks_for(g.B * g.C), kThreads, 0, stream>>>(
      g, w, t.aa.data_ptr<float>(), t.bb.data_ptr<float>(), t.pp.data_ptr<float>(), sa, sb, sp,
      t.ea.data_ptr<float>(), t.eb.data_ptr<float>(), t.ep.data_ptr<float>(), t.aa_out.data_ptr<float>(), t.bb_out.data_ptr<float>(), t.pp_out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chunk_output<scalar_t, V><<<blocks_for(g.B * g.N * (g.C / V)), kThreads, 0, stream>>>(
      g, w, u, k, v, t.ea.data_ptr<float>(), t.eb.data_ptr<float>(), t.ep.data_ptr<float>(),
      t.y.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Widest vector access that C allows: 4 channels per thread, else 2, else 1.
int vector_width(int64_t C) { return C % 4 == 0 ? 4 : C % 2 == 0 ? 2 : 1; }

template <typename scalar_t>
void launch_any_width(const Layout& g, int vec, Buffers& t) {
  switch (vec) {
    case 4: launch<scalar_t, 4>(g, t); break;
    case 2: launch<scalar_t, 2>(g, t); break;
    default: launch<scalar_t, 1>(g, t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_forward(
    const at::Tensor& w_, const at::Tensor& u_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& aa_,
    const at::Tensor& bb_, const at::Tensor& pp_) {
  TORCH_CHECK(k_.dim() == 3 && k_.sizes() == v_.sizes(), "wkv4_forward: k and v must both be [B, T, C]");
  TORCH_CHECK(k_.scalar_type() == v_.scalar_type(), "wkv4_forward: k and v must share a dtype");
  const int64_t B = k_.size(0), T = k_.size(1), C = k_.size(2);
  TORCH_CHECK(T >= 1 && B >= 1 && C >= 1, "wkv4_forward: B, T and C must be >= 1");
  TORCH_CHECK(w_.numel() == C && u_.numel() == C, "wkv4_forward: w and u must have C elements");
  for (const auto* s : {&aa_, &bb_, &pp_}) {
    TORCH_CHECK(s->dim() == 2 && s->size(0) == B && s->size(1) == C, "wkv4_forward: state tensors must be [B, C]");
  }
  const c10::cuda::CUDAGuard guard(k_.device());
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const int vec = vector_width(C);
  const Layout g = make_layout(B, T, C, vec);
  const auto opts = k_.options().dtype(at::kFloat);
  Buffers t{f32(w_), f32(u_), k_.contiguous(), v_.contiguous(), f32(aa_), f32(bb_), f32(pp_)};
  t.y = at::empty_like(t.k);
  for (auto* chunk_state : {&t.sa, &t.sb, &t.sp, &t.ea, &t.eb, &t.ep}) *chunk_state = at::empty({B, g.N, C}, opts);
  t.aa_out = at::empty({B, C}, opts), t.bb_out = at::empty_like(t.aa_out), t.pp_out = at::empty_like(t.aa_out);
  switch (t.k.scalar_type()) {
    case at::kFloat: launch_any_width<float>(g, vec, t); break;
    case at::kHalf: launch_any_width<at::Half>(g, vec, t); break;
    case at::kBFloat16: launch_any_width<at::BFloat16>(g, vec, t); break;
    default: TORCH_CHECK(false, "wkv4_forward: k and v must be float32, bfloat16 or float16, got ", t.k.scalar_type());
  }
  return {t.y, t.aa_out, t.bb_out, t.pp_out};
}

}  // namespace

TORCH_LIBRARY(zoo, m) {
  m.def("wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zoo, CUDA, m) { m.impl("wkv4_forward", &wkv4_forward); }
