"""RWKV-5 "Eagle" language models (Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
Recurrence", arXiv 2404.05892; BlinkDL's x052 code path, as the RWKV-5 World models, and the 5.0 / 5.1 preview:
`version`, read from an official file's keys and shapes as the `rwkv` package does).

RWKV4LM with RWKV-5 blocks: the same three modes give the same logits (parallel, parallel from a state, RNN).
The state is one tensor [n_layer, head_size + 2, B, C] (float32; float64 for a float64 model): per layer att
x_prev, the [B, H, N, N] WKV state as N = head_size rows of [B, C] (blocks.rwkv5.pack_wkv_state), ffn x_prev,
the `rwkv` package's order. Parameter names are the official ones, so official `.pth` files map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from blocks.rwkv5 import VERSIONS, RWKV5Block

from ..registry import register_model
from . import rwkv4
from .rwkv4 import RWKV4Config, RWKV4LM, official_common_fields, to_official_state_dict

__all__ = ["RWKV5Config", "RWKV5LM", "checkpoint_filter_fn", "config_from_state_dict", "to_official_state_dict",
           "is_state_dict"]

PAPER = "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence (Peng et al., 2024, arXiv 2404.05892)"


@dataclass
class RWKV5Config(RWKV4Config):
    vocab_size: int = 65536
    tokenizer: str = "world"
    head_size: int = 64
    head_size_divisor: int = 8    # ln_x eps = 1e-5 * head_size_divisor^2, as the official trainer's GroupNorm
    version: str = "5.2"          # 5.2, or the preview's 5.1 (per-head decay and bonus) and 5.0 (5.1 without gate)

    def __post_init__(self):
        super().__post_init__()
        if self.version not in VERSIONS:
            raise ValueError(f"RWKV5Config: version must be one of {', '.join(VERSIONS)}, got {self.version!r}")
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise ValueError(f"RWKV5Config: n_embd={self.n_embd} must be a positive multiple of "
                             f"head_size={self.head_size}")

    @property
    def ffn_size(self) -> int:
        """dim_ffn, or the official default int(3.5 C) rounded down to a multiple of 32."""
        return self.dim_ffn or int(3.5 * self.n_embd) // 32 * 32


class RWKV5LM(RWKV4LM):
    """Embedding, n_layer RWKV-5 blocks, final LayerNorm and an untied head."""

    arch = "rwkv5"
    config_class = RWKV5Config

    @property
    def state_rows(self) -> int:
        return self.config.head_size + 2

    def make_block(self, layer_id: int) -> nn.Module:
        c = self.config
        return RWKV5Block(c.n_embd, c.ffn_size, c.head_size, layer_id, c.n_layer, c.head_size_divisor, c.version)


def is_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Does this official state dict look like RWKV-5? As the `rwkv` package decides: `ln_x` keys (RWKV-4 has
    none), an `att.time_decay` (RWKV-7 has none), no `time_maa_*` or `time_decay_w1` (RWKV-6)."""
    return ("blocks.0.att.time_decay" in state_dict and any(".att.ln_x." in k for k in state_dict)
            and not any(".time_maa" in k or ".time_decay_w1" in k for k in state_dict))


def config_from_state_dict(state_dict: dict[str, Tensor], **overrides) -> RWKV5Config:
    """Infer vocab, width, depth, head size, FFN size and version from the shapes of an (official) RWKV-5 state
    dict. The version as the `rwkv` package reads it: per-channel decays [H, N] (N > 1) are 5.2; one decay per head
    is 5.1 with a gate, 5.0 without."""
    if any(".time_maa" in k or ".time_decay_w1" in k for k in state_dict):
        raise ValueError("this state dict has time_maa_* / time_decay_w1 keys: it is RWKV-6, not RWKV-5")
    decay = state_dict.get("blocks.0.att.time_decay")
    per_head = decay is not None and decay.squeeze().dim() <= 1
    if per_head and "blocks.0.att.time_faaaa" in state_dict:
        raise ValueError("blocks.0.att.time_decay is one per head but the bonus is time_faaaa: the RWKV-5 preview "
                         "trainer's 'r2' variant, which is not supported (5.0 / 5.1 have time_first per head, 5.2 "
                         "time_decay and time_faaaa per channel)")
    version = "5.2" if not per_head else "5.1" if "blocks.0.att.gate.weight" in state_dict else "5.0"
    required = ("blocks.0.att.time_decay", "blocks.0.att.time_first" if per_head else "blocks.0.att.time_faaaa",
                "blocks.0.att.key.weight", *(("blocks.0.att.gate.weight",) if version != "5.0" else ()),
                "blocks.0.att.ln_x.weight", "head.weight")
    fields = official_common_fields(state_dict, required, f"RWKV-{version}", "world")
    n_embd = fields["n_embd"]
    if per_head:
        n_head = decay.numel()
        head_size = n_embd // n_head
    elif decay.dim() == 2:
        n_head, head_size = decay.shape
    else:
        raise ValueError(f"blocks.0.att.time_decay has shape {tuple(decay.shape)}: RWKV-5 has one decay per "
                         "channel [H, N] (5.2) or per head [H] (5.0 / 5.1)")
    if n_head * head_size != n_embd or state_dict["blocks.0.att.key.weight"].shape != (n_embd, n_embd):
        raise ValueError(f"attention width {n_head} x {head_size} (time_decay), att.key.weight "
                         f"{tuple(state_dict['blocks.0.att.key.weight'].shape)}: only dim_att = n_embd = {n_embd} "
                         "is supported")
    return RWKV5Config(**{**fields, "head_size": head_size, "version": version, **overrides})


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RWKV5LM) -> dict[str, Tensor]:
    """Official RWKV-5 keys and shapes are ours already (5.2: time_decay and time_faaaa [H, N]; 5.0 / 5.1:
    time_decay and time_first [H], also taken as [H, 1] or [H, 1, 1]; time_mix_* [1, 1, C]); only the dtype is
    brought to the model's."""
    ours = model.state_dict()
    per_head = {k: v.reshape(ours[k].shape) for k, v in state_dict.items()
                if (k.endswith(".att.time_decay") or k.endswith(".att.time_first")) and k in ours
                and v.shape != ours[k].shape and v.numel() == ours[k].numel()}
    return rwkv4.checkpoint_filter_fn(state_dict | per_head, model)


def _register(name: str, **cfg) -> None:
    register_model(name, RWKV5LM, RWKV5Config(**cfg), family="language", paper=PAPER)


OFFICIAL_SIZES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1b5": (24, 2048), "3b": (32, 2560), "7b": (32, 4096)}
"""(n_layer, n_embd) of the RWKV-5 World models: vocab 65536 (World tokenizer), head size 64, FFN 3.5 C."""

for _size, (_layers, _width) in OFFICIAL_SIZES.items():
    _register(f"rwkv5-{_size}", n_layer=_layers, n_embd=_width, ctx_len=4096)
# Byte-level model for tests and the CPU demo.
_register("rwkv5-tiny", vocab_size=256, n_layer=4, n_embd=128, head_size=32, ctx_len=256, tokenizer="byte")
