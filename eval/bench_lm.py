"""`zoo bench lm`: RWKV-4 against the matched GPT baseline (and the `rwkv` package), in one process on one GPU.

Parts (all on random weights of the registered shapes; speed does not depend on the values):
  - train:   training tokens/s and peak memory at T = 1024, 4096, 16384 (bf16 autocast, AdamW; the same tokens per
             step at every T; GPT attends through torch SDPA's flash kernel, RWKV through cuda/wkv.cu);
  - decode:  per-token latency and memory while generating after a context of 1k .. 64k tokens, batch 1, fp16
             (zoo.decode: RWKV's constant RNN state against GPT's growing KV cache; both steps in CUDA graphs);
             a step is the whole streaming loop: step, greedy pick, the token back on the host;
  - batched: generation throughput (new tokens/s over the batch) after a 512-token prompt;
  - rnn:     RWKV-4 at batch 1 against the `rwkv` package (strategy "cuda fp16", its CUDA kernel on) on the same
             fp16 weights: ms/token in RNN mode and a 1024-token prefill through the parallel kernel (repeated, and
             the first one, which captures graphs and compiles), eager, in CUDA graphs, and compiled (torch.compile)
             in CUDA graphs; ours also streamed (zoo.decode's `stream`: the pick stays on the GPU, the host reads
             the ids one step behind; the package and the other parts take each id back before the next step);
             the largest logit differences (prefill vs RNN mode; ours vs package).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .bench import time_ms

__all__ = ["bench_lm", "PARTS", "train_throughput", "decode_latency", "batched_throughput", "rnn_vs_package"]

PARTS = ("train", "decode", "batched", "rnn")
TRAIN_LENGTHS = (1024, 4096, 16384)
TRAIN_TOKENS = 16384          # per step, at every length
CONTEXTS = (1024, 4096, 16384, 65536)
BATCHES = (1, 8, 32, 128)
PROMPT = 512
PACKAGE_TIMEOUT_S = 300       # the rwkv package's run, its CUDA kernel build included


def build(arch: str, size: str, dtype: torch.dtype = torch.float32, ctx_len: int | None = None, seed: int = 0):
    """A registered language model on the GPU with every weight drawn at random (the official RWKV-4 init zeroes
    some projections, which would make logit comparisons trivial). GPT's ctx_len is raised to fit `ctx_len`."""
    import zoo

    torch.manual_seed(seed)
    overrides = {"ctx_len": ctx_len} if arch == "gpt" and ctx_len else {}
    model = zoo.create_model(f"{arch}-{size}", device="cuda", **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5 if "emb" not in name and "wte" not in name else 1.0)
    return model.to(dtype)


def _release() -> None:
    """Free what earlier measurements left (models and decoders in reference cycles hold CUDA memory until the
    collector runs), so that each measurement's memory is its own."""
    gc.collect()
    torch.cuda.empty_cache()


def _synced_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms, with the GPU synchronised around each call (for loops that sync anyway)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_throughput(arch: str, size: str, seq_len: int, tokens: int = TRAIN_TOKENS) -> dict:
    """One training step (bf16 autocast forward, backward, AdamW) on tokens // seq_len sequences."""
    _release()
    model = build(arch, size, ctx_len=seq_len)
    batch = max(1, tokens // seq_len)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_ms(step, warmup=2, reps=5, calls=2)
    except torch.cuda.OutOfMemoryError:
        return {"batch": batch, "tokens_per_s": None, "note": "out of memory"}
    return {"batch": batch, "ms_per_step": ms, "tokens_per_s": batch * seq_len / (ms / 1e3),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _greedy_loop(decoder, first: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` tokens the way a streaming generator takes them: step, argmax, the ids back on the host."""
    token = first
    for _ in range(steps):
        token = decoder.step(token).argmax(-1).cpu()
    return token


def _streamed_loop(decoder, logits: torch.Tensor, steps: int) -> None:
    """`steps` tokens through decoder.stream: the greedy pick on the GPU feeds the next step there, and the ids reach
    the host one step behind (steps + 1 picks: the first comes from `logits`, as _greedy_loop's `first` does)."""
    for _ in decoder.stream(logits, steps + 1):
        pass


def decode_latency(arch: str, size: str, context: int, steps: int = 64, reps: int = 3) -> dict:
    """ms per generated token at batch 1 after a random `context`-token prompt, and the memory held while
    decoding (weights + state or cache) and at its peak."""
    from zoo.decode import make_decoder

    _release()
    capacity = context + 1 + steps * (reps + 1) + 3  # + the warm-up and capture runs of the graph
    model = build(arch, size, torch.float16, ctx_len=capacity)
    decoder = make_decoder(model, 1, capacity=capacity)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    first = decoder.prefill(prompt).argmax(-1).cpu()
    _greedy_loop(decoder, first, steps)                      # capture and warm-up
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    ms = _synced_ms(lambda: _greedy_loop(decoder, first, steps), reps) / steps
    return {"context": context, "ms_per_token": ms, "path": decoder.path, "held_gib": held / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def batched_throughput(arch: str, size: str, batch: int, prompt: int = PROMPT, steps: int = 64) -> dict:
    """New tokens per second over the batch, greedy, after a random `prompt`-token prompt per row."""
    from zoo.decode import make_decoder

    _release()
    capacity = prompt + 1 + 2 * steps + 3
    model = build(arch, size, torch.float16, ctx_len=capacity)
    try:
        decoder = make_decoder(model, batch, capacity=capacity)
        first = decoder.prefill(torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda"))
        first = first.argmax(-1).cpu()
        _greedy_loop(decoder, first, steps)
        ms = _synced_ms(lambda: _greedy_loop(decoder, first, steps), 1)
    except torch.cuda.OutOfMemoryError:
        return {"batch": batch, "tokens_per_s": None, "note": "out of memory"}
    return {"batch": batch, "tokens_per_s": batch * steps / (ms / 1e3), "ms_per_step": ms / steps}


_PACKAGE_SCRIPT = """
import json, os, statistics, sys, time, torch
from rwkv.model import RWKV
model = RWKV(sys.argv[1], "cuda fp16")
tokens = torch.load(sys.argv[2], weights_only=True).tolist()
def timed(fn, reps):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)
for _ in range(2):
    logits, state = model.forward(tokens, None)
prefill_ms = timed(lambda: model.forward(tokens, None), 5)
logits, state = model.forward(tokens, None)
first = logits.float().cpu()
def loop(n=64):
    global state
    token = int(logits.argmax())
    for _ in range(n):
        out, state = model.forward([token], state)
        token = int(out.argmax())
loop(8)
ms = timed(loop, 3) / 64
torch.save(first, sys.argv[3])
print(json.dumps({"prefill_ms": prefill_ms, "ms_per_token": ms, "cuda_on": os.environ.get("RWKV_CUDA_ON")}))
"""


def _build_locks_hint() -> str:
    """torch's extension builds wait, silently and forever, on a `lock` file that a killed build left behind."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()   # as torch's builds choose it
    locks = sorted(str(p) for p in Path(root).glob("**/lock"))
    return f"; build locks present (left by a killed build? delete them): {', '.join(locks)}" if locks else ""


def _package_run(model, tokens: torch.Tensor) -> dict:
    """The `rwkv` package on this model's weights (exported as an official .pth) in a subprocess: it reads its
    RWKV_* switches at import and builds its own CUDA kernel."""
    import zoo

    with tempfile.TemporaryDirectory() as folder:
        pth = Path(folder) / "model.pth"
        zoo.export_official(model, pth, dtype=torch.float16)
        torch.save(tokens.cpu(), Path(folder) / "tokens.pt")
        env = {**os.environ, "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "1"}
        try:
            run = subprocess.run([sys.executable, "-c", _PACKAGE_SCRIPT, str(pth.with_suffix("")),
                                  str(Path(folder) / "tokens.pt"), str(Path(folder) / "logits.pt")],
                                 env=env, capture_output=True, text=True, timeout=PACKAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return {"error": f"no result within {PACKAGE_TIMEOUT_S} s; its last words: {err.strip()[-300:]!r}"
                             + _build_locks_hint()}
        if run.returncode != 0:
            return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result["logits"] = torch.load(Path(folder) / "logits.pt", weights_only=True)
        return result


def rnn_vs_package(size: str = "169m", prompt: int = 1024, steps: int = 64, package: bool = True) -> list[dict]:
    """RWKV-4 at batch 1, fp16: our decoders (eager, CUDA graph, torch.compile + CUDA graph) and the package."""
    from zoo.decode import RNNDecoder

    _release()
    model = build("rwkv4", size, torch.float16).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    rows = []
    reference = None
    variants = {"eager": (False, False), "cuda-graph": (True, False), "compile+cuda-graph": (True, True)}
    for variant, (graph, compile) in variants.items():
        decoder = RNNDecoder(model, 1, cuda_graph=graph, compile=compile, graph_prefill=graph)
        first_prefill_ms = _synced_ms(lambda: decoder.prefill(tokens), 1)   # with capture and compilation
        decoder.reset()
        prefill_logits = decoder.prefill(tokens).float()
        first = prefill_logits.argmax(-1).cpu()
        _greedy_loop(decoder, first, 8)
        ms = _synced_ms(lambda: _greedy_loop(decoder, first, steps), 3) / steps
        streamed_ms = _synced_ms(lambda: _streamed_loop(decoder, prefill_logits, steps), 3) / steps
        prefill_ms = time_ms(lambda: (decoder.reset(), decoder.prefill(tokens)), warmup=2, reps=5, calls=1)
        decoder.reset()                 # RNN mode over the prompt against the parallel prefill
        for t in range(prompt):
            rnn_logits = decoder.step(tokens[0, t:t + 1].cpu()).float()
        row = {"impl": f"ours ({variant})", "ms_per_token": ms, "streamed_ms_per_token": streamed_ms,
               "prefill_ms": prefill_ms, "first_prefill_ms": first_prefill_ms,
               "rnn_vs_prefill_max_abs": (rnn_logits - prefill_logits).abs().max().item()}
        reference = prefill_logits if reference is None else reference
        rows.append(row)
        print(f"  rnn: {row['impl']}: {ms:.3f} ms/token ({streamed_ms:.3f} streamed), {prompt}-token prefill "
              f"{prefill_ms:.2f} ms", flush=True)
    if package:
        print("  rnn: the rwkv package (builds its kernel first) ...", flush=True)
        result = _package_run(model, tokens[0])
        if "error" in result:
            rows.append({"impl": "rwkv package (cuda fp16)", "note": result["error"]})
        else:
            diff = (result.pop("logits").cuda() - reference[0]).abs().max().item()
            rows.append({"impl": "rwkv package (cuda fp16)", **result, "package_vs_ours_max_abs": diff})
    return rows


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train", "seq_len", "tokens_per_s", "training tokens/s (bf16 autocast)", "sequence length"),
              ("decode", "context", "ms_per_token", "ms per generated token (batch 1, fp16)", "context tokens"),
              ("decode", "context", "peak_gib", "peak GiB while decoding (batch 1)", "context tokens"),
              ("batched", "batch", "tokens_per_s", f"generation tokens/s after {PROMPT} tokens", "batch")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (part, x, y, title, xlabel) in zip(axes, panels):
        rows = [r for r in result.get(part, []) if r.get(y)]
        for key in sorted({(r["arch"], r["size"]) for r in rows}):
            pts = sorted((r[x], r[y]) for r in rows if (r["arch"], r["size"]) == key)
            ax.plot(*zip(*pts), "o-" if key[0] == "rwkv4" else "s--", label=f"{key[0]}-{key[1]}")
        ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(part: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n[{part}]")
    print("  ".join(f"{c:>14}" for c in columns))
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        print("  ".join(f"{c:>14.4g}" if isinstance(c, float) else f"{str(c):>14}" for c in cells))


_COLUMNS = {"train": ["arch", "size", "seq_len", "batch", "tokens_per_s", "peak_gib", "rwkv_over_gpt"],
            "decode": ["arch", "size", "context", "ms_per_token", "held_gib", "peak_gib", "rwkv_over_gpt"],
            "batched": ["arch", "size", "batch", "tokens_per_s", "ms_per_step", "rwkv_over_gpt"],
            "rnn": ["impl", "ms_per_token", "streamed_ms_per_token", "prefill_ms", "first_prefill_ms",
                    "rnn_vs_prefill_max_abs", "package_vs_ours_max_abs"]}


def _add_ratios(rows: list[dict], key: str, metric: str) -> None:
    """rwkv_over_gpt on each RWKV row: its metric over GPT's at the same size and `key`."""
    for row in rows:
        anchor = next((r for r in rows if r["arch"] == "gpt" and r["size"] == row["size"] and r[key] == row[key]),
                      None)
        if row["arch"] == "rwkv4" and anchor and row.get(metric) and anchor.get(metric):
            row["rwkv_over_gpt"] = row[metric] / anchor[metric]


def bench_lm(out_json: str | None = "bench_lm.json", out_png: str | None = "bench_lm.png",
             sizes: tuple[str, ...] = ("169m", "430m"), parts: tuple[str, ...] = PARTS, package: bool = True) -> dict:
    """Run the chosen parts for rwkv4 and gpt at each size (progress bars; each part's table and the JSON so far as
    soon as the part is done); print tables with RWKV/GPT ratios, write JSON and PNG."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    from blocks import wkv_cuda

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "wkv": wkv_cuda.status()}
    print(f"{result['device']}, torch {result['torch']}; WKV: {result['wkv']}")
    grid = [(arch, size) for size in sizes for arch in ("rwkv4", "gpt")]
    # per part: the measurement, the values it runs at (the row's `key`), and the metric RWKV/GPT ratios compare
    measures = {"train": (train_throughput, TRAIN_LENGTHS, "seq_len", "tokens_per_s"),
                "decode": (decode_latency, CONTEXTS, "context", "ms_per_token"),
                "batched": (batched_throughput, BATCHES, "batch", "tokens_per_s")}
    for part in (p for p in PARTS if p in parts):   # each part's table (and the JSON so far) as soon as it is done
        if part == "rnn":
            result["rnn"] = rnn_vs_package(sizes[0], package=package)
        else:
            measure, values, key, metric = measures[part]
            runs = tqdm([(a, s, x) for a, s in grid for x in values], desc=f"bench lm: {part}", unit="run")
            result[part] = [{"arch": a, "size": s, key: x, **measure(a, s, x)} for a, s, x in runs]
            _add_ratios(result[part], key, metric)
        _print_table(part, result[part], _COLUMNS[part])
        if out_json:
            Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    if out_png:
        _plot(result, Path(out_png))
    return result
