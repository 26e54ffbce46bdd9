"""RRWKV layers: RWKV-4 with "mediums", the means of past segments of s tokens, read by the time-mix through a
second WKV over the medium sequence and added to the channel-mix's key input. The equations, and which parts are
this zoo's interpretation of the withdrawn RRWKV paper (arXiv 2306.05176), are in docs/rrwkv.md.

With the gate g and the weight beta at their initial 0, a layer computes exactly RWKV-4's. Cost stays O(T); the RNN
state has a constant size (STATE_ROWS rows of [B, C]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rwkv4 import RWKV4ChannelMix, RWKV4TimeMix, orthogonal_init_, time_mix_init
from .wkv import EMPTY_PP, wkv4

__all__ = ["segment_means", "RRWKVTimeMix", "RRWKVChannelMix", "RRWKVBlock", "STATE_ROWS"]

STATE_ROWS = 13
"""Per-layer state rows: att x_prev, aa, bb, pp, medium aa, bb, pp, medium read R, segment sum of the time-mix input,
ffn x_prev, segment sum of the channel-mix input, its last medium, and the position in the current segment."""


def segment_means(x: Tensor, carried_sum: Tensor, phase: int, segment_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Segments of a sequence that starts `phase` tokens into a segment whose earlier tokens sum to `carried_sum`.

    Returns (means of the segments completed in this call [B, n, C], the sum of the segment left in progress [B, C],
    each token's segment index [T], 0 being the segment in progress at the start). Each segment is summed on its
    own (no running cumulative sum, whose rounding would grow with T)."""
    B, T, C = x.shape
    total = phase + T
    segments = math.ceil(total / segment_len)
    padded = F.pad(x, (0, 0, phase, segments * segment_len - total)).view(B, segments, segment_len, C).sum(2)
    sums = torch.cat([padded[:, :1] + carried_sum[:, None].to(x.dtype), padded[:, 1:]], dim=1)
    done = total // segment_len
    partial = sums[:, done] if done < segments else torch.zeros_like(carried_sum, dtype=x.dtype)
    index = torch.div(torch.arange(phase, total, device=x.device), segment_len, rounding_mode="floor")
    return sums[:, :done] / segment_len, partial, index


def _per_token(first: Tensor, completed: Tensor, index: Tensor) -> Tensor:
    """[B, T, C]: `first` [B, C] for the tokens of the segment in progress at the start, completed[:, q - 1] for
    those of segment q."""
    return torch.cat([first[:, None].to(completed.dtype), completed], dim=1)[:, index]


class RRWKVTimeMix(RWKV4TimeMix):
    """out = W_o(sigmoid(r) * (wkv + g * R)); R: the medium WKV's read after the last completed segment."""

    def __init__(self, n_embd: int, layer_id: int, n_layer: int, segment_len: int):
        super().__init__(n_embd, layer_id, n_layer)
        self.segment_len = segment_len
        self.medium_decay = nn.Parameter(time_mix_init(n_embd, layer_id, n_layer)["decay"])
        self.medium_gate = nn.Parameter(torch.zeros(n_embd))
        self.medium_key = nn.Linear(n_embd, n_embd, bias=False)
        self.medium_value = nn.Linear(n_embd, n_embd, bias=False)
        nn.init.zeros_(self.medium_key.weight)         # equal weights for mediums at equal distance, as RWKV-4's key
        orthogonal_init_(self.medium_value.weight)     # nonzero, so the gate gets a gradient from the start

    def forward(self, x: Tensor, state: Tensor, phase: int) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: rows 0-8 of the layer state. Returns (out, new rows 0-8)."""
        r, wkv, token_state = self.gated_wkv(x, state[:4])
        means, partial, index = segment_means(x, state[8], phase, self.segment_len)
        medium_state, read = state[4:7], state[7]
        if means.shape[1]:
            w = -torch.exp(self.medium_decay.float())
            reads, medium_state = wkv4(w, -w, self.medium_key(means), self.medium_value(means), tuple(medium_state))
            medium_state, read, completed = torch.stack(medium_state), reads[:, -1], reads
        else:
            completed = wkv.new_zeros(x.shape[0], 0, x.shape[2])
        out = self.output(r * (wkv + self.medium_gate * _per_token(state[7], completed, index)))
        new_state = torch.cat([token_state, medium_state.to(token_state.dtype),
                               torch.stack([read, partial]).to(token_state.dtype)])
        return out, new_state


class RRWKVChannelMix(RWKV4ChannelMix):
    """RWKV-4's channel mix with beta * n added to the key input; n: the mean of the channel-mix input over the last
    completed segment."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int, segment_len: int):
        super().__init__(n_embd, dim_ffn, layer_id, n_layer)
        self.segment_len = segment_len
        self.medium_mix = nn.Parameter(torch.zeros(n_embd))

    def forward(self, y: Tensor, state: Tensor, phase: int) -> tuple[Tensor, Tensor]:
        """y: [B, T, C]; state: rows (y_prev, segment sum, last medium) [3, B, C]. Returns (out, new rows)."""
        means, partial, index = segment_means(y, state[1], phase, self.segment_len)
        last = means[:, -1] if means.shape[1] else state[2]
        out, y_last = super().forward(y, state[0], self.medium_mix * _per_token(state[2], means, index))
        return out, torch.stack([y_last, partial, last]).to(state.dtype)


class RRWKVBlock(nn.Module):
    """x = x + att(ln1(x)); x = x + ffn(ln2(x)) with the retrospective time- and channel-mix; ln0 before block 0."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: int, segment_len: int):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.layer_id, self.segment_len = layer_id, segment_len
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.att = RRWKVTimeMix(n_embd, layer_id, n_layer, segment_len)
        self.ffn = RRWKVChannelMix(n_embd, dim_ffn, layer_id, n_layer, segment_len)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C]; state: [STATE_ROWS, B, C] or None (a fresh sequence). Returns (x, new state)."""
        if state is None:
            state = self.init_state(x.shape[0], x.shape[2], x.device, torch.promote_types(x.dtype, torch.float32))
        phase = int(state[12, 0, 0])
        if self.layer_id == 0:
            x = self.ln0(x)
        att, att_state = self.att(self.ln1(x), state[:9], phase)
        x = x + att
        ffn, ffn_state = self.ffn(self.ln2(x), state[9:12], phase)
        x = x + ffn
        position = torch.full_like(state[12:], (phase + x.shape[1]) % self.segment_len)
        return x, torch.cat([att_state, ffn_state.to(att_state.dtype), position.to(att_state.dtype)])

    @staticmethod
    def init_state(batch_size: int, n_embd: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty state [STATE_ROWS, B, C]: zeros, with both exponent rows (pp) at -1e38."""
        state = torch.zeros(STATE_ROWS, batch_size, n_embd, device=device, dtype=dtype)
        state[3] = state[6] = EMPTY_PP
        return state
