"""The CUDA WKV kernels of cuda/: built on first use with torch.utils.cpp_extension (cached per GPU
architecture), registered by the libraries as `torch.ops.zoo.*`; fake and autograd rules are added here.

Two extensions, built separately so that each keeps its own build cache: "wkv" (cuda/wkv.cu: RWKV-4's WKV and
Vision-RWKV's Bi-WKV, per channel) and "matrix" (cuda/wkv_matrix.cu: WKV-6, its reversed scan for the bidirectional
form, and WKV-7, per head of N channels with an N x N state; head sizes MATRIX_HEAD_SIZES).
`status()` says whether the kernels serve CUDA tensors and why not. Set ZOO_WKV_REFERENCE=1 to force
the PyTorch reference paths. A failed build logs the compiler's error once; callers then fall back.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["available", "serves", "serves_heads", "status", "SOURCES", "FORCE_REFERENCE_ENV", "KERNEL_DTYPES",
           "MATRIX_HEAD_SIZES"]

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "ZOO_WKV_REFERENCE"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MATRIX_HEAD_SIZES = {torch.float32: (32, 64, 80, 128), torch.bfloat16: (32, 64, 80, 128),
                     torch.float16: (32, 64, 80, 128), torch.float64: (32, 64)}
"""Head sizes N with a matrix-state kernel, per input dtype (cuda/wkv_matrix.cu's dispatch)."""

_CUDA = Path(__file__).resolve().parent.parent / "cuda"


@dataclass
class _Extension:
    module: str                       # torch extension name, the key of its build cache
    source: Path
    ops: str                          # for status()
    register: Callable[[], None]      # fake and autograd rules of its ops
    loaded: bool = False
    error: str | None = None


_lock = threading.Lock()


def _wheel_cuda_includes() -> list[str]:
    """Headers shipped in NVIDIA's CUDA wheels (cusparse.h, ...), for toolkits that lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(p) for root in nvidia.__path__ for p in Path(root).glob("cu*/include")]


def _build(ext: _Extension) -> None:
    from torch.utils import cpp_extension

    if not ext.source.exists():
        raise FileNotFoundError(f"CUDA source not found: {ext.source} (the kernels build from a source checkout)")
    cpp_extension.load(name=ext.module, sources=[str(ext.source)], extra_include_paths=_wheel_cuda_includes(),
                       extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False)
    ext.register()


def _kept_nothing(op: str, flag: str = "keep_den") -> RuntimeError:
    return RuntimeError(f"zoo::{op} ran with {flag}=False, which keeps nothing for a backward")


def _register_wkv_rules() -> None:
    """Fake (meta) implementations, for torch.compile, and autograd rules pairing each forward with its backward."""
    from .wkv import _compute_dtype  # the kernels' arithmetic dtype: float64 for float64 inputs, else float32

    def kept_den(k, keep_den):
        """The denominators a Bi-WKV forward keeps for its backward: (exponent, scaled denominator) pairs for 32-
        and 64-bit inputs, the log for 16-bit ones (kDenWords in cuda/wkv.cu); nothing without keep_den."""
        words = 2 if k.element_size() >= 4 else 1
        return torch.empty((*k.shape, words) if keep_den else (0,), dtype=_compute_dtype(k), device=k.device)

    def kept_states(k, keep_states):
        """The states a causal forward keeps for its backward: (a, b, scale) of the state entering every span of
        kStateSpan tokens (cuda/wkv.cu: 64 // element size, 32 for 16-bit inputs), [3, B, spans, C]."""
        B, T, C = k.shape
        span = 64 // k.element_size()
        shape = (3, B, -(-T // span), C) if keep_states else (0,)
        return torch.empty(shape, dtype=_compute_dtype(k), device=k.device)

    @torch.library.register_fake("zoo::wkv4_forward")
    def _(w, u, k, v, aa, bb, pp, keep_states):
        state = torch.empty(aa.shape, dtype=_compute_dtype(k), device=k.device)
        states = kept_states(k, keep_states)
        return torch.empty_like(k), state, torch.empty_like(state), torch.empty_like(state), states

    @torch.library.register_fake("zoo::wkv4_backward")
    def _(w, u, k, v, aa, bb, pp, pp_out, states, gy, gaa, gbb):
        wu = torch.empty(w.shape, dtype=_compute_dtype(k), device=k.device)
        state = torch.empty(aa.shape, dtype=_compute_dtype(k), device=k.device)
        return (wu, torch.empty_like(wu), torch.empty_like(k), torch.empty_like(v), state, torch.empty_like(state),
                torch.empty_like(state))

    @torch.library.register_fake("zoo::biwkv_forward")
    def _(w, u, k, v, keep_den):
        return torch.empty_like(k), kept_den(k, keep_den)

    @torch.library.register_fake("zoo::biwkv_backward")
    def _(w, u, k, v, y, den, gy):
        wu = torch.empty(w.shape, dtype=_compute_dtype(k), device=k.device)
        return wu, torch.empty_like(wu), torch.empty_like(k), torch.empty_like(v)

    def wkv4_setup(ctx, inputs, output):
        ctx.keep_states = inputs[7]
        ctx.set_materialize_grads(False)  # no zero gradient for the kept states (see biwkv_setup)
        _, _, _, pp_out, states = output
        ctx.save_for_backward(*inputs[:7], pp_out, states)

    def wkv4_backward(ctx, gy, gaa, gbb, _gpp, _gstates):
        """pp is a normalisation (see wkv4_backward in cuda/wkv.cu) and the states are kept by the forward for
        this backward: neither has a gradient of its own."""
        if not ctx.keep_states:
            raise _kept_nothing("wkv4_forward", "keep_states")
        w, u, k, v, aa, bb, pp, pp_out, states = ctx.saved_tensors
        if gy is None and gaa is None and gbb is None:
            return (None,) * 8
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype)
        gaa = torch.zeros_like(aa) if gaa is None else gaa
        gbb = torch.zeros_like(bb) if gbb is None else gbb
        gw, gu, gk, gv, g_aa, g_bb, g_pp = torch.ops.zoo.wkv4_backward(w, u, k, v, aa, bb, pp, pp_out, states,
                                                                       gy, gaa, gbb)
        return (gw.to(w.dtype), gu.to(u.dtype), gk, gv, g_aa.to(aa.dtype), g_bb.to(bb.dtype), g_pp.to(pp.dtype),
                None)

    def biwkv_setup(ctx, inputs, output):
        ctx.keep_den = inputs[4]
        ctx.set_materialize_grads(False)  # no zero gradient for den: a memset as large as two wkv outputs
        ctx.save_for_backward(*inputs[:4], *output)

    def biwkv_backward(ctx, gy, _gden):
        """The denominators are kept by the forward for this backward and have no gradient of their own."""
        if not ctx.keep_den:
            raise _kept_nothing("biwkv_forward")
        w, u, k, v, y, den = ctx.saved_tensors
        if gy is None:
            return None, None, None, None, None
        gw, gu, gk, gv = torch.ops.zoo.biwkv_backward(w, u, k, v, y, den, gy.to(k.dtype))
        return gw.to(w.dtype), gu.to(u.dtype), gk, gv, None

    torch.library.register_autograd("zoo::wkv4_forward", wkv4_backward, setup_context=wkv4_setup)
    torch.library.register_autograd("zoo::biwkv_forward", biwkv_backward, setup_context=biwkv_setup)


def _register_matrix_rules() -> None:
    """Fake implementations and autograd rules of the matrix-state ops (token tensors [B, T, H, N])."""
    from .wkv import _compute_dtype

    def state_like(x):
        B, _, H, N = x.shape
        return torch.empty(B, H, N, N, dtype=_compute_dtype(x), device=x.device)

    @torch.library.register_fake("zoo::wkv6_forward")
    def _(r, k, v, w, u, state, reverse):
        return torch.empty_like(v), state_like(k)

    @torch.library.register_fake("zoo::wkv6_backward")
    def _(r, k, v, w, u, state, state_out, gy, gstate_out, reverse):
        gu = torch.empty(u.shape, dtype=_compute_dtype(k), device=k.device)
        return (torch.empty_like(r), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w), gu,
                state_like(k))

    @torch.library.register_fake("zoo::wkv7_forward")
    def _(r, log_w, k, v, a, b, state, keep_sa):
        sa = torch.empty(k.shape if keep_sa else (0,), dtype=_compute_dtype(k), device=k.device)
        return torch.empty_like(v), state_like(k), sa

    @torch.library.register_fake("zoo::wkv7_backward")
    def _(r, log_w, k, v, a, b, state, state_out, sa, gy, gstate_out):
        return (*(torch.empty_like(x) for x in (r, log_w, k, v, a, b)), state_like(k))

    def wkv6_setup(ctx, inputs, output):
        ctx.reverse = inputs[6]
        ctx.save_for_backward(*inputs[:6], output[1])

    def wkv6_backward(ctx, gy, gstate):
        r, k, v, w, u, state, state_out = ctx.saved_tensors
        gy = torch.zeros_like(v) if gy is None else gy.to(v.dtype)
        gstate = torch.zeros_like(state_out) if gstate is None else gstate
        gr, gk, gv, gw, gu, gs = torch.ops.zoo.wkv6_backward(r, k, v, w, u, state, state_out, gy, gstate, ctx.reverse)
        return gr, gk, gv, gw, gu.to(u.dtype), gs.to(state.dtype), None

    def wkv7_setup(ctx, inputs, output):
        ctx.keep_sa = inputs[7]
        ctx.save_for_backward(*inputs[:7], output[1], output[2])

    def wkv7_backward(ctx, gy, gstate, _gsa):
        """sa (S_{t-1} a_t, kept by the forward for this backward) has no gradient of its own."""
        if not ctx.keep_sa:
            raise _kept_nothing("wkv7_forward", "keep_sa")
        r, log_w, k, v, a, b, state, state_out, sa = ctx.saved_tensors
        gy = torch.zeros_like(v) if gy is None else gy.to(v.dtype)
        gstate = torch.zeros_like(state_out) if gstate is None else gstate
        grads = torch.ops.zoo.wkv7_backward(r, log_w, k, v, a, b, state, state_out, sa, gy, gstate)
        return (*grads[:6], grads[6].to(state.dtype), None)

    torch.library.register_autograd("zoo::wkv6_forward", wkv6_backward, setup_context=wkv6_setup)
    torch.library.register_autograd("zoo::wkv7_forward", wkv7_backward, setup_context=wkv7_setup)


_EXTENSIONS = {
    "wkv": _Extension("zoo_wkv", _CUDA / "wkv.cu", "wkv4_forward/backward, biwkv_forward/backward",
                      _register_wkv_rules),
    "matrix": _Extension("zoo_wkv_matrix", _CUDA / "wkv_matrix.cu", "wkv6_forward/backward, wkv7_forward/backward",
                         _register_matrix_rules),
}
SOURCES = [ext.source for ext in _EXTENSIONS.values()]
"""Every CUDA source (tests/test_cuda_build.py compiles each)."""


def _forced_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


@torch.compiler.assume_constant_result
def available(extension: str = "wkv") -> bool:
    """True when the extension's kernels ("wkv" or "matrix") are built and loaded (building them on the first call).
    torch.compile runs this at trace time and keeps the answer as a constant, so a model compiled before any eager
    call still builds the kernels and traces them (not the PyTorch path)."""
    ext = _EXTENSIONS[extension]
    if _forced_reference() or not torch.cuda.is_available():
        return False
    with _lock:
        if not ext.loaded and ext.error is None:
            try:
                _build(ext)
                ext.loaded = True
            except Exception as e:  # noqa: BLE001 (any build failure means: fall back, and say why once)
                ext.error = f"{type(e).__name__}: {e}"
                log.error("building the CUDA WKV kernels of %s failed; using the PyTorch reference paths.\n%s",
                          ext.source.name, ext.error)
    return ext.loaded


def serves(*tokens: torch.Tensor, extension: str = "wkv") -> bool:
    """True when the extension's kernels take these token tensors: CUDA, one kernel dtype, kernels available."""
    first = tokens[0]
    return (first.is_cuda and first.dtype in KERNEL_DTYPES and all(x.dtype == first.dtype for x in tokens)
            and available(extension))


def keeps_for_backward(*inputs: torch.Tensor) -> bool:
    """Whether a forward op should keep what its backward reads (keep_states, keep_den, keep_sa): autograd will
    differentiate it."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


_refused: set[tuple[str, int, torch.dtype]] = set()


def serves_heads(op: str, head_size: int, *tokens: torch.Tensor) -> bool:
    """`serves` for the matrix-state kernels, which also need a head size they were built for; a head size without
    one is logged once per (op, size, dtype) as the reason for the PyTorch path."""
    if not serves(*tokens, extension="matrix"):
        return False
    dtype = tokens[0].dtype
    if head_size in MATRIX_HEAD_SIZES[dtype]:
        return True
    if (op, head_size, dtype) not in _refused and not torch.compiler.is_compiling():
        _refused.add((op, head_size, dtype))
        log.warning("%s: no CUDA kernel for head size %d in %s (kernels for %s); using the PyTorch path", op,
                    head_size, dtype, ", ".join(map(str, MATRIX_HEAD_SIZES[dtype])))
    return False


def status() -> str:
    """Which WKV path serves CUDA tensors, and why: one line per extension."""
    if _forced_reference():
        return f"PyTorch reference: forced by {FORCE_REFERENCE_ENV}={os.environ[FORCE_REFERENCE_ENV]}"
    if not torch.cuda.is_available():
        return "PyTorch reference: no CUDA device"
    lines = []
    for name, ext in _EXTENSIONS.items():
        if available(name):
            arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
            lines.append(f"CUDA kernels zoo::{{{ext.ops}}} built for {arch} "
                         f"({', '.join(str(d)[6:] for d in KERNEL_DTYPES)})")
        else:
            lines.append(f"PyTorch reference for {ext.source.name}: the kernel build failed "
                         f"({str(ext.error).splitlines()[0]})")
    return "\n".join(lines)
