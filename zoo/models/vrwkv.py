"""Vision-RWKV image classifiers (arXiv 2403.02308, "Vision-RWKV: Efficient and Scalable Visual Perception with
RWKV-Like Architectures"), in timm's model-file order and registered in timm and in the zoo.

Patch embedding (16 x 16 convolution), absolute position embedding (resized bicubically for other input sizes),
Vision-RWKV blocks (`blocks.vision`), final LayerNorm, global average pooling, linear head; no class token.
`checkpoint_filter_fn` maps the official (mmcls) checkpoints' keys onto this model's.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model as register_timm_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from blocks.checkpointing import GradCheckpointing, run_block, run_blocks
from blocks.vision import VRWKVBlock

from ..registry import register_model

__all__ = ["VRWKVConfig", "VisionRWKV", "checkpoint_filter_fn", "SIZES"]

PAPER = "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like Architectures (arXiv 2403.02308)"


@dataclass
class VRWKVConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0               # dropout after the position embedding
    drop_path_rate: float = 0.0          # stochastic depth, rising linearly to this at the last block
    post_norm: bool = False
    layer_scale: float | None = None     # init of the per-channel residual scales (gamma1, gamma2); None: none
    key_norm: bool = False
    version: int = 4                     # 4: Vision-RWKV (Bi-WKV), 6: Vision-RWKV-6 (bidirectional WKV-6, heads)
    head_size: int = 64                  # version 6: channels per head
    global_pool: str = "avg"             # "avg", or "" for the token features
    head_hidden_dim: int = 0             # > 0: pooled features -> Linear(embed_dim, this) -> tanh -> classifier
                                         # (the official large model's head, its depth > 12 configuration)


class VisionRWKV(GradCheckpointing, nn.Module):
    """Vision-RWKV classifier with timm's model API (forward_features / forward_head / forward_intermediates,
    reset_classifier, group_matcher, set_grad_checkpointing, no_weight_decay)."""

    arch = "vrwkv"
    config_class = VRWKVConfig

    def __init__(self, config: VRWKVConfig | None = None, **kwargs):
        super().__init__()
        config = replace(config or VRWKVConfig(), **kwargs)
        if config.global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {config.global_pool!r}")
        self.config = config
        self.num_classes = config.num_classes
        self.global_pool = config.global_pool
        self.num_features = self.embed_dim = config.embed_dim
        self.head_hidden_size = config.head_hidden_dim or config.embed_dim
        self.num_prefix_tokens = 0
        self.patch_embed = PatchEmbed(to_2tuple(config.img_size), config.patch_size, config.in_chans, config.embed_dim,
                                      output_fmt="NHWC", strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, config.embed_dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            VRWKVBlock(config.embed_dim, i, config.depth, config.mlp_ratio, rates[i], config.layer_scale,
                       config.post_norm, config.key_norm, version=config.version, head_size=config.head_size)
            for i in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(config.embed_dim, config.head_hidden_dim),
                                                    act=nn.Tanh())) if config.head_hidden_dim else nn.Identity()
        self.head = nn.Linear(self.head_hidden_size, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=config.embed_dim, reduction=config.patch_size)
                             for i in range(config.depth)]
        self.pretrained_cfg = _cfg()  # timm's builder replaces it with the variant's; models built here keep it
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official configs' init: truncated normal (std 0.02) linear weights, zero biases; the position
        embedding starts at zero and the per-channel mixes keep their fancy init."""
        if isinstance(m, nn.Linear) and not m.weight.is_meta:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for num_classes (0: none); the config follows, so checkpoints rebuild this model."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.config = replace(self.config, num_classes=num_classes, global_pool=self.global_pool)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def _check_input(self, x: Tensor) -> None:
        p, c = self.config.patch_size, self.config.in_chans
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"{type(self).__name__} takes images [B, {c}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the patch size {p}")

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens [B, H*W, C] plus the position embedding (resampled to this grid), and the grid."""
        self._check_input(x)
        x = self.patch_embed(x)
        grid = (x.shape[1], x.shape[2])
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.patch_embed.grid_size), num_prefix_tokens=0)
        return self.pos_drop(x.flatten(1, 2) + pos), grid

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> normalised patch tokens [B, H*W/p^2, embed_dim]."""
        x, grid = self._embed(x)
        return self.norm(run_blocks(self.grad_checkpointing, self.blocks, x, grid))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the outputs of the blocks `indices` (the last n if an int) as [B, C, H, W] (or
        NLC) maps, normalised by the final norm if `norm`; with the final features unless intermediates_only."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        intermediates = []
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            x = run_block(self.grad_checkpointing, block, x, grid)
            if i in take:
                y = self.norm(x) if norm else x
                intermediates.append(y if output_fmt == "NLC" else y.transpose(1, 2).reshape(y.shape[0], -1, *grid))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VisionRWKV) -> dict[str, Tensor]:
    """Official Vision-RWKV keys -> ours: `backbone.` dropped, `layers.N` -> `blocks.N`, `patch_embed.projection` ->
    `patch_embed.proj`, the backbone's final `ln1` -> `norm`, the head's `head.fc` (mmcls) -> `head`, or for the
    large model (its InternImage-style trainer: `head.0` Linear, `head.1` tanh, `head.2` Linear) `head.0` ->
    `pre_logits.fc`, `head.2` -> `head`; the position embedding resampled (bicubic) to the model's grid. Native keys
    pass through."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.", "", key)
        key = re.sub(r"^layers\.", "blocks.", key)
        key = re.sub(r"^patch_embed\.projection\.", "patch_embed.proj.", key)
        key = re.sub(r"^ln1\.", "norm.", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        key = re.sub(r"^head\.0\.", "pre_logits.fc.", key)
        key = re.sub(r"^head\.2\.", "head.", key)
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            side = int(round(value.shape[1] ** 0.5))
            value = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), [side, side], num_prefix_tokens=0)
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "paper_ids": "arXiv:2403.02308", "paper_name": PAPER, "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    **{f"vrwkv_{size}.in1k": _cfg() for size in ("tiny", "small", "base", "large")},
    **{f"vrwkv6_{size}.in1k": _cfg() for size in ("tiny", "small", "base")},
})

SIZES = {
    "tiny": dict(embed_dim=192, depth=12, drop_path_rate=0.1),
    "small": dict(embed_dim=384, depth=12, drop_path_rate=0.3, post_norm=True, layer_scale=1.0),
    "base": dict(embed_dim=768, depth=12, drop_path_rate=0.5, post_norm=True, layer_scale=1e-5),
    "large": dict(embed_dim=1024, depth=24, drop_path_rate=0.1, post_norm=True, layer_scale=1e-5, key_norm=True,
                  head_hidden_dim=3072),
}
"""The paper's classifiers (ImageNet-1k training; drop path as in the official configs)."""

SIZES_V6 = {
    "tiny": dict(embed_dim=192, depth=12, version=6),
    "small": dict(embed_dim=384, depth=12, drop_path_rate=0.3, post_norm=True, layer_scale=1e-5, version=6),
    "base": dict(embed_dim=768, depth=12, drop_path_rate=0.5, post_norm=True, layer_scale=1e-5, version=6),
}
"""Vision-RWKV-6 (OpenGVLab/Vision-RWKV's vrwkv6 configs: head size 64, FFN 4C, LoRA ranks 32 and 64): 7.6M,
27.7M and 104.9M parameters with the 1000-class head."""


def _create_vrwkv(variant: str, pretrained: bool = False, **kwargs) -> VisionRWKV:
    return build_model_with_cfg(VisionRWKV, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_timm_model
def vrwkv_tiny(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv_tiny", pretrained, **{**SIZES["tiny"], **kwargs})


@register_timm_model
def vrwkv_small(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv_small", pretrained, **{**SIZES["small"], **kwargs})


@register_timm_model
def vrwkv_base(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv_base", pretrained, **{**SIZES["base"], **kwargs})


@register_timm_model
def vrwkv_large(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv_large", pretrained, **{**SIZES["large"], **kwargs})


@register_timm_model
def vrwkv6_tiny(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv6_tiny", pretrained, **{**SIZES_V6["tiny"], **kwargs})


@register_timm_model
def vrwkv6_small(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv6_small", pretrained, **{**SIZES_V6["small"], **kwargs})


@register_timm_model
def vrwkv6_base(pretrained: bool = False, **kwargs) -> VisionRWKV:
    return _create_vrwkv("vrwkv6_base", pretrained, **{**SIZES_V6["base"], **kwargs})


for _prefix, _sizes in (("vrwkv", SIZES), ("vrwkv6", SIZES_V6)):
    for _size, _cfg_fields in _sizes.items():
        register_model(f"{_prefix}_{_size}", VisionRWKV, VRWKVConfig(**_cfg_fields), family="vision", paper=PAPER)
