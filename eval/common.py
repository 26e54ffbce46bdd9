"""What the evaluation commands share: loading a language model, or an image-text model with its transforms and
tokenizer, and reporting a result as printed and written JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_language_model", "load_image_text_model", "report"]


def load_language_model(model_name: str | None, checkpoint: str | None, device: torch.device) -> nn.Module:
    """A language model in eval mode on `device`: a checkpoint (a native directory, or an official .pth read into
    `model_name`'s config when given, else into the config its shapes imply), or a registered language model with
    random weights."""
    import zoo
    from zoo.registry import get_entry, list_models

    if model_name is not None and (family := get_entry(model_name).family) != "language":
        raise ValueError(f"{model_name} is a {family} model, not a language model")
    if checkpoint is None:
        logging.getLogger("zoo").warning("no checkpoint: %s has randomly initialised weights", model_name)
        model = zoo.create_model(model_name)
    else:
        model = zoo.create_model(model_name, pretrained=checkpoint) if model_name else zoo.load_checkpoint(checkpoint)
    language_classes = {get_entry(name).model_class for name in list_models() if get_entry(name).family == "language"}
    if type(model) not in language_classes:
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a language model")
    return model.to(device).eval()


def load_image_text_model(model_name: str | None, checkpoint: str | None, device: torch.device):
    """(model in eval mode on `device`, its evaluation transform, its tokenizer): a native checkpoint, or a
    registered image-text model with random weights."""
    import zoo
    from zoo.factory import clip_transforms
    from zoo.models.clip import ImageTextModel

    model = zoo.load_checkpoint(checkpoint) if checkpoint else zoo.create_model(model_name)
    if not isinstance(model, ImageTextModel):
        raise ValueError(f"{checkpoint or model_name} is not an image-text model")
    _, preprocess = clip_transforms(model.config.image_size)
    return model.to(device).eval(), preprocess, zoo.get_tokenizer(model.config.tokenizer)


def report(result: dict, out_json: str | None) -> dict:
    """Print the result as JSON and, when asked, write it to `out_json`; returns it."""
    text = json.dumps(result, indent=2)
    print(text)
    if out_json:
        Path(out_json).write_text(text + "\n")
    return result
