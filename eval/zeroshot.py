"""`zoo eval zeroshot`: zero-shot classification of an image-text model, as CLIP_benchmark reports it.

The classifier is open_clip's `build_zero_shot_classifier`: every class name in every template, encoded,
normalised and averaged per class (template ensembling). Reported: top-1 and top-5 accuracy and the mean
per-class recall, in CLIP_benchmark's JSON layout (dataset, model, pretrained, task, metrics).
"""

from __future__ import annotations

import torch

__all__ = ["zero_shot_classification", "TEMPLATES"]

TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
             "a photo of the {}.", "a drawing of a {}.", "a product photo of a {}.")
"""Templates for datasets without their own (Fashion-MNIST: grey product photos of clothing)."""


def zero_shot_classification(model_name: str | None, checkpoint: str | None, dataset: str, batch_size: int = 64,
                             workers: int = 4, device: str = "auto", out_json: str | None = None) -> dict:
    """Zero-shot accuracy of an image-text model (a native checkpoint, or a registered name with random weights) on
    the evaluation split of a classification source (fashion-mnist[:DIR], an image folder, image shards)."""
    import open_clip

    from recipes.classify import ClassifyConfig, ImageDataConfig, image_data
    from recipes.distributed import init_ranks

    from .common import load_image_text_model, report

    ranks = init_ranks(device, "ddp")
    model, preprocess, tokenizer = load_image_text_model(model_name, checkpoint, ranks.device)
    data = image_data(ClassifyConfig(data=ImageDataConfig(source=dataset, workers=workers), batch_size=batch_size),
                      preprocess, preprocess, ranks)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, data.classes, TEMPLATES,
                                                          device=ranks.device)
        n = len(data.classes)
        correct1 = correct5 = total = 0
        hits, seen = torch.zeros(n), torch.zeros(n)
        for images, labels, *_ in data.eval_batches():
            logits = model.encode_image(images.to(ranks.device), normalize=True) @ classifier
            top = logits.topk(min(5, n), dim=1).indices.cpu()
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(1).sum().item()
            total += len(labels)
            hits.index_add_(0, labels, (top[:, 0] == labels).float())
            seen.index_add_(0, labels, torch.ones(len(labels)))
    recall = (hits / seen.clamp(min=1))[seen > 0].mean().item()
    result = {"dataset": dataset, "model": model_name or checkpoint, "pretrained": checkpoint, "task": "zeroshot_classification",
              "metrics": {"acc1": correct1 / total, "acc5": correct5 / total, "mean_per_class_recall": recall},
              "samples": total, "templates": list(TEMPLATES)}
    ranks.close()
    return report(result, out_json)
