"""Bidirectional WKV-6: the token mixer of Vision-RWKV-6 and of RWKV-CLIP's towers (RWKV-6 blocks over patches or
caption tokens, where every token reads the whole sequence). Per head, with decays w_m = exp(-exp(d_m)) in (0, 1),

    y_t = r_t^T ( diag(u) k_t v_t^T + sum_{s != t} diag(prod_{m strictly between s and t} w_m) k_s v_s^T )

the decay between two tokens being the product over the tokens between them, the same in both directions (no
division by T, unlike RWKV-4's Bi-WKV), and the bonus u counted once, for the token itself. Computed as the causal
WKV-6 (blocks.wkv6, which holds the part s <= t) plus the causal WKV-6 of the reversed sequence without the bonus
(the part s > t), as Vision-RWKV-6's kernel does with its forward and backward scans. On CUDA the reversed scan is the
WKV-6 kernel walking the sequence from its end (cuda/wkv_matrix.cu), so nothing is flipped in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import wkv_cuda
from .wkv import _compute_dtype, _log_path
from .wkv6 import _check, wkv6

__all__ = ["biwkv6", "biwkv6_reference"]


def biwkv6_reference(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """The defining sum in float64, O(T^2): r, k, v, w (decay logits d): [B, T, H*N]; u: [H, N]. Returns y [B, T, C]."""
    B, T, C = k.shape
    H, N = u.shape
    r, k, v, w = (x.double().reshape(B, T, H, N) for x in (r, k, v, w))
    log_w = -torch.exp(w)                                                    # [B, T, H, N]
    between = torch.cat([log_w.new_zeros(B, 1, H, N), log_w.cumsum(1)], 1)  # sum_{m < t} log w_m at index t
    t = torch.arange(T)
    lo, hi = torch.minimum(t[:, None], t[None, :]), torch.maximum(t[:, None], t[None, :])
    # log of prod over lo < m < hi: between[hi] - between[lo + 1]; [B, T(t), T(s), H, N]
    log_decay = between[:, hi] - between[:, lo + 1]
    weights = torch.where((t[:, None] == t[None, :])[None, :, :, None, None], u.double(), log_decay.exp())
    scores = torch.einsum("bthn,btshn,bshn->btsh", r, weights, k)
    return torch.einsum("btsh,bshn->bthn", scores, v).reshape(B, T, C)


def biwkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """Bidirectional WKV-6 of r, k, v, w (decay logits d, w = exp(-exp(d))): [B, T, H*N], u: [H, N]; returns y
    [B, T, C] in v's dtype (float32 arithmetic, float64 for float64 inputs; differentiable in all inputs)."""
    _check(r, k, v, w, u, None)
    B, T, C = k.shape
    H, N = u.shape
    if wkv_cuda.serves_heads("biwkv6", N, r, k, v, w):
        _log_path("biwkv6", "cuda-kernel", k.device)
        tokens = [x.reshape(B, T, H, N) for x in (r, k, v, w)]
        empty = k.new_zeros(B, H, N, N, dtype=_compute_dtype(k))
        forward, _ = torch.ops.zoo.wkv6_forward(*tokens, u, empty, False)
        backward, _ = torch.ops.zoo.wkv6_forward(*tokens, torch.zeros_like(u), empty, True)
        return (forward + backward).view(B, T, C)
    _log_path("biwkv6", "torch-wkv6", k.device)
    forward, _ = wkv6(r, k, v, w, u)
    flip = [x.flip(1) for x in (r, k, v, w)]
    backward, _ = wkv6(*flip, torch.zeros_like(u))
    return forward + backward.flip(1)
