"""The RWKV-4 WKV operator: one entry point, a float64 reference and a chunked PyTorch path.

Per channel, with w < 0 the decay (w = -exp(time_decay)) and u the bonus (time_first):

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t)
          / (sum_{i<t} e^{(t-1-i)w + k_i}       + e^{u+k_t})

The recurrent state after token t is (aa, bb, pp) with
aa = sum_{i<=t} e^{(t-i)w + k_i - pp} v_i and bb the same without v_i: pp is a running
maximum of the exponents, so nothing overflows (RWKV paper, arXiv 2305.13048, eq. 19-23).
An empty state is aa = bb = 0, pp = -1e38.

`wkv4` is the op every layer calls: CUDA tensors of the kernel dtypes go to the kernel of
cuda/wkv.cu (blocks/wkv_cuda.py), everything else to the PyTorch paths below; under torch.compile, one
token takes the PyTorch step, which inductor fuses with the layer's other elementwise work (decoding).
The path that ran is logged once per device type (`zoo -v`, or logging at INFO).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from . import wkv_cuda

__all__ = ["WKV4State", "wkv4", "wkv4_absorb", "wkv4_init_state", "wkv4_reference", "wkv4_step", "wkv4_chunked"]

log = logging.getLogger(__name__)

WKV4State = tuple[Tensor, Tensor, Tensor]
"""(aa, bb, pp), each [B, C] float32 (float64 in the reference)."""

EMPTY_PP = -1e38
DEFAULT_CHUNK_LEN = 4  # fastest on CPU in forward+backward for T in 128..512, C in 128..256


def wkv4_init_state(batch_size: int, channels: int, device=None, dtype=torch.float32) -> WKV4State:
    """The empty state: aa = bb = 0, pp = -1e38."""
    zeros = torch.zeros(batch_size, channels, device=device, dtype=dtype)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY_PP)


def wkv4_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State) -> tuple[Tensor, WKV4State]:
    """One token of the recurrence (RNN mode). k, v: [B, C]; returns (wkv [B, C], new state)."""
    aa, bb, pp = state
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    return y, wkv4_absorb(w, k, v, state)


def wkv4_absorb(w: Tensor, k: Tensor, v: Tensor, state: WKV4State) -> WKV4State:
    """The state one token later: e^pp (aa, bb) <- e^w e^pp (aa, bb) + e^k (v, 1), pp the new maximum."""
    aa, bb, pp = state
    ww = pp + w
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return e1 * aa + e2 * v, e1 * bb + e2, p


def wkv4_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None):
    """Sequential float64 reference: `wkv4_step` over t. Returns (wkv [B,T,C] float64, state)."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    B, T, C = k.shape
    state = wkv4_init_state(B, C, k.device, torch.float64) if state is None else tuple(s.double() for s in state)
    ys = []
    for t in range(T):
        y, state = wkv4_step(w, u, k[:, t], v[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def wkv4_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None,
                 chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, WKV4State]:
    """Chunked parallel form, exact up to rounding (float32 arithmetic, any T).

    The sequence is cut into chunks of L tokens. Inside a chunk every output is a weighted sum
    over at most L + 1 exponents (the earlier tokens of the chunk, its own bonus term and the
    incoming state), each stabilised by its own maximum. Chunk states are carried by a short
    sequential scan over chunks, so the Python loop runs T / L times instead of T times.
    """
    B, T, C = k.shape
    dev = k.device
    dt = _compute_dtype(k, v)
    w, u = w.to(dt), u.to(dt)
    L = max(1, min(chunk_len, T))
    N = math.ceil(T / L)
    pad = N * L - T
    kf = torch.nn.functional.pad(k.to(dt), (0, 0, 0, pad)).view(B, N, L, C)
    vf = torch.nn.functional.pad(v.to(dt), (0, 0, 0, pad)).view(B, N, L, C)
    state = wkv4_init_state(B, C, dev, dt) if state is None else tuple(s.to(dt) for s in state)

    pos = torch.arange(L, device=dev)
    # Local chunk summaries: S_n = sum_{i<len_n} e^{(len_n-1-i)w + k_i} (v_i, 1), len_n = L but the last.
    lens = torch.full((N,), L, device=dev)
    lens[-1] = L - pad
    end_dist = (lens[:, None] - 1 - pos[None, :]).to(dt)                         # [N, L]
    end_logits = torch.where((pos[None, :] < lens[:, None])[..., None],
                             end_dist[..., None] * w + kf, float("-inf"))      # [B, N, L, C]
    m_loc = end_logits.amax(dim=2).detach()                                      # [B, N, C]
    e_loc = torch.exp(end_logits - m_loc[:, :, None])
    a_loc, b_loc = (e_loc * vf).sum(dim=2), e_loc.sum(dim=2)

    # Sequential scan over chunks: the state entering each chunk. The exponent pp is kept as an anchor (the
    # last local maximum it was reset to) plus decay x tokens since, not by adding lens * w chunk after chunk:
    # that sum's float32 rounding grew over long sequences (1e-5 relative in the state at T = 1000).
    aa, bb, pp = state
    anchor, since = pp, torch.zeros_like(pp)
    states_in = []
    for n in range(N):
        states_in.append((aa, bb, pp))
        decayed = anchor + (since + lens[n]) * w
        p = torch.maximum(decayed, m_loc[:, n])
        e1, e2 = torch.exp(decayed - p), torch.exp(m_loc[:, n] - p)
        aa, bb, pp = e1 * aa + e2 * a_loc[:, n], e1 * bb + e2 * b_loc[:, n], p
        reset = m_loc[:, n] >= decayed
        anchor, since = torch.where(reset, m_loc[:, n], anchor), torch.where(reset, 0.0, since + lens[n])
    aa_in, bb_in, pp_in = (torch.stack(s, dim=1) for s in zip(*states_in))       # [B, N, C]

    # Outputs: rows t attend to columns i < t (decay), i == t (bonus) and the incoming state.
    dist = (pos[:, None] - 1 - pos[None, :]).to(dt)                              # [L, L]
    intra = torch.where((pos[None, :] < pos[:, None])[..., None], dist[..., None] * w, u)
    intra = torch.where((pos[None, :] <= pos[:, None])[..., None], intra + kf[:, :, None], float("-inf"))
    state_logit = pp_in[:, :, None] + pos[:, None].to(dt) * w                    # [B, N, L, C]
    m = torch.maximum(intra.amax(dim=3), state_logit).detach()
    e_intra = torch.exp(intra - m[:, :, :, None])                                # [B, N, L, L, C]
    e_state = torch.exp(state_logit - m)
    num = e_state * aa_in[:, :, None] + (e_intra * vf[:, :, None]).sum(dim=3)
    den = e_state * bb_in[:, :, None] + e_intra.sum(dim=3)
    y = (num / den).view(B, N * L, C)[:, :T]
    return y.to(v.dtype), (aa, bb, pp)


def _check(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None, op: str = "wkv4") -> None:
    """Clear errors for bad shapes, dtypes and devices, before any kernel sees them."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"{op}: k and v must both be [B, T, C]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, C = k.shape
    if T < 1:
        raise ValueError(f"{op}: sequence length must be >= 1")
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"{op}: w and u must be [C={C}]; got w {tuple(w.shape)}, u {tuple(u.shape)}")
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"{op}: {name} is on {x.device} but k is on {k.device}")
    if state is not None:
        if len(state) != 3:
            raise ValueError(f"{op}: state must be a tuple (aa, bb, pp)")
        for name, s in zip(("aa", "bb", "pp"), state):
            if s.shape != (B, C):
                raise ValueError(f"{op}: state {name} must be [B={B}, C={C}], got {tuple(s.shape)}")
            if s.device != k.device:
                raise ValueError(f"{op}: state {name} is on {s.device} but k is on {k.device}")


_logged_paths: set[tuple[str, str, str]] = set()


def _log_path(op: str, path: str, device: torch.device) -> None:
    key = (op, path, device.type)
    if key not in _logged_paths and not torch.compiler.is_compiling():
        _logged_paths.add(key)
        log.info("%s on %s: using the %s path", op, device.type, path)


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None) -> tuple[Tensor, WKV4State]:
    """WKV of RWKV-4. w (negative decay), u: [C]; k, v: [B, T, C]; state: (aa, bb, pp) [B, C].

    Arithmetic is float32 (float64 for float64 inputs). Returns (wkv [B, T, C] in v's dtype,
    the state after the last token in the arithmetic dtype). Differentiable in all inputs, the
    incoming state included; pp counts as a normalisation (the state stands for e^pp (aa, bb)).
    """
    _check(w, u, k, v, state)
    if wkv_cuda.serves(k, v) and not (k.shape[1] == 1 and torch.compiler.is_compiling()):
        _log_path("wkv4", "cuda-kernel", k.device)
        if state is None:
            state = wkv4_init_state(k.shape[0], k.shape[2], k.device)
        y, aa, bb, pp, _ = torch.ops.zoo.wkv4_forward(w, u, k, v, *state,
                                                      wkv_cuda.keeps_for_backward(w, u, k, v, *state))
        return y, (aa, bb, pp)
    if k.shape[1] == 1:
        _log_path("wkv4", "torch-step", k.device)
        dt = _compute_dtype(k, v)
        B, _, C = k.shape
        init = wkv4_init_state(B, C, k.device, dt) if state is None else tuple(s.to(dt) for s in state)
        y, new_state = wkv4_step(w.to(dt), u.to(dt), k[:, 0].to(dt), v[:, 0].to(dt), init)
        return y[:, None].to(v.dtype), new_state
    _log_path("wkv4", "torch-chunked", k.device)
    return wkv4_chunked(w, u, k, v, state)
