"""What the evaluation commands share: loading an image-text model with its transforms and tokenizer, and
reporting a result as printed and written JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load_image_text_model", "report"]


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
