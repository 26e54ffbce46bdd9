"""RWKV-6 "Finch" language models (Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
Recurrence", arXiv 2404.05892).

RWKV4LM's interface and its three modes (parallel, parallel from a state, RNN), with RWKV-6 blocks (blocks.rwkv6).
The state is one tensor [n_layer, N + 2, B, C] (N = head_size; float32, float64 for a float64 model): per layer the
time-mix's x_prev, every head's N x N WKV state packed into N rows, and the channel-mix's x_prev. It does not grow
with the sequence. Parameter names, shapes and order are those of BlinkDL's official x060 checkpoints, so official
`.pth` state dicts map one to one (`checkpoint_filter_fn`, `to_official_state_dict`); `is_state_dict` tells them
from the other versions' and `config_from_state_dict` reads the sizes off their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blocks.rwkv6 import RWKV6Block, state_rows

from ..registry import register_model
from . import rwkv4
from .rwkv4 import RWKV4Config, RWKV4LM, official_common_fields

__all__ = ["RWKV6Config", "RWKV6LM", "checkpoint_filter_fn", "config_from_state_dict", "to_official_state_dict",
           "is_state_dict"]

PAPER = "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence (Peng et al., 2024, arXiv 2404.05892)"


@dataclass
class RWKV6Config(RWKV4Config):
    vocab_size: int = 65536
    ctx_len: int = 4096
    tokenizer: str = "world"
    head_size: int = 64
    mix_lora: int = 32        # rank of the token-shift LoRA (time_maa_w1/w2); the official models: 64 at width 4096
    decay_lora: int = 64      # rank of the decay LoRA (time_decay_w1/w2); the official models: 128 at width 4096

    def __post_init__(self):
        super().__post_init__()
        for name in ("head_size", "mix_lora", "decay_lora"):
            if getattr(self, name) < 1:
                raise ValueError(f"RWKV6Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise ValueError(f"RWKV6Config: n_embd={self.n_embd} is not a multiple of head_size={self.head_size}")
        if self.ffn_size < 1:
            raise ValueError(f"RWKV6Config: n_embd={self.n_embd} gives no default FFN size; set dim_ffn")

    @property
    def ffn_size(self) -> int:
        """dim_ffn, or the official default: 3.5 n_embd rounded down to a multiple of 32."""
        return self.dim_ffn or int(3.5 * self.n_embd) // 32 * 32


class RWKV6LM(RWKV4LM):
    """RWKV4LM (embedding, blocks, final LayerNorm, untied head; the official init of both) with RWKV-6 blocks."""

    arch = "rwkv6"
    config_class = RWKV6Config

    @property
    def state_rows(self) -> int:
        return state_rows(self.config.head_size)

    def make_block(self, layer_id: int) -> nn.Module:
        c = self.config
        return RWKV6Block(c.n_embd, c.ffn_size, layer_id, c.n_layer, c.head_size, c.mix_lora, c.decay_lora)


def is_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether an official BlinkDL state dict is RWKV-6 (x060): its time-mix has the data-dependent token shift
    (`time_maa_x`, `time_maa_w1`) and decay (`time_decay_w1`). The `rwkv` package calls a file v6 when a key holds
    `time_maa`; RWKV-4 (time_mix_*), RWKV-5 (time_mix_*, ln_x, time_faaaa) and RWKV-7 (x_r, w0, a0, k_k, ...) have
    none of these."""
    return all(f"blocks.0.att.{name}" in state_dict for name in ("time_maa_x", "time_maa_w1", "time_decay_w1"))


_REQUIRED = ("blocks.0.att.key.weight", "blocks.0.att.time_maa_w2", "blocks.0.att.time_decay_w1",
             "blocks.0.att.time_faaaa")


def config_from_state_dict(state_dict: dict[str, Tensor], **overrides) -> RWKV6Config:
    """Vocab, width, depth, head size, FFN size and LoRA ranks, read off the shapes of an official RWKV-6 state dict."""
    fields = official_common_fields(state_dict, _REQUIRED, "RWKV-6", "world")
    n_embd = fields["n_embd"]
    bonus = state_dict["blocks.0.att.time_faaaa"]
    if bonus.dim() != 2 or bonus.numel() != n_embd:
        raise ValueError(f"blocks.0.att.time_faaaa has shape {tuple(bonus.shape)}, but RWKV-6's is [n_head, head_size] "
                         f"with n_head * head_size = n_embd = {n_embd}")
    if tuple(state_dict["blocks.0.att.key.weight"].shape) != (n_embd, n_embd):
        raise ValueError(f"blocks.0.att.key.weight has shape {tuple(state_dict['blocks.0.att.key.weight'].shape)}: "
                         f"only an attention width equal to n_embd = {n_embd} is supported")
    mix_w2 = state_dict["blocks.0.att.time_maa_w2"]
    if mix_w2.dim() != 3 or mix_w2.shape[0] != 5:
        raise ValueError(f"blocks.0.att.time_maa_w2 has shape {tuple(mix_w2.shape)}, but RWKV-6's is [5, rank, n_embd]")
    fields.update(head_size=bonus.shape[1], mix_lora=mix_w2.shape[1],
                  decay_lora=state_dict["blocks.0.att.time_decay_w1"].shape[1])
    return RWKV6Config(**{**fields, **overrides})


def _squeezed(shape: torch.Size) -> list[int]:
    return [d for d in shape if d != 1]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RWKV6LM) -> dict[str, Tensor]:
    """Official x060 keys are ours already. Tensors are brought to the model's dtype, and to our shape where a
    converter squeezed size-1 axes (time_maa_k [C] for [1, 1, C]); other mismatches are left to the loader's error."""
    dtype = model.emb.weight.dtype
    own = model.state_dict()
    out = {}
    for key, tensor in state_dict.items():
        if key in own and tensor.shape != own[key].shape and _squeezed(tensor.shape) == _squeezed(own[key].shape):
            tensor = tensor.reshape(own[key].shape)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def to_official_state_dict(model: RWKV6LM, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The model's weights as an official x060 state dict (the same keys, shapes and order) on the CPU, in `dtype`
    (default: the model's); `checkpoint_filter_fn` is its inverse."""
    if getattr(model, "arch", None) != "rwkv6":
        raise ValueError(f"to_official_state_dict takes an RWKV-6 model, got {type(model).__name__}")
    return rwkv4.to_official_state_dict(model, dtype)


def _register(name: str, **cfg) -> None:
    register_model(name, RWKV6LM, RWKV6Config(**cfg), family="language", paper=PAPER)


OFFICIAL_SIZES = {"0.1b": (12, 768), "1b6": (24, 2048), "3b": (32, 2560), "7b": (32, 4096), "14b": (61, 4096)}
"""(n_layer, n_embd) of BlinkDL's RWKV-6 World models: vocab 65536 (World tokenizer), head size 64, FFN
int(3.5 C) // 32 * 32, LoRA ranks 32 (token shift) and 64 (decay), 64 and 128 at width 4096."""

for _size, (_layers, _width) in OFFICIAL_SIZES.items():
    _ranks = dict(mix_lora=64, decay_lora=128) if _width == 4096 else {}
    _register(f"rwkv6-{_size}", n_layer=_layers, n_embd=_width, **_ranks)
# Byte-level model for tests and the CPU demo.
_register("rwkv6-tiny", vocab_size=256, n_layer=4, n_embd=128, head_size=32, ctx_len=256, tokenizer="byte")
