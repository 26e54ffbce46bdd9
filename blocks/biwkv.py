"""Bi-WKV, the bidirectional WKV of Vision-RWKV (arXiv 2403.02308, eq. 4): the op, a PyTorch path and references.

Per channel, with w and u already divided by the number of tokens T (w may be negative):

    wkv_t = (sum_{i!=t} e^{-(|t-i|-1)w + k_i} v_i + e^{u+k_t} v_t)
          / (sum_{i!=t} e^{-(|t-i|-1)w + k_i}       + e^{u+k_t})

`biwkv` is the op layers call: CUDA tensors go to the kernel of cuda/wkv.cu, everything else to
`biwkv_parallel`, the formula evaluated directly in blocks of query rows (autograd differentiates it).
`biwkv_recurrent` is the RNN form: a causal sum from the left and its mirror from the right, two scans.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import wkv_cuda
from .wkv import _check, _compute_dtype, _log_path, wkv4_absorb, wkv4_init_state

__all__ = ["biwkv", "biwkv_parallel", "biwkv_reference", "biwkv_recurrent"]

PARALLEL_BLOCK_ELEMENTS = 1 << 24
"""Largest [B, rows, T, C] block of exponents `biwkv_parallel` materialises at once."""


def biwkv_parallel(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The formula, each output a softmax-weighted mean over all T tokens. O(T^2 C) work; float32 arithmetic
    (float64 for float64 inputs). Returns [B, T, C] in v's dtype."""
    B, T, C = k.shape
    dt = _compute_dtype(k, v)
    w, u, kf, vf = (x.to(dt) for x in (w, u, k, v))
    pos = torch.arange(T, device=k.device)
    rows = max(1, PARALLEL_BLOCK_ELEMENTS // (B * T * C))
    out = []
    for start in range(0, T, rows):
        dist = (pos[start:start + rows, None] - pos[None, :]).abs()                   # [R, T]
        logits = -(dist - 1).to(dt)[..., None] * w + kf[:, None]                       # [B, R, T, C]
        logits = torch.where((dist == 0)[..., None], u + kf[:, None], logits)
        weights = torch.exp(logits - logits.amax(dim=2, keepdim=True).detach())
        out.append((weights * vf[:, None]).sum(dim=2) / weights.sum(dim=2))
    return torch.cat(out, dim=1).to(v.dtype)


def biwkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`biwkv_parallel` in float64: the reference the kernel is tested against."""
    return biwkv_parallel(*(x.double() for x in (w, u, k, v)))


def biwkv_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The RNN form in float64: wkv_t = (L_t + R_t + e^{u+k_t} (v_t, 1)) as a ratio, where L_t is the state of
    the tokens left of t (step factor e^{-w}, `wkv4_absorb`) and R_t its mirror over the tokens right of t.
    O(T C) memory, a Python loop over T."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    B, T, C = k.shape

    def states_before(order):
        state, before = wkv4_init_state(B, C, k.device, torch.float64), {}
        for t in order:
            before[t] = state
            state = wkv4_absorb(-w, k[:, t], v[:, t], state)
        return before

    left, right = states_before(range(T)), states_before(reversed(range(T)))
    ys = []
    for t in range(T):
        (la, lb, lp), (ra, rb, rp), bonus = left[t], right[t], u + k[:, t]
        top = torch.maximum(torch.maximum(lp, rp), bonus)
        el, er, eb = torch.exp(lp - top), torch.exp(rp - top), torch.exp(bonus - top)
        ys.append((el * la + er * ra + eb * v[:, t]) / (el * lb + er * rb + eb))
    return torch.stack(ys, dim=1)


def biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bi-WKV. w, u: [C] (already divided by T); k, v: [B, T, C]. Returns wkv [B, T, C] in v's dtype,
    differentiable in all inputs. The path that ran is logged once per device type."""
    _check(w, u, k, v, op="biwkv")
    if wkv_cuda.serves(k, v):
        _log_path("biwkv", "cuda-kernel", k.device)
        return torch.ops.zoo.biwkv_forward(w, u, k, v, wkv_cuda.keeps_for_backward(w, u, k, v))[0]
    _log_path("biwkv", "torch-parallel", k.device)
    return biwkv_parallel(w, u, k, v)
