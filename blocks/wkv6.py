"""The RWKV-6 ("Finch") WKV operator: one entry point, a float64 reference and a chunked PyTorch form.

Eagle and Finch (arXiv 2404.05892). Per head of N channels the state S is an N x N matrix (rows: key
channels i, columns: value channels j); the decay w_t = exp(-exp(d_t)) in (0, 1) depends on the token and the key
channel, and u (time_faaaa) is a per-key-channel bonus for the current token:

    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1})
    S_t = diag(w_t) S_{t-1} + k_t v_t^T

that is, from a state S_0 before token 1, y_t = sum_{s<t} (sum_i r_{t,i} k_{s,i} prod_{s<j<t} w_{j,i}) v_s
+ (sum_i r_{t,i} u_i k_{t,i}) v_t + (r_t * prod_{j<t} w_j)^T S_0. An empty state is S = 0. The layout of S is the
`rwkv` package's ([.., i, j]: key channel i, value channel j).

`wkv6` is the op the layers call: CUDA tensors of the kernel dtypes and head sizes go to the kernel of
cuda/wkv_matrix.cu (blocks/wkv_cuda.py), everything else to the PyTorch forms below; the path that ran is logged once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import wkv_cuda
from .wkv import _compute_dtype, _log_path

__all__ = ["wkv6", "wkv6_chunked", "wkv6_reference", "wkv6_step"]

DEFAULT_CHUNK_LEN = 8  # of 4, 8, 16, 32 the fastest on CPU in forward+backward (T 256..1024, C 128..768, 1 thread)


def wkv6_step(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence. r, k, v, w (decay logits d): [B, H, N]; u: [H, N]; state: [B, H, N, N].
    Returns (y [B, H, N], the next state)."""
    kv = k[..., :, None] * v[..., None, :]
    y = torch.einsum("bhi,bhij->bhj", r, u[..., None] * kv + state)
    return y, torch.exp(-torch.exp(w))[..., None] * state + kv


def wkv6_reference(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential float64 reference: `wkv6_step` over t. Returns (y [B, T, C] float64, state [B, H, N, N])."""
    B, T, C = k.shape
    H, N = u.shape
    r, k, v, w = (x.double().reshape(B, T, H, N) for x in (r, k, v, w))
    state = k.new_zeros(B, H, N, N) if state is None else state.double()
    ys = []
    for t in range(T):
        y, state = wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u.double(), state)
        ys.append(y)
    return torch.stack(ys, dim=1).reshape(B, T, C), state


def wkv6_chunked(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None,
                 chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Chunked form, exact up to rounding (float32 arithmetic, float64 for float64 inputs; any T).

    The sequence is cut into chunks of L tokens. With log w_j <= 0 and S the state entering a chunk, for the
    chunk's tokens t, s:

        y_t = sum_{s<t} A_ts v_s + (r_t . u k_t) v_t + (r_t * e^{sum_{j<t} log w_j})^T S
        A_ts = sum_i r_{t,i} k_{s,i} e^{sum_{s<j<t} log w_{j,i}}
        S'   = diag(e^{sum_j log w_j}) S + sum_s (k_s * e^{sum_{j>s} log w_j}) v_s^T

    The outputs and chunk summaries are matrix products, batched over all chunks; only S is carried by a short
    loop over chunks. Every exponent is a sum of log-decays (<= 0), so nothing overflows whatever the decay; the
    pairwise sums are masked cumulative sums, not differences of one cumulative sum (whose float32 cancellation
    would lose small decays next to large ones). The pairwise decays, [B, H, T/L, L, L, N], take L times the
    memory of an input, hence the short default chunk.
    """
    B, T, C = k.shape
    H, N = u.shape
    dt, out_dtype = _compute_dtype(r, k, v, w), v.dtype
    L = max(1, min(chunk_len, T))
    n = math.ceil(T / L)

    def chunks(x: Tensor) -> Tensor:
        """[B, T, C] -> [B, H, n, L, N], zero-padded at the end (padding: k = 0 and log w = 0 leave S alone)."""
        x = F.pad(x.to(dt), (0, 0, 0, n * L - T)).view(B, n, L, H, N)
        return x.permute(0, 3, 1, 2, 4)

    r, k, v, log_w = chunks(r), chunks(k), chunks(v), chunks(-torch.exp(w.to(dt)))
    pos = torch.arange(L, device=k.device)
    # since[.., s, t, :] = sum_{s<j<=t} log w_j, and between[.., t, s, :] = sum_{s<j<t} log w_j
    since = torch.where((pos[None, :] > pos[:, None])[..., None], log_w[..., None, :, :], 0.0).cumsum(dim=-2)
    between = F.pad(since[..., :-1, :], (0, 0, 1, 0)).transpose(-3, -2)
    decay = torch.where((pos[None, :] < pos[:, None])[..., None], between, -math.inf).exp()    # [B, H, n, L, L, N]
    scores = torch.einsum("bhctsn,bhcsn->bhcts", r[..., :, None, :] * decay, k)
    y = scores @ v + (r * u.to(dt)[:, None, None, :] * k).sum(-1, keepdim=True) * v

    kv = (k * since[..., -1, :].exp()).transpose(-1, -2) @ v                                 # [B, H, n, N, N]
    chunk_decay = log_w.sum(dim=-2).exp()[..., None]                                        # [B, H, n, N, 1]
    s = torch.zeros(B, H, N, N, device=k.device, dtype=dt) if state is None else state.to(dt)
    states_in = []
    for c in range(n):
        states_in.append(s)
        s = chunk_decay[:, :, c] * s + kv[:, :, c]
    decay_in = F.pad(log_w.cumsum(dim=-2)[..., :-1, :], (0, 0, 1, 0)).exp()                # e^{sum_{j<t} log w_j}
    y = y + (r * decay_in) @ torch.stack(states_in, dim=2)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, C)[:, :T]
    return y.to(out_dtype), s


def _check(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None) -> None:
    """Clear errors for bad shapes, dtypes and devices."""
    if k.dim() != 3 or any(x.shape != k.shape for x in (r, v, w)):
        raise ValueError("wkv6: r, k, v and w must all be [B, T, C]; got "
                         + ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip("rkvw", (r, k, v, w))))
    B, T, C = k.shape
    if T < 1:
        raise ValueError("wkv6: sequence length must be >= 1")
    if u.dim() != 2 or u.shape[0] * u.shape[1] != C:
        raise ValueError(f"wkv6: u must be [H, N] with H * N = C = {C}, got {tuple(u.shape)}")
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u), ("state", state)):
        if x is None:
            continue
        if not x.is_floating_point():
            raise TypeError(f"wkv6: {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"wkv6: {name} is on {x.device} but k is on {k.device}")
    if state is not None and state.shape != (B, *u.shape, u.shape[1]):
        raise ValueError(f"wkv6: state must be [B, H, N, N] = {(B, *u.shape, u.shape[1])}, got {tuple(state.shape)}")


def wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV of RWKV-6. r, k, v, w (decay logits d, w_t = exp(-exp(d_t))): [B, T, H*N]; u: [H, N]; state: [B, H, N, N].

    Arithmetic is float32 (float64 for float64 inputs). Returns (y [B, T, C] in v's dtype, the state after the last
    token in the arithmetic dtype). Differentiable in all inputs, the incoming state included.
    """
    _check(r, k, v, w, u, state)
    B, T, C = k.shape
    H, N = u.shape
    if wkv_cuda.serves_heads("wkv6", N, r, k, v, w):
        _log_path("wkv6", "cuda-kernel", k.device)
        init = k.new_zeros(B, H, N, N, dtype=_compute_dtype(k)) if state is None else state
        y, state = torch.ops.zoo.wkv6_forward(*(x.reshape(B, T, H, N) for x in (r, k, v, w)), u, init, False)
        return y.view(B, T, C), state
    if T == 1:
        _log_path("wkv6", "torch-step", k.device)
        dt = _compute_dtype(r, k, v, w)
        state = k.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
        y, state = wkv6_step(*(x.to(dt).view(B, H, N) for x in (r, k, v, w)), u.to(dt), state)
        return y.reshape(B, 1, C).to(v.dtype), state
    _log_path("wkv6", "torch-chunked", k.device)
    return wkv6_chunked(r, k, v, w, u, state)
