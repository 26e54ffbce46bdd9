"""RWKV-CLIP (arXiv 2406.06973, "RWKV-CLIP: A Robust Vision-Language Representation Learner") with open_clip's
model interface: an RWKV image tower and a bidirectional RWKV text tower, each with a linear projection into a
shared embedding, and a learnable logit scale.

Image tower: a Vision-RWKV backbone (`zoo.models.vrwkv`, no classifier head), average-pooled. Text tower: token
embedding, bidirectional RWKV blocks (time mix and channel mix over the 1-D bidirectional token shift: half of
each head's channels see t-1, half t+1), final LayerNorm, pooled. Sizes are those of the published configs (width
640; image: depth 12, FFN 5C; text: 6 layers, FFN 2240, heads of 64; CLIP BPE, context 77). `block` names the
towers' block family:

- "rwkv4-bi" (`RWKV-CLIP-B-32`, `-B-16`, `-tiny`): Vision-RWKV's Bi-WKV blocks in both towers, linear projections
  into `embed_dim`, text mean over the non-padding tokens. This zoo's own variant; no official weights.
- "rwkv6-bi" (`RWKV-CLIP-6-B-32`, `-B-16`: the published model, deepglint/RWKV-CLIP): a Vision-RWKV-6 image tower
  (heads of `image_head_size` = 80) and RWKV-6 language-model layers made bidirectional for the text (bidirectional
  WKV-6, GroupNorm eps 64e-5, RWKV-6's channel mix; no position embedding), no projections (the towers' 640-d
  outputs are the embeddings), and the text pooled as the mean of the L2-normalised outputs at all `context_length`
  positions, padding included:  text = (1/T) sum_t LN(x_t) / |LN(x_t)|.
  `checkpoint_filter_fn` maps the official checkpoints' keys.

Baselines: `openclip-ViT-B-32` etc. are open_clip's own models (`open_clip.create_model`, random weights) behind
the same interface, so recipes and evaluations compare RWKV-CLIP with a ViT CLIP on equal terms.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.checkpointing import GradCheckpointing, check_grad_checkpointing, run_blocks
from blocks.vision import VRWKVBlock, bi_token_shift

from ..registry import register_model
from . import vrwkv
from .vrwkv import VisionRWKV

__all__ = ["RWKVCLIPConfig", "RWKVCLIP", "TextRWKV", "ImageTextModel", "OpenCLIPConfig", "OpenCLIPBaseline",
           "checkpoint_filter_fn", "CONFIG_DIR"]

PAPER = "RWKV-CLIP: A Robust Vision-Language Representation Learner (arXiv 2406.06973)"
CONFIG_DIR = Path(__file__).with_name("clip_configs")
BLOCKS = {"rwkv4-bi": 4, "rwkv6-bi": 6}
"""block family -> the Vision-RWKV version of its blocks (VRWKVBlock's `version`)."""
TEXT_POOLS = ("mean", "normalized-mean")


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
    head_size: int = 64                  # the text tower's heads (its shift, and the WKV-6 heads of rwkv6-bi)
    image_head_size: int = 64            # rwkv6-bi: the image tower's WKV-6 and Q-Shift heads (published: 80)
    vocab_size: int = 49408
    context_length: int = 77
    tokenizer: str = "clip"
    projection: bool = True              # linear projections into embed_dim; False: the towers' outputs as they are
    text_pool: str = "mean"              # "mean": over the non-padding tokens; "normalized-mean": see the module doc
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {', '.join(TEXT_POOLS)}, got {self.text_pool!r}")
        if not self.projection and not self.embed_dim == self.image_width == self.text_width:
            raise ValueError(f"without projections the towers' widths are the embedding: embed_dim={self.embed_dim}, "
                             f"image_width={self.image_width} and text_width={self.text_width} must be equal")


class TextRWKV(GradCheckpointing, nn.Module):
    """Token ids [B, context] -> the final LayerNorm's outputs, pooled: "mean" over the non-padding tokens (id 0
    pads), or "normalized-mean" of the L2-normalised outputs over every position, padding included (RWKV-CLIP's).
    The blocks see the whole padded context, as a fixed-length CLIP text tower does."""

    def __init__(self, config: RWKVCLIPConfig):
        super().__init__()
        self.context_length = config.context_length
        self.pool = config.text_pool
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        version = BLOCKS[config.block]
        shift = partial(bi_token_shift, head_size=config.head_size)
        self.blocks = nn.ModuleList(
            VRWKVBlock(config.text_width, i, config.text_layers, config.text_mlp_ratio, token_shift=shift,
                       version=version, head_size=config.head_size, lm_layers=version == 6)
            for i in range(config.text_layers))
        self.ln_final = nn.LayerNorm(config.text_width)

    def forward(self, text: Tensor) -> Tensor:
        if text.dim() != 2 or text.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must be token ids [B, context], got {tuple(text.shape)} {text.dtype}")
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than the context of {self.context_length} "
                             "(the tokenizer truncates to it)")
        x = self.token_embedding(text)
        x = run_blocks(self.grad_checkpointing, self.blocks, x, None)
        x = self.ln_final(x)
        if self.pool == "normalized-mean":
            return F.normalize(x, dim=-1).mean(1)
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
    """RWKV image and text towers, with linear projections into a shared embedding (or none), and a learnable logit
    scale."""

    arch = "rwkv-clip"
    config_class = RWKVCLIPConfig

    def __init__(self, config: RWKVCLIPConfig | None = None, **overrides):
        super().__init__()
        config = replace(config or RWKVCLIPConfig(), **overrides)
        self.config = config
        self.visual = VisionRWKV(img_size=config.image_size, patch_size=config.patch_size, num_classes=0,
                                 embed_dim=config.image_width, depth=config.image_layers,
                                 mlp_ratio=config.image_mlp_ratio, drop_path_rate=config.drop_path_rate,
                                 version=BLOCKS[config.block], head_size=config.image_head_size)
        self.text = TextRWKV(config)
        if config.projection:
            self.visual_projection = nn.Linear(config.image_width, config.embed_dim, bias=False)
            self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        else:
            self.visual_projection = self.text_projection = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self._init_weights()

    def _init_weights(self) -> None:
        """Projections normal(0, in^-1/2); token embedding normal(0, 0.02), or uniform(+-1e-4) for rwkv6-bi (the
        official text tower's init)."""
        if self.logit_scale.is_meta:
            return
        for projection in (self.visual_projection, self.text_projection):
            if isinstance(projection, nn.Linear):
                nn.init.normal_(projection.weight, std=projection.in_features ** -0.5)
        if self.config.block == "rwkv6-bi":
            nn.init.uniform_(self.text.token_embedding.weight, -1e-4, 1e-4)
        else:
            nn.init.normal_(self.text.token_embedding.weight, std=0.02)

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        features = self.visual_projection(self.visual(image))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        features = self.text_projection(self.text(text))
        return F.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Both towers (blocks.checkpointing: False, True or "selective")."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", *(f"visual.{n}" for n in self.visual.no_weight_decay())}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: RWKVCLIP) -> dict[str, Tensor]:
    """Official RWKV-CLIP (deepglint/RWKV-CLIP, e.g. `model_31.pt`) keys -> ours: the `module.` (DDP) and
    `_orig_mod.` (torch.compile) prefixes dropped; `image_model.*` mapped by Vision-RWKV's own mapping
    (vrwkv.checkpoint_filter_fn: `layers.N` -> `blocks.N`, `patch_embed.projection` -> `patch_embed.proj`, final
    `ln1` -> `norm`, the position embedding resampled to the model's grid) into `visual.*`; `text_model.emb` ->
    `text.token_embedding`, `text_model.blocks` -> `text.blocks` (the layers' names are the official ones),
    `text_model.ln_out` -> `text.ln_final`; `logit_scale` as it is. Native keys pass through; tensors keep their
    dtype (the official text time_decay / time_faaaa are bfloat16, which loading into float32 keeps exactly)."""
    state_dict = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}
    image = {k.removeprefix("image_model."): v for k, v in state_dict.items() if k.startswith("image_model.")}
    if (image or any(k.startswith("text_model.") for k in state_dict)) and model.config.block != "rwkv6-bi":
        raise ValueError(f"an official RWKV-CLIP checkpoint has RWKV-6 towers; this model's block is "
                         f"{model.config.block!r}: load it into RWKV-CLIP-6-B-32 or RWKV-CLIP-6-B-16")
    out = {f"visual.{k}": v for k, v in vrwkv.checkpoint_filter_fn(image, model.visual).items()}
    for key, value in state_dict.items():
        if key.startswith("image_model."):
            continue
        key = re.sub(r"^text_model\.emb\.", "text.token_embedding.", key)
        key = re.sub(r"^text_model\.ln_out\.", "text.ln_final.", key)
        out[re.sub(r"^text_model\.", "text.", key)] = value
    return out


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

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        if check_grad_checkpointing(enable) == "selective":
            raise ValueError("open_clip's towers take grad checkpointing True or False, not 'selective'")
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
