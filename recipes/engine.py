"""The training engine for language models: AdamW with the official RWKV parameter groups,
warm-up + cosine, clipping, accumulation, bf16 autocast on GPU, L2Wrap, logs, plots, checkpoints,
one process or many (torchrun; DDP or FSDP2, see recipes.distributed).

Each step's global batch is drawn from a generator seeded by (seed, step, micro-step) and split by
rank, so a resumed run, or one with more processes at the same global batch, sees the same data as an
uninterrupted single-process run and reproduces its loss sequence. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import zoo
from zoo.checkpoint import atomic_dir, load_weights, read_state_dict, write_model_files

from .config import OptimConfig, TrainConfig, to_yaml
from .data import DataError, TokenData, evaluate_lm, load_lm_data
from .distributed import Ranks, gradient_sync, init_ranks, wrap_model

__all__ = ["train", "param_groups", "l2wrap_penalty", "lr_lambda", "latest_checkpoint", "NonFiniteLossError"]

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"         # torch.distributed.checkpoint files: sharded under FSDP, any world size reads them
CHECKSUMS = "checksums.json"        # sha256 of every other file, written last
STEP_DIR = re.compile(r"step_(\d+)$")
FAULT_ENV = "ZOO_FAULT_INJECT"      # kill_after_step:N or kill_while_saving:N, for the kill-and-resume tests

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Official RWKV groups: weight decay on matrices only; time_decay at 2x lr, time_first at 3x (layerwise_lr)."""
    no_decay = model.no_weight_decay()
    groups = {"decay": ([], cfg.weight_decay, 1.0), "no_decay": ([], 0.0, 1.0),
              "time_decay": ([], 0.0, 2.0), "time_first": ([], 0.0, 3.0)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.rsplit(".", 1)[-1]
        if cfg.layerwise_lr and key in ("time_decay", "time_first"):
            groups[key][0].append(p)
        else:
            groups["no_decay" if name in no_decay else "decay"][0].append(p)
    return [{"params": params, "weight_decay": wd, "lr": cfg.lr * scale, "name": name}
            for name, (params, wd, scale) in groups.items() if params]


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Factor on each group's lr: linear warm-up from 0, then cosine down to min_lr / lr at max_steps."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def l2wrap_penalty(logits: Tensor) -> Tensor:
    """RWKV's L2Wrap as a loss term worth 0 that adds 1e-4/(B*T) * max_logit to the max logit's gradient.

    Its value is zero (p - p.detach()); its gradient equals that of 1e-4 / (2 B T) * sum(max_logit^2).
    Unlike the official autograd.Function it is scaled with the loss under gradient accumulation.
    """
    top = logits.float().amax(dim=-1)
    penalty = 1e-4 / (2 * top.numel()) * top.square().sum()
    return penalty - penalty.detach()


def _file_digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def checkpoint_problem(path: Path) -> str | None:
    """Why a step checkpoint cannot be resumed from (missing files, a checksum mismatch), or None if it can."""
    if not (path / CHECKSUMS).exists() or not (path / TRAINER_STATE).exists():
        return f"{CHECKSUMS} or {TRAINER_STATE} missing"
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable {CHECKSUMS} ({e})"
    found = _file_digests(path)
    bad = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    return f"files missing, extra or changed since written: {', '.join(bad)}" if bad else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint of a run whose files match their checksums; a corrupt one is skipped with a
    warning (temporary directories of interrupted writes are never named step_N)."""
    steps = sorted(((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
                    if (m := STEP_DIR.match(p.name))), reverse=True)
    for _, path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def _resolve_resume(resume: str, out_dir: Path) -> Path | None:
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if STEP_DIR.match(path.name) and path.is_dir():
        if (problem := checkpoint_problem(path)) is not None:
            raise FileNotFoundError(f"resume={resume!r}: cannot resume from this checkpoint: {problem}")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"resume={resume!r}: neither a step checkpoint nor a run directory with one")
    return found


class RunLogger:
    """Per-step CSV, TensorBoard scalars and a loss-curve PNG in the run directory; `unit` names the loss's unit
    in the plot, `fields` the CSV columns (the language-model engine's by default)."""

    FIELDS = ["step", "loss", "lr", "tokens_per_s", "tokens_per_s_per_process", "step_ms", "peak_mem_gb",
              "skipped_samples", "val_loss", "val_bpb"]

    def __init__(self, out_dir: Path, start_step: int, fields: list[str] | None = None, unit: str = "nats/token"):
        from torch.utils.tensorboard import SummaryWriter

        self.FIELDS = fields or self.FIELDS
        self.unit = unit
        self.out_dir = out_dir
        self.csv_path = out_dir / "metrics.csv"
        rows = []
        if start_step > 0 and self.csv_path.exists():     # drop rows the resumed run will write again
            with open(self.csv_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.rows = rows
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, **values) -> None:
        row = {"step": step, **{k: "" if v is None else v for k, v in values.items()}}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        for k, v in values.items():
            if v is not None:
                self.tb.add_scalar(k, v, step)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key):
            pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in ("", None)]
            return zip(*pts) if pts else ((), ())

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*series("loss"), label=f"train loss ({self.unit})", lw=0.8)
        ax.plot(*series("val_loss"), "o-", label=f"val loss ({self.unit})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=120)
        plt.close(fig)

    def close(self) -> None:
        self.plot()
        self.tb.close()


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _build_model(cfg: TrainConfig, data: TokenData) -> nn.Module:
    model = zoo.create_model(cfg.model, **cfg.model_args)
    if cfg.init_from:
        init = zoo.load_checkpoint(cfg.init_from)
        load_weights(model, init.state_dict(), cfg.init_from)
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise DataError(f"tokenizer {data.tokenizer.name} has {data.tokenizer.vocab_size} ids but {cfg.model} "
                         f"only {model.config.vocab_size}: pick a matching data.tokenizer or model_args.vocab_size")
    return model


@contextlib.contextmanager
def _one_process_is_intended():
    """torch.distributed.checkpoint warns when it runs without a process group; a one-process run means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _full_weights(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on rank 0's CPU (gathered from FSDP shards; DDP's prefix removed); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save(path: Path, model: nn.Module, optimizer, scheduler, step: int, cfg: TrainConfig, ranks: Ranks) -> None:
    """A step checkpoint, written by every rank into one temporary directory that rank 0 renames when complete:
    model.safetensors + config.json (full weights), optimizer/ (torch.distributed.checkpoint), trainer_state.pt,
    and checksums.json last."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = _full_weights(model)
    optim_state = get_optimizer_state_dict(model, optimizer)
    with atomic_dir(path) if ranks.is_main else contextlib.nullcontext() as tmp:
        tmp = ranks.broadcast(tmp)
        with _one_process_is_intended():
            dcp.save({"optimizer": optim_state}, checkpoint_id=tmp / OPTIMIZER_DIR)
        ranks.barrier()
        if ranks.is_main:
            _write_model(model, tmp, cfg, weights)
            _inject_fault("kill_while_saving", step)
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                        "recipe": asdict(cfg), "world_size": ranks.world_size}, tmp / TRAINER_STATE)
            (tmp / CHECKSUMS).write_text(json.dumps(_file_digests(tmp), indent=1) + "\n")
    ranks.barrier()
    if ranks.is_main:
        steps = sorted(p for p in path.parent.glob("step_*") if STEP_DIR.match(p.name))
        for old in steps[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(old)


def seed_image_processes(cfg, ranks: Ranks) -> None:
    """Seeds for the image engines: torch's the same on every rank (the same initial model; FSDP shards it as it is),
    Python's and numpy's per rank (augmentations differ by rank: timm's crops draw from Python's random); and the
    recipe's CPU thread count."""
    import random

    import numpy as np

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + ranks.rank)
    np.random.seed(cfg.seed + ranks.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def prepare_out_dir(cfg, ranks: Ranks) -> Path:
    """The run directory (rank 0 creates it and removes the temporaries of interrupted checkpoint writes)."""
    out_dir = Path(cfg.out_dir)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / "checkpoints").glob(".step_*.tmp-*"):
            shutil.rmtree(stale)
    return out_dir


def prepare_model(model: nn.Module, cfg, out_dir: Path, ranks: Ranks) -> tuple[nn.Module, Path | None]:
    """The model on this rank's device with the weights of the checkpoint to resume from (if any), gradient
    checkpointing and torch.compile as the recipe says (compiled in place: the module, its parameter names and
    checkpoints stay as they are), wrapped for its strategy; and that checkpoint."""
    model = model.to(ranks.device)
    resume_from = _find_resume(cfg, out_dir, ranks)
    if resume_from is not None:
        weights = read_state_dict(resume_from)[0]
        load_weights(model, {k: v.to(ranks.device) for k, v in weights.items()}, str(resume_from))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.compile:  # FSDP2 shards each block, so each block is compiled on its own, before the sharding
        for module in model.blocks if cfg.strategy == "fsdp" else [model]:
            module.compile(mode=cfg.compile)
    return wrap_model(model, cfg.strategy, ranks), resume_from


def announce(cfg, out_dir: Path, summary: str) -> None:
    """Rank 0 at the start of a run: the resolved config printed and saved as config.yaml, then `summary`."""
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    tqdm.write(f"config:\n{to_yaml(cfg)}")
    tqdm.write(summary)


def save_final_model(model: nn.Module, path: Path, cfg, ranks: Ranks) -> None:
    """The trained model's full weights (gathered from every rank) as a native checkpoint, written by rank 0."""
    weights = _full_weights(model)
    if ranks.is_main:
        with atomic_dir(path) as tmp:
            _write_model(model, tmp, cfg, weights)
    ranks.barrier()


def _write_model(model: nn.Module, directory: Path, cfg, weights: dict) -> None:
    """A recipe's model files; a timm baseline the zoo does not register (no `arch`) with the arguments that rebuild
    it: the recipe's model_args, img_size and the head's class count."""
    model = _unwrapped(model)
    timm_kwargs = None if hasattr(model, "arch") else {**cfg.model_args, "img_size": cfg.img_size,
                                                       "num_classes": model.num_classes}
    write_model_files(model, directory, cfg.model, state_dict=weights, timm_kwargs=timm_kwargs)


def _inject_fault(event: str, step: int) -> None:
    """Fault injection for tests: with ZOO_FAULT_INJECT=<event>:<step>, rank 0 dies of SIGKILL at that point
    (under torchrun the launcher then stops the other workers and the job fails)."""
    if os.environ.get(FAULT_ENV) == f"{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _resume(path: Path, model: nn.Module, optimizer, fresh_groups: list[dict] | None = None) -> int:
    """Optimizer state and RNG from a step checkpoint into a wrapped model's optimizer; returns the step.
    `fresh_groups` (the recipe's parameter groups) override the saved lr, decay, betas and eps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    with _one_process_is_intended():
        dcp.load(optim_state, checkpoint_id=path / OPTIMIZER_DIR)
    set_optimizer_state_dict(model, optimizer, optim_state["optimizer"])
    for group, fresh in zip(optimizer.param_groups, fresh_groups or ()):
        group.update({key: value for key, value in fresh.items() if key != "params"})
    torch.set_rng_state(state["rng"])
    return state["step"]


def _train_batches(cfg: TrainConfig, data: TokenData, ranks: Ranks, start_step: int):
    """This rank's training micro-batches (inputs, targets, samples skipped so far or None) from start_step on:
    its rows of the seeded global batch of each (step, micro-step), or the next batch of its shard stream.
    A stream is seeded by (seed, start_step, rank, loader worker): a resumed run draws a fresh, reproducible
    stream rather than the interrupted one's continuation."""
    if data.train_shards is not None:
        from .shards import ShardStream, lm_windows

        stream = ShardStream(data.train_shards, lm_windows(cfg.ctx_len), cfg.batch_size, ranks.rank, ranks.world_size,
                             cfg.data.workers, seed=cfg.seed * 7919 + start_step, shuffle_buffer=cfg.data.shuffle_buffer)
        if stream.info["chunk_tokens"] < cfg.ctx_len + 1:
            raise DataError(f"{data.train_shards} holds chunks of {stream.info['chunk_tokens']} tokens, fewer than "
                            f"ctx_len + 1 = {cfg.ctx_len + 1}: write shards with a larger --chunk-tokens")
        for x, y, tail in stream.loader((cfg.max_steps - start_step) * cfg.grad_accum):
            yield x, y, stream.skipped(tail)
        return
    rows = slice(ranks.rank * cfg.batch_size, (ranks.rank + 1) * cfg.batch_size)  # this rank's share of a batch
    for step in range(start_step, cfg.max_steps):
        for micro in range(cfg.grad_accum):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
            x, y = data.sample("train", cfg.batch_size * ranks.world_size, cfg.ctx_len, generator)
            yield x[rows], y[rows], None


def _find_resume(cfg: TrainConfig, out_dir: Path, ranks: Ranks) -> Path | None:
    """Rank 0 picks the checkpoint (verifying its checksums) and tells the others, or all raise its error."""
    found = None
    if cfg.resume and ranks.is_main:
        try:
            found = _resolve_resume(cfg.resume, out_dir)
        except FileNotFoundError as e:
            found = e
    found = ranks.broadcast(found)
    if isinstance(found, Exception):
        raise found
    return found


def _clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Global-norm clipping; under FSDP the norm of the sharded gradients is reduced over ranks first."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)


def train(cfg: TrainConfig) -> dict:
    """Run a recipe (in every process of a torchrun job); returns the first and final validation metrics and the
    run's paths."""
    ranks = init_ranks(cfg.device, cfg.strategy)
    try:
        return _train(cfg, ranks)
    finally:
        ranks.close()


def _train(cfg: TrainConfig, ranks: Ranks) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ranks.device
    amp_dtype = _amp_dtype(cfg, device)
    out_dir = prepare_out_dir(cfg, ranks)
    ckpt_dir = out_dir / "checkpoints"
    data = load_lm_data(cfg.data)
    model, resume_from = prepare_model(_build_model(cfg, data), cfg, out_dir, ranks)
    optimizer = torch.optim.AdamW(param_groups(_unwrapped(model), cfg.optim), betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    start_step, last_good = 0, None
    if resume_from is not None:
        # the recipe governs lr, schedule and decay, so overrides given with resume= take effect;
        # with an unchanged recipe this reproduces the saved scheduler state exactly
        fresh = [{**group, "initial_lr": group["lr"], "betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps}
                 for group in param_groups(_unwrapped(model), cfg.optim)]
        start_step, last_good = _resume(resume_from, model, optimizer, fresh), resume_from
        if ranks.is_main:
            tqdm.write(f"resumed from {resume_from} at step {start_step}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.max_steps),
                                                  last_epoch=start_step - 1)

    global_batch = cfg.batch_size * cfg.grad_accum * ranks.world_size
    tokens_per_step = global_batch * cfg.ctx_len
    logger = None
    if ranks.is_main:
        announce(cfg, out_dir, f"global batch: {cfg.batch_size} sequences x {cfg.grad_accum} accumulation steps x "
                               f"{ranks.world_size} processes ({cfg.strategy}, {device.type}) = {global_batch} "
                               f"sequences, {tokens_per_step:,} tokens per step")
        logger = RunLogger(out_dir, start_step)

    def validate(step: int) -> dict:
        metrics = evaluate_lm(model, data, cfg.eval_batches, cfg.batch_size, cfg.ctx_len, amp_dtype=amp_dtype,
                              ranks=ranks)
        if logger is not None:
            logger.log(step, val_loss=metrics["loss"], val_bpb=metrics["bpb"])
            logger.plot()
        return metrics

    first_val = validate(start_step) if start_step == 0 else None
    val = first_val
    batches = _train_batches(cfg, data, ranks, start_step)
    skipped = None
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="train",
               unit="step", mininterval=1, dynamic_ncols=True, disable=not ranks.is_main)
    try:
        for step in bar:
            t0 = time.perf_counter()
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y, skipped = next(batches)
                x, y = x.to(device), y.to(device)
                with gradient_sync(model, micro == cfg.grad_accum - 1):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    mean_loss = ranks.mean([loss.item()])[0]
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(
                            f"loss is {mean_loss} at step {step + 1}: stopping. Last good checkpoint: "
                            f"{last_good or 'none written yet'} (lower optim.lr or check the data)")
                    objective = loss + (l2wrap_penalty(logits) if cfg.l2wrap else 0)
                    (objective / cfg.grad_accum).backward()
                loss_sum += mean_loss
            if cfg.optim.grad_clip > 0:
                _clip_gradients(model, cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            seconds = time.perf_counter() - t0
            train_loss = loss_sum / cfg.grad_accum
            if logger is not None:
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                logger.log(done, loss=train_loss, lr=lr, tokens_per_s=tokens_per_step / seconds,
                           tokens_per_s_per_process=tokens_per_step / ranks.world_size / seconds,
                           step_ms=1000 * seconds, peak_mem_gb=peak, skipped_samples=skipped)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}",
                                tok_s_proc=f"{tokens_per_step / ranks.world_size / seconds:,.0f}",
                                **({"mem_gb": f"{peak:.1f}"} if peak is not None else {}),
                                **({"skipped": skipped} if skipped else {}), refresh=False)
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val = validate(done)
                if ranks.is_main:
                    bar.write(f"step {done}: val loss {val['loss']:.4f}, val bits/byte {val['bpb']:.4f}")
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                last_good = ckpt_dir / f"step_{done:07d}"
                _save(last_good, model, optimizer, scheduler, done, cfg, ranks)
            if ranks.is_main:
                _inject_fault("kill_after_step", done)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    save_final_model(model, out_dir / "model", cfg, ranks)
    return {"first_val": first_val, "final_val": val, "model_dir": str(out_dir / "model"),
            "checkpoint": str(last_good) if last_good else None}
