"""`zoo eval retrieval`: image-text retrieval of an image-text model on caption shards (`zoo data shards captions`
or `openclipart`), reported as CLIP_benchmark does: image_retrieval_recall@k (a caption finds its image among all
images) and text_retrieval_recall@k (an image finds its caption), k = 1, 5, 10, one caption per image."""

from __future__ import annotations

__all__ = ["retrieval"]


def retrieval(model_name: str | None, checkpoint: str | None, data: str, batch_size: int = 64, device: str = "auto",
              out_json: str | None = None) -> dict:
    from recipes.clip import caption_features, retrieval_metrics
    from recipes.distributed import init_ranks

    from .common import load_image_text_model, report

    dev = init_ranks(device, "ddp").device
    model, preprocess, tokenizer = load_image_text_model(model_name, checkpoint, dev)
    image_features, text_features, skipped = caption_features(model, preprocess, tokenizer, data, dev, batch_size)
    result = {"dataset": data, "model": model_name or checkpoint, "pretrained": checkpoint,
              "task": "zeroshot_retrieval", "metrics": retrieval_metrics(image_features, text_features),
              "samples": len(image_features), "skipped": skipped}
    return report(result, out_json)
