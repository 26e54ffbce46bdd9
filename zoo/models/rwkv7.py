"""RWKV-7 "Goose" language models (Peng et al., "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
arXiv 2503.14456): BlinkDL's x070 architecture, the World models' sizes.

The same three modes as RWKV-4 give the same logits (parallel, parallel from a state, RNN). The state is one
tensor [n_layer, head_size + 2, B, C] whatever the sequence length: per layer att x_prev, the WKV matrix state
(N rows of [B, C]) and ffn x_prev (blocks.rwkv7.pack_state). Parameter names and shapes are the official ones:
`checkpoint_filter_fn` only casts, `to_official_state_dict` writes the official key order back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blocks.checkpointing import run_block
from blocks.rwkv7 import RWKV7Block

from ..registry import register_model
from .rwkv4 import RWKV4Config, RWKV4LM, official_common_fields

__all__ = ["RWKV7Config", "RWKV7LM", "official_lora_ranks", "checkpoint_filter_fn", "config_from_state_dict",
           "to_official_state_dict", "is_state_dict"]

PAPER = 'RWKV-7 "Goose" with Expressive Dynamic State Evolution (Peng et al., 2025, arXiv 2503.14456)'


def official_lora_ranks(n_embd: int) -> dict[str, int]:
    """The x070 trainer's low-rank sizes for width C (RWKV-LM, Dec 2024), multiples of 32 and at least 32:
    decay and iclr round(1.8 sqrt(C) / 32) * 32, value round(1.3 sqrt(C) / 32) * 32, gate round(0.6 C^0.8 / 32) * 32.
    They are the released 0.1B, 1.5B and 2.9B models' sizes; the 0.4B model has gate 128 (the formula: 160)."""
    def rank(x: float) -> int:
        return max(32, int(round(x / 32) * 32))
    return {"decay": rank(1.8 * n_embd ** 0.5), "iclr": rank(1.8 * n_embd ** 0.5),
            "value": rank(1.3 * n_embd ** 0.5), "gate": rank(0.6 * n_embd ** 0.8)}


@dataclass
class RWKV7Config(RWKV4Config):
    vocab_size: int = 65536
    tokenizer: str = "world"
    head_size: int = 64
    decay_lora: int = 0       # low-rank sizes of w1/w2, a1/a2, v1/v2, g1/g2 (official D_DECAY_LORA, D_AAA_LORA,
    iclr_lora: int = 0        # D_MV_LORA, D_GATE_LORA); 0: the trainer's size for this width (official_lora_ranks)
    value_lora: int = 0
    gate_lora: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise ValueError(f"RWKV7Config.head_size must divide n_embd={self.n_embd}, got {self.head_size}")
        for name in ("decay_lora", "iclr_lora", "value_lora", "gate_lora"):
            if getattr(self, name) < 0:
                raise ValueError(f"RWKV7Config.{name} must be >= 0 (0: the official size), got {getattr(self, name)}")

    @property
    def lora_ranks(self) -> dict[str, int]:
        """{"decay", "iclr", "value", "gate"}: the configured sizes, official ones where 0."""
        default = official_lora_ranks(self.n_embd)
        return {name: getattr(self, f"{name}_lora") or default[name] for name in default}


class RWKV7LM(RWKV4LM):
    """Embedding, n_layer RWKV-7 blocks, final LayerNorm and an untied head (RWKV4LM's API, init of emb and head)."""

    arch = "rwkv7"
    config_class = RWKV7Config

    @property
    def state_rows(self) -> int:
        return self.config.head_size + 2

    def make_block(self, layer_id: int) -> nn.Module:
        c = self.config
        ranks = c.lora_ranks
        return RWKV7Block(c.n_embd, c.ffn_size, c.head_size, layer_id, c.n_layer, ranks["decay"], ranks["iclr"],
                          ranks["value"], ranks["gate"])

    def _stack(self, block_mode: bool | str, x: Tensor, state: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """RWKV4LM's, with v_first (layer 0's values) passed from block to block within the call; it is not part of
        the state."""
        v_first, new_state = None, []
        for i, block in enumerate(self.blocks):
            x, v_first, s = run_block(block_mode, block, x, v_first, None if state is None else state[i])
            new_state.append(s)
        return x, new_state

    def no_weight_decay(self) -> set[str]:
        """The official trainer decays only the `.weight` matrices (emb, head, the linear layers); not LoRA factors,
        mixes, norms or r_k. (It also doubles att.w0's learning rate, which is the recipe's business.)"""
        return {n for n, p in self.named_parameters() if not (n.endswith(".weight") and p.squeeze().dim() >= 2)}


_SIGNATURE = ("blocks.0.att.x_r", "blocks.0.att.w0", "blocks.0.att.a0", "blocks.0.att.k_k", "blocks.0.att.r_k")
"""Keys only RWKV-7 has (RWKV-4 has att.time_decay [C]; RWKV-5 time_decay [H, N] and time_faaaa; RWKV-6 time_maa_*)."""

_UNUSED_IN_LAYER_0 = ("blocks.0.att.v1", "blocks.0.att.v2", "blocks.0.att.v0")


def is_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether an official state dict is RWKV-7's (x070): its time-mix has x_r, w0, a0, k_k and an [H, N] r_k."""
    return all(k in state_dict for k in _SIGNATURE) and state_dict["blocks.0.att.r_k"].dim() == 2


def _shape(state_dict: dict[str, Tensor], key: str) -> tuple[int, ...]:
    return tuple(state_dict[key].shape)


def config_from_state_dict(state_dict: dict[str, Tensor], **overrides) -> RWKV7Config:
    """Infer vocab, width, depth, head size, FFN size and LoRA sizes from an official RWKV-7 state dict's shapes."""
    value_key = "blocks.1.att.v1" if "blocks.1.att.v1" in state_dict else "blocks.0.att.v1"
    fields = official_common_fields(state_dict, (*_SIGNATURE, "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1"),
                                    "RWKV-7", "neox")
    if any(".s_emb" in k for k in state_dict):
        raise ValueError("this RWKV-7 state dict has DeepEmbed tensors (ffn.s_emb): that variant is not supported")
    n_embd = fields["n_embd"]
    n_head, head_size = _shape(state_dict, "blocks.0.att.r_k")
    if n_head * head_size != n_embd:
        raise ValueError(f"blocks.0.att.r_k is [{n_head}, {head_size}] but emb.weight has width {n_embd}: "
                         f"n_head * head_size must equal it")
    ffn_in = _shape(state_dict, "blocks.0.ffn.key.weight")[1]
    if ffn_in != n_embd:
        raise ValueError(f"blocks.0.ffn.key.weight is {_shape(state_dict, 'blocks.0.ffn.key.weight')}, "
                         f"its input size is not the width {n_embd}")
    ranks = {}
    for name, key in (("decay", "blocks.0.att.w1"), ("iclr", "blocks.0.att.a1"), ("value", value_key),
                      ("gate", "blocks.0.att.g1")):
        if key not in state_dict:   # a one-layer model without layer 0's unused v1: the official size
            continue
        rows, ranks[name] = _shape(state_dict, key)
        if rows != n_embd:
            raise ValueError(f"{key} is {_shape(state_dict, key)}, expected [{n_embd}, rank]")
    fields.update(head_size=head_size, **{f"{name}_lora": rank for name, rank in ranks.items()})
    return RWKV7Config(**{**fields, **overrides})


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RWKV7LM) -> dict[str, Tensor]:
    """Official keys and shapes are ours: tensors are cast to the model's dtype. Layer 0's v0/v1/v2, unused by the
    model, are taken from the model where a file lacks them (some conversions drop them)."""
    dtype = model.emb.weight.dtype
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    own = model.state_dict()
    for key in _UNUSED_IN_LAYER_0:
        out.setdefault(key, own[key])
    return out


def _official_keys(config: RWKV7Config) -> list[str]:
    """The key order of the official trainer's state dict (its modules' registration order)."""
    att = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w1", "w2", "w0", "a1", "a2", "a0", "v1", "v2", "v0", "g1", "g2",
           "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight",
           "ln_x.bias"]
    keys = ["emb.weight"]
    for i in range(config.n_layer):
        norms = ("ln1", "ln2", "ln0") if i == 0 else ("ln1", "ln2")
        keys += [f"blocks.{i}.{ln}.{p}" for ln in norms for p in ("weight", "bias")]
        keys += [f"blocks.{i}.att.{name}" for name in att]
        keys += [f"blocks.{i}.ffn.{name}" for name in ("x_k", "key.weight", "value.weight")]
    return keys + ["ln_out.weight", "ln_out.bias", "head.weight"]


def to_official_state_dict(model: RWKV7LM, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The official `.pth` state dict of a model: official keys in the trainer's order, on the CPU, in `dtype`
    (default: the model's)."""
    own = model.state_dict()
    keys = _official_keys(model.config)
    if set(keys) != set(own):
        raise ValueError(f"model keys differ from the official ones: {sorted(set(keys) ^ set(own))}")
    return {k: own[k].detach().cpu().to(dtype or own[k].dtype).contiguous() for k in keys}


def _register(name: str, **cfg) -> None:
    register_model(name, RWKV7LM, RWKV7Config(**cfg), family="language", paper=PAPER)


OFFICIAL_SIZES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1b5": (24, 2048), "2b9": (32, 2560)}
"""The RWKV-7 World models (n_layer, n_embd): vocab 65536 (World tokenizer), head size 64, FFN 4C, ctx 4096."""

for _size, (_layers, _width) in OFFICIAL_SIZES.items():
    _register(f"rwkv7-{_size}", n_layer=_layers, n_embd=_width, ctx_len=4096,
              gate_lora=128 if _size == "0.4b" else 0)
# Byte-level model for tests and the CPU demo.
_register("rwkv7-tiny", vocab_size=256, n_layer=4, n_embd=128, ctx_len=256, tokenizer="byte")
