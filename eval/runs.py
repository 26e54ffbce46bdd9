"""`zoo eval runs`: training runs side by side, from their run folders (metrics.csv and config.yaml, as every
recipe writes them): one curve per run of a logged metric, coloured by model, and per model the final and best
value, mean and standard deviation over its runs (seeds).

    zoo eval runs runs/austen-rwkv4-s0 runs/austen-rwkv4-s1 runs/austen-gpt-s0 runs/austen-gpt-s1 --metric val_loss
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

__all__ = ["read_run", "compare_runs"]


def read_run(folder: str | Path, metric: str) -> dict:
    """{"dir", "model" (the recipe's model and its model_args), "seed", "curve": [(step, value), ...]} of a run."""
    folder = Path(folder)
    if not (folder / "metrics.csv").exists():
        raise FileNotFoundError(f"{folder} is not a run folder: it has no metrics.csv")
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise ValueError(f"{folder}/metrics.csv has no column {metric!r}; it has {', '.join(rows[0])}")
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
    curve = [(int(r["step"]), float(r[metric])) for r in rows if r.get(metric) not in ("", None)]
    if not curve:
        raise ValueError(f"{folder} logged no {metric} yet")
    model = config.get("model", folder.name)
    if config.get("model_args"):
        model += " (" + ", ".join(f"{k}={v}" for k, v in config["model_args"].items()) + ")"
    return {"dir": str(folder), "model": model, "seed": config.get("seed"), "curve": curve}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def compare_runs(folders: list[str], metric: str = "val_loss", out_json: str | None = None,
                 out_png: str | None = None) -> dict:
    """Each model's final and best `metric` (lowest, or highest for accuracies: names with 'top' or 'acc') over its
    runs; prints a table, writes JSON and a PNG of the curves; returns the summary."""
    runs = [read_run(f, metric) for f in folders]
    higher_is_better = "top" in metric or "acc" in metric
    best = max if higher_is_better else min
    summary = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        summary[model] = {"runs": [r["dir"] for r in mine], "seeds": [r["seed"] for r in mine],
                          "final": _spread([r["curve"][-1][1] for r in mine]),
                          "best": _spread([best(v for _, v in r["curve"]) for r in mine]),
                          "final_step": [r["curve"][-1][0] for r in mine]}
    print(f"{metric}: final and {'highest' if higher_is_better else 'lowest'} logged value, mean +- std over runs")
    width = max(28, *(len(m) for m in summary))
    print(f"{'model':<{width}} {'runs':>4} {'final':>18} {'best':>18}")
    for model, s in summary.items():
        print(f"{model:<{width}} {len(s['runs']):>4} {s['final']['mean']:>10.4f} +- {s['final']['std']:<5.3f} "
              f"{s['best']['mean']:>10.4f} +- {s['best']['std']:<5.3f}")
    if out_json:
        Path(out_json).write_text(json.dumps({"metric": metric, "summary": summary, "runs": runs}, indent=2) + "\n")
    if out_png:
        _plot(runs, metric, Path(out_png))
    return summary


def _plot(runs: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in runs))}
    labelled = set()
    for r in runs:
        label = None if r["model"] in labelled else r["model"]
        labelled.add(r["model"])
        ax.plot(*zip(*r["curve"]), "o-", ms=2.5, lw=1, color=colours[r["model"]], label=label, alpha=0.8)
    ax.set(xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
