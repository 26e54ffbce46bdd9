"""RWKV-7 "Goose" layers (Peng et al., arXiv 2503.14456): time-mix, channel-mix and the residual block.

The equations are those of BlinkDL's x070 code path (RWKV-LM's RWKV-v7, the `rwkv` package's RWKV_x070), with
the official parameter names and shapes (`att.x_r` [1, 1, C], `att.w1` [C, D], `att.r_k` [H, N], ...), so
official state dicts load unchanged. Initialisation follows the x070 trainer of the released World models' time
(RWKV-LM, Dec 2024 - Apr 2025: `RWKV_Tmix_x070.__init__` plus `generate_init_weight`); RWKV-LM's later "better
init" (May 2025: zigzag terms in w0/a0, other v0/k_k/k_a/r_k, x_k/x_v) is not followed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rwkv4 import _channel_ramp, _ratios, orthogonal_init_, token_shift
from .rwkv5 import pack_wkv_state, unpack_wkv_state
from .wkv7 import wkv7

__all__ = ["RWKV7TimeMix", "RWKV7ChannelMix", "RWKV7Block", "LOG_DECAY_SCALE", "pack_state", "unpack_state"]

LOG_DECAY_SCALE = 0.606531
"""log w = -0.606531 sigmoid(.): e^{-1/2} as the `rwkv` package rounds it (the trainer's -softplus(-z) - 1/2 before
exp(-exp(.)) is the same decay up to 6e-7 relative), so decays lie in (0.545, 1)."""


def pack_state(att_prev: Tensor, wkv_state: Tensor, ffn_prev: Tensor) -> Tensor:
    """One layer's state as [N + 2, B, C]: row 0 att x_prev, rows 1..N the WKV state (row 1 + i holds S[h, i, j] of
    every head at column h N + j), row N + 1 ffn x_prev; in the WKV state's dtype (float32, float64)."""
    rows = pack_wkv_state(wkv_state)
    return torch.cat([att_prev[None].to(rows.dtype), rows, ffn_prev[None].to(rows.dtype)])


def unpack_state(state: Tensor, head_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `pack_state`: (att x_prev [B, C], WKV state [B, H, N, N], ffn x_prev [B, C])."""
    return state[0], unpack_wkv_state(state[1:head_size + 1], head_size), state[head_size + 1]


def _low_rank_pair(n_embd: int, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(down [C, rank] = 0, up [rank, C] orthogonal with gain 0.1): the official init of a LoRA projection."""
    up = torch.empty(rank, n_embd)
    orthogonal_init_(up, gain=0.1)
    return nn.Parameter(torch.zeros(n_embd, rank)), nn.Parameter(up)


class RWKV7TimeMix(nn.Module):
    """RWKV-7 time-mix. With x' the token-shifted input and x_* = lerp(x, x', mu_*) (= x + (x' - x) mu_*):

        r, k, v = W_r x_r, W_k x_k, W_v x_v
        log w   = -0.606531 sigmoid(w0 + tanh(x_w w1) w2)          decay, per channel
        iclr    = sigmoid(a0 + (x_a a1) a2)                         in-context learning rate
        g       = sigmoid(x_g g1) g2                                output gate
        v       = lerp(v, v_first, sigmoid(v0 + (x_v v1) v2))       value residual toward layer 0 (layers >= 1)
        kk      = normalize(k * k_k) per head;   k = k * (1 + (iclr - 1) k_a)
        y       = WKV7(r, w, k, v, a = -kk, b = kk * iclr)          S_t = S_{t-1}(diag(w_t) - kk (iclr kk)^T) + v k^T
        out     = W_o((GroupNorm_H(y) + (sum_head r * k * r_k) v) * g)     GroupNorm eps 64e-5

    In layer 0, v0/v1/v2 are unused (v_first is that layer's own v); they are kept as buffers, not parameters,
    so official checkpoints (which carry them) round-trip and no unused parameter waits for a gradient.
    """

    def __init__(self, n_embd: int, head_size: int, layer_id: int, n_layer: int, decay_lora: int, iclr_lora: int,
                 value_lora: int, gate_lora: int):
        super().__init__()
        C, N = n_embd, head_size
        H = C // N
        self.layer_id = layer_id
        depth, shallow = _ratios(layer_id, n_layer)
        ramp = _channel_ramp(C)
        self.x_r = nn.Parameter(1 - ramp ** (0.2 * shallow))
        self.x_w = nn.Parameter(1 - ramp ** (0.9 * shallow))
        self.x_k = nn.Parameter(1 - (ramp ** (0.9 * shallow) + 0.4 * depth))
        self.x_v = nn.Parameter(1 - (ramp ** (0.4 * shallow) + 0.6 * depth))
        self.x_a = nn.Parameter(1 - ramp ** (0.9 * shallow))
        self.x_g = nn.Parameter(1 - ramp ** (0.2 * shallow))
        self.w1, self.w2 = _low_rank_pair(C, decay_lora)
        decay_speed = -7 + 5 * (torch.arange(C) / max(C - 1, 1)) ** (0.85 + depth ** 0.5)
        self.w0 = nn.Parameter((decay_speed + 0.5).view(1, 1, C))
        self.a1, self.a2 = _low_rank_pair(C, iclr_lora)
        self.a0 = nn.Parameter(torch.zeros(1, 1, C))
        v1, v2 = _low_rank_pair(C, value_lora)
        for name, param in (("v1", v1), ("v2", v2), ("v0", nn.Parameter(torch.ones(1, 1, C)))):
            if layer_id == 0:
                self.register_buffer(name, param.data)
            else:
                self.register_parameter(name, param)
        self.g1, self.g2 = _low_rank_pair(C, gate_lora)
        self.k_k = nn.Parameter(torch.full((1, 1, C), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        self.reset_parameters(n_layer)

    def reset_parameters(self, n_layer: int) -> None:
        """Official x070 init: W_r, W_v orthogonal, W_k orthogonal x 0.1, W_o = 0; ln_x weight ((l + 1) / L)^0.7."""
        orthogonal_init_(self.receptance.weight)
        orthogonal_init_(self.key.weight, gain=0.1)
        orthogonal_init_(self.value.weight)
        nn.init.zeros_(self.output.weight)
        nn.init.constant_(self.ln_x.weight, ((self.layer_id + 1) / n_layer) ** 0.7)
        nn.init.zeros_(self.ln_x.bias)

    def forward(self, x: Tensor, v_first: Tensor | None, x_prev: Tensor | None = None,
                wkv_state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, C]; v_first: layer 0's v (None in layer 0); x_prev [B, C] and wkv_state [B, H, N, N] from the
        previous call, or None. Returns (out, v_first, new WKV state)."""
        B, T, C = x.shape
        H, N = self.r_k.shape
        shifted = token_shift(x, x_prev)
        xr, xw, xk, xv, xa, xg = (torch.lerp(x, shifted, mu.to(x.dtype))
                                  for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        decay_logit = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_w = -LOG_DECAY_SCALE * torch.sigmoid(decay_logit.to(torch.promote_types(x.dtype, torch.float32)))
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2))
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)
        k = k * (1 + (iclr - 1) * self.k_a)

        r, k, v, log_w, iclr = (z.view(B, T, H, N) for z in (r, k, v, log_w, iclr))
        y, wkv_state = wkv7(r, log_w, k, v, -kk, kk * iclr, wkv_state, max_decay=LOG_DECAY_SCALE)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, H, N)
        y = y + (r * k * self.r_k).sum(dim=-1, keepdim=True) * v
        return self.output(y.view(B, T, C) * g), v_first, wkv_state


class RWKV7ChannelMix(nn.Module):
    """out = W_v relu(W_k lerp(x, x', x_k))^2; official init x_k = 1 - (c/C)^((1 - l/L)^4), W_k orthogonal, W_v = 0."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int):
        super().__init__()
        self.x_k = nn.Parameter(1 - _channel_ramp(n_embd) ** (_ratios(layer_id, n_layer)[1] ** 4))
        self.key = nn.Linear(n_embd, dim_ffn, bias=False)
        self.value = nn.Linear(dim_ffn, n_embd, bias=False)
        if not self.key.weight.is_meta:
            nn.init.orthogonal_(self.key.weight)      # gain 1 whatever the shape, as the official x070 init
        nn.init.zeros_(self.value.weight)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; x_prev: [B, C] or None. Returns (out, last token of x)."""
        k = torch.relu(self.key(torch.lerp(x, token_shift(x, x_prev), self.x_k.to(x.dtype)))) ** 2
        return self.value(k), x[:, -1]


class RWKV7Block(nn.Module):
    """x = x + att(ln1(x)); x = x + ffn(ln2(x)); block 0 first applies ln0 to the embeddings. The time-mix also
    hands v_first (layer 0's values) to the later blocks."""

    def __init__(self, n_embd: int, dim_ffn: int, head_size: int, layer_id: int, n_layer: int, decay_lora: int,
                 iclr_lora: int, value_lora: int, gate_lora: int):
        super().__init__()
        if n_embd % head_size:
            raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
        self.layer_id = layer_id
        self.head_size = head_size
        self.ln1 = nn.LayerNorm(n_embd)     # registered in the official order: ln1, ln2, ln0, att, ffn
        self.ln2 = nn.LayerNorm(n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.att = RWKV7TimeMix(n_embd, head_size, layer_id, n_layer, decay_lora, iclr_lora, value_lora, gate_lora)
        self.ffn = RWKV7ChannelMix(n_embd, dim_ffn, layer_id, n_layer)

    def forward(self, x: Tensor, v_first: Tensor | None, state: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, C]; state: [head_size + 2, B, C] (`pack_state`) or None. Returns (x, v_first, new state)."""
        att_prev, wkv_state, ffn_prev = (None,) * 3 if state is None else unpack_state(state, self.head_size)
        if self.layer_id == 0:
            x = self.ln0(x)
        att_in = self.ln1(x)
        att, v_first, wkv_state = self.att(att_in, v_first, att_prev, wkv_state)
        x = x + att
        ffn, ffn_last = self.ffn(self.ln2(x), ffn_prev)
        x = x + ffn
        return x, v_first, pack_state(att_in[:, -1], wkv_state, ffn_last)

    def init_state(self, batch_size: int, n_embd: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty state [head_size + 2, B, C]: zeros."""
        return torch.zeros(self.head_size + 2, batch_size, n_embd, device=device, dtype=dtype)
