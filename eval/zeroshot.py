"""`zoo eval zeroshot`: zero-shot classification of an image-text model, as CLIP_benchmark reports it.

The classifier is open_clip's `build_zero_shot_classifier`: every class name in every template, encoded,
normalised and averaged per class (template ensembling); the metrics are recipes.clip.zero_shot_metrics, the
ones CLIP training reports. Reported: top-1 and top-5 accuracy and the mean per-class recall, in
CLIP_benchmark's JSON layout (dataset, model, pretrained, task, metrics).
"""

from __future__ import annotations

__all__ = ["zero_shot_classification"]


def zero_shot_classification(model_name: str | None, checkpoint: str | None, dataset: str, batch_size: int = 64,
                             workers: int = 4, device: str = "auto", out_json: str | None = None) -> dict:
    """Zero-shot accuracy of an image-text model (a native checkpoint, or a registered name with random weights) on
    the evaluation split of a classification source (fashion-mnist[:DIR], an image folder, image shards)."""
    from recipes.classify import ClassifyConfig, ImageDataConfig, image_data
    from recipes.clip import TEMPLATES, zero_shot_metrics
    from recipes.distributed import init_ranks

    from .common import load_image_text_model, report

    ranks = init_ranks(device, "ddp")
    try:
        model, preprocess, tokenizer = load_image_text_model(model_name, checkpoint, ranks.device)
        data = image_data(ClassifyConfig(data=ImageDataConfig(source=dataset, workers=workers), batch_size=batch_size),
                          preprocess, preprocess, ranks)
        metrics = zero_shot_metrics(model, tokenizer, data, ranks)
    finally:
        ranks.close()
    result = {"dataset": dataset, "model": model_name or checkpoint, "pretrained": checkpoint,
              "task": "zeroshot_classification", "metrics": metrics, "samples": data.eval_size,
              "templates": list(TEMPLATES)}
    return report(result, out_json)
