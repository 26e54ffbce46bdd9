"""RWKV-6 "Finch" layers (Peng et al., "Eagle and Finch", arXiv 2404.05892): time-mix, channel-mix, residual block.

Parameter names, shapes and order are those of BlinkDL's official x060 checkpoints (`att.time_maa_x` [1, 1, C],
`att.time_maa_w1` [C, 5R], `att.time_maa_w2` [5, R, C], `att.time_decay` [1, 1, C], `att.time_faaaa` [H, N],
`att.ln_x`, `ffn.time_maa_k`, ...), so official state dicts load unchanged. Initialisation follows the official
x060 trainer (BlinkDL/RWKV-LM, RWKV-v5/src/model.py: `RWKV_Tmix_x060`, `RWKV_CMix_x060`, `generate_init_weight`).

Per-layer RNN state: `state_rows(N)` = N + 2 rows of [B, C] (C = H * N): row 0 the time-mix's x_prev, rows 1..N the
WKV state (row 1 + i holds S[b, h, i, :] of every head h, at columns h*N .. h*N + N-1; i is a key channel), row
N + 1 the channel-mix's x_prev: the `rwkv` package's three parts, in its order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rwkv4 import ResidualBlock, _channel_ramp, _ratios, token_shift
from .rwkv4 import time_mix_init as rwkv4_time_mix_init
from .rwkv5 import bonus_init, decay_init, pack_wkv_state, unpack_wkv_state
from .wkv6 import wkv6

__all__ = ["RWKV6TimeMix", "RWKV6ChannelMix", "RWKV6Block", "state_rows", "time_mix_init"]

GROUP_NORM_EPS = 64e-5
"""ln_x's eps: the official 1e-5 * head_size_divisor^2 with head_size_divisor = 8."""


def state_rows(head_size: int) -> int:
    """Rows of one layer's state: att x_prev, head_size rows of WKV state, ffn x_prev."""
    return head_size + 2


def time_mix_init(n_embd: int, layer_id: int, n_layer: int, head_size: int) -> dict[str, Tensor]:
    """The official x060 init of the time-mix's per-channel parameters, with depth = l/(L-1), shallow = 1 - l/L:
    maa_x = maa_w = maa_k = 1 - (c/C)^shallow, maa_v = 1 - (c/C)^shallow - 0.3 depth, maa_r = maa_g =
    1 - (c/C)^(shallow/2) (one minus RWKV-4's time_mix init), each [1, 1, C];
    decay[c] = -6 + 5 (c/(C-1))^(0.7 + 1.3 depth), [1, 1, C]; bonus[c] = depth (1 - c/(C-1)) + 0.1 ((c+1) % 3 - 1),
    shaped [H, N]."""
    mix = rwkv4_time_mix_init(n_embd, layer_id, n_layer)
    return {"maa_x": 1 - mix["mix_k"], "maa_w": 1 - mix["mix_k"], "maa_k": 1 - mix["mix_k"],
            "maa_v": 1 - mix["mix_v"], "maa_r": 1 - mix["mix_r"], "maa_g": 1 - mix["mix_r"],
            "decay": decay_init(n_embd, head_size, layer_id, n_layer).view(1, 1, n_embd),
            "bonus": bonus_init(n_embd, head_size, layer_id, n_layer)}


class RWKV6TimeMix(nn.Module):
    """Finch time mixing. With x' the token-shifted x, delta = x' - x and * in (w, k, v, r, g):

        m_*     = tanh((x + delta * maa_x) @ time_maa_w1)_* @ time_maa_w2[*]       (LoRA of rank R per mix)
        x_*     = x + delta * (maa_* + m_*)                                        (ddlerp: data-dependent shift)
        r, k, v = W_r x_r, W_k x_k, W_v x_v;   g = SiLU(W_g x_g)
        d       = time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2            (decay logits; LoRA of rank D)
        out     = W_o(GroupNorm_H(wkv6(r, k, v, d, u = time_faaaa)) * g)            (w_t = exp(-exp(d_t)), blocks.wkv6)
    """

    def __init__(self, n_embd: int, layer_id: int, n_layer: int, head_size: int = 64, mix_lora: int = 32,
                 decay_lora: int = 64, group_norm_eps: float = GROUP_NORM_EPS):
        super().__init__()
        if n_embd % head_size:
            raise ValueError(f"n_embd={n_embd} is not a multiple of head_size={head_size}")
        self.layer_id, self.n_layer = layer_id, n_layer
        init = time_mix_init(n_embd, layer_id, n_layer, head_size)
        self.time_maa_x = nn.Parameter(init["maa_x"])
        self.time_maa_w = nn.Parameter(init["maa_w"])
        self.time_maa_k = nn.Parameter(init["maa_k"])
        self.time_maa_v = nn.Parameter(init["maa_v"])
        self.time_maa_r = nn.Parameter(init["maa_r"])
        self.time_maa_g = nn.Parameter(init["maa_g"])
        self.time_maa_w1 = nn.Parameter(torch.empty(n_embd, 5 * mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, mix_lora, n_embd))
        self.time_decay = nn.Parameter(init["decay"])
        self.time_decay_w1 = nn.Parameter(torch.empty(n_embd, decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_lora, n_embd))
        self.time_faaaa = nn.Parameter(init["bonus"])
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        self.gate = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_x = nn.GroupNorm(n_embd // head_size, n_embd, eps=group_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official x060: LoRA A zero and B uniform(+-0.01); W_r, W_v orthogonal, W_k, W_g orthogonal x 0.1, W_o zero;
        ln_x weight ((l+1)/L)^0.7."""
        nn.init.zeros_(self.time_maa_w1)
        nn.init.uniform_(self.time_maa_w2, -0.01, 0.01)
        nn.init.zeros_(self.time_decay_w1)
        nn.init.uniform_(self.time_decay_w2, -0.01, 0.01)
        for lin, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1)):
            nn.init.orthogonal_(lin.weight, gain=gain)
        nn.init.zeros_(self.output.weight)
        nn.init.constant_(self.ln_x.weight, ((self.layer_id + 1) / self.n_layer) ** 0.7)
        nn.init.zeros_(self.ln_x.bias)

    def projections(self, x: Tensor, shifted: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(r, k, v, g, decay logits d) of tokens x [B, T, C] and their token-shifted neighbours."""
        B, T, C = x.shape
        delta = shifted - x
        lora = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)
        m_w, m_k, m_v, m_r, m_g = torch.einsum("btjr,jrc->jbtc", lora, self.time_maa_w2)
        x_w = x + delta * (self.time_maa_w + m_w)
        r = self.receptance(x + delta * (self.time_maa_r + m_r))
        k = self.key(x + delta * (self.time_maa_k + m_k))
        v = self.value(x + delta * (self.time_maa_v + m_v))
        g = F.silu(self.gate(x + delta * (self.time_maa_g + m_g)))
        decay = self.time_decay + torch.tanh(x_w @ self.time_decay_w1) @ self.time_decay_w2
        return r, k, v, g, decay

    def gated_output(self, y: Tensor, g: Tensor) -> Tensor:
        """W_o(GroupNorm_H(y) * g) for the WKV output y [B, T, C]."""
        B, T, C = y.shape
        return self.output(self.ln_x(y.reshape(B * T, C)).view(B, T, C) * g)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: [1 + N, B, C] (x_prev, packed WKV state) or None. Returns (out, new state)."""
        r, k, v, g, decay = self.projections(x, token_shift(x, None if state is None else state[0]))
        wkv_state = None if state is None else unpack_wkv_state(state[1:], self.time_faaaa.shape[1])
        y, wkv_state = wkv6(r, k, v, decay, self.time_faaaa, wkv_state)
        return self.gated_output(y, g), torch.cat([x[None, :, -1].to(wkv_state.dtype), pack_wkv_state(wkv_state)])


class RWKV6ChannelMix(nn.Module):
    """out = sigmoid(W_r x_r) * W_v(relu(W_k x_k)^2), x_* = x + (x' - x) * maa_*; official x060 init
    maa_k = maa_r = 1 - (c/C)^((1 - l/L)^3), W_k orthogonal, W_r and W_v zero."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int):
        super().__init__()
        shallow = _ratios(layer_id, n_layer)[1]
        self.time_maa_k = nn.Parameter(1 - _channel_ramp(n_embd) ** (shallow ** 3))
        self.time_maa_r = nn.Parameter(1 - _channel_ramp(n_embd) ** (shallow ** 3))
        self.key = nn.Linear(n_embd, dim_ffn, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(dim_ffn, n_embd, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.key.weight)
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.value.weight)

    def mix(self, x: Tensor, shifted: Tensor) -> Tensor:
        """The channel mix of tokens x [B, T, C] and their token-shifted neighbours."""
        delta = shifted - x
        k = torch.square(torch.relu(self.key(x + delta * self.time_maa_k)))
        return torch.sigmoid(self.receptance(x + delta * self.time_maa_r)) * self.value(k)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; x_prev: [B, C] or None. Returns (out, last token of x)."""
        return self.mix(x, token_shift(x, x_prev)), x[:, -1]


class RWKV6Block(ResidualBlock):
    """The RWKV-6 residual block (ResidualBlock); state rows: att x_prev, the WKV state (N rows), ffn x_prev."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int, head_size: int = 64,
                 mix_lora: int = 32, decay_lora: int = 64):
        super().__init__()
        self.layer_id, self.head_size = layer_id, head_size
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)      # after ln1, ln2: the official key order
        self.att = RWKV6TimeMix(n_embd, layer_id, n_layer, head_size, mix_lora, decay_lora)
        self.ffn = RWKV6ChannelMix(n_embd, dim_ffn, layer_id, n_layer)

    def init_state(self, batch_size: int, n_embd: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty state [state_rows(N), B, C]: zeros."""
        return torch.zeros(state_rows(self.head_size), batch_size, n_embd, device=device, dtype=dtype)
