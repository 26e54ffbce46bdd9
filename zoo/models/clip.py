"""RWKV-CLIP (arXiv 2406.06973, "RWKV-CLIP: A Robust Vision-Language Representation Learner") with open_clip's
model interface: an RWKV image tower and a bidirectional RWKV text tower, each with a linear projection into a
shared embedding, and a learnable logit scale.

Image tower: a Vision-RWKV backbone (`zoo.models.vrwkv`, no classifier head), average-pooled. Text tower: token
embedding, bidirectional RWKV blocks (Bi-WKV time-mix and channel mix over the 1-D bidirectional token shift:
half of each head's channels see t-1, half t+1), final LayerNorm, mean over the text's tokens (padding
excluded). Sizes are those of the published configs (width 640; image: depth 12, FFN 5C; text: 6 layers, FFN
2240, heads of 64; CLIP BPE, context 77). `block` names the towers' block family: the published model uses
RWKV-6 blocks, which this zoo does not have yet (issue 9), so its checkpoints do not load here; the key mapping
belongs with that block, not a stand-in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.vision import VRWKVBlock, bi_token_shift

from ..registry import register_model
from .vrwkv import VisionRWKV

__all__ = ["RWKVCLIPConfig", "RWKVCLIP", "TextRWKV", "CONFIG_DIR"]

PAPER = "RWKV-CLIP: A Robust Vision-Language Representation Learner (arXiv 2406.06973)"
CONFIG_DIR = Path(__file__).with_name("clip_configs")
BLOCKS = ("rwkv4-bi",)


@dataclass
class RWKVCLIPConfig:
    embed_dim: int = 640                 # the shared embedding both towers project into
    block: str = "rwkv4-bi"              # the towers' block family
    image_size: int = 224
    patch_size: int = 32
    image_width: int = 640
    image_layers: int = 12
    image_mlp_ratio: float = 5.0
    drop_path_rate: float = 0.3
    text_width: int = 640
    text_layers: int = 6
    text_mlp_ratio: float = 3.5          # 2240 / 640
    head_size: int = 64                  # the text shift's heads
    vocab_size: int = 49408
    context_length: int = 77
    tokenizer: str = "clip"
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)} (RWKV-6 towers come with issue 9), "
                             f"got {self.block!r}")


class TextRWKV(nn.Module):
    """Token ids [B, context] -> mean of the final LayerNorm's outputs over the non-padding tokens (id 0 pads).
    The blocks see the whole padded context, as a fixed-length CLIP text tower does; only the mean skips pads."""

    def __init__(self, config: RWKVCLIPConfig):
        super().__init__()
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        shift = partial(bi_token_shift, head_size=config.head_size)
        self.blocks = nn.ModuleList(
            VRWKVBlock(config.text_width, i, config.text_layers, config.text_mlp_ratio, token_shift=shift)
            for i in range(config.text_layers))
        self.ln_final = nn.LayerNorm(config.text_width)

    def forward(self, text: Tensor) -> Tensor:
        if text.dim() != 2 or text.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must be token ids [B, context], got {tuple(text.shape)} {text.dtype}")
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than the context of {self.context_length} "
                             "(the tokenizer truncates to it)")
        x = self.token_embedding(text)
        for block in self.blocks:
            x = block(x, None)
        x = self.ln_final(x)
        keep = (text != 0).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


class RWKVCLIP(nn.Module):
    """open_clip's CLIP interface: encode_image, encode_text, logit_scale (stored as a log) and forward(image, text)
    returning {"image_features", "text_features", "logit_scale"} (features normalised, scale exp'd, at most 100)."""

    arch = "rwkv-clip"
    config_class = RWKVCLIPConfig

    def __init__(self, config: RWKVCLIPConfig | None = None, **overrides):
        super().__init__()
        config = replace(config or RWKVCLIPConfig(), **overrides)
        self.config = config
        self.visual = VisionRWKV(img_size=config.image_size, patch_size=config.patch_size, num_classes=0,
                                 embed_dim=config.image_width, depth=config.image_layers,
                                 mlp_ratio=config.image_mlp_ratio, drop_path_rate=config.drop_path_rate)
        self.visual_projection = nn.Linear(config.image_width, config.embed_dim, bias=False)
        self.text = TextRWKV(config)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        for projection in (self.visual_projection, self.text_projection):
            if not projection.weight.is_meta:
                nn.init.normal_(projection.weight, std=projection.in_features ** -0.5)
        if not self.text.token_embedding.weight.is_meta:
            nn.init.normal_(self.text.token_embedding.weight, std=0.02)

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        features = self.visual_projection(self.visual(image))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        features = self.text_projection(self.text(text))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> dict:
        if image is not None and text is not None and image.shape[0] != text.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {text.shape[0]} texts: a contrastive batch pairs them")
        return {"image_features": self.encode_image(image, normalize=True) if image is not None else None,
                "text_features": self.encode_text(text, normalize=True) if text is not None else None,
                "logit_scale": self.logit_scale.exp().clamp(max=100)}

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", *(f"visual.{n}" for n in self.visual.no_weight_decay())}


def _register() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        fields = json.loads(path.read_text())
        register_model(path.stem, RWKVCLIP, RWKVCLIPConfig(**fields), family="clip", paper=PAPER)


_register()
