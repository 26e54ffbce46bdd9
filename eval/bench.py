"""`zoo bench kernels`: WKV kernels against their anchors, in one process, on one GPU.

Rows: device-to-device copy (the bandwidth ceiling), our kernels, the official RWKV-4 kernel built
from the `kernels/rwkv/` sources of an installed transformers 4.57 (or a folder given with
--official-sources; never copied into this repo), and torch SDPA flash attention (causal) at the
matching size (heads of 64 channels). Times are medians of CUDA-event timings; the byte floor counts
each tensor that must be read or written once (forward: k, v, wkv; backward adds k, v, wkv, d_wkv
read and d_k, d_v written), over the measured copy bandwidth.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from blocks import wkv_cuda
from blocks.wkv import wkv4

__all__ = ["bench_kernels", "time_ms", "official_kernel"]

CAUSAL_SHAPE = (8, 4096, 2048)


def time_ms(fn, warmup: int = 3, reps: int = 10, calls: int = 10) -> float:
    """Median GPU time of one fn() call in milliseconds; `calls` back-to-back calls per sample hide the
    host's launch latency, as in any training loop."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _official_sources(folder: str | None) -> Path | None:
    if folder:
        return Path(folder)
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "kernels" / "rwkv"
    return path if path.is_dir() else None


def official_kernel(sources: Path, max_len: int):
    """The official RWKV-4 kernel, built with the flags transformers uses (it needs a compile-time Tmax)."""
    from torch.utils.cpp_extension import load

    flags = ["-res-usage", "--maxrregcount 60", "--use_fast_math", "-O3", "-Xptxas -O3",
             "--extra-device-vectorization", f"-DTmax={max_len}"]
    files = [str(sources / f) for f in ("wkv_op.cpp", "wkv_cuda.cu", "wkv_cuda_bf16.cu")]
    return load(name=f"wkv_official_{max_len}", sources=files, extra_cuda_cflags=flags, verbose=False)


def _copy_bandwidth() -> float:
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src)) * 1e-3)


def bench_kernels(out_json: str | None = None, official_sources: str | None = None) -> list[dict]:
    """Run every row, print the table, write JSON; returns the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    if not wkv_cuda.available():
        raise RuntimeError(f"our kernels are not available: {wkv_cuda.status()}")
    bandwidth = _copy_bandwidth()
    B, T, C = CAUSAL_SHAPE
    sources = _official_sources(official_sources)
    official = official_kernel(sources, T) if sources else None
    rows: list[dict] = []

    def add(case, impl, ms, floor_bytes):
        rows.append({"case": case, "impl": impl, "ms": ms, "GB/s": floor_bytes / ms / 1e6,
                     "pct_copy_bw": 100 * floor_bytes / (ms * 1e-3) / bandwidth,
                     "floor_ms": floor_bytes / bandwidth * 1e3})

    g = torch.Generator(device="cuda").manual_seed(0)
    decay = torch.randn(C, device="cuda", generator=g)
    w, u = -torch.exp(decay), torch.randn(C, device="cuda", generator=g)

    def heads(x):
        """[B, T, C] -> [B, C/64, T, 64], SDPA's layout."""
        return x.view(B, T, C // 64, 64).transpose(1, 2)

    for dtype, backward in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        case = f"causal {'fwd+bwd' if backward else 'fwd'} {str(dtype)[6:]} B{B} T{T} C{C}"
        k, v = (torch.randn(B, T, C, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        gy = torch.randn_like(k)
        floor = (9 if backward else 3) * k.numel() * k.element_size()
        if backward:
            kg, vg, wg, ug = (x.detach().requires_grad_() for x in (k, v, w, u))
            add(case, "ours (backward: PyTorch recompute)", time_ms(   # ~0.7 s a call: few samples
                lambda: torch.autograd.grad(wkv4(wg, ug, kg, vg)[0], (wg, ug, kg, vg), gy), warmup=1, reps=3, calls=1),
                floor)
        else:
            add(case, "ours", time_ms(lambda: wkv4(w, u, k, v)), floor)
        if official is not None:
            y = torch.empty_like(k)
            u_in = u.to(dtype)
            forward = official.forward_bf16 if dtype == torch.bfloat16 else official.forward
            if backward:
                gw, gu = (torch.empty(B, C, device="cuda", dtype=dtype) for _ in range(2))
                gk, gv = torch.empty_like(k), torch.empty_like(k)
                backward_fn = official.backward_bf16 if dtype == torch.bfloat16 else official.backward

                def official_fwd_bwd():
                    forward(w, u_in, k, v, y)
                    backward_fn(w, u_in, k, v, y, gy, gw, gu, gk, gv)

                add(case, "official (transformers 4.57 kernels/rwkv)", time_ms(official_fwd_bwd), floor)
            else:
                add(case, "official (transformers 4.57 kernels/rwkv)", time_ms(lambda: forward(w, u_in, k, v, y)), floor)
        q, kk, vv = (heads(torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, generator=g)) for _ in range(3))
        if backward:
            q, kk, vv = (x.requires_grad_() for x in (q, kk, vv))
            go = torch.randn_like(q)
            add(case, "torch SDPA causal (bf16)", time_ms(
                lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, kk, vv, is_causal=True), (q, kk, vv),
                                            go)), floor)
        else:
            add(case, "torch SDPA causal (bf16)", time_ms(
                lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)), floor)
        del k, v, gy, q, kk, vv
        torch.cuda.empty_cache()

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"official kernel: {sources if official is not None else 'not found (install the oracles extra)'}")
    print(f"{'case':<40} {'impl':<42} {'ms':>7} {'floor':>7} {'GB/s':>7} {'%copy':>6} {'t/t_ours':>8}")
    for row in rows:
        ours = next(r for r in rows if r["case"] == row["case"] and r["impl"].startswith("ours"))
        row["ours_speedup"] = row["ms"] / ours["ms"]
        print(f"{row['case']:<40} {row['impl']:<42} {row['ms']:>7.3f} {row['floor_ms']:>7.3f} {row['GB/s']:>7.0f} "
              f"{row['pct_copy_bw']:>5.0f}% {row['ours_speedup']:>7.2f}x")
    if out_json:
        Path(out_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "copy_bandwidth": bandwidth, "rows": rows}, indent=2) + "\n")
    return rows
