"""Pre-LN GPT baselines (GPT-2 layout, torch SDPA attention), one per RWKV-4 size, same V, L and D.

Used for side-by-side comparisons: per layer 12 D^2 + 13 D parameters against RWKV-4's 13 D^2 + 11 D,
plus a learned position embedding of ctx_len x D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blocks import GPTBlock, KVCache
from blocks.checkpointing import GradCheckpointing, run_block, run_stack

from ..registry import register_model
from ._validate import check_tokens
from .rwkv4 import PAPER_SIZES

__all__ = ["GPTConfig", "GPTLM"]

PAPER = "Language Models are Unsupervised Multitask Learners (Radford et al., 2019), pre-LN baseline"


@dataclass
class GPTConfig:
    vocab_size: int = 50277
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 0           # 0: n_embd // 64
    ctx_len: int = 1024       # the position embedding's length: the longest input
    tokenizer: str = "neox"

    @property
    def heads(self) -> int:
        return self.n_head or max(1, self.n_embd // 64)


class GPTLM(GradCheckpointing, nn.Module):
    arch = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.ctx_len, config.n_embd)
        self.blocks = nn.ModuleList(GPTBlock(config.n_embd, config.heads) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor, cache: KVCache | None = None, logits_to_keep: int = 0) -> Tensor:
        """idx: [B, T] with T <= ctx_len. Returns logits [B, T, V] (of the last `logits_to_keep` positions only when
        > 0). With a cache (new_cache), the tokens continue the cached ones: their keys and values are added to it,
        and positions count on from cache.filled."""
        check_tokens(idx, self.config.vocab_size, self.wte.weight.device)
        T = idx.shape[1]
        start = 0 if cache is None else cache.filled
        if start + T > self.config.ctx_len:
            raise ValueError(f"sequence length {start + T} exceeds this GPT's ctx_len={self.config.ctx_len}")
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; {start} filled, {T} more given")
        positions = torch.arange(T, device=idx.device) + (0 if cache is None else cache.length)
        x = self.wte(idx) + self.wpe(positions)
        x = run_stack(self.grad_checkpointing, self._stack, x, cache, positions)
        if cache is not None:
            cache.length += T
            cache.filled += T
        return self.head(self.ln_f(x[:, -logits_to_keep:] if logits_to_keep else x))

    def _stack(self, block_mode: bool | str, x: Tensor, cache: KVCache | None, positions: Tensor) -> Tensor:
        """x through every block (run_block(block_mode, ...))."""
        for i, block in enumerate(self.blocks):
            x = run_block(block_mode, block, x, cache, i, positions)
        return x

    def new_cache(self, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `capacity` positions (default ctx_len), in the weights' dtype unless given."""
        c = self.config
        capacity = c.ctx_len if capacity is None else capacity
        if not 1 <= capacity <= c.ctx_len:
            raise ValueError(f"a KV cache holds 1 to ctx_len={c.ctx_len} positions, got {capacity}")
        return KVCache(c.n_layer, batch_size, c.heads, c.n_embd // c.heads, capacity, self.wte.weight.device,
                       dtype or self.wte.weight.dtype)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.dim() < 2}


def _register(name: str, **cfg) -> None:
    register_model(name, GPTLM, GPTConfig(**cfg), family="language", paper=PAPER)


for _size, (_layers, _width) in PAPER_SIZES.items():
    _register(f"gpt-{_size}", n_layer=_layers, n_embd=_width)
_register("gpt-tiny", vocab_size=256, n_layer=4, n_embd=128, n_head=4, ctx_len=256, tokenizer="byte")
