"""RWKV-4 language models (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", arXiv 2305.13048).

One model, three modes that give the same logits:
  - parallel ("GPT mode"): model(idx) -> logits [B, T, V];
  - parallel from a state:  model(idx, state=s, return_state=True) -> (logits, state), for chunked prefill;
  - RNN:                    model.forward_rnn(token_ids [B], state) -> (logits [B, V], state).

The state is one float32 tensor [n_layer, 5, B, C]; rows per layer are att x_prev, aa, bb, pp and
ffn x_prev (the `rwkv` package's order). Parameter names are those of BlinkDL's official
checkpoints, so official `.pth` state dicts map one to one (`checkpoint_filter_fn`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blocks import STATE_ROWS, RWKV4Block
from blocks.checkpointing import GradCheckpointing, run_block, run_stack

from ..registry import register_model
from ._validate import check_tokens

__all__ = ["RWKV4Config", "RWKV4LM", "checkpoint_filter_fn", "config_from_state_dict", "is_state_dict",
           "to_official_state_dict", "official_common_fields"]

PAPER = "RWKV: Reinventing RNNs for the Transformer Era (Peng et al., 2023, arXiv 2305.13048)"


@dataclass
class RWKV4Config:
    vocab_size: int = 50277
    n_layer: int = 12
    n_embd: int = 768
    dim_ffn: int = 0          # 0: the default hidden size, ffn_size
    ctx_len: int = 1024       # training context; the model itself has no length limit
    tokenizer: str = "neox"

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "ctx_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"RWKV4Config.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def ffn_size(self) -> int:
        return self.dim_ffn or 4 * self.n_embd


class RWKV4LM(GradCheckpointing, nn.Module):
    """Embedding, n_layer RWKV-4 blocks, final LayerNorm and an untied head."""

    arch = "rwkv4"
    config_class = RWKV4Config
    state_rows = STATE_ROWS

    def __init__(self, config: RWKV4Config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.reset_parameters()

    def make_block(self, layer_id: int) -> nn.Module:
        return RWKV4Block(self.config.n_embd, self.config.ffn_size, layer_id, self.config.n_layer)

    def reset_parameters(self) -> None:
        """Official v4neo init of the embedding and head; blocks initialise themselves."""
        if self.emb.weight.is_meta:
            return
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        V, C = self.config.vocab_size, self.config.n_embd
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)

    def init_state(self, batch_size: int, device=None) -> Tensor:
        """Empty RNN state [n_layer, state_rows, B, C] (float32; float64 for a float64 model)."""
        device = self.emb.weight.device if device is None else device
        dtype = torch.float64 if self.emb.weight.dtype == torch.float64 else torch.float32
        one = self.blocks[0].init_state(batch_size, self.config.n_embd, device, dtype)
        return one.expand(self.config.n_layer, *one.shape).clone()

    def check_state(self, state: Tensor, batch_size: int) -> None:
        """Raise a clear error unless `state` fits this model and batch size."""
        expected = (self.config.n_layer, self.state_rows, batch_size, self.config.n_embd)
        if not isinstance(state, Tensor):
            raise TypeError(f"state must be a tensor from init_state() or return_state=True, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise ValueError(f"state has shape {tuple(state.shape)} but this model and batch need {expected} "
                             f"(n_layer, {self.state_rows}, batch, n_embd): is it from another model or batch size?")
        if not state.is_floating_point():
            raise TypeError(f"state must be floating point, got {state.dtype}")
        if state.device != self.emb.weight.device:
            raise ValueError(f"state is on {state.device} but the model is on {self.emb.weight.device}")

    def forward(self, idx: Tensor, state: Tensor | None = None, return_state: bool = False, logits_to_keep: int = 0):
        """idx: [B, T] token ids. Returns logits [B, T, V] (of the last `logits_to_keep` positions only when > 0, as
        a prefill needs), and the new state if return_state."""
        check_tokens(idx, self.config.vocab_size, self.emb.weight.device)
        if state is not None:
            self.check_state(state, idx.shape[0])
        x, new_state = run_stack(self.grad_checkpointing, self._stack, self.emb(idx), state)
        logits = self.head(self.ln_out(x[:, -logits_to_keep:] if logits_to_keep else x))
        return (logits, torch.stack(new_state)) if return_state else logits

    def _stack(self, block_mode: bool | str, x: Tensor, state: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """x through every block (run_block(block_mode, ...)), each from its layer of `state` (None: empty); returns
        x and the blocks' states."""
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = run_block(block_mode, block, x, None if state is None else state[i])
            new_state.append(s)
        return x, new_state

    def forward_rnn(self, token_ids: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step of RNN mode. token_ids: [B]. Returns (logits [B, V], new state)."""
        if not isinstance(token_ids, Tensor) or token_ids.dim() != 1:
            shape = tuple(token_ids.shape) if isinstance(token_ids, Tensor) else type(token_ids).__name__
            raise ValueError(f"forward_rnn takes token ids of shape [B], got {shape}")
        logits, state = self(token_ids[:, None], state=state, return_state=True)
        return logits[:, 0], state

    def no_weight_decay(self) -> set[str]:
        """Parameters the official trainer keeps out of weight decay: everything that is not a matrix."""
        return {n for n, p in self.named_parameters() if p.dim() < 2 or "time_" in n}


_TOKENIZER_BY_VOCAB = {256: "byte", 65536: "world"}  # official RWKV-4 Pile models: 50277 (neox)


def official_common_fields(state_dict: dict[str, Tensor], required: tuple[str, ...], version: str,
                           default_tokenizer: str) -> dict:
    """What every official RWKV state dict (versions 4 to 7) gives the same way, after checking that the `required`
    keys are there (a KeyError names the missing ones): vocab_size and n_embd from emb.weight, n_layer from the block
    indices, dim_ffn from ffn.key.weight, and the tokenizer from the vocabulary size (else `default_tokenizer`)."""
    missing = [k for k in ("emb.weight", "blocks.0.ffn.key.weight", *required) if k not in state_dict]
    if missing:
        raise KeyError(f"not an {version} state dict: missing {missing}")
    vocab_size, n_embd = state_dict["emb.weight"].shape
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    return dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=max(layers) + 1,
                dim_ffn=state_dict["blocks.0.ffn.key.weight"].shape[0],
                tokenizer=_TOKENIZER_BY_VOCAB.get(vocab_size, default_tokenizer))


def config_from_state_dict(state_dict: dict[str, Tensor], **overrides) -> RWKV4Config:
    """Infer vocab, width, depth and FFN size from the shapes of an (official) RWKV-4 state dict."""
    fields = official_common_fields(state_dict, ("blocks.0.att.time_decay",), "RWKV-4", "neox")
    if state_dict["blocks.0.att.time_decay"].dim() != 1:
        raise ValueError("blocks.0.att.time_decay is not 1-D: this is not an RWKV-4 checkpoint "
                         "(RWKV-5/6/7 have per-head decays)")
    return RWKV4Config(**{**fields, **overrides})


def is_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether an official BlinkDL state dict is RWKV-4's: a 1-D att.time_decay and no ln_x (RWKV-5 has ln_x)."""
    decay = state_dict.get("blocks.0.att.time_decay")
    return decay is not None and decay.dim() == 1 and "blocks.0.att.ln_x.weight" not in state_dict


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RWKV4LM) -> dict[str, Tensor]:
    """Official BlinkDL keys and shapes are ours already; only the dtype is brought to the model's."""
    dtype = model.emb.weight.dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def to_official_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The official `.pth` state dict of a model whose keys, shapes and order are the official ones (RWKV-4, -5,
    -6): its own state dict on the CPU, in `dtype` (default: the model's)."""
    return {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}


def _register(name: str, **cfg) -> None:
    register_model(name, RWKV4LM, RWKV4Config(**cfg), family="language", paper=PAPER)


PAPER_SIZES = {"169m": (12, 768), "430m": (24, 1024), "1b5": (24, 2048), "3b": (32, 2560), "7b": (32, 4096),
               "14b": (40, 5120)}
"""Table 2 of the paper: (n_layer, n_embd) per size; vocab 50277, the GPT-NeoX 20B tokenizer of the Pile models."""

for _size, (_layers, _width) in PAPER_SIZES.items():
    _register(f"rwkv4-{_size}", n_layer=_layers, n_embd=_width)
# Byte-level model for tests and the CPU demo.
_register("rwkv4-tiny", vocab_size=256, n_layer=4, n_embd=128, ctx_len=256, tokenizer="byte")
