"""`zoo bench mqar`: recall of language models of equal size trained for equal steps on MQAR (issue 7's claim).

Every model x task x learning rate x seed is trained from scratch by eval.mqar.train_mqar (same batches for every
model at a given seed, same optimizer and schedule) and scored on held-out sequences; as in Zoology, a model's
result on a task is its best learning rate's mean accuracy over the seeds. Per model and task, throughput is
measured once on a fixed batch: a training step (bf16 autocast forward, backward, AdamW) and an inference forward.
The table gives each model's accuracy and its throughput as a ratio to the first model's; rows go to JSON as they
come (a run cut short keeps what it finished) and a PNG plot is drawn at the end.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .mqar import MQARTask, build_model, mqar_batch, train_mqar, train_step

__all__ = ["parse_tasks", "bench_mqar"]


def parse_tasks(spec: str, vocab: int) -> list[MQARTask]:
    """'256:32,1024:64' -> MQAR tasks of (seq_len, pairs) with the given vocabulary."""
    tasks = []
    for item in spec.split(","):
        try:
            seq_len, pairs = (int(n) for n in item.split(":"))
        except ValueError:
            raise ValueError(f"task {item!r}: give SEQ_LEN:PAIRS, e.g. 256:32") from None
        tasks.append(MQARTask(seq_len, pairs, vocab))
    return tasks


def _seconds_per_call(fn, device: torch.device, warmup: int = 3, calls: int = 10) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def throughput(model: torch.nn.Module, task: MQARTask, batch_size: int, device: torch.device) -> dict:
    """Tokens/s of a training step and of an inference forward on one fixed batch (bf16 autocast on CUDA)."""
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    inputs, targets = (t.to(device) for t in mqar_batch(task, batch_size, torch.Generator().manual_seed(0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)    # lr 0: times the step, leaves the weights

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(inputs)

    tokens = batch_size * task.seq_len
    model.train()
    train = tokens / _seconds_per_call(lambda: train_step(model, optimizer, inputs, targets, amp_dtype), device)
    model.eval()
    infer = tokens / _seconds_per_call(forward, device)
    model.train()
    return {"train_step_tokens_per_s": train, "inference_tokens_per_s": infer}


def _summary(rows: list[dict], models: list[str], tasks: list[MQARTask]) -> list[dict]:
    summary = []
    for task in tasks:
        anchor = None
        for name in models:
            runs = [r for r in rows if r["model"] == name and r["seq_len"] == task.seq_len and r["pairs"] == task.pairs]
            if not runs:
                continue
            lrs = sorted({r["lr"] for r in runs})
            by_lr = {lr: statistics.mean(r["accuracy"] for r in runs if r["lr"] == lr) for lr in lrs}
            best_lr = max(by_lr, key=by_lr.get)
            best = [r for r in runs if r["lr"] == best_lr]
            accs = [r["accuracy"] for r in best]
            entry = {"model": name, "seq_len": task.seq_len, "pairs": task.pairs, "params": runs[0]["params"],
                     "best_lr": best_lr, "mean_accuracy_by_lr": by_lr, "seeds": [r["seed"] for r in best],
                     "accuracies": accs, "mean_accuracy": by_lr[best_lr],
                     "train_step_tokens_per_s": runs[0]["train_step_tokens_per_s"],
                     "inference_tokens_per_s": runs[0]["inference_tokens_per_s"]}
            anchor = anchor or entry
            for key in ("train_step_tokens_per_s", "inference_tokens_per_s"):
                entry[key.replace("tokens_per_s", "vs_" + anchor["model"])] = entry[key] / anchor[key]
            summary.append(entry)
    return summary


def _plot(rows: list[dict], summary: list[dict], models: list[str], tasks: list[MQARTask], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [row for row in rows if row["curve"]]
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(18 if curves else 12, 4.2))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        for j, task in enumerate(tasks):
            entry = next((e for e in summary if e["model"] == name and e["seq_len"] == task.seq_len
                          and e["pairs"] == task.pairs), None)
            if entry is None:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            axes[0].bar(x, entry["mean_accuracy"], width, color=f"C{i}", label=name if j == 0 else None)
            axes[0].plot([x] * len(entry["accuracies"]), entry["accuracies"], "k.", ms=4)
            for k, key in enumerate(("train_step_tokens_per_s", "inference_tokens_per_s")):
                axes[1].bar(2 * j + k + (i - (len(models) - 1) / 2) * width, entry[key], width, color=f"C{i}",
                            label=name if j == k == 0 else None)
    labels = [f"T={t.seq_len}, {t.pairs} pairs" for t in tasks]
    axes[0].set_xticks(range(len(tasks)), labels)
    axes[0].set(ylabel="query accuracy (held-out)", ylim=(0, 1.02),
                title="MQAR recall at the best lr (bars: mean, dots: seeds)")
    axes[1].set_xticks(range(2 * len(tasks)), [f"{lab}\n{mode}" for lab in labels for mode in ("train", "inference")])
    axes[1].set(ylabel="tokens / s", yscale="log", title="throughput")
    lrs = sorted({row["lr"] for row in curves})
    for row in curves:    # learning curves: colour = model, line style = learning rate, one panel for all tasks
        label = f"{row['model']}, lr {row['lr']:g}" + (f", {len(tasks)} tasks" if len(tasks) > 1 else "")
        first = row["seed"] == curves[0]["seed"] and row["seq_len"] == curves[0]["seq_len"]
        axes[2].plot([c["step"] for c in row["curve"]], [c["accuracy"] for c in row["curve"]],
                     color=f"C{models.index(row['model'])}", ls=("-", "--", ":", "-.")[lrs.index(row["lr"]) % 4],
                     lw=1, label=label if first else None)
    if curves:
        axes[2].set(xlabel="training step", ylabel="query accuracy (held-out)", ylim=(0, 1.02),
                    title="learning curves (one line per seed and task)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_mqar(models: list[str], tasks: list[MQARTask], seeds: list[int], steps: int, batch_size: int,
               lrs: list[float],
               model_args: dict, device: torch.device, out_json: str | None = "bench_mqar.json",
               out_png: str | None = "bench_mqar.png", eval_every: int = 0) -> list[dict]:
    """Train and score every model x task x learning rate x seed; print the table (best lr per model and task,
    throughput ratios to models[0]); write JSON and a PNG plot; returns the per-task summary."""
    for name in models:    # an unknown or non-language model fails before any training
        build_model(name, tasks[0], model_args)
    rows: list[dict] = []
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": steps, "batch_size": batch_size, "lrs": lrs,
              "eval_every": eval_every, "model_args": model_args}

    def save(summary=None):
        if out_json:
            Path(out_json).write_text(json.dumps({**header, "runs": rows, "summary": summary}, indent=2) + "\n")

    for task in tasks:
        for name in models:
            speed = None
            for lr in lrs:
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = build_model(name, task, model_args)
                    result = train_mqar(model, task, steps, batch_size, lr, seed=seed, device=device,
                                        eval_every=eval_every)
                    speed = speed or throughput(model, task, batch_size, device)
                    rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "lr": lr,
                                 **result, **speed})
                    print(f"{name} T={task.seq_len} pairs={task.pairs} lr={lr:g} seed={seed}: accuracy "
                          f"{result['accuracy']:.4f}", flush=True)
                    save()
    summary = _summary(rows, models, tasks)
    save(summary)
    anchor = models[0]
    print(f"\n{header['device']}, torch {torch.__version__}, {steps} steps of {batch_size}, lrs {lrs}, seeds {seeds}")
    print(f"{'model':<14} {'T':>5} {'pairs':>5} {'params':>9} {'best lr':>8} {'accuracy (mean; seeds)':<34} "
          f"{'train tok/s':>12} {'x ' + anchor:>12} {'infer tok/s':>12} {'x ' + anchor:>12}")
    for e in summary:
        accs = f"{e['mean_accuracy']:.3f}; " + " ".join(f"{a:.3f}" for a in e["accuracies"])
        print(f"{e['model']:<14} {e['seq_len']:>5} {e['pairs']:>5} {e['params']:>9,} {e['best_lr']:>8g} {accs:<34} "
              f"{e['train_step_tokens_per_s']:>12.4g} {e['train_step_vs_' + anchor]:>11.2f}x "
              f"{e['inference_tokens_per_s']:>12.4g} {e['inference_vs_' + anchor]:>11.2f}x")
    if out_png:
        _plot(rows, summary, models, tasks, Path(out_png))
    return summary
