"""Pre-LN GPT baselines (GPT-2 layout, torch SDPA attention), one per RWKV-4 size, same V, L and D.

Used for side-by-side comparisons: per layer 12 D^2 + 13 D parameters against RWKV-4's 13 D^2 + 11 D,
plus a learned position embedding of ctx_len x D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blocks import GPTBlock

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


class GPTLM(nn.Module):
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
        self.grad_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """idx: [B, T] with T <= ctx_len. Returns logits [B, T, V]."""
        check_tokens(idx, self.config.vocab_size, self.wte.weight.device)
        T = idx.shape[1]
        if T > self.config.ctx_len:
            raise ValueError(f"sequence length {T} exceeds this GPT's ctx_len={self.config.ctx_len}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        return self.head(self.ln_f(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's API)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.dim() < 2}


def _register(name: str, **cfg) -> None:
    register_model(name, GPTLM, GPTConfig(**cfg), family="language", paper=PAPER)


for _size, (_layers, _width) in PAPER_SIZES.items():
    _register(f"gpt-{_size}", n_layer=_layers, n_embd=_width)
_register("gpt-tiny", vocab_size=256, n_layer=4, n_embd=128, n_head=4, ctx_len=256, tokenizer="byte")
