"""RWKV-4 layers (arXiv 2305.13048): token shift, time-mix, channel-mix and the residual block.

Parameter names and shapes are those of BlinkDL's official checkpoints (`att.time_decay`,
`att.time_mix_k` [1, 1, C], `ffn.key.weight`, ...), so official state dicts load unchanged.
Initialisation follows the official v4neo trainer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .wkv import EMPTY_PP, wkv4

__all__ = ["token_shift", "mix", "time_mix_init", "channel_mix_init", "RWKV4TimeMix", "RWKV4ChannelMix", "RWKV4Block",
           "STATE_ROWS"]

STATE_ROWS = 5
"""Per-layer RNN state rows, in the `rwkv` package's order: att x_prev, aa, bb, pp, ffn x_prev."""


def token_shift(x: Tensor, prev: Tensor | None = None) -> Tensor:
    """x'_t = x_{t-1}, with x'_0 = prev (the last token of the previous call) or zeros. x: [B, T, C]."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def mix(x: Tensor, x_prev: Tensor, mu: Tensor) -> Tensor:
    """mu * x + (1 - mu) * x_prev, the per-channel interpolation of RWKV's token shift, as x_prev + mu (x - x_prev)
    (torch.lerp: one kernel instead of four; decoding a token is bound by the number of kernels)."""
    dtype = torch.promote_types(x.dtype, mu.dtype)
    return torch.lerp(x_prev.to(dtype), x.to(dtype), mu.to(dtype))


def orthogonal_init_(weight: Tensor, gain: float = 1.0) -> None:
    """Official v4neo init of a [out, in] matrix: orthogonal, gain * sqrt(out/in) when out > in."""
    if weight.is_meta:
        return
    rows, cols = weight.shape
    nn.init.orthogonal_(weight, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))


def _ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(l / (L-1), 1 - l / L), the depth ratios of the official init."""
    return layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer


def _channel_ramp(n_embd: int) -> Tensor:
    """c / C for c = 0 .. C-1, shaped [1, 1, C] like the official time_mix tensors."""
    return (torch.arange(n_embd, dtype=torch.float32) / n_embd).view(1, 1, n_embd)


def time_mix_init(n_embd: int, layer_id: int, n_layer: int) -> dict[str, Tensor]:
    """The official v4neo init of a time-mix's per-channel parameters (Vision-RWKV's "fancy" init is the same):
    decay[c] = -5 + 8 (c/(C-1))^(0.7 + 1.3 l/(L-1)), first[c] = log 0.3 + 0.5 ((c+1) % 3 - 1),
    mix_k = (c/C)^(1 - l/L), mix_v = mix_k + 0.3 l/(L-1), mix_r = (c/C)^(0.5 (1 - l/L)) (the mixes [1, 1, C])."""
    depth, shallow = _ratios(layer_id, n_layer)
    c = torch.arange(n_embd, dtype=torch.float32)
    ramp = _channel_ramp(n_embd)
    return {"decay": -5 + 8 * (c / max(n_embd - 1, 1)) ** (0.7 + 1.3 * depth),
            "first": math.log(0.3) + 0.5 * ((c + 1) % 3 - 1),
            "mix_k": ramp ** shallow, "mix_v": ramp ** shallow + 0.3 * depth, "mix_r": ramp ** (0.5 * shallow)}


def channel_mix_init(n_embd: int, layer_id: int, n_layer: int) -> Tensor:
    """The official init of a channel-mix's mix_k and mix_r: (c/C)^(1 - l/L), [1, 1, C]."""
    return _channel_ramp(n_embd) ** _ratios(layer_id, n_layer)[1]


class RWKV4TimeMix(nn.Module):
    """k, v, r = W_k mix_k, W_v mix_v, W_r mix_r;  out = W_o(sigmoid(r) * wkv(w, u, k, v)).

    w = -exp(time_decay), u = time_first; official init (`time_mix_init`).
    """

    def __init__(self, n_embd: int, layer_id: int, n_layer: int):
        super().__init__()
        init = time_mix_init(n_embd, layer_id, n_layer)
        self.time_decay = nn.Parameter(init["decay"])
        self.time_first = nn.Parameter(init["first"])
        self.time_mix_k = nn.Parameter(init["mix_k"])
        self.time_mix_v = nn.Parameter(init["mix_v"])
        self.time_mix_r = nn.Parameter(init["mix_r"])
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.key, self.receptance, self.output):
            nn.init.zeros_(lin.weight)
        orthogonal_init_(self.value.weight)

    def gated_wkv(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(sigmoid(r), wkv, new state [4, B, C]): the time-mix before its output projection."""
        x_prev = token_shift(x, None if state is None else state[0])
        k = self.key(mix(x, x_prev, self.time_mix_k))
        v = self.value(mix(x, x_prev, self.time_mix_v))
        r = torch.sigmoid(self.receptance(mix(x, x_prev, self.time_mix_r)))
        w = -torch.exp(self.time_decay.float())
        wkv, (aa, bb, pp) = wkv4(w, self.time_first, k, v, None if state is None else tuple(state[1:4]))
        return r, wkv, torch.stack([x[:, -1].to(aa.dtype), aa, bb, pp])

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: [4, B, C] (x_prev, aa, bb, pp) or None. Returns (out, new state)."""
        r, wkv, new_state = self.gated_wkv(x, state)
        return self.output(r * wkv), new_state


class RWKV4ChannelMix(nn.Module):
    """out = sigmoid(W_r mix_r) * W_v(relu(W_k mix_k)^2); official init time_mix_k = time_mix_r = (c/C)^(1 - l/L)."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(channel_mix_init(n_embd, layer_id, n_layer))
        self.time_mix_r = nn.Parameter(channel_mix_init(n_embd, layer_id, n_layer))
        self.key = nn.Linear(n_embd, dim_ffn, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(dim_ffn, n_embd, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        orthogonal_init_(self.key.weight)
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: Tensor, x_prev: Tensor | None = None,
                key_offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; x_prev: [B, C] or None; key_offset: added to the key's mixed input (RRWKV's medium).
        Returns (out, last token of x)."""
        xx = token_shift(x, x_prev)
        key_input = mix(x, xx, self.time_mix_k)
        k = torch.square(torch.relu(self.key(key_input if key_offset is None else key_input + key_offset)))
        r = torch.sigmoid(self.receptance(mix(x, xx, self.time_mix_r)))
        return r * self.value(k), x[:, -1]


class ResidualBlock(nn.Module):
    """x = x + att(ln1(x)); x = x + ffn(ln2(x)); block 0 first applies ln0 to the embeddings. Subclasses build
    layer_id, ln0 (block 0 only), ln1, ln2, att (its state: all rows but the last) and ffn (its x_prev: the last
    row), in their checkpoints' key order."""

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: [state rows, B, C] or None. Returns (x, new state)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att, att_state = self.att(self.ln1(x), None if state is None else state[:-1])
        x = x + att
        ffn, ffn_prev = self.ffn(self.ln2(x), None if state is None else state[-1])
        x = x + ffn
        return x, torch.cat([att_state, ffn_prev[None].to(att_state.dtype)])


class RWKV4Block(ResidualBlock):
    """The RWKV-4 residual block (ResidualBlock); state rows: att x_prev, aa, bb, pp, ffn x_prev."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.att = RWKV4TimeMix(n_embd, layer_id, n_layer)
        self.ffn = RWKV4ChannelMix(n_embd, dim_ffn, layer_id, n_layer)

    @staticmethod
    def init_state(batch_size: int, n_embd: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty state [STATE_ROWS, B, C]: zeros, with pp = -1e38."""
        state = torch.zeros(STATE_ROWS, batch_size, n_embd, device=device, dtype=dtype)
        state[3] = EMPTY_PP
        return state
