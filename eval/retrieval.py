"""`zoo eval retrieval`: image-text retrieval of an image-text model on caption shards (`zoo data shards captions`),
reported as CLIP_benchmark does: image_retrieval_recall@k (a caption finds its image among all images) and
text_retrieval_recall@k (an image finds its caption), k = 1, 5, 10, one caption per image."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["recall_at_k", "retrieval"]


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Share of rows whose own column (the diagonal) is among their k highest scores. similarity: [N, N]."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return (top == torch.arange(len(similarity))[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def retrieval(model_name: str | None, checkpoint: str | None, data: str, batch_size: int = 64, device: str = "auto",
              out_json: str | None = None) -> dict:
    import webdataset as wds

    from recipes.data import DataError
    from recipes.distributed import init_ranks
    from recipes.shards import IMAGE_FIELDS, shard_info

    from .common import load_image_text_model, report

    info, urls = shard_info(Path(data))
    if info.get("kind") != "captions":
        raise DataError(f"{data} holds {info.get('kind')} shards; retrieval needs caption shards (zoo data shards captions)")
    dev = init_ranks(device, "ddp").device
    model, preprocess, tokenizer = load_image_text_model(model_name, checkpoint, dev)
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("pil"),
                               wds.batched(batch_size, partial=True, collation_fn=list))
    images, texts = [], []
    for batch in samples:
        pixels = torch.stack([preprocess(next(s[k] for k in IMAGE_FIELDS if k in s).convert("RGB")) for s in batch])
        images.append(model.encode_image(pixels.to(dev), normalize=True).float().cpu())
        texts.append(model.encode_text(tokenizer([s["txt"] for s in batch]).to(dev), normalize=True).float().cpu())
    image_features, text_features = torch.cat(images), torch.cat(texts)
    similarity = text_features @ image_features.T                                  # [captions, images]
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(similarity, k)
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(similarity.T, k)
    result = {"dataset": data, "model": model_name or checkpoint, "pretrained": checkpoint,
              "task": "zeroshot_retrieval", "metrics": metrics, "samples": len(image_features)}
    return report(result, out_json)
