"""`zoo eval classify`: top-1 / top-5 of an image classifier on a dataset's evaluation split, reported like
timm's validate.py (top1, top1_err, top5, top5_err, param_count in millions, img_size, crop_pct,
interpolation)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["evaluate_classification", "load_classifier"]


def load_classifier(model: str, checkpoint: str | None, img_size: int | None):
    """A native checkpoint directory (`model` may then be omitted), or a registered vision model name with an
    official checkpoint (its class count read from the head) or with random weights."""
    import zoo
    from zoo.checkpoint import read_state_dict

    if checkpoint and Path(checkpoint).is_dir():
        overrides = {"img_size": img_size} if img_size else {}
        return zoo.load_checkpoint(checkpoint, **overrides)
    if model is None:
        raise ValueError("give --model NAME (with --checkpoint FILE for an official checkpoint)")
    kwargs = {"img_size": img_size} if img_size else {}
    if checkpoint:
        state_dict, _ = read_state_dict(checkpoint)
        head = next((v for k, v in state_dict.items() if k.endswith(("head.fc.weight", "head.weight"))), None)
        if head is not None:
            kwargs["num_classes"] = head.shape[0]
    return zoo.create_model(model, pretrained=checkpoint, **kwargs)


def evaluate_classification(model: str | None, checkpoint: str | None, data: str, img_size: int | None = None,
                            crop_pct: float | None = None, batch_size: int = 128, workers: int = 4,
                            device: str = "auto", out_json: str | None = None) -> dict:
    from timm.data import create_transform, resolve_data_config

    from recipes.classify import ClassifyConfig, ImageDataConfig, evaluate_classifier, image_data
    from recipes.distributed import init_ranks

    from .common import report

    ranks = init_ranks(device, "ddp")
    net = load_classifier(model, checkpoint, img_size).to(ranks.device)
    cfg = resolve_data_config(model=net)
    size = img_size or net.patch_embed.img_size  # timm's attribute: the zoo's classifiers and timm's own have it
    size = size if isinstance(size, int) else size[0]
    cfg["crop_pct"] = crop_pct or cfg["crop_pct"]
    transform = create_transform(size, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                                 mean=cfg["mean"], std=cfg["std"])
    source = image_data(ClassifyConfig(data=ImageDataConfig(source=data, workers=workers), batch_size=batch_size),
                        transform, transform, ranks)
    if len(source.classes) != net.num_classes:
        raise ValueError(f"the model has {net.num_classes} classes, {data} has {len(source.classes)}")
    amp = torch.bfloat16 if ranks.device.type == "cuda" else None
    metrics = evaluate_classifier(net, source.eval_batches(), ranks, amp)
    result = {"model": checkpoint or model, "top1": round(metrics["top1"], 3), "top1_err": round(100 - metrics["top1"], 3),
              "top5": round(metrics["top5"], 3), "top5_err": round(100 - metrics["top5"], 3),
              "loss": round(metrics["loss"], 5), "param_count": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
              "img_size": size, "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"],
              "samples": int(metrics["samples"]), "data": data}
    ranks.close()
    return report(result, out_json)
