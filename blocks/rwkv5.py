"""RWKV-5 "Eagle" layers (Peng et al., "Eagle and Finch", arXiv 2404.05892; BlinkDL's x052 code path, and the
earlier RWKV-5.0 / 5.1 preview): the multi-head time-mix with a matrix-valued state, RWKV-4's channel-mix, and the
residual block.

Parameter names and shapes are those of the official checkpoints, declared in the official order, so official
state dicts load unchanged: 5.2 has per-channel `att.time_decay` and `att.time_faaaa` [H, N] and a gate
(`att.time_mix_g` [1, 1, C], `att.gate.weight`); 5.1 has one decay and one `att.time_first` per head [H] and the
gate; 5.0 the per-head parameters and no gate. Initialisation follows the official v5 trainer (RWKV-LM, RWKV-v5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rwkv4 import RWKV4ChannelMix, ResidualBlock, _ratios, mix, orthogonal_init_, time_mix_init, token_shift
from .wkv5 import wkv5

__all__ = ["RWKV5TimeMix", "RWKV5Block", "VERSIONS", "decay_init", "bonus_init", "pack_wkv_state", "unpack_wkv_state"]

VERSIONS = ("5.0", "5.1", "5.2")
"""RWKV-5 variants: 5.0 (per-head decay and bonus, no gate), 5.1 (5.0 with the gate), 5.2 (per-channel, gate)."""


def decay_init(n_embd: int, head_size: int, layer_id: int, n_layer: int) -> Tensor:
    """time_decay[c] = -6 + 5 (c/(C-1))^(0.7 + 1.3 l/(L-1)), shaped [H, N] (w = exp(-exp(time_decay))). RWKV-5.0 /
    5.1's one decay per head is the same ramp over the heads: decay_init(H, 1, ...)."""
    c = torch.arange(n_embd, dtype=torch.float32)
    depth = _ratios(layer_id, n_layer)[0]
    return (-6 + 5 * (c / max(n_embd - 1, 1)) ** (0.7 + 1.3 * depth)).view(-1, head_size)


def bonus_init(n_embd: int, head_size: int, layer_id: int, n_layer: int) -> Tensor:
    """time_faaaa[c] = (l/(L-1)) (1 - c/(C-1)) + 0.1 ((c+1) % 3 - 1), shaped [H, N]."""
    c = torch.arange(n_embd, dtype=torch.float32)
    depth = _ratios(layer_id, n_layer)[0]
    return (depth * (1 - c / max(n_embd - 1, 1)) + 0.1 * ((c + 1) % 3 - 1)).view(-1, head_size)


def pack_wkv_state(state: Tensor) -> Tensor:
    """[B, H, N, N] (key x value) -> N rows of [B, C]: row i holds S[:, h, i, j] at column h*N + j."""
    B, H, N, _ = state.shape
    return state.permute(2, 0, 1, 3).reshape(N, B, H * N)


def unpack_wkv_state(rows: Tensor, head_size: int) -> Tensor:
    """The inverse of `pack_wkv_state`: N rows of [B, C] -> [B, H, N, N]."""
    N, B, C = rows.shape
    return rows.reshape(N, B, C // head_size, head_size).permute(1, 2, 0, 3)


class RWKV5TimeMix(nn.Module):
    """Multi-head time-mix of RWKV-5, with x' the token-shifted input and mix(x, x') = mu x + (1 - mu) x':

        r, k, v = W_r mix_r, W_k mix_k, W_v mix_v          (split into H heads of N = head_size channels)
        g       = SiLU(W_g mix_g)                           (5.1 and 5.2; 1 for 5.0)
        y       = wkv5(r, k, v; w = exp(-exp(time_decay)), u)                 (blocks.wkv5)
        out     = W_o(GroupNorm_H(y) * g)

    with u = time_faaaa in 5.2, and in 5.0 / 5.1 u = exp(time_first) and time_decay, time_first one per head
    (shared by its N channels). GroupNorm over the heads has eps = 1e-5 * head_size_divisor^2: the official trainer
    normalises y / 8 with eps 1e-5, which is the same function (the `rwkv` package uses eps 64e-5 on y).
    """

    def __init__(self, n_embd: int, head_size: int, layer_id: int, n_layer: int, head_size_divisor: int = 8,
                 version: str = "5.2"):
        super().__init__()
        if n_embd % head_size:
            raise ValueError(f"n_embd={n_embd} is not a multiple of head_size={head_size}")
        if version not in VERSIONS:
            raise ValueError(f"RWKV-5 version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.head_size = head_size
        self.n_head = n_embd // head_size
        self.version = version
        mixes = time_mix_init(n_embd, layer_id, n_layer)
        self.time_mix_k = nn.Parameter(mixes["mix_k"])
        self.time_mix_v = nn.Parameter(mixes["mix_v"])
        self.time_mix_r = nn.Parameter(mixes["mix_r"])
        if version != "5.0":
            self.time_mix_g = nn.Parameter(mixes["mix_r"].clone())
        if version == "5.2":
            self.time_decay = nn.Parameter(decay_init(n_embd, head_size, layer_id, n_layer))
            self.time_faaaa = nn.Parameter(bonus_init(n_embd, head_size, layer_id, n_layer))
        else:
            self.time_decay = nn.Parameter(decay_init(self.n_head, 1, layer_id, n_layer).view(-1))
            self.time_first = nn.Parameter(torch.full((self.n_head,), -3.0))
        self.gate = nn.Linear(n_embd, n_embd, bias=False) if version == "5.1" else None   # the preview's order
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        if version == "5.2":
            self.gate = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, n_embd, eps=1e-5 * head_size_divisor ** 2)
        self.layer_scale = ((1 + layer_id) / n_layer) ** 0.7
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official v5 init: orthogonal r, k, v, g; zero output; ln_x.weight = ((1 + l) / L)^0.7."""
        for lin in (self.receptance, self.key, self.value, self.gate):
            if lin is not None:
                orthogonal_init_(lin.weight)
        nn.init.zeros_(self.output.weight)
        nn.init.constant_(self.ln_x.weight, self.layer_scale)
        nn.init.zeros_(self.ln_x.bias)

    def decay_and_bonus(self) -> tuple[Tensor, Tensor]:
        """(time_decay, u), each [H, N], as wkv5 takes them."""
        if self.version == "5.2":
            return self.time_decay, self.time_faaaa
        shape = (self.n_head, self.head_size)
        return self.time_decay[:, None].expand(shape), self.time_first.exp()[:, None].expand(shape)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: [1 + N, B, C] (x_prev, then the packed WKV state) or None.
        Returns (out, new state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        x_prev = token_shift(x, None if state is None else state[0])
        r = self.receptance(mix(x, x_prev, self.time_mix_r)).view(B, T, H, N)
        k = self.key(mix(x, x_prev, self.time_mix_k)).view(B, T, H, N)
        v = self.value(mix(x, x_prev, self.time_mix_v)).view(B, T, H, N)
        wkv_in = None if state is None else unpack_wkv_state(state[1:], N)
        y, wkv_state = wkv5(r, k, v, *self.decay_and_bonus(), wkv_in)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        if self.gate is not None:
            y = y * F.silu(self.gate(mix(x, x_prev, self.time_mix_g)))
        new_state = torch.cat([x[:, -1][None].to(wkv_state.dtype), pack_wkv_state(wkv_state)])
        return self.output(y), new_state


class RWKV5Block(ResidualBlock):
    """The RWKV-5 residual block (ResidualBlock), with RWKV-4's channel-mix (sigmoid(W_r mix_r) * W_v relu(W_k
    mix_k)^2). State rows per layer: att x_prev, the WKV state as head_size rows of [B, C] (`pack_wkv_state`), ffn
    x_prev."""

    def __init__(self, n_embd: int, dim_ffn: int, head_size: int, layer_id: int, n_layer: int,
                 head_size_divisor: int = 8, version: str = "5.2"):
        super().__init__()
        self.layer_id = layer_id
        self.state_rows = head_size + 2
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.att = RWKV5TimeMix(n_embd, head_size, layer_id, n_layer, head_size_divisor, version)
        self.ffn = RWKV4ChannelMix(n_embd, dim_ffn, layer_id, n_layer)

    def init_state(self, batch_size: int, n_embd: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty state [state_rows, B, C]: zeros."""
        return torch.zeros(self.state_rows, batch_size, n_embd, device=device, dtype=dtype)
