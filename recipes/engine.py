"""The training engine for language models: AdamW with the official RWKV parameter groups,
warm-up + cosine, clipping, accumulation, bf16 autocast on GPU, L2Wrap, logs, plots, checkpoints.

Batches are drawn from a generator seeded by (seed, step, micro-step), so a resumed run sees the
same data as an uninterrupted one and reproduces its loss sequence.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import time
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

__all__ = ["train", "param_groups", "l2wrap_penalty", "lr_lambda", "latest_checkpoint", "NonFiniteLossError"]

TRAINER_STATE = "trainer_state.pt"
STEP_DIR = re.compile(r"step_(\d+)$")


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run (temporary directories are never named step_N)."""
    steps = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*") if (m := STEP_DIR.match(p.name))
             and (p / TRAINER_STATE).exists()]
    return max(steps)[1] if steps else None


def _resolve_resume(resume: str, out_dir: Path) -> Path | None:
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / TRAINER_STATE).exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"resume={resume!r}: neither a step checkpoint nor a run directory with one")
    return found


class RunLogger:
    """Per-step CSV, TensorBoard scalars and a loss-curve PNG in the run directory."""

    FIELDS = ["step", "loss", "lr", "tokens_per_s", "val_loss", "val_bpb"]

    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

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
        ax.plot(*series("loss"), label="train loss (nats/token)", lw=0.8)
        ax.plot(*series("val_loss"), "o-", label="val loss (nats/token)")
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


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


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


def _save(path: Path, model, optimizer, scheduler, step: int, cfg: TrainConfig, keep_last: int) -> None:
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, cfg.model)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "recipe": asdict(cfg)}, tmp / TRAINER_STATE)
    steps = sorted(p for p in path.parent.glob("step_*") if STEP_DIR.match(p.name))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def train(cfg: TrainConfig) -> dict:
    """Run a recipe; returns the first and final validation metrics and the run's paths."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    amp_dtype = _amp_dtype(cfg, device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"

    data = load_lm_data(cfg.data)
    model = _build_model(cfg, data).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.max_steps))

    start_step, last_good = 0, None
    resume_from = _resolve_resume(cfg.resume, out_dir) if cfg.resume else None
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
        load_weights(model, {k: v.to(device) for k, v in read_state_dict(resume_from)[0].items()}, str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        # the recipe governs lr, schedule and decay, so overrides given with resume= take effect;
        # with an unchanged recipe this reproduces the saved scheduler state exactly
        for group, fresh in zip(optimizer.param_groups, param_groups(model, cfg.optim)):
            group.update(initial_lr=fresh["lr"], weight_decay=fresh["weight_decay"], betas=tuple(cfg.optim.betas),
                         eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.max_steps),
                                                      last_epoch=state["step"] - 1)
        torch.set_rng_state(state["rng"])
        start_step, last_good = state["step"], resume_from
        tqdm.write(f"resumed from {resume_from} at step {start_step}")
    (out_dir / "recipe.yaml").write_text(to_yaml(cfg))

    logger = RunLogger(out_dir, start_step)

    def validate(step: int) -> dict:
        metrics = evaluate_lm(model, data, cfg.eval_batches, cfg.batch_size, cfg.ctx_len, amp_dtype=amp_dtype)
        logger.log(step, val_loss=metrics["loss"], val_bpb=metrics["bpb"])
        logger.plot()
        return metrics

    first_val = validate(start_step) if start_step == 0 else None
    val = first_val
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.ctx_len
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="train",
               unit="step", mininterval=1, dynamic_ncols=True)
    try:
        for step in bar:
            t0 = time.perf_counter()
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
                x, y = (t.to(device) for t in data.sample("train", cfg.batch_size, cfg.ctx_len, generator))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step + 1}: stopping. Last good checkpoint: "
                        f"{last_good or 'none written yet'} (lower optim.lr or check the data)")
                objective = loss + (l2wrap_penalty(logits) if cfg.l2wrap else 0)
                (objective / cfg.grad_accum).backward()
                loss_sum += loss.item()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            rate = tokens_per_step / (time.perf_counter() - t0)
            train_loss = loss_sum / cfg.grad_accum
            logger.log(done, loss=train_loss, lr=lr, tokens_per_s=rate)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val = validate(done)
                bar.write(f"step {done}: val loss {val['loss']:.4f}, val bits/byte {val['bpb']:.4f}")
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                last_good = ckpt_dir / f"step_{done:07d}"
                _save(last_good, model, optimizer, scheduler, done, cfg, cfg.keep_last)
    finally:
        bar.close()
        logger.close()
    zoo.save_checkpoint(model, out_dir / "model", name=cfg.model)
    return {"first_val": first_val, "final_val": val, "model_dir": str(out_dir / "model"),
            "checkpoint": str(last_good) if last_good else None}
