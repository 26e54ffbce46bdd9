"""Image classification: datasets, the training engine (`zoo train` with `task: classify` recipes) and evaluation.

Built from timm's pieces as its train.py uses them: `create_transform` (RandAugment, random erasing),
`Mixup` (mixup / cutmix with label smoothing), `SoftTargetCrossEntropy` / `LabelSmoothingCrossEntropy`,
`create_optimizer_v2` (AdamW, no decay on biases, norms and `no_weight_decay()`), `create_scheduler_v2` (cosine
with warm-up, stepped per update), `accuracy`. Processes, checkpoints and logs are the language-model engine's
(torchrun DDP / FSDP2, rank-0 output, checksummed checkpoints, resume=auto). The learning rate is given for a
global batch of `optim.lr_base_size` and scaled linearly to the run's (the paper: 1e-3 at 1024).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import RunConfig

__all__ = ["ImageDataConfig", "AugmentConfig", "ClassifyOptim", "ClassifyConfig", "ImageData", "image_data", "image_datasets",
           "evaluate_classifier", "train_classifier"]

FASHION_MNIST = "fashion-mnist"


@dataclass
class ImageDataConfig:
    source: str = FASHION_MNIST     # "fashion-mnist" (Debian's IDX files; "fashion-mnist:DIR" for another folder),
                                    # a folder with train/ and val/ image folders (one sub-folder per class), or
                                    # `zoo data shards images|fashion-mnist` shards (train/ and val/ or test/)
    workers: int = 4                # loader processes per training process


@dataclass
class AugmentConfig:
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"   # timm's RandAugment spec; null for none
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    re_prob: float = 0.25           # random erasing
    hflip: float = 0.5
    color_jitter: float = 0.4
    mixup: float = 0.0              # mixup alpha (0: off)
    cutmix: float = 0.0             # cutmix alpha (0: off)
    smoothing: float = 0.1          # label smoothing


@dataclass
class ClassifyOptim:
    opt: str = "adamw"
    lr: float = 1e-3                # for a global batch of lr_base_size, scaled linearly
    lr_base_size: int = 1024
    weight_decay: float = 0.05
    warmup_epochs: int = 20
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    grad_clip: float = 0.0          # max global grad norm; 0 disables


@dataclass
class ClassifyConfig(RunConfig):
    task: str = "classify"
    model: str = "vrwkv_tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: ClassifyOptim = field(default_factory=ClassifyOptim)
    img_size: int = 224
    crop_pct: Optional[float] = None  # evaluation centre crop (None: the model's pretrained_cfg, 0.875)
    batch_size: int = 128           # per process
    epochs: int = 300
    save_every: int = 1             # epochs
    keep_last: int = 2
    out_dir: str = "runs/classify"

    positive: ClassVar[tuple[str, ...]] = ("img_size", "batch_size", "epochs", "save_every")


# --- data -----------------------------------------------------------------------------------------------------


class IdxImages(torch.utils.data.Dataset):
    """Images and labels of an IDX pair (Fashion-MNIST's format) as (transformed RGB PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform=None):
        self.images, self.labels, self.classes, self.transform = images, labels.astype(np.int64), classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def image_datasets(source: str, train_transform, eval_transform):
    """(train, eval) datasets of a source, both with `.classes`."""
    from .data import DataError
    from .shards import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

    if source == FASHION_MNIST or source.startswith(FASHION_MNIST + ":"):
        folder = Path(source.partition(":")[2] or FASHION_MNIST_DIR)

        def split(name, transform):
            files = {kind: next(iter(sorted(folder.glob(f"{name}-{kind}-idx*"))), None) for kind in ("images", "labels")}
            if None in files.values():
                raise FileNotFoundError(f"no {name} IDX files in {folder} (Debian: apt-get install dataset-fashion-mnist)")
            return IdxImages(read_idx(files["images"]), read_idx(files["labels"]), FASHION_MNIST_CLASSES, transform)

        return split("train", train_transform), split("t10k", eval_transform)
    root = Path(source)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(f"data.source={source!r}: expected 'fashion-mnist', a folder with train/ and val/ "
                        "image folders (one sub-folder per class), or image shards (zoo data shards)")
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root / "train"), train_transform), ImageFolder(str(root / "val"), eval_transform)


def _transforms(cfg: ClassifyConfig, model: nn.Module):
    from timm.data import create_transform, resolve_data_config

    data_cfg = resolve_data_config(model=model)
    common = dict(input_size=cfg.img_size, interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
                  std=data_cfg["std"])
    train = create_transform(is_training=True, auto_augment=cfg.aug.auto_augment, re_prob=cfg.aug.re_prob,
                             hflip=cfg.aug.hflip, color_jitter=cfg.aug.color_jitter, scale=tuple(cfg.aug.scale),
                             **common)
    return train, create_transform(is_training=False, crop_pct=cfg.crop_pct or data_cfg["crop_pct"], **common)


@dataclass
class ImageData:
    """One rank's view of a source: `train_batches(epoch)` and `eval_batches()` yield (images, labels, ...);
    `skipped(rest)` reads how many corrupt samples a shard stream has skipped from a batch's extra element."""

    classes: list[str]
    train_size: int
    eval_size: int
    updates_per_epoch: int
    train_batches: Callable[[int], Iterable]
    eval_batches: Callable[[], Iterable]
    skipped: Callable[[tuple], Optional[int]] = lambda rest: None


def image_data(cfg: ClassifyConfig, train_transform, eval_transform, ranks) -> ImageData:
    """Map-style datasets (Fashion-MNIST, image folders) through DistributedSampler, or `zoo data shards` image
    shards (train/ plus val/ or test/) through ShardStream: resampled per rank and worker for training (an
    epoch is the training split's size in global batches), one split pass over the evaluation shards."""
    root = Path(cfg.data.source)
    if (root / "train" / "info.json").exists():
        return _shard_data(cfg, root, train_transform, eval_transform, ranks)
    train_set, eval_set = image_datasets(cfg.data.source, train_transform, eval_transform)
    train_loader = _loader(train_set, cfg.batch_size, ranks, cfg.data.workers, train=True, seed=cfg.seed)
    eval_loader = _loader(eval_set, cfg.batch_size, ranks, cfg.data.workers, train=False)

    def train_batches(epoch: int):
        train_loader.sampler.set_epoch(epoch)
        return train_loader

    return ImageData(list(train_set.classes), len(train_set), len(eval_set), len(train_loader), train_batches,
                     lambda: eval_loader)


def _shard_data(cfg: ClassifyConfig, root: Path, train_transform, eval_transform, ranks) -> ImageData:
    from .data import DataError
    from .shards import EpochStreams, ShardStream, image_of, shard_info

    eval_dir = next((root / name for name in ("val", "test") if (root / name / "info.json").exists()), None)
    if eval_dir is None:
        raise DataError(f"{root} has train/ shards but no val/ or test/ shards to evaluate on")

    def labelled(transform):
        def sample(fields: dict, rng) -> tuple:
            return transform(image_of(fields).convert("RGB")), torch.tensor(int(fields["cls"]))
        return sample

    train = ShardStream(root / "train", labelled(train_transform), cfg.batch_size, ranks.rank, ranks.world_size,
                        cfg.data.workers, seed=cfg.seed)
    eval_shards = len(shard_info(eval_dir)[1])
    evaluation = ShardStream(eval_dir, labelled(eval_transform), cfg.batch_size, ranks.rank, ranks.world_size,
                             min(cfg.data.workers, eval_shards // ranks.world_size), resampled=False,
                             shuffle_buffer=1, partial=True)
    updates = max(1, train.info["samples"] // (cfg.batch_size * ranks.world_size))
    epochs = EpochStreams(train, updates)
    return ImageData(train.info["classes"], train.info["samples"], evaluation.info["samples"], updates, epochs,
                     evaluation.loader, epochs.skipped)


def _loader(dataset, batch_size: int, ranks, workers: int, train: bool, seed: int = 0):
    sampler = torch.utils.data.DistributedSampler(dataset, ranks.world_size, ranks.rank, shuffle=train, seed=seed,
                                                  drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                                       pin_memory=ranks.device.type == "cuda", persistent_workers=workers > 0)


# --- evaluation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, ranks, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over a loader, summed over ranks (a DistributedSampler
    pads to equal shards, so a few samples may count twice when the set does not divide evenly). A last, shorter
    batch is padded to the first one's size (its copies' outputs dropped), so a compiled model needs no new graph."""
    was_training = model.training
    model.eval()
    device = ranks.device
    loss = correct1 = correct5 = count = 0.0
    size = None
    for x, y, *_ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        size = size or len(x)
        if len(x) < size:
            x = torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()[:len(y)]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        count += len(y)
    loss, correct1, correct5, count = ranks.sum([loss, correct1, correct5, count])
    model.train(was_training)
    return {"loss": loss / count, "top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "samples": count}


# --- training -------------------------------------------------------------------------------------------------

FIELDS = ["step", "epoch", "loss", "lr", "images_per_s", "images_per_s_per_process", "step_ms", "peak_mem_gb",
          "skipped_samples", "val_loss", "val_top1", "val_top5"]


def train_classifier(cfg: ClassifyConfig) -> dict:
    """Run a classification recipe (in every process of a torchrun job); returns the final evaluation and paths."""
    from .distributed import init_ranks

    ranks = init_ranks(cfg.device, cfg.strategy)
    try:
        return _train(cfg, ranks)
    finally:
        ranks.close()


def _train(cfg: ClassifyConfig, ranks) -> dict:
    import timm
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    import zoo  # noqa: F401  (registers the vrwkv models in timm)
    from .engine import (RunLogger, _amp_dtype, _resume, _save, _unwrapped, announce, prepare_model, prepare_out_dir,
                         save_final_model, seed_image_processes)

    seed_image_processes(cfg, ranks)
    device, amp_dtype = ranks.device, _amp_dtype(cfg, ranks.device)
    out_dir = prepare_out_dir(cfg, ranks)
    model = timm.create_model(cfg.model, **{**cfg.model_args, "img_size": cfg.img_size})
    data = image_data(cfg, *_transforms(cfg, model), ranks)
    model.reset_classifier(len(data.classes))
    model, resume_from = prepare_model(model, cfg, out_dir, ranks)
    global_batch = cfg.batch_size * ranks.world_size
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_base_size
    optimizer = create_optimizer_v2(_unwrapped(model), cfg.optim.opt, lr=lr, weight_decay=cfg.optim.weight_decay)
    updates_per_epoch = data.updates_per_epoch
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.optim.warmup_epochs,
                                       warmup_lr=cfg.optim.warmup_lr, min_lr=cfg.optim.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    start_epoch = _resume(resume_from, model, optimizer) if resume_from is not None else 0
    mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, label_smoothing=cfg.aug.smoothing,
                  num_classes=len(data.classes)) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(cfg.aug.smoothing)

    logger = None
    if ranks.is_main:
        announce(cfg, out_dir, f"global batch: {cfg.batch_size} images x {ranks.world_size} processes "
                               f"({cfg.strategy}, {device.type}) = {global_batch}; lr {lr:.3g} ({cfg.optim.lr:g} at "
                               f"{cfg.optim.lr_base_size}); {data.train_size} training, {data.eval_size} evaluation "
                               f"images, {len(data.classes)} classes")
        logger = RunLogger(out_dir, start_epoch * updates_per_epoch, FIELDS, unit="cross-entropy")
    metrics = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        bar = tqdm(data.train_batches(epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=1,
                   total=updates_per_epoch, dynamic_ncols=True, disable=not ranks.is_main)
        for i, (x, y, *rest) in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * updates_per_epoch + i
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(x).float(), y)
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
                           images_per_s=global_batch / seconds, images_per_s_per_process=cfg.batch_size / seconds,
                           step_ms=1000 * seconds, peak_mem_gb=peak, skipped_samples=data.skipped(rest))
                bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{global_batch / seconds:,.0f}", refresh=False)
        bar.close()
        metrics = evaluate_classifier(model, data.eval_batches(), ranks, amp_dtype)
        done = epoch + 1
        if logger is not None:
            logger.log(done * updates_per_epoch, epoch=done, val_loss=metrics["loss"], val_top1=metrics["top1"],
                       val_top5=metrics["top5"])
            logger.plot()
            tqdm.write(f"epoch {done}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
                       f"loss {metrics['loss']:.4f}")
        if done % cfg.save_every == 0 or done == cfg.epochs:
            _save(out_dir / "checkpoints" / f"step_{done:07d}", model, optimizer, scheduler, done, cfg, ranks)
    if logger is not None:
        logger.close()
    save_final_model(model, out_dir / "model", cfg, ranks)
    return {"final": metrics, "model_dir": str(out_dir / "model")}
