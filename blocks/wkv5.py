"""The RWKV-5 ("Eagle", x052) WKV operator: RWKV-6's (blocks.wkv6) with a decay that does not depend on the token.

Per head of N channels, with a matrix state S (key channel x value channel), the decay w = exp(-exp(time_decay))
in (0, 1)^N per key channel and the bonus u = time_faaaa (Eagle and Finch, arXiv 2404.05892, section 4):

    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1})
    S_t = diag(w) S_{t-1} + k_t v_t^T                     S_{-1} = the incoming state (zeros if none)

so y_t = r_t^T (diag(u) k_t v_t^T + sum_{i<t} diag(w)^{t-1-i} k_i v_i^T + diag(w)^t S_{-1}): WKV-6 with the decay
logits d_t = time_decay at every token. The reference, the chunked form and the entry point here are WKV-6's on the
heads laid out as channels and time_decay broadcast over the tokens, so CUDA tensors take WKV-6's kernel.
"""

from __future__ import annotations

from torch import Tensor

from .wkv6 import DEFAULT_CHUNK_LEN, wkv6, wkv6_chunked, wkv6_reference

__all__ = ["wkv5", "wkv5_chunked", "wkv5_reference"]


def _as_wkv6(op, r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor, state: Tensor | None,
             **kwargs) -> tuple[Tensor, Tensor]:
    """Run a WKV-6 form on RWKV-5's [B, T, H, N] inputs with the per-channel decay logits repeated at every token."""
    B, T, H, N = k.shape
    r, k, v = (x.reshape(B, T, H * N) for x in (r, k, v))
    decay = time_decay.reshape(1, 1, H * N).expand(B, T, H * N)
    y, state = op(r, k, v, decay, u, state, **kwargs)
    return y.view(B, T, H, N), state


def wkv5_reference(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential float64 reference (WKV-6's). Returns (y [B, T, H, N] float64, state [B, H, N, N])."""
    return _as_wkv6(wkv6_reference, r, k, v, time_decay, u, state)


def wkv5_chunked(r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor, state: Tensor | None = None,
                 chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Chunked parallel form (WKV-6's), exact up to rounding (float32 arithmetic, float64 for float64 inputs)."""
    return _as_wkv6(wkv6_chunked, r, k, v, time_decay, u, state, chunk_len=chunk_len)


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
    return _as_wkv6(wkv6, r, k, v, time_decay, u, state)
