"""Vision-RWKV layers (arXiv 2403.02308): Q-Shift, the Bi-WKV spatial mix, the channel mix and the block; with the
bidirectional token shift they also make RWKV-CLIP's text tower (arXiv 2406.06973).

Parameter names are those of the official code (`att.spatial_decay`, `att.spatial_mix_k` [1, 1, C],
`ffn.key.weight`, `gamma1`, ...), so official checkpoints map onto them key for key; the per-channel
parameters start from the official "fancy" init, which is RWKV-4's (`time_mix_init`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from .biwkv import biwkv
from .biwkv6 import biwkv6
from .rwkv4 import channel_mix_init, orthogonal_init_, time_mix_init
from .rwkv6 import GROUP_NORM_EPS, RWKV6ChannelMix, RWKV6TimeMix

__all__ = ["q_shift", "bi_token_shift", "TOKEN_SHIFTS", "shift_mixes", "VRWKVSpatialMix", "VRWKV6SpatialMix",
           "VRWKVChannelMix", "BiRWKV6ChannelMix", "VRWKVBlock"]


def q_shift(x: Tensor, resolution: tuple[int, int], head_size: int | None = None) -> Tensor:
    """Q-Shift: tokens x [B, H*W, C] (row-major grid) take channel quarters from their four neighbours:
    [0, C/4) from the left pixel, [C/4, C/2) from the right, [C/2, 3C/4) from above, [3C/4, 4*(C//4)) from below,
    zeros past the border; channels past 4*(C//4) keep their own value. With head_size (Vision-RWKV-6's multi-head
    Q-Shift, RWKV-CLIP's image tower), the quarters are taken inside every head of head_size channels instead."""
    B, N, C = x.shape
    H, W = resolution
    if N != H * W:
        raise ValueError(f"q_shift: {N} tokens do not fill a {H} x {W} grid")
    head_size = head_size or C
    if C % head_size:
        raise ValueError(f"q_shift: {C} channels are not whole heads of {head_size}")
    q = head_size // 4
    grid = x.view(B, H, W, C // head_size, head_size)
    out = torch.zeros_like(grid)
    out[:, :, 1:, :, :q] = grid[:, :, :-1, :, :q]
    out[:, :, :-1, :, q:2 * q] = grid[:, :, 1:, :, q:2 * q]
    out[:, 1:, :, :, 2 * q:3 * q] = grid[:, :-1, :, :, 2 * q:3 * q]
    out[:, :-1, :, :, 3 * q:4 * q] = grid[:, 1:, :, :, 3 * q:4 * q]
    out[..., 4 * q:] = grid[..., 4 * q:]
    return out.view(B, N, C)


def bi_token_shift(x: Tensor, resolution: object = None, head_size: int = 64) -> Tensor:
    """The text towers' bidirectional token shift: in every head of `head_size` channels, the first half of the
    channels take token t-1 and the second half token t+1 (zeros past either end). x: [B, T, C]."""
    earlier = torch.zeros_like(x)
    earlier[:, 1:] = x[:, :-1]
    later = torch.zeros_like(x)
    later[:, :-1] = x[:, 1:]
    first_half = (torch.arange(x.shape[-1], device=x.device) % head_size) < head_size // 2
    return torch.where(first_half, earlier, later)


TOKEN_SHIFTS = {"q": q_shift, "bi": bi_token_shift}
"""How a block's mixes find the neighbour tokens: Q-Shift on an image grid, or the 1-D bidirectional shift."""


def shift_mixes(x: Tensor, shifted: Tensor, *mus: Tensor) -> list[Tensor]:
    """mu * x + (1 - mu) * shifted for each mu, computed as shifted + mu * (x - shifted): one difference and one
    fused multiply-add per mix instead of three passes each (the mixes are most of this model's memory traffic)."""
    diff = x - shifted
    return [torch.addcmul(shifted, diff, mu) for mu in mus]


class VRWKVSpatialMix(nn.Module):
    """x' = Q-Shift(x); k, v, r = W_k mix_k, W_v mix_v, W_r mix_r;
    out = W_o(sigmoid(r) * key_norm(biwkv(spatial_decay / T, spatial_first / T, k, v))), T tokens, key_norm an
    optional LayerNorm (Vision-RWKV-L)."""

    def __init__(self, dim: int, layer_id: int, depth: int, key_norm: bool = False, token_shift: str | Callable = "q"):
        super().__init__()
        self.shift = TOKEN_SHIFTS.get(token_shift, token_shift)
        init = time_mix_init(dim, layer_id, depth)
        self.spatial_decay = nn.Parameter(init["decay"])
        self.spatial_first = nn.Parameter(init["first"])
        self.spatial_mix_k = nn.Parameter(init["mix_k"])
        self.spatial_mix_v = nn.Parameter(init["mix_v"])
        self.spatial_mix_r = nn.Parameter(init["mix_r"])
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, resolution: tuple[int, int]) -> Tensor:
        xk, xv, xr = shift_mixes(x, self.shift(x, resolution), self.spatial_mix_k, self.spatial_mix_v,
                                 self.spatial_mix_r)
        k, v, r = self.key(xk), self.value(xv), torch.sigmoid(self.receptance(xr))
        T = x.shape[1]
        wkv = biwkv(self.spatial_decay / T, self.spatial_first / T, k, v)
        return self.output(r * self.key_norm(wkv))


class VRWKV6SpatialMix(RWKV6TimeMix):
    """Vision-RWKV-6's spatial mix: RWKV-6's time mix (data-dependent token-shift interpolation and decay, bonus,
    GroupNorm with eps 1e-5, SiLU gate; blocks.rwkv6) with Q-Shift inside every head for the token shift and the
    bidirectional WKV-6 (blocks.biwkv6) for the causal one:
        r, k, v, g, d = projections(x, Q-Shift_heads(x));   out = W_o(GroupNorm_H(biwkv6(r, k, v, d, u)) * g).
    With token_shift="bi" and group_norm_eps=64e-5 it is RWKV-CLIP's text-tower time mix."""

    def __init__(self, dim: int, layer_id: int, depth: int, head_size: int = 64, token_shift: str | Callable = "q",
                 group_norm_eps: float = 1e-5):
        super().__init__(dim, layer_id, depth, head_size, group_norm_eps=group_norm_eps)
        shift = TOKEN_SHIFTS.get(token_shift, token_shift)
        self.shift = partial(shift, head_size=head_size) if token_shift in TOKEN_SHIFTS else shift

    def forward(self, x: Tensor, resolution: tuple[int, int]) -> Tensor:
        r, k, v, g, decay = self.projections(x, self.shift(x, resolution))
        return self.gated_output(biwkv6(r, k, v, decay, self.time_faaaa), g)


class VRWKVChannelMix(nn.Module):
    """x' = Q-Shift(x); out = sigmoid(W_r mix_r) * W_v(key_norm(relu(W_k mix_k)^2)), hidden mlp_ratio * C."""

    def __init__(self, dim: int, layer_id: int, depth: int, mlp_ratio: float = 4.0, key_norm: bool = False,
                 token_shift: str | Callable = "q"):
        super().__init__()
        self.shift = TOKEN_SHIFTS.get(token_shift, token_shift)
        hidden = int(dim * mlp_ratio)
        self.spatial_mix_k = nn.Parameter(channel_mix_init(dim, layer_id, depth))
        self.spatial_mix_r = nn.Parameter(channel_mix_init(dim, layer_id, depth))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden) if key_norm else nn.Identity()
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, resolution: tuple[int, int]) -> Tensor:
        xk, xr = shift_mixes(x, self.shift(x, resolution), self.spatial_mix_k, self.spatial_mix_r)
        k = self.key_norm(torch.square(torch.relu(self.key(xk))))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class BiRWKV6ChannelMix(RWKV6ChannelMix):
    """RWKV-6's channel mix (blocks.rwkv6, official names time_maa_k/r) over a two-sided token shift: RWKV-CLIP's
    text-tower FFN. With x' = token_shift(x, resolution) and hidden mlp_ratio * C:
        x_* = x + (x' - x) * time_maa_*;   out = sigmoid(W_r x_r) * W_v(relu(W_k x_k)^2).
    RWKV-CLIP's init: time_maa_k = time_maa_r = 1 - (c/C)^(1 - l/L); W_k orthogonal, gain 0.5 sqrt(hidden/C);
    W_r, W_v zero."""

    def __init__(self, dim: int, layer_id: int, depth: int, mlp_ratio: float, token_shift: Callable):
        super().__init__(dim, int(dim * mlp_ratio), layer_id, depth)
        self.time_maa_k = nn.Parameter(1 - channel_mix_init(dim, layer_id, depth))
        self.time_maa_r = nn.Parameter(1 - channel_mix_init(dim, layer_id, depth))
        self.shift = token_shift

    def reset_parameters(self) -> None:
        orthogonal_init_(self.key.weight, gain=0.5)
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: Tensor, resolution: tuple[int, int] | None) -> Tensor:
        return self.mix(x, self.shift(x, resolution))


class VRWKVBlock(nn.Module):
    """Pre-norm: x = x + drop(gamma * mix(LN(x))); post-norm: x = x + drop(gamma * LN(mix(x))), for the spatial
    mix (ln1, gamma1) then the channel mix (ln2, gamma2); gamma (layer scale) only when `layer_scale` gives its
    init. Block 0 first applies ln0 to the patch embeddings. `token_shift`: "q" (Q-Shift on the image grid given as
    `resolution`), "bi" (the text towers' bidirectional shift; `resolution` unused) or a function (x, resolution).
    `version` 4: Vision-RWKV's spatial mix (Bi-WKV); 6: Vision-RWKV-6's (VRWKV6SpatialMix), whose named token shifts
    work inside each head of `head_size` channels in both mixes. `lm_layers` (version 6): RWKV-6's language-model
    layers made bidirectional, as in RWKV-CLIP's text tower: GroupNorm eps 64e-5 and RWKV-6's channel mix
    (BiRWKV6ChannelMix) instead of Vision-RWKV-6's eps 1e-5 and VRWKVChannelMix."""

    def __init__(self, dim: int, layer_id: int, depth: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, post_norm: bool = False, key_norm: bool = False,
                 token_shift: str | Callable = "q", version: int = 4, head_size: int = 64, lm_layers: bool = False):
        super().__init__()
        if version not in (4, 6):
            raise ValueError(f"VRWKVBlock version must be 4 or 6, got {version}")
        if version == 6 and key_norm:
            raise ValueError("key_norm is not offered with version 6 (no Vision-RWKV-6 configuration uses it)")
        if lm_layers and version != 6:
            raise ValueError(f"lm_layers (RWKV-6's language-model layers) needs version 6, got {version}")
        self.layer_id = layer_id
        self.post_norm = post_norm
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        if version == 6:
            self.att = VRWKV6SpatialMix(dim, layer_id, depth, head_size, token_shift,
                                        GROUP_NORM_EPS if lm_layers else 1e-5)
            token_shift = self.att.shift
        else:
            self.att = VRWKVSpatialMix(dim, layer_id, depth, key_norm, token_shift)
        self.ffn = BiRWKV6ChannelMix(dim, layer_id, depth, mlp_ratio, token_shift) if lm_layers else \
            VRWKVChannelMix(dim, layer_id, depth, mlp_ratio, key_norm, token_shift)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def _residual(self, mixer: nn.Module, norm: nn.Module, gamma: Tensor | None, x: Tensor,
                  resolution: tuple[int, int]) -> Tensor:
        y = norm(mixer(x, resolution)) if self.post_norm else mixer(norm(x), resolution)
        return self.drop_path(y if gamma is None else gamma * y)

    def forward(self, x: Tensor, resolution: tuple[int, int]) -> Tensor:
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + self._residual(self.att, self.ln1, getattr(self, "gamma1", None), x, resolution)
        return x + self._residual(self.ffn, self.ln2, getattr(self, "gamma2", None), x, resolution)
