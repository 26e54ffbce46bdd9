"""RRWKV language models: RWKV-4 with retrospective "mediums" (blocks.rrwkv; equations and which parts are this
zoo's interpretation of the withdrawn RRWKV paper, arXiv 2306.05176, in docs/rrwkv.md).

The same three modes as RWKV-4 (parallel, parallel from a state, RNN) give the same logits; the state is
[n_layer, 13, B, C] whatever the sequence length. The registered sizes keep RWKV-4's parameter count: the two
C x C medium projections per layer are paid for with a channel-mix hidden size of 3C instead of 4C.
An experiment, not a recommendation: on MQAR it recalled no better than RWKV-4 of the same size (docs/rrwkv.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from blocks import RRWKVBlock
from blocks.rrwkv import STATE_ROWS

from ..registry import register_model
from .rwkv4 import PAPER_SIZES, RWKV4Config, RWKV4LM

__all__ = ["RRWKVConfig", "RRWKVLM"]

PAPER = "RRWKV: Capturing Long-range Dependencies in RWKV (arXiv 2306.05176, withdrawn; equations: docs/rrwkv.md)"


@dataclass
class RRWKVConfig(RWKV4Config):
    segment_len: int = 16     # tokens per medium

    def __post_init__(self):
        super().__post_init__()
        if self.segment_len < 1:
            raise ValueError(f"RRWKVConfig.segment_len must be >= 1, got {self.segment_len}")

    @property
    def ffn_size(self) -> int:
        return self.dim_ffn or 3 * self.n_embd    # dim_ffn 0: 3C, paying for the two C x C medium projections


class RRWKVLM(RWKV4LM):
    """RWKV4LM with RRWKV blocks."""

    arch = "rrwkv"
    config_class = RRWKVConfig
    state_rows = STATE_ROWS
    static_step = False
    """Its steps read the position within a segment from the state on the host (it decides whether a segment ends),
    so zoo.decode runs them eagerly: no CUDA graph, no torch.compile."""

    def make_block(self, layer_id: int) -> nn.Module:
        c = self.config
        return RRWKVBlock(c.n_embd, c.ffn_size, layer_id, c.n_layer, c.segment_len)


def _register(name: str, **cfg) -> None:
    register_model(name, RRWKVLM, RRWKVConfig(**cfg), family="language", paper=PAPER)


for _size in ("169m", "430m"):
    _layers, _width = PAPER_SIZES[_size]
    _register(f"rrwkv-{_size}", n_layer=_layers, n_embd=_width)
_register("rrwkv-tiny", vocab_size=256, n_layer=4, n_embd=128, ctx_len=256, tokenizer="byte")
