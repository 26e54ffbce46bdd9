"""Contrastive image-text training (`zoo train` with `task: clip` recipes) and the evaluations it reports.

As open_clip's trainer: `ClipLoss` (symmetric InfoNCE over the global batch: each process all-gathers the
others' features with their gradients), AdamW (betas 0.9 / 0.98, eps 1e-6, weight decay 0.2 on matrices only),
linear warm-up then cosine per update (timm's CosineLRScheduler), bf16 autocast, gradient clipping; images
augmented by open_clip's training transform, captions tokenized by the model's tokenizer, (image, caption)
pairs streamed from caption shards (`zoo data shards openclipart|captions`). Every `eval_every` epochs:
contrastive loss and image / text retrieval recall@1/5/10 on the val split, and zero-shot accuracy on a
classification set (Fashion-MNIST by default) with open_clip's template-ensembled classifier. Processes,
checkpoints and logs are the language-model engine's.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import RecipeError, RunConfig
from .data import DataError

__all__ = ["CaptionDataConfig", "ClipOptim", "ClipConfig", "TEMPLATES", "caption_pairs", "caption_features",
           "retrieval_metrics", "zero_shot_metrics", "contrastive_loss", "train_clip"]

TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
             "a photo of the {}.", "a drawing of a {}.", "a product photo of a {}.")
"""Zero-shot templates for datasets without their own (Fashion-MNIST: grey product photos of clothing)."""


@dataclass
class CaptionDataConfig:
    source: str = "data/openclipart"    # caption shards with train/ and val/ (zoo data shards openclipart|captions)
    workers: int = 4                    # loader processes per training process
    shuffle_buffer: int = 1000
    zeroshot: Optional[str] = "fashion-mnist"   # classification source evaluated zero-shot (null: none)


@dataclass
class ClipOptim:
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.2           # matrices only (timm's param_groups_weight_decay)
    grad_clip: float = 1.0              # max global grad norm; 0 disables


@dataclass
class ClipConfig(RunConfig):
    task: str = "clip"
    model: str = "RWKV-CLIP-B-32"       # a registered image-text model (RWKV-CLIP-*, or an openclip-* baseline)
    model_args: dict[str, Any] = field(default_factory=dict)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    optim: ClipOptim = field(default_factory=ClipOptim)
    batch_size: int = 256               # pairs per process; the contrastive batch is the global batch
    epochs: int = 40                    # an epoch: the training split's size in global batches
    local_loss: bool = False            # open_clip's --local-loss: each process scores only its own rows
    eval_every: int = 5                 # epochs
    save_every: int = 5                 # epochs
    keep_last: int = 2
    out_dir: str = "runs/clip"

    positive: ClassVar[tuple[str, ...]] = ("batch_size", "epochs", "eval_every", "save_every")

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "ddp":
            raise RecipeError("CLIP recipes train with strategy=ddp: the evaluations call encode_image / encode_text "
                              "outside forward, which FSDP's sharded parameters do not allow")


# --- data -----------------------------------------------------------------------------------------------------


def caption_pairs(preprocess: Callable, tokenizer: Callable) -> Callable[[dict, random.Random], tuple]:
    """make_sample for caption shards: (transformed image, token ids [context]); an empty caption is an error,
    which the shard stream counts as a skipped sample."""
    from .shards import image_of

    def pair(fields: dict, rng: random.Random) -> tuple[Tensor, Tensor]:
        caption = (fields.get("txt") or "").strip()
        if not caption:
            raise DataError(f"sample {fields.get('__key__')}: empty caption")
        return preprocess(image_of(fields).convert("RGB")), tokenizer([caption])[0]

    return pair


# --- evaluation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def caption_features(model: nn.Module, preprocess: Callable, tokenizer: Callable, folder: Path,
                     device: torch.device, batch_size: int = 64,
                     amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, int]:
    """(image features, text features, pairs skipped) of every pair of a caption shard directory, in order,
    normalised, as float32 on the CPU. A pair that does not decode, or has an empty caption, is skipped."""
    import webdataset as wds

    from .shards import SkipCounter, shard_info

    info, urls = shard_info(Path(folder))
    if info.get("kind") != "captions":
        raise DataError(f"{folder} holds {info.get('kind')} shards, not caption shards (zoo data shards captions)")
    was_training = model.training
    model.eval()
    make_pair, skip = caption_pairs(preprocess, tokenizer), SkipCounter()

    def pairs(samples):
        for sample in samples:
            try:
                yield make_pair(sample, None)
            except Exception as e:  # noqa: BLE001 - one bad pair skips that pair
                skip(e)

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=skip),
                                wds.decode("pil", handler=skip), pairs, wds.batched(batch_size, partial=True))
    images, texts = [], []
    for pixels, tokens in pipeline:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            images.append(model.encode_image(pixels.to(device), normalize=True).float().cpu())
            texts.append(model.encode_text(tokens.to(device), normalize=True).float().cpu())
    model.train(was_training)
    if not images:
        raise DataError(f"{folder}: no readable (image, caption) pair")
    return torch.cat(images), torch.cat(texts), skip.count


def retrieval_metrics(image_features: Tensor, text_features: Tensor) -> dict[str, float]:
    """CLIP_benchmark's retrieval metrics for paired features [N, D]: image_retrieval_recall@k (a caption finds
    its image among all images) and text_retrieval_recall@k (an image finds its caption), k = 1, 5, 10."""
    similarity = text_features @ image_features.T                                  # [captions, images]
    target = torch.arange(len(similarity))[:, None]
    metrics = {}
    for k in (1, 5, 10):
        for name, scores in (("image", similarity), ("text", similarity.T)):
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices
            metrics[f"{name}_retrieval_recall@{k}"] = (top == target).any(dim=1).float().mean().item()
    return metrics


@torch.no_grad()
def zero_shot_metrics(model: nn.Module, tokenizer: Callable, data, ranks, amp_dtype: torch.dtype | None = None,
                      templates: tuple[str, ...] = TEMPLATES) -> dict[str, float]:
    """Zero-shot acc1, acc5 and mean per-class recall over an ImageData's evaluation batches (recipes.classify),
    each rank scoring its share; the classifier is open_clip's `build_zero_shot_classifier` (every class name in
    every template, encoded, normalised, averaged per class)."""
    import open_clip

    was_training = model.training
    model.eval()
    device, n = ranks.device, len(data.classes)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, data.classes, templates, device=device,
                                                          use_tqdm=False)
        hits, seen, top5 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
        for images, labels, *_ in data.eval_batches():
            logits = model.encode_image(images.to(device), normalize=True).float() @ classifier.float()
            top = logits.topk(min(5, n), dim=1).indices.cpu()
            hits.index_add_(0, labels, (top[:, 0] == labels).double())
            seen.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
            top5 += (top == labels[:, None]).any(1).sum().item()
    model.train(was_training)
    totals = ranks.sum([*hits.tolist(), *seen.tolist(), top5])
    hits, seen, top5 = torch.tensor(totals[:n]), torch.tensor(totals[n:2 * n]), totals[-1]
    return {"acc1": (hits.sum() / seen.sum()).item(), "acc5": top5 / seen.sum().item(),
            "mean_per_class_recall": (hits / seen.clamp(min=1))[seen > 0].mean().item()}


# --- training -------------------------------------------------------------------------------------------------


def contrastive_loss(ranks, local_loss: bool = False) -> nn.Module:
    """open_clip's ClipLoss for this job: every process all-gathers the features of all processes with their
    gradients, so the logits span the global batch; under DDP's gradient averaging the update equals that of one
    process holding the whole batch. local_loss: each process scores only its own rows against all columns."""
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=local_loss, gather_with_grad=True, cache_labels=True, rank=ranks.rank,
                    world_size=ranks.world_size)

FIELDS = ["step", "epoch", "loss", "lr", "logit_scale", "pairs_per_s", "pairs_per_s_per_process", "step_ms",
          "peak_mem_gb", "skipped_samples", "val_loss", "val_image_r1", "val_text_r1", "val_mean_recall",
          "zeroshot_acc1"]


def train_clip(cfg: ClipConfig) -> dict:
    """Run a CLIP recipe (in every process of a torchrun job); returns the last evaluation and the model's path."""
    from .distributed import init_ranks

    ranks = init_ranks(cfg.device, cfg.strategy)
    try:
        return _train(cfg, ranks)
    finally:
        ranks.close()


def _evaluate(model: nn.Module, cfg: ClipConfig, preprocess: Callable, tokenizer: Callable, zeroshot_data, ranks,
              amp_dtype) -> dict[str, float]:
    """Val-split contrastive loss and retrieval (every rank the whole split: it needs all pairs at once), and the
    zero-shot metrics (ranks share the set)."""
    from open_clip.loss import ClipLoss

    image_features, text_features, _ = caption_features(model, preprocess, tokenizer, Path(cfg.data.source) / "val",
                                                        ranks.device, cfg.batch_size, amp_dtype)
    scale = model.logit_scale.detach().exp().clamp(max=100).float().cpu()
    metrics = {"loss": ClipLoss()(image_features, text_features, scale).item(),
               **retrieval_metrics(image_features, text_features)}
    metrics["mean_recall"] = float(np.mean([v for k, v in metrics.items() if "recall@" in k]))
    if zeroshot_data is not None:
        zero_shot = zero_shot_metrics(model, tokenizer, zeroshot_data, ranks, amp_dtype)
        metrics.update({f"zeroshot_{k}": v for k, v in zero_shot.items()})
    return metrics


def _train(cfg: ClipConfig, ranks) -> dict:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    import zoo
    from zoo.factory import clip_transforms

    from .classify import ClassifyConfig, ImageDataConfig, image_data
    from .engine import (RunLogger, _amp_dtype, _resume, _save, _unwrapped, announce, prepare_model, prepare_out_dir,
                         save_final_model, seed_image_processes)
    from .shards import EpochStreams, ShardStream, shard_info

    seed_image_processes(cfg, ranks)
    device, amp_dtype = ranks.device, _amp_dtype(cfg, ranks.device)
    out_dir = prepare_out_dir(cfg, ranks)
    model = zoo.create_model(cfg.model, **cfg.model_args)
    preprocess_train, preprocess_val = clip_transforms(model.config.image_size)
    tokenizer = zoo.get_tokenizer(model.config.tokenizer)

    root = Path(cfg.data.source)
    train = ShardStream(root / "train", caption_pairs(preprocess_train, tokenizer), cfg.batch_size, ranks.rank,
                        ranks.world_size, cfg.data.workers, seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    if train.info.get("kind") != "captions":
        raise DataError(f"{root / 'train'} holds {train.info.get('kind')} shards, not caption shards")
    val_pairs = shard_info(root / "val")[0]["samples"]
    global_batch = cfg.batch_size * ranks.world_size
    updates_per_epoch = max(1, train.info["samples"] // global_batch)
    epochs = EpochStreams(train, updates_per_epoch)
    zeroshot_data = None
    if cfg.data.zeroshot:
        zeroshot_source = ClassifyConfig(data=ImageDataConfig(cfg.data.zeroshot, cfg.data.workers),
                                         batch_size=cfg.batch_size)
        zeroshot_data = image_data(zeroshot_source, preprocess_val, preprocess_val, ranks)

    model, resume_from = prepare_model(model, cfg, out_dir, ranks)
    module = _unwrapped(model)
    optimizer = create_optimizer_v2(module, "adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_updates - cfg.optim.warmup_steps),
                                  lr_min=cfg.optim.min_lr, warmup_t=cfg.optim.warmup_steps, warmup_lr_init=0.0,
                                  warmup_prefix=True, t_in_epochs=False)
    start_epoch = _resume(resume_from, model, optimizer) if resume_from is not None else 0
    scheduler.step_update(start_epoch * updates_per_epoch)
    loss_fn = contrastive_loss(ranks, cfg.local_loss)

    logger = None
    if ranks.is_main:
        announce(cfg, out_dir, f"contrastive batch: {cfg.batch_size} pairs x {ranks.world_size} processes "
                               f"({cfg.strategy}, {device.type}) = {global_batch}; {train.info['samples']} training "
                               f"and {val_pairs} val pairs; {updates_per_epoch} updates an epoch, {total_updates} "
                               f"in all; zero-shot on {cfg.data.zeroshot or 'nothing'}")
        logger = RunLogger(out_dir, start_epoch * updates_per_epoch, FIELDS, unit="contrastive, nats")
    metrics = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        bar = tqdm(epochs(epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=1,
                   total=updates_per_epoch, dynamic_ncols=True, disable=not ranks.is_main)
        for i, (images, texts, *rest) in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * updates_per_epoch + i
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(images, texts)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step_update(step + 1)
            mean_loss = ranks.mean([loss.item()])[0]
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at epoch {epoch + 1}, step {step + 1}: stopping")
            seconds = time.perf_counter() - t0
            if logger is not None:
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                logger.log(step + 1, epoch=epoch + 1, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                           logit_scale=out["logit_scale"].item(), pairs_per_s=global_batch / seconds,
                           pairs_per_s_per_process=cfg.batch_size / seconds, step_ms=1000 * seconds,
                           peak_mem_gb=peak, skipped_samples=epochs.skipped(rest))
                bar.set_postfix(loss=f"{mean_loss:.3f}", pairs_s=f"{global_batch / seconds:,.0f}", refresh=False)
        bar.close()
        done = epoch + 1
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            metrics = _evaluate(module, cfg, preprocess_val, tokenizer, zeroshot_data, ranks, amp_dtype)
            if logger is not None:
                logger.log(done * updates_per_epoch, epoch=done, val_loss=metrics["loss"],
                           val_image_r1=metrics["image_retrieval_recall@1"],
                           val_text_r1=metrics["text_retrieval_recall@1"], val_mean_recall=metrics["mean_recall"],
                           zeroshot_acc1=metrics.get("zeroshot_acc1"))
                logger.plot()
                zero_shot = f", zero-shot top-1 {metrics['zeroshot_acc1']:.2%}" if zeroshot_data is not None else ""
                tqdm.write(f"epoch {done}: val loss {metrics['loss']:.4f}, image R@1 "
                           f"{metrics['image_retrieval_recall@1']:.2%}, text R@1 "
                           f"{metrics['text_retrieval_recall@1']:.2%}, mean recall {metrics['mean_recall']:.2%}"
                           f"{zero_shot}")
        if done % cfg.save_every == 0 or done == cfg.epochs:
            _save(out_dir / "checkpoints" / f"step_{done:07d}", model, optimizer, scheduler, done, cfg, ranks)
    if logger is not None:
        logger.close()
        if metrics is not None:
            (out_dir / "eval.json").write_text(json.dumps({"model": cfg.model, "epoch": cfg.epochs, **metrics},
                                                          indent=2) + "\n")
    save_final_model(model, out_dir / "model", cfg, ranks)
    return {"final": metrics, "model_dir": str(out_dir / "model")}
