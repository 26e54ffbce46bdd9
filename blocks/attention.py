"""Pre-LN transformer block (GPT-2 layout) on torch's scaled_dot_product_attention: the baseline.

Decoding reuses keys and values through a KVCache: buffers of a fixed capacity and the next position kept
on the device, so one decoding step has static shapes and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalSelfAttention", "GPTBlock", "KVCache"]


class KVCache:
    """Keys and values of every layer, [n_layer, B, H, capacity, head] each, and the next position.

    `length` is a device tensor (so a captured step advances it on replay); `filled` counts the same on the host
    for the caller's bounds checks and is advanced by whoever runs a step (GPTLM.forward, or a graph's owner).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_size: int, capacity: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, capacity, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.filled = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length.zero_()
        self.filled = 0


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V over n_head heads, through F.scaled_dot_product_attention."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, positions: Tensor | None = None):
        """x: [B, T, C]. With a cache, the new keys and values go to `positions` [T] of layer `layer`: an empty cache
        takes a causal (flash) attention over x itself; later calls attend over the whole capacity, masked to the
        positions filled so far (a static shape, whatever the fill)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None or cache.filled == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if cache is not None:
            keys, values = cache.k[layer], cache.v[layer]
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
            if cache.filled:
                visible = torch.arange(cache.capacity, device=x.device) <= positions[:, None]  # [T, capacity]
                y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    """x = x + attn(ln1(x)); x = x + mlp(ln2(x)), MLP hidden 4C with GELU."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, positions: Tensor | None = None):
        x = x + self.attn(self.ln1(x), cache, layer, positions)
        return x + self.mlp(self.ln2(x))
