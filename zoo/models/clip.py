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

Baselines: `openclip-ViT-B-32` etc. are open_clip's own models (`open_clip.create_model`, random weights) behind
the same interface, so recipes and evaluations compare RWKV-CLIP with a ViT CLIP on equal terms.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blocks.vision import VRWKVBlock, bi_token_shift

from ..registry import register_model
from .vrwkv import VisionRWKV

__all__ = ["RWKVCLIPConfig", "RWKVCLIP", "TextRWKV", "ImageTextModel", "OpenCLIPConfig", "OpenCLIPBaseline",
           "CONFIG_DIR"]

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
        self.grad_checkpointing = False

    def forward(self, text: Tensor) -> Tensor:
        if text.dim() != 2 or text.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must be token ids [B, context], got {tuple(text.shape)} {text.dtype}")
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than the context of {self.context_length} "
                             "(the tokenizer truncates to it)")
        x = self.token_embedding(text)
        for block in self.blocks:
            x = checkpoint(block, x, None, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x, None)
        x = self.ln_final(x)
        keep = (text != 0).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


class ImageTextModel(nn.Module):
    """open_clip's CLIP interface on top of `encode_image`, `encode_text` and `logit_scale` (a log):
    forward(image, text) returns {"image_features", "text_features", "logit_scale"}, features normalised and the
    scale exp'd and clamped at 100 (open_clip's trainer clamps the parameter to log 100 instead)."""

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> dict:
        if image is not None and text is not None and image.shape[0] != text.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {text.shape[0]} texts: a contrastive batch pairs them")
        return {"image_features": self.encode_image(image, normalize=True) if image is not None else None,
                "text_features": self.encode_text(text, normalize=True) if text is not None else None,
                "logit_scale": self.logit_scale.exp().clamp(max=100)}


class RWKVCLIP(ImageTextModel):
    """RWKV image and text towers with linear projections into a shared embedding and a learnable logit scale."""

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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", *(f"visual.{n}" for n in self.visual.no_weight_decay())}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@dataclass
class OpenCLIPConfig:
    model_name: str = "ViT-B-32"         # the model's name in open_clip
    image_size: int = 224
    tokenizer: str = "clip"


class OpenCLIPBaseline(ImageTextModel):
    """An open_clip model (`open_clip.create_model(model_name)`, random weights) as `self.model`, with this
    zoo's checkpoints and the RWKV-CLIP interface; its state dict is open_clip's under the prefix `model.`."""

    arch = "open_clip"
    config_class = OpenCLIPConfig

    def __init__(self, config: OpenCLIPConfig | None = None, **overrides):
        import open_clip

        super().__init__()
        self.config = replace(config or OpenCLIPConfig(), **overrides)
        random_init_notice = _DropMessage("No pretrained weights loaded")   # random weights are the point here
        logging.getLogger().addFilter(random_init_notice)
        try:
            self.model = open_clip.create_model(self.config.model_name, force_image_size=self.config.image_size,
                                                device=torch.get_default_device())
        finally:
            logging.getLogger().removeFilter(random_init_notice)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_text(text, normalize=normalize)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.dim() < 2}


OPEN_CLIP_BASELINES = ("ViT-S-32", "ViT-B-32", "ViT-B-16")
OPEN_CLIP_PAPER = "Learning Transferable Visual Models From Natural Language Supervision (arXiv 2103.00020), open_clip"


def _register() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        fields = json.loads(path.read_text())
        register_model(path.stem, RWKVCLIP, RWKVCLIPConfig(**fields), family="clip", paper=PAPER)
    for name in OPEN_CLIP_BASELINES:
        register_model(f"openclip-{name}", OpenCLIPBaseline, OpenCLIPConfig(name), family="clip",
                       paper=OPEN_CLIP_PAPER)


_register()
