"""Multi-query associative recall (MQAR; Arora et al., "Zoology", arXiv 2312.04927): how well a language model
recalls values bound to keys earlier in its context, the recall gap between recurrent models and attention.

A sequence of `seq_len` tokens holds `pairs` key-value pairs (k_1 v_1 ... k_n v_n, keys distinct), then, at
random places in the rest of the sequence, every key again followed by its value; elsewhere the filler token 0.
The model is scored on the queries only: at each repeated key it must predict that key's value. Keys are drawn
from [1, vocab / 2), values from [vocab / 2, vocab). Batches are generated on the fly from a seeded generator.
`zoo eval mqar` trains a registered language model from scratch on the task (or evaluates a checkpoint) and
reports query accuracy on fresh sequences.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["MQARTask", "mqar_batch", "query_accuracy", "train_step", "train_mqar", "build_model", "mqar"]

IGNORE = -100   # cross_entropy's ignore_index: positions that are not queries


@dataclass(frozen=True)
class MQARTask:
    seq_len: int = 256
    pairs: int = 16
    vocab: int = 8192

    def __post_init__(self):
        if self.pairs < 1 or self.vocab < 4:
            raise ValueError(f"MQAR needs pairs >= 1 and vocab >= 4, got pairs={self.pairs}, vocab={self.vocab}")
        if 4 * self.pairs > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} cannot hold {self.pairs} pairs and their {self.pairs} queries "
                             f"(4 x pairs = {4 * self.pairs} tokens)")
        if self.pairs > self.vocab // 2 - 1:
            raise ValueError(f"{self.pairs} distinct keys need vocab >= {2 * (self.pairs + 1)}, got {self.vocab}")


def mqar_batch(task: MQARTask, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs [B, seq_len], targets [B, seq_len]): targets hold the value at each query key, IGNORE elsewhere."""
    n, length = task.pairs, task.seq_len
    keys = torch.rand(batch_size, task.vocab // 2 - 1, generator=generator).argsort(1)[:, :n] + 1
    values = torch.randint(task.vocab // 2, task.vocab, (batch_size, n), generator=generator)
    inputs = torch.zeros(batch_size, length, dtype=torch.long)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
    # the queries take n of the (length - 2n) // 2 two-token slots after the context, in random order
    slots = torch.rand(batch_size, (length - 2 * n) // 2, generator=generator).argsort(1)[:, :n]
    starts = 2 * n + 2 * slots
    order = torch.rand(batch_size, n, generator=generator).argsort(1)
    query_keys, query_values = keys.gather(1, order), values.gather(1, order)
    inputs.scatter_(1, starts, query_keys)
    inputs.scatter_(1, starts + 1, query_values)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, starts, query_values)
    return inputs, targets


@torch.no_grad()
def query_accuracy(model: nn.Module, task: MQARTask, batches: int, batch_size: int, generator: torch.Generator,
                   device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
    """Share of queries whose value is the model's top prediction, over `batches` fresh batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for _ in range(batches):
        inputs, targets = (t.to(device) for t in mqar_batch(task, batch_size, generator))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            predicted = model(inputs).argmax(-1)
        queried = targets != IGNORE
        correct += (predicted[queried] == targets[queried]).sum().item()
        total += queried.sum().item()
    model.train(was_training)
    return correct / total


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor,
               amp_dtype: torch.dtype | None) -> Tensor:
    """One optimizer step on the queries' cross-entropy (autocast to amp_dtype, gradient norm clipped to 1)."""
    with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_mqar(model: nn.Module, task: MQARTask, steps: int, batch_size: int = 64, lr: float = 1e-3,
               weight_decay: float = 0.1, eval_batches: int = 16, seed: int = 0,
               device: torch.device | str = "cpu", eval_every: int = 0) -> dict:
    """Train on fresh batches (AdamW, linear warm-up over the first 10% of steps, then cosine to 0; cross-entropy on
    the queries only), then measure query accuracy on sequences the training never drew (another seed stream).
    With eval_every > 0, the accuracy on the same held-out sequences is also taken every eval_every steps (the
    learning curve, `curve`)."""
    device = torch.device(device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    train_stream = torch.Generator().manual_seed(seed)
    def held_out_accuracy() -> float:
        held_out = torch.Generator().manual_seed(seed + 1_000_003)
        return query_accuracy(model, task, eval_batches, batch_size, held_out, device, amp_dtype)

    loss, curve, evaluating = None, [], 0.0
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"MQAR T={task.seq_len} pairs={task.pairs}", unit="step", mininterval=1)
    for step in bar:
        inputs, targets = (t.to(device) for t in mqar_batch(task, batch_size, train_stream))
        loss = train_step(model, optimizer, inputs, targets, amp_dtype)
        schedule.step()
        if step % 50 == 1:    # reading the loss waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if eval_every and step % eval_every == 0 and step < steps:
            tick = time.perf_counter()
            curve.append({"step": step, "accuracy": held_out_accuracy()})
            evaluating += time.perf_counter() - tick
    final_loss = loss.item() if loss is not None else None
    seconds = time.perf_counter() - start - evaluating
    accuracy = held_out_accuracy()
    if eval_every:
        curve.append({"step": steps, "accuracy": accuracy})
    return {"accuracy": accuracy, "final_loss": final_loss, "steps": steps, "curve": curve,
            "train_tokens_per_s": steps * batch_size * task.seq_len / seconds if steps else None,
            "seq_len": task.seq_len, "pairs": task.pairs, "vocab": task.vocab, "seed": seed}


def build_model(model_name: str, task: MQARTask, model_args: dict) -> nn.Module:
    """A registered language model built for the task's vocabulary and length, with config overrides."""
    import zoo
    from zoo.registry import get_entry

    if get_entry(model_name).family != "language":
        raise ValueError(f"{model_name} is not a language model")
    try:
        return zoo.create_model(model_name, **{"vocab_size": task.vocab, "ctx_len": task.seq_len, **model_args})
    except TypeError as e:    # an unknown config field, named with its closest match
        raise ValueError(str(e)) from None


def mqar(model_name: str | None, checkpoint: str | None, task: MQARTask, steps: int, batch_size: int, lr: float,
         seed: int, device: str, model_args: dict, out_json: str | None) -> dict:
    """`zoo eval mqar`: a registered language model built for the task's vocabulary and length (with model_args)
    and trained from scratch, or a checkpoint evaluated (and trained further if steps > 0); prints and writes
    the result."""
    import zoo
    from recipes.distributed import init_ranks

    from .common import report

    torch.manual_seed(seed)
    model = zoo.load_checkpoint(checkpoint) if checkpoint else build_model(model_name, task, model_args)
    if model.config.vocab_size < task.vocab:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the task's "
                         f"({task.vocab})")
    result = train_mqar(model, task, steps, batch_size, lr, seed=seed, device=init_ranks(device, "ddp").device)
    params = sum(p.numel() for p in model.parameters())
    return report({"model": model_name or checkpoint, "params": params, **result}, out_json)
