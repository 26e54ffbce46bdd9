"""The RWKV-5 ("Eagle", x052) WKV operator: one entry point, a float64 reference and a chunked PyTorch form.

Per head of N channels, with a matrix state S (key channel x value channel), the decay w = exp(-exp(time_decay))
in (0, 1)^N per key channel and the bonus u = time_faaaa (Eagle and Finch, arXiv 2404.05892, section 4):

    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1})
    S_t = diag(w) S_{t-1} + k_t v_t^T                     S_{-1} = the incoming state (zeros if none)

so y_t = r_t^T (diag(u) k_t v_t^T + sum_{i<t} diag(w)^{t-1-i} k_i v_i^T + diag(w)^t S_{-1}).

`wkv5` is the op the layers call. A CUDA kernel has not been written yet; `wkv5` is the one place that will
dispatch to it (as `blocks.wkv.wkv4` does). Until then every device runs the chunked form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .wkv import _compute_dtype, _log_path

__all__ = ["wkv5", "wkv5_chunked", "wkv5_reference", "wkv5_step"]

DEFAULT_CHUNK_LEN = 16


def wkv5_step(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token (RNN mode). r, k, v: [B, H, N]; w (decay in (0, 1)), u: [H, N]; state: [B, H, N, N].
    Returns (y [B, H, N], new state): y = r^T (diag(u) k v^T + S), S <- diag(w) S + k v^T."""
    kv = k[..., :, None] * v[..., None, :]
    y = (r[..., :, None] * (u[..., None] * kv + state)).sum(-2)
    return y, w[..., None] * state + kv


def wkv5_reference(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential float64 reference: `wkv5_step` over t. Returns (y [B, T, H, N] float64, state [B, H, N, N])."""
    r, k, v, time_decay, u = (x.double() for x in (r, k, v, time_decay, u))
    B, T, H, N = k.shape
    state = k.new_zeros(B, H, N, N) if state is None else state.double()
    w = torch.exp(-torch.exp(time_decay))
    ys = []
    for t in range(T):
        y, state = wkv5_step(r[:, t], k[:, t], v[:, t], w, u, state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _full_chunks(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor,
                 chunk_len: int) -> tuple[Tensor, Tensor]:
    """`wkv5_chunked` on a length that is a multiple of chunk_len. r, k, v: [B, T, H, N]; log_w = -exp(time_decay)."""
    B, T, H, N = k.shape
    L, n = chunk_len, T // chunk_len
    r, k, v = (x.reshape(B, n, L, H, N).permute(0, 3, 1, 2, 4) for x in (r, k, v))     # [B, H, n, L, N]
    pos = torch.arange(L, device=k.device)
    # Every decay factor below is a power >= 0 of w, so nothing overflows whatever the decay.
    lag = pos[:, None] - 1 - pos[None, :]                                                  # t - 1 - i
    pair = torch.exp(lag.clamp(min=0)[:, :, None, None].to(log_w.dtype) * log_w)           # [L, L, H, N]
    pair = torch.where((lag >= 0)[:, :, None, None], pair, torch.where((lag == -1)[:, :, None, None], u, 0.0))
    scores = torch.einsum("bhntc,tihc,bhnic->bhnti", r, pair, k)                          # [B, H, n, L, L]
    from_state = torch.exp(pos[:, None, None].to(log_w.dtype) * log_w).transpose(0, 1)   # w^t: [H, L, N]
    to_end = torch.exp((L - 1 - pos)[:, None, None].to(log_w.dtype) * log_w).transpose(0, 1)  # w^(L-1-i)
    chunk_kv = (k * to_end[:, None]).transpose(-1, -2) @ v                                 # [B, H, n, N, N]

    # The one sequential part: the state entering each chunk, S <- diag(w^L) S + sum_i diag(w^(L-1-i)) k_i v_i^T.
    chunk_decay = torch.exp(L * log_w)[:, :, None]                                         # [H, N, 1]
    states_in = []
    for j in range(n):
        states_in.append(state)
        state = chunk_decay * state + chunk_kv[:, :, j]
    y = scores @ v + (r * from_state[:, None]) @ torch.stack(states_in, dim=2)
    return y.permute(0, 2, 3, 1, 4).reshape(B, T, H, N), state


def wkv5_chunked(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor, state: Tensor | None = None,
                 chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Chunked parallel form, exact up to rounding (float32 arithmetic, float64 for float64 inputs; any T).

    The sequence is cut into chunks of L tokens. Inside a chunk, y = (R * D) K^T V-style products: the scores
    r_t^T diag(D_ti) k_i with D_ti = w^(t-1-i) (i < t), u (i = t), 0 (i > t) are one contraction over the
    channels, and the state entering the chunk adds r_t^T diag(w^t) S_in. The states entering the chunks come
    from a short scan over chunks (T / L steps of one [B, H, N, N] multiply-add). A last partial chunk is a
    chunk of its own length.
    """
    dt, out_dtype = _compute_dtype(r, k, v), v.dtype
    B, T, H, N = k.shape
    r, k, v, u = (x.to(dt) for x in (r, k, v, u))
    log_w = -torch.exp(time_decay.to(dt))
    state = k.new_zeros(B, H, N, N) if state is None else state.to(dt)
    L = max(1, min(chunk_len, T))
    full = T - T % L
    ys = []
    for lo, hi, length in ((0, full, L), (full, T, T - full)):
        if hi > lo:
            y, state = _full_chunks(r[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_w, u, state, length)
            ys.append(y)
    return torch.cat(ys, dim=1).to(out_dtype), state


def _check(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor, state: Tensor | None) -> None:
    """Clear errors for bad shapes, dtypes and devices, before any kernel sees them."""
    if k.dim() != 4 or not (r.shape == k.shape == v.shape):
        raise ValueError(f"wkv5: r, k and v must all be [B, T, H, N]; got r {tuple(r.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, T, H, N = k.shape
    if T < 1:
        raise ValueError("wkv5: sequence length must be >= 1")
    if time_decay.shape != (H, N) or u.shape != (H, N):
        raise ValueError(f"wkv5: time_decay and u must be [H={H}, N={N}]; got {tuple(time_decay.shape)}, "
                         f"{tuple(u.shape)}")
    named = {"r": r, "k": k, "v": v, "time_decay": time_decay, "u": u} | ({} if state is None else {"state": state})
    for name, x in named.items():
        if not x.is_floating_point():
            raise TypeError(f"wkv5: {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"wkv5: {name} is on {x.device} but k is on {k.device}")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv5: state must be [B={B}, H={H}, N={N}, N={N}], got {tuple(state.shape)}")


def wkv5(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor,
         state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV of RWKV-5. r, k, v: [B, T, H, N]; time_decay (w = exp(-exp(time_decay))), u: [H, N];
    state: [B, H, N, N] (key x value) or None for zeros.

    Arithmetic is float32 (float64 for float64 inputs). Returns (y [B, T, H, N] in v's dtype, the state after
    the last token in the arithmetic dtype). Differentiable in all inputs, the incoming state included.
    """
    _check(r, k, v, time_decay, u, state)
    # A CUDA kernel for RWKV-5 goes here, dispatched as wkv4 dispatches to its kernel (blocks/wkv_cuda.py).
    if k.shape[1] == 1:
        _log_path("wkv5", "torch-step", k.device)
        dt = _compute_dtype(r, k, v)
        B, _, H, N = k.shape
        init = k.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
        w = torch.exp(-torch.exp(time_decay.to(dt)))
        y, new_state = wkv5_step(r[:, 0].to(dt), k[:, 0].to(dt), v[:, 0].to(dt), w, u.to(dt), init)
        return y[:, None].to(v.dtype), new_state
    _log_path("wkv5", "torch-chunked", k.device)
    return wkv5_chunked(r, k, v, time_decay, u, state)
