"""`zoo bench kernels`: WKV kernels against their anchors, in one process, on one GPU.

Rows: device-to-device copy (the bandwidth ceiling), our kernels (causal WKV-4 and Bi-WKV), the official
RWKV-4 kernel built from the `kernels/rwkv/` sources of an installed transformers 4.57 (or a folder given
with --official-sources; never copied into this repo), and torch SDPA flash attention at the matching
size (bf16, heads of 64 channels; causal for the causal cases, full for Bi-WKV). Times are medians of
CUDA-event timings; the byte floor counts each tensor that must be read or written once (forward: k, v,
wkv; backward adds k, v, wkv, d_wkv read and d_k, d_v written), over the measured copy bandwidth.

The matrix-state rows (WKV-6, bidirectional WKV-6, WKV-7 at B=8 T=4096 C=2048, heads of 64, bf16) put ours beside
flash-linear-attention's Triton chunk_rwkv6 / chunk_rwkv7 when `fla` is importable (an optional extra), at the same
math: fla gets the log decays (-exp(d) for WKV-6, log_w for WKV-7) and scale 1; its floor counts the token tensors
(r, k, v, w, and a, b for WKV-7) and y once each, and for fwd+bwd their gradients and d_y as well.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from blocks import wkv_cuda
from blocks.biwkv import biwkv
from blocks.biwkv6 import biwkv6
from blocks.wkv import wkv4
from blocks.wkv6 import wkv6
from blocks.wkv7 import wkv7

__all__ = ["bench_kernels", "time_ms", "official_kernel", "CASES", "MATRIX_CASES"]


@dataclass(frozen=True)
class Case:
    op: str  # "causal" or "bi"
    dtype: torch.dtype
    backward: bool
    shape: tuple[int, int, int]

    @property
    def name(self) -> str:
        B, T, C = self.shape
        return f"{self.op} {'fwd+bwd' if self.backward else 'fwd'} {str(self.dtype)[6:]} B{B} T{T} C{C}"


CASES = (Case("causal", torch.float32, False, (8, 4096, 2048)), Case("causal", torch.bfloat16, False, (8, 4096, 2048)),
         Case("causal", torch.bfloat16, True, (8, 4096, 2048)), Case("bi", torch.float32, False, (1, 16384, 768)),
         Case("bi", torch.bfloat16, True, (4, 16384, 768)))
"""The sizes of issue 3's targets."""

MATRIX_CASES = tuple((op, backward) for op in ("wkv6", "wkv7", "biwkv6") for backward in (False, True))
MATRIX_SHAPE, MATRIX_HEAD = (8, 4096, 2048), 64
"""Issue 9's target size: B=8 T=4096 C=2048, heads of 64, bf16."""


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


def _fwd_bwd(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of its output against grad_out, as one callable."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)


def bench_kernels(out_json: str | None = None, official_sources: str | None = None) -> list[dict]:
    """Run every row, print the table, write JSON; returns the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    if not (wkv_cuda.available() and wkv_cuda.available("matrix")):
        raise RuntimeError(f"our kernels are not available: {wkv_cuda.status()}")
    bandwidth = _copy_bandwidth()
    sources = _official_sources(official_sources)
    official_len = max(case.shape[1] for case in CASES if case.op == "causal")
    official = official_kernel(sources, official_len) if sources else None
    rows: list[dict] = []
    g = torch.Generator(device="cuda").manual_seed(0)

    def add_row(name, floor, impl, fn):
        ms = time_ms(fn)
        rows.append({"case": name, "impl": impl, "ms": ms, "GB/s": floor / ms / 1e6,
                     "pct_copy_bw": 100 * floor / (ms * 1e-3) / bandwidth, "floor_ms": floor / bandwidth * 1e3})

    for case in CASES:
        B, T, C = case.shape
        floor = (9 if case.backward else 3) * B * T * C * case.dtype.itemsize

        def add(impl, fn):
            add_row(case.name, floor, impl, fn)

        k, v = (torch.randn(B, T, C, device="cuda", dtype=case.dtype, generator=g) for _ in range(2))
        if case.op == "causal":
            w, u = -torch.exp(torch.randn(C, device="cuda", generator=g)), torch.randn(C, device="cuda", generator=g)
            ours = lambda *x: wkv4(*x)[0]  # noqa: E731
        else:
            w, u = (torch.randn(C, device="cuda", generator=g) * 4 / T for _ in range(2))
            ours = biwkv
        gy = torch.randn_like(k)
        add("ours", _fwd_bwd(ours, (w, u, k, v), gy) if case.backward else partial(ours, w, u, k, v))
        if case.op == "causal" and official is not None:
            add("official (transformers 4.57 kernels/rwkv)", _official_call(official, case, w, u, k, v, gy))
        q, kk, vv = (heads(torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, generator=g)) for _ in range(3))
        sdpa = lambda *x: F.scaled_dot_product_attention(*x, is_causal=case.op == "causal")  # noqa: E731
        add(f"torch SDPA {'causal' if case.op == 'causal' else 'full'} (bf16)",
            _fwd_bwd(sdpa, (q, kk, vv), torch.randn_like(q)) if case.backward else partial(sdpa, q, kk, vv))
        del k, v, gy, q, kk, vv
        torch.cuda.empty_cache()

    fla = _matrix_rows(add_row, g)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"official kernel: {sources if official is not None else 'not found (install the oracles extra)'}")
    print(f"fla (flash-linear-attention): {fla}")
    print(f"{'case':<40} {'impl':<42} {'ms':>7} {'floor':>7} {'GB/s':>7} {'%copy':>6} {'t/t_ours':>8}")
    for row in rows:
        ours_ms = next(r["ms"] for r in rows if r["case"] == row["case"] and r["impl"] == "ours")
        row["ours_speedup"] = row["ms"] / ours_ms
        print(f"{row['case']:<40} {row['impl']:<42} {row['ms']:>7.3f} {row['floor_ms']:>7.3f} {row['GB/s']:>7.0f} "
              f"{row['pct_copy_bw']:>5.0f}% {row['ours_speedup']:>7.2f}x")
    if out_json:
        Path(out_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "copy_bandwidth": bandwidth, "rows": rows}, indent=2) + "\n")
    return rows


def _fla_ops():
    """fla's chunk_rwkv6 and chunk_rwkv7, and a line saying which fla (or why none)."""
    try:
        import fla
        from fla.ops.rwkv6 import chunk_rwkv6
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        return None, None, f"not installed ({e})"
    return chunk_rwkv6, chunk_rwkv7, f"fla {getattr(fla, '__version__', '?')}"


def _matrix_rows(add_row, g: torch.Generator) -> str:
    """The matrix-state rows, ours and fla's; returns the line saying which fla ran."""
    chunk_rwkv6, chunk_rwkv7, fla = _fla_ops()
    B, T, C = MATRIX_SHAPE
    H, N = C // MATRIX_HEAD, MATRIX_HEAD
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    for op in dict.fromkeys(op for op, _ in MATRIX_CASES):
        if op == "wkv7":
            kk = F.normalize(randn(B, T, H, N), dim=-1)
            log_w = -0.6065 * torch.sigmoid(randn(B, T, H, N))  # RWKV-7's range: w >= exp(-e^{-1/2})
            ours_in = [x.to(dt) for x in (randn(B, T, H, N), log_w, randn(B, T, H, N), randn(B, T, H, N), -kk,
                                          kk * torch.rand(B, T, H, N, device="cuda", generator=g))]
            fla_in = ours_in
            ours = lambda *x: wkv7(*x)[0]  # noqa: E731
            anchors = [("fla chunk_rwkv7", lambda *x: chunk_rwkv7(*x, scale=1.0)[0]),
                       ("fla chunk_rwkv7 lower_bound=-0.61", lambda *x: chunk_rwkv7(*x, scale=1.0,
                                                                                    lower_bound=-0.6065)[0])]
        else:
            r, k, v, d = (randn(B, T, C).to(dt) for _ in range(4))
            u = randn(H, N) * 0.5
            ours_in = [r, k, v, d, u]
            fla_in = [*(x.view(B, T, H, N) for x in (r, k, v)), -torch.exp(d.float()).to(dt).view(B, T, H, N),
                      u.to(dt)]
            ours = (lambda *x: wkv6(*x)[0]) if op == "wkv6" else biwkv6
            anchors = [("fla chunk_rwkv6", lambda *x: chunk_rwkv6(*x, scale=1.0)[0])] if op == "wkv6" else []
        tensors = 6 if op == "wkv7" else 4
        gy = randn(B, T, C).to(dt)
        for impl, fn, inputs in [("ours", ours, ours_in)] + [(a, f, fla_in) for a, f in anchors if chunk_rwkv6]:
            for backward in (False, True):
                name = f"{op} {'fwd+bwd' if backward else 'fwd'} bf16 B{B} T{T} C{C} N{N}"
                floor = ((3 * tensors + 2) if backward else (tensors + 1)) * B * T * C * dt.itemsize
                add_row(name, floor, impl, _fwd_bwd(fn, inputs, gy.view_as(inputs[0])) if backward
                        else partial(fn, *inputs))
    return fla


def heads(x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, C/64, T, 64], SDPA's layout."""
    B, T, C = x.shape
    return x.view(B, T, C // 64, 64).transpose(1, 2)


def _official_call(official, case: Case, w, u, k, v, gy):
    """The official kernel's forward (and backward) on the case's tensors; it takes u in k's dtype."""
    bf16 = case.dtype == torch.bfloat16
    forward = official.forward_bf16 if bf16 else official.forward
    y, u_in = torch.empty_like(k), u.to(case.dtype)
    if not case.backward:
        return lambda: forward(w, u_in, k, v, y)
    backward = official.backward_bf16 if bf16 else official.backward
    B, _, C = case.shape
    gw, gu = (torch.empty(B, C, device="cuda", dtype=case.dtype) for _ in range(2))
    gk, gv = torch.empty_like(k), torch.empty_like(k)

    def fwd_bwd():
        forward(w, u_in, k, v, y)
        backward(w, u_in, k, v, y, gy, gw, gu, gk, gv)

    return fwd_bwd
