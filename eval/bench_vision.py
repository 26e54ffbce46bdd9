"""`zoo bench vision`: Vision-RWKV against timm's DeiT at growing resolution, in one process on one GPU.

Per model and resolution: images/s and peak memory for inference (bf16 autocast, no grad) and for a training
step (bf16 autocast forward, backward, AdamW step). DeiT runs timm's attention, which is torch SDPA (flash /
memory-efficient kernels). The batch shrinks with resolution (224: 128, 512: 32, 1024: 4, 2048: 1) and is the
same for every model; a configuration that does not fit is recorded as out of memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import time_ms

__all__ = ["bench_vision", "MODELS", "BATCH"]

MODELS = ("vrwkv_tiny", "deit_tiny_patch16_224", "vrwkv_small", "deit_small_patch16_224")
BATCH = {224: 128, 512: 32, 1024: 4, 2048: 1}
ANCHORS = {"vrwkv_tiny": "deit_tiny_patch16_224", "vrwkv_small": "deit_small_patch16_224"}


def _measure(name: str, resolution: int, batch: int, train: bool) -> dict:
    import timm

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = timm.create_model(name, img_size=resolution).cuda()
    x = torch.randn(batch, 3, resolution, resolution, device="cuda")
    if train:
        target = torch.randint(0, 1000, (batch,), device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
    try:
        ms = time_ms(step, warmup=3, reps=5, calls=3)
    except torch.cuda.OutOfMemoryError:
        return {"images_per_s": None, "peak_gb": None, "note": "out of memory"}
    return {"images_per_s": batch / (ms / 1e3), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, ax in zip(("inference", "training"), axes[:2]):
        for name in MODELS:
            pts = [(r["resolution"], r["images_per_s"]) for r in rows
                   if r["model"] == name and r["mode"] == mode and r["images_per_s"]]
            ax.plot(*zip(*pts), "o-" if name.startswith("vrwkv") else "s--", label=name)
        ax.set(yscale="log", ylabel="images / s", title=f"{mode} (bf16 autocast)")
    for name in MODELS:
        pts = [(r["resolution"], r["peak_gb"]) for r in rows if r["model"] == name and r["mode"] == "training"
               and r["peak_gb"]]
        axes[2].plot(*zip(*pts), "o-" if name.startswith("vrwkv") else "s--", label=name)
    axes[2].set(ylabel="peak GiB", title="training step memory")
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(BATCH), [f"{r}\n(batch {b})" for r, b in BATCH.items()])
        ax.set_xlabel("image size (px)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_vision(out_json: str | None = "bench_vision.json", out_png: str | None = "bench_vision.png") -> list[dict]:
    """Every model x resolution x mode; prints a table with each Vision-RWKV's ratios to its DeiT, writes JSON and
    a PNG plot; returns the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    import zoo  # noqa: F401  (registers the vrwkv models in timm)

    _measure(MODELS[0], 224, BATCH[224], train=True)  # warm-up: a process's first measurement runs low
    rows = [{"model": name, "resolution": res, "batch": batch, "mode": mode,
             **_measure(name, res, batch, mode == "training")}
            for res, batch in BATCH.items() for mode in ("inference", "training") for name in MODELS]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast")
    print(f"{'model':<24} {'px':>5} {'batch':>5} {'mode':<10} {'img/s':>10} {'peak GiB':>9} {'x DeiT img/s':>12} "
          f"{'x DeiT mem':>10}")
    for row in rows:
        anchor = next((r for r in rows if r["model"] == ANCHORS.get(row["model"]) and r["resolution"] ==
                       row["resolution"] and r["mode"] == row["mode"]), None)
        if anchor and row["images_per_s"] and anchor["images_per_s"]:
            row["speed_vs_deit"] = row["images_per_s"] / anchor["images_per_s"]
            row["memory_vs_deit"] = row["peak_gb"] / anchor["peak_gb"]
        speed = f"{row['images_per_s']:10.1f}" if row["images_per_s"] else f"{row.get('note', ''):>10}"
        peak = f"{row['peak_gb']:9.2f}" if row["peak_gb"] else f"{'':>9}"
        ratio = f"{row['speed_vs_deit']:11.2f}x {row['memory_vs_deit']:9.2f}x" if "speed_vs_deit" in row else ""
        print(f"{row['model']:<24} {row['resolution']:>5} {row['batch']:>5} {row['mode']:<10} {speed} {peak} {ratio}")
    if out_json:
        Path(out_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=2) + "\n")
    if out_png:
        _plot(rows, Path(out_png))
    return rows
