"""The RWKV-7 WKV operator ("Goose", arXiv 2503.14456): one entry point, a float64 reference and a chunked form.

Per head, with S_t [N, N] the state (rows: value channels, columns: key channels) and all vectors [N]:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,        y_t = S_t r_t

w_t in (0, 1] is the decay, given as log_w = log w_t <= 0. RWKV-7 passes a = -kk and b = kk * iclr (kk the
unit-norm key of each head, iclr the in-context learning rate in (0, 1)): S_{t-1} (I - kk (iclr kk)^T) removes
part of what the state holds along kk before v k^T is written, the generalised delta rule of the paper (eq. 14).

`wkv7` is the op the layers call: CUDA tensors of the kernel dtypes and head sizes go to the kernel of
cuda/wkv_matrix.cu (blocks/wkv_cuda.py); otherwise one token goes to `wkv7_step`, longer inputs to `wkv7_chunked`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import wkv_cuda
from .wkv import _compute_dtype, _log_path

__all__ = ["wkv7", "wkv7_chunked", "wkv7_reference", "wkv7_step", "DEFAULT_CHUNK_LEN"]

DEFAULT_CHUNK_LEN = 16
MAX_CHUNK_LOG_DECAY = 60.0
"""The chunked form scales keys by e^{-sum log w} over a chunk: chunks are shortened so this sum stays above -60
(e^60 is far from float32's overflow). RWKV-7's decays (log w >= -e^{-1/2}) always allow the full 16 tokens."""


def wkv7_step(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
              state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence. r, log_w, k, v, a, b: [B, H, N]; state [B, H, N, N]. Returns (y, new state)."""
    state = (state * torch.exp(log_w)[:, :, None, :] + (state @ a[..., None]) @ b[:, :, None, :]
             + v[..., None] @ k[:, :, None, :])
    return (state @ r[..., None])[..., 0], state


def wkv7_reference(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential float64 reference: `wkv7_step` over t. Inputs [B, T, H, N]. Returns (y float64, state)."""
    r, log_w, k, v, a, b = (x.double() for x in (r, log_w, k, v, a, b))
    B, T, H, N = k.shape
    state = k.new_zeros(B, H, N, N) if state is None else state.double()
    ys = []
    for t in range(T):
        y, state = wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _safe_chunk_len(log_w: Tensor, chunk_len: int, max_decay: float | None = None) -> int:
    """The longest chunk, at most chunk_len, over which the strongest decay sums to at least -MAX_CHUNK_LOG_DECAY.
    The strongest decay is `max_decay` (a bound -log_w <= max_decay the caller guarantees) or else read from log_w,
    which waits for the device."""
    strongest = max_decay if max_decay is not None else float(-log_w.detach().min())
    if strongest * chunk_len <= MAX_CHUNK_LOG_DECAY:
        return chunk_len
    return max(1, int(MAX_CHUNK_LOG_DECAY / strongest))


def wkv7_chunked(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 state: Tensor | None = None, chunk_len: int = DEFAULT_CHUNK_LEN,
                 max_decay: float | None = None) -> tuple[Tensor, Tensor]:
    """Chunked form, exact up to rounding (float32 arithmetic, float64 for float64 inputs; any T).

    Inside a chunk of L tokens, with c_t = sum_{j<=t} log w_j and S_0 the state entering it, the recurrence unrolls to
        S_t = S_0 diag(e^{c_t}) + sum_{i<=t} (u_i b_i^T + v_i k_i^T) diag(e^{c_t - c_i}),   u_t = S_{t-1} a_t,
    and the u_t solve the unit lower-triangular system (I - A) U = (a e^{c_{t-1}}) S_0^T + A' V with
    A[t, i] = (a_t e^{c_{t-1}}) . (b_i e^{-c_i}) and A' the same with k for b (i < t): matrix products and one
    triangular solve per chunk, all chunks at once. What is left sequential is S_0 -> S_L, affine in S_0
    (S_L = S_0 P + Q), one [N, N] matrix product per chunk.
    """
    B, T, H, N = k.shape
    dt, out_dtype = _compute_dtype(r, log_w, k, v, a, b), v.dtype
    L = _safe_chunk_len(log_w, max(1, min(chunk_len, T)), max_decay)
    n = math.ceil(T / L)
    pad = n * L - T

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, N] -> [B, H, n, L, N]; padded tokens (all zeros) leave S as it is
        x = torch.nn.functional.pad(x.to(dt), (0, 0, 0, 0, 0, pad))
        return x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4)

    r, log_w, k, v, a, b = (chunks(x) for x in (r, log_w, k, v, a, b))
    c = torch.cumsum(log_w, dim=3)
    c_end = c[:, :, :, -1:]
    a_in = a * torch.exp(c - log_w)                 # a_t e^{c_{t-1}}
    r_in = r * torch.exp(c)                         # r_t e^{c_t}
    b_out, k_out = b * torch.exp(-c), k * torch.exp(-c)
    b_end, k_end = b * torch.exp(c_end - c), k * torch.exp(c_end - c)

    ones = torch.ones(L, L, dtype=torch.bool, device=k.device)
    strict, causal = torch.tril(ones, -1), torch.tril(ones)
    zero = torch.zeros((), dtype=dt, device=k.device)
    A_ab = torch.where(strict, a_in @ b_out.transpose(-1, -2), zero)
    A_ak = torch.where(strict, a_in @ k_out.transpose(-1, -2), zero)
    R_b = torch.where(causal, r_in @ b_out.transpose(-1, -2), zero)
    R_k = torch.where(causal, r_in @ k_out.transpose(-1, -2), zero)

    # U = a_solved S_0^T + u_local: the part of u from the incoming state and the part from this chunk's tokens.
    system = torch.eye(L, dtype=dt, device=k.device) - A_ab
    a_solved, u_local = torch.linalg.solve_triangular(system, torch.cat([a_in, A_ak @ v], dim=-1), upper=False,
                                                      unitriangular=True).split(N, dim=-1)
    # S_L = S_0 (diag(e^{c_L}) + a_solved^T b_end) + u_local^T b_end + v^T k_end
    transition = torch.diag_embed(c_end[:, :, :, 0].exp()) + a_solved.transpose(-1, -2) @ b_end
    inflow = u_local.transpose(-1, -2) @ b_end + v.transpose(-1, -2) @ k_end

    S = k.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    states_in = []
    for i in range(n):
        states_in.append(S)
        S = S @ transition[:, :, i] + inflow[:, :, i]
    S_in_t = torch.stack(states_in, dim=2).transpose(-1, -2)        # [B, H, n, N, N], S_0^T per chunk

    # y = r_in S_0^T + R_b U + R_k V
    y = (r_in + R_b @ a_solved) @ S_in_t + R_b @ u_local + R_k @ v
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]
    return y.to(out_dtype), S


def _check(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None) -> None:
    """Clear errors for bad shapes, dtypes and devices."""
    if k.dim() != 4:
        raise ValueError(f"wkv7: inputs must be [B, T, H, N]; got k {tuple(k.shape)}")
    B, T, H, N = k.shape
    if T < 1:
        raise ValueError("wkv7: sequence length must be >= 1")
    for name, x in (("r", r), ("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != k.shape:
            raise ValueError(f"wkv7: {name} must have k's shape {tuple(k.shape)}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"wkv7: {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"wkv7: {name} is on {x.device} but k is on {k.device}")
    if state is not None:
        if state.shape != (B, H, N, N):
            raise ValueError(f"wkv7: state must be [B={B}, H={H}, N={N}, N={N}], got {tuple(state.shape)}")
        if state.device != k.device:
            raise ValueError(f"wkv7: state is on {state.device} but k is on {k.device}")


def wkv7(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
         state: Tensor | None = None, max_decay: float | None = None) -> tuple[Tensor, Tensor]:
    """WKV of RWKV-7. r, log_w (log decay, <= 0), k, v, a, b: [B, T, H, N]; state: [B, H, N, N] or None (zeros);
    max_decay: a bound on -log_w the caller guarantees (RWKV-7's layers: LOG_DECAY_SCALE), which spares the chunked
    form reading the strongest decay back from the device.

    Arithmetic is float32 (float64 for float64 inputs). Returns (y [B, T, H, N] in v's dtype, the state after the
    last token in the arithmetic dtype). Differentiable in all inputs, the incoming state included.
    """
    _check(r, log_w, k, v, a, b, state)
    B, T, H, N = k.shape
    inputs = (r, log_w, k, v, a, b)
    if wkv_cuda.serves_heads("wkv7", N, *inputs):
        _log_path("wkv7", "cuda-kernel", k.device)
        init = k.new_zeros(B, H, N, N, dtype=_compute_dtype(k)) if state is None else state
        # the backward needs S_{t-1} a_t of every token, kept only when a gradient may be asked for
        y, new_state, _ = torch.ops.zoo.wkv7_forward(*inputs, init, wkv_cuda.keeps_for_backward(*inputs, init))
        return y, new_state
    if T == 1:
        _log_path("wkv7", "torch-step", k.device)
        dt = _compute_dtype(*inputs)
        init = k.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
        y, new_state = wkv7_step(*(x[:, 0].to(dt) for x in (r, log_w, k, v, a, b)), init)
        return y[:, None].to(v.dtype), new_state
    _log_path("wkv7", "torch-chunked", k.device)
    return wkv7_chunked(r, log_w, k, v, a, b, state, max_decay=max_decay)
