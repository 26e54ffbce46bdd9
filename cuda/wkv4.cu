// RWKV-4 WKV forward on CUDA as a chunked scan (parallel over B x T-chunks x C, not only B x C).
//
// Per channel, with w < 0 and u the bonus (see blocks/wkv.py for the float64 reference):
//   wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})
// The state (a, b, p) stands for (e^p a, e^p b) = sum_{i<=t} e^{(t-i)w + k_i} (v_i, 1); p is the running
// maximum of the exponents, so nothing overflows. Three launches:
//   1. chunk_summary: each chunk's state from an empty start (one thread per batch, chunk, channel);
//   2. chunk_scan:    the state entering every chunk, and the final state (one thread per batch, channel);
//   3. chunk_output:  each chunk replays its tokens from its entering state and writes wkv.
// Inputs are fp32, bf16 or fp16; all arithmetic is fp32. Any B, T >= 1, C >= 1.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kTargetThreads = 1 << 18;  // enough (batch, chunk, channel) threads to fill a GPU
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

template <typename scalar_t>
__global__ void chunk_summary(Layout g, const float* __restrict__ w, const scalar_t* __restrict__ k,
                              const scalar_t* __restrict__ v, float* __restrict__ sa, float* __restrict__ sb,
                              float* __restrict__ sp) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // ((b * N) + n) * C + c
  if (idx >= g.B * g.N * g.C) return;
  const int64_t c = idx % g.C, n = (idx / g.C) % g.N, b = idx / (g.C * g.N);
  const int64_t offset = (b * g.T + n * g.L) * g.C + c;
  const float wc = w[c];
  State s{0.f, 0.f, -1e38f};
  for (int64_t t = 0, len = g.chunk_len(n); t < len; ++t) {
    absorb(s, wc, static_cast<float>(k[offset + t * g.C]), static_cast<float>(v[offset + t * g.C]));
  }
  sa[idx] = s.a;
  sb[idx] = s.b;
  sp[idx] = s.p;
}

// Walks the chunks of one (batch, channel): on entry sa/sb/sp hold chunk summaries, on exit the state
// entering each chunk. The state after the last chunk goes to the *_out tensors.
__global__ void chunk_scan(Layout g, const float* __restrict__ w, const float* __restrict__ aa_in,
                           const float* __restrict__ bb_in, const float* __restrict__ pp_in, float* sa, float* sb,
                           float* sp, float* __restrict__ aa_out, float* __restrict__ bb_out,
                           float* __restrict__ pp_out) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // b * C + c
  if (idx >= g.B * g.C) return;
  const int64_t c = idx % g.C, b = idx / g.C;
  const float wc = w[c];
  State s{aa_in[idx], bb_in[idx], pp_in[idx]};
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t j = (b * g.N + n) * g.C + c;
    const State local{sa[j], sb[j], sp[j]};
    sa[j] = s.a;
    sb[j] = s.b;
    sp[j] = s.p;
    const float decayed = s.p + static_cast<float>(g.chunk_len(n)) * wc;
    const float p = fmaxf(decayed, local.p);
    const float e1 = expf(decayed - p), e2 = expf(local.p - p);
    s = State{e1 * s.a + e2 * local.a, e1 * s.b + e2 * local.b, p};
  }
  aa_out[idx] = s.a;
  bb_out[idx] = s.b;
  pp_out[idx] = s.p;
}

template <typename scalar_t>
__global__ void chunk_output(Layout g, const float* __restrict__ w, const float* __restrict__ u,
                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                             const float* __restrict__ sa, const float* __restrict__ sb,
                             const float* __restrict__ sp, scalar_t* __restrict__ y) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= g.B * g.N * g.C) return;
  const int64_t c = idx % g.C, n = (idx / g.C) % g.N, b = idx / (g.C * g.N);
  const int64_t offset = (b * g.T + n * g.L) * g.C + c;
  const float wc = w[c], uc = u[c];
  State s{sa[idx], sb[idx], sp[idx]};
  for (int64_t t = 0, len = g.chunk_len(n); t < len; ++t) {
    const float kt = static_cast<float>(k[offset + t * g.C]), vt = static_cast<float>(v[offset + t * g.C]);
    y[offset + t * g.C] = static_cast<scalar_t>(emit(s, uc, kt, vt));
    absorb(s, wc, kt, vt);
  }
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Chunks long enough to keep the scan short, short enough to give every SM work.
Layout make_layout(int64_t B, int64_t T, int64_t C) {
  const int64_t wanted = (T * B * C + kTargetThreads - 1) / kTargetThreads;
  const int64_t L = std::min(T, std::max(wanted, kMinChunk));
  return Layout{B, T, C, L, (T + L - 1) / L};
}

template <typename scalar_t>
void launch(const Layout& g, const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& aa, const at::Tensor& bb, const at::Tensor& pp, at::Tensor& y, at::Tensor& sa,
            at::Tensor& sb, at::Tensor& sp, at::Tensor& aa_out, at::Tensor& bb_out, at::Tensor& pp_out) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* kp = k.data_ptr<scalar_t>();
  const auto* vp = v.data_ptr<scalar_t>();
  chunk_summary<scalar_t><<<blocks_for(g.B * g.N * g.C), kThreads, 0, stream>>>(
      g, w.data_ptr<float>(), kp, vp, sa.data_ptr<float>(), sb.data_ptr<float>(), sp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chunk_scan<<<blocks_for(g.B * g.C), kThreads, 0, stream>>>(
      g, w.data_ptr<float>(), aa.data_ptr<float>(), bb.data_ptr<float>(), pp.data_ptr<float>(), sa.data_ptr<float>(),
      sb.data_ptr<float>(), sp.data_ptr<float>(), aa_out.data_ptr<float>(), bb_out.data_ptr<float>(),
      pp_out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chunk_output<scalar_t><<<blocks_for(g.B * g.N * g.C), kThreads, 0, stream>>>(
      g, w.data_ptr<float>(), u.data_ptr<float>(), kp, vp, sa.data_ptr<float>(), sb.data_ptr<float>(),
      sp.data_ptr<float>(), y.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const at::Tensor w = f32(w_), u = f32(u_), aa = f32(aa_), bb = f32(bb_), pp = f32(pp_);
  const at::Tensor k = k_.contiguous(), v = v_.contiguous();
  const Layout g = make_layout(B, T, C);
  at::Tensor y = at::empty_like(k);
  const auto opts = k.options().dtype(at::kFloat);
  at::Tensor sa = at::empty({B, g.N, C}, opts), sb = at::empty_like(sa), sp = at::empty_like(sa);
  at::Tensor aa_out = at::empty({B, C}, opts), bb_out = at::empty_like(aa_out), pp_out = at::empty_like(aa_out);
  switch (k.scalar_type()) {
    case at::kFloat:
      launch<float>(g, w, u, k, v, aa, bb, pp, y, sa, sb, sp, aa_out, bb_out, pp_out);
      break;
    case at::kHalf:
      launch<at::Half>(g, w, u, k, v, aa, bb, pp, y, sa, sb, sp, aa_out, bb_out, pp_out);
      break;
    case at::kBFloat16:
      launch<at::BFloat16>(g, w, u, k, v, aa, bb, pp, y, sa, sb, sp, aa_out, bb_out, pp_out);
      break;
    default:
      TORCH_CHECK(false, "wkv4_forward: k and v must be float32, bfloat16 or float16, got ", k.scalar_type());
  }
  return {y, aa_out, bb_out, pp_out};
}

}  // namespace

TORCH_LIBRARY(zoo, m) {
  m.def("wkv4_forward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor aa, Tensor bb, Tensor pp) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zoo, CUDA, m) { m.impl("wkv4_forward", &wkv4_forward); }
