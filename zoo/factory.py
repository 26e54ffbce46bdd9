"""create_model / model_info: build registered models by name, optionally with weights."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch
from torch import nn

from .checkpoint import OFFICIAL_LM_FORMATS, load_weights, read_state_dict
from .models import clip, vrwkv
from .registry import get_entry

__all__ = ["create_model", "create_model_and_transforms", "clip_transforms", "model_info", "build_config", "count_params"]


def build_config(name: str, **overrides) -> Any:
    """The registered config of `name` with fields replaced; unknown fields are an error."""
    entry = get_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        close = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        hints = ", ".join(f"{k}" + (f" (did you mean {c[0]}?)" if c else "") for k, c in close.items())
        raise TypeError(f"{name}: unknown config field(s) {hints}; fields are {', '.join(sorted(fields))}")
    return dataclasses.replace(entry.config, **overrides)


def create_model(name: str, pretrained: str | None = None, device=None, dtype: torch.dtype | None = None,
                 **overrides) -> nn.Module:
    """Build a registered model. pretrained: path to a native checkpoint or an official `.pth`.

    device="meta" builds the module without allocating (or initialising) any weights.
    """
    entry = get_entry(name)
    config = build_config(name, **overrides)
    with torch.device(device or "cpu"):
        model = entry.model_class(config)
    if pretrained is not None:
        state_dict, meta = read_state_dict(pretrained)
        official = {**OFFICIAL_LM_FORMATS, "vrwkv": vrwkv, "rwkv-clip": clip}.get(model.arch)
        official_filter = official.checkpoint_filter_fn if official else None
        if meta is None and official_filter is not None:
            state_dict = official_filter(state_dict, model)
        load_weights(model, state_dict, f"{pretrained} (for {name})")
    if dtype is not None:
        model = model.to(dtype)
    return model


def clip_transforms(image_size: int):
    """(preprocess_train, preprocess_val): open_clip's image transforms with OpenAI CLIP's mean and std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.transform import image_transform

    return (image_transform(image_size, True, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
            image_transform(image_size, False, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))


def create_model_and_transforms(name: str, pretrained: str | None = None, device=None, **overrides):
    """open_clip's entry point for the image-text models: (model, preprocess_train, preprocess_val)."""
    entry = get_entry(name)
    if entry.family != "clip":
        raise ValueError(f"{name} is a {entry.family} model, not an image-text one: use zoo.create_model")
    model = create_model(name, pretrained, device, **overrides)
    return (model, *clip_transforms(model.config.image_size))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(name: str) -> dict:
    """Family, paper, config, parameter count and parameter shapes of a registered model."""
    entry = get_entry(name)
    model = create_model(name, device="meta")
    return {
        "name": name,
        "family": entry.family,
        "arch": entry.model_class.arch,
        "paper": entry.paper,
        "params": count_params(model),
        "config": dataclasses.asdict(entry.config),
        "shapes": {k: list(p.shape) for k, p in model.named_parameters()},
        "pretrained": list(entry.pretrained),
    }
