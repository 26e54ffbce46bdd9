"""`zoo bench vision`: Vision-RWKV against timm's DeiT at growing resolution, in one process on one GPU.

Per model and resolution: images/s and peak memory for inference (bf16 autocast, no grad) and for a training
step (bf16 autocast forward, backward, AdamW step). DeiT runs timm's attention, which is torch SDPA (flash /
memory-efficient kernels). The batch shrinks with resolution (224: 128, 512: 32, 1024: 4, 2048: 1) and is the
same for every model; a configuration that does not fit is recorded as out of memory.

Each model also runs in the torch.compile modes asked for ("none" is eager; "reduce-overhead" adds CUDA graphs,
which take the host's launches out of the step: Vision-RWKV's many small kernels make its eager step bound by them).
The zoo's models also train under the grad-checkpointing modes asked for ("full": each block recomputed in the
backward; "selective": only the elementwise work between products and kernels, blocks.checkpointing); DeiT, the
anchor, trains without. Ratios compare each Vision-RWKV with its DeiT in the same compile mode, and with DeiT eager
where that ran too.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from recipes.config import COMPILE_MODES as RECIPE_COMPILE_MODES

from .bench import time_ms

__all__ = ["bench_vision", "MODELS", "BATCH", "COMPILE_MODES", "CHECKPOINTING"]

MODELS = ("vrwkv_tiny", "deit_tiny_patch16_224", "vrwkv_small", "deit_small_patch16_224")
BATCH = {224: 128, 512: 32, 1024: 4, 2048: 1}
ANCHORS = {"vrwkv_tiny": "deit_tiny_patch16_224", "vrwkv_small": "deit_small_patch16_224"}
COMPILE_MODES = ("none", *RECIPE_COMPILE_MODES)
CHECKPOINTING = {"none": False, "full": True, "selective": "selective"}   # name -> set_grad_checkpointing's argument


def _measure(name: str, resolution: int, batch: int, train: bool, compile: str = "none",
             grad_checkpointing: str = "none") -> dict:
    """images/s (eval.bench.time_ms after warm-up) and the peak memory from model creation on, compilation and
    CUDA-graph pools included."""
    import timm

    torch.compiler.reset()  # a fresh compile per model, instead of one that hits dynamo's recompile limit
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = timm.create_model(name, img_size=resolution).cuda()
    if not train:
        model.eval()
    if grad_checkpointing != "none":
        model.set_grad_checkpointing(CHECKPOINTING[grad_checkpointing])
    forward = model if compile == "none" else torch.compile(model, mode=compile)
    x = torch.randn(batch, 3, resolution, resolution, device="cuda")
    if train:
        target = torch.randint(0, 1000, (batch,), device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(forward(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        @torch.no_grad()
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                forward(x)
    try:
        ms = time_ms(step, warmup=3, reps=5, calls=3)
    except torch.cuda.OutOfMemoryError:
        return {"images_per_s": None, "peak_gb": None, "note": "out of memory"}
    return {"images_per_s": batch / (ms / 1e3), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def _add_ratios(rows: list[dict]) -> None:
    """Each Vision-RWKV row against its DeiT at the same resolution and mode (training or inference): in the same
    compile mode (speed_vs_deit, memory_vs_deit) and, for compiled rows, against DeiT eager (speed_vs_deit_eager)."""
    def anchor(row, compile):
        return next((r for r in rows if r["model"] == ANCHORS.get(row["model"]) and r["compile"] == compile
                     and r["grad_checkpointing"] == "none"
                     and r["resolution"] == row["resolution"] and r["mode"] == row["mode"] and r["images_per_s"]),
                    None)

    for row in rows:
        if not row["images_per_s"]:
            continue
        same, eager = anchor(row, row["compile"]), anchor(row, "none")
        if same:
            row["speed_vs_deit"] = row["images_per_s"] / same["images_per_s"]
            row["memory_vs_deit"] = row["peak_gb"] / same["peak_gb"]
        if eager and row["compile"] != "none":
            row["speed_vs_deit_eager"] = row["images_per_s"] / eager["images_per_s"]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = dict.fromkeys((r["model"], r["compile"], r["grad_checkpointing"]) for r in rows)
    sizes = sorted({(r["resolution"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2 + 0.25 * len(lines)))
    panels = [("inference", "images_per_s"), ("training", "images_per_s"), ("training", "peak_gb")]
    for ax, (mode, metric) in zip(axes, panels):
        for color, (name, compile, checkpointing) in enumerate(lines):
            pts = [(r["resolution"], r[metric]) for r in rows if r[metric] and r["mode"] == mode
                   and (r["model"], r["compile"], r["grad_checkpointing"]) == (name, compile, checkpointing)]
            if pts:
                label = ", ".join([name] + [f"compile {compile}"] * (compile != "none")
                                  + [f"{checkpointing} checkpointing"] * (checkpointing != "none"))
                ax.plot(*zip(*pts), "o-" if name.startswith("vrwkv") else "s--", color=f"C{color}", label=label)
    for ax, mode in zip(axes[:2], ("inference", "training")):
        ax.set(yscale="log", ylabel="images / s", title=f"{mode} (bf16 autocast)")
    axes[2].set(ylabel="peak GiB", title="training step memory")
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([r for r, _ in sizes], [f"{r}\n(batch {b})" for r, b in sizes])
        ax.set_xlim(sizes[0][0] / 1.4, sizes[-1][0] * 1.4)
        ax.set_xlabel("image size (px)")
        ax.grid(alpha=0.3)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * ((len(legend) + 1) // 2) + 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_vision(out_json: str | None = "bench_vision.json", out_png: str | None = "bench_vision.png",
                 models: tuple[str, ...] = MODELS, resolutions: tuple[int, ...] = tuple(BATCH),
                 compile: tuple[str, ...] = ("none",), grad_checkpointing: tuple[str, ...] = ("none",)) -> list[dict]:
    """Every model x resolution x mode x compile mode, and the zoo's models' training x grad_checkpointing mode;
    prints a table with each Vision-RWKV's ratios to its DeiT, writes JSON and a PNG plot; returns the rows."""
    import timm

    import zoo  # registers the vrwkv models in timm

    known = timm.list_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        close = [difflib.get_close_matches(m, known, n=3) for m in unknown]
        raise ValueError(f"unknown models {unknown}; close: {close}")
    if not set(resolutions) <= set(BATCH):
        raise ValueError(f"resolutions must be among {list(BATCH)} (each has its batch), got {list(resolutions)}")
    for what, asked, allowed in (("compile", compile, COMPILE_MODES),
                                 ("grad checkpointing", grad_checkpointing, tuple(CHECKPOINTING))):
        if bad := [m for m in asked if m not in allowed]:
            raise ValueError(f"{what} modes must be among {allowed}, got {bad}")
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")

    _measure(models[0], 224, BATCH[224], train=True)  # warm-up: a process's first measurement runs low
    rows = []
    ours = set(zoo.list_models())
    configs = [(res, mode, c, name, g) for res in resolutions for mode in ("inference", "training") for c in compile
               for name in models
               for g in (grad_checkpointing if mode == "training" and name in ours else ("none",))]
    for res, mode, c, name, g in tqdm(configs, desc="bench vision", unit="config"):
        rows.append({"model": name, "resolution": res, "batch": BATCH[res], "mode": mode, "compile": c,
                     "grad_checkpointing": g, **_measure(name, res, BATCH[res], mode == "training", c, g)})
    _add_ratios(rows)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast")
    print(f"{'model':<24} {'px':>5} {'batch':>5} {'mode':<10} {'compile':<16} {'checkpoint':<10} {'img/s':>10} "
          f"{'peak GiB':>9} {'x DeiT img/s':>12} {'x DeiT mem':>10} {'x DeiT eager':>12}")
    for row in rows:
        speed = f"{row['images_per_s']:10.1f}" if row["images_per_s"] else f"{row.get('note', ''):>10}"
        peak = f"{row['peak_gb']:9.2f}" if row["peak_gb"] else f"{'':>9}"
        ratio = f"{row['speed_vs_deit']:11.2f}x {row['memory_vs_deit']:9.2f}x" if "speed_vs_deit" in row else ""
        eager = f" {row['speed_vs_deit_eager']:11.2f}x" if "speed_vs_deit_eager" in row else ""
        print(f"{row['model']:<24} {row['resolution']:>5} {row['batch']:>5} {row['mode']:<10} {row['compile']:<16} "
              f"{row['grad_checkpointing']:<10} {speed} {peak} {ratio}{eager}")
    if out_json:
        Path(out_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=2) + "\n")
    if out_png:
        _plot(rows, Path(out_png))
    return rows
