"""The CUDA WKV kernels of cuda/: built on first use with torch.utils.cpp_extension (cached per GPU
architecture), registered by the library as `torch.ops.zoo.*`; fake and autograd rules are added here.

`status()` says whether the kernels serve CUDA tensors and why not. Set ZOO_WKV_REFERENCE=1 to force
the PyTorch reference paths. A failed build logs the compiler's error once; callers then fall back.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

__all__ = ["available", "serves", "status", "SOURCES", "FORCE_REFERENCE_ENV", "KERNEL_DTYPES"]

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "ZOO_WKV_REFERENCE"
SOURCES = [Path(__file__).resolve().parent.parent / "cuda" / "wkv.cu"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None}


def _wheel_cuda_includes() -> list[str]:
    """Headers shipped in NVIDIA's CUDA wheels (cusparse.h, ...), for toolkits that lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(p) for root in nvidia.__path__ for p in Path(root).glob("cu*/include")]


def _build() -> None:
    from torch.utils import cpp_extension

    missing = [str(s) for s in SOURCES if not s.exists()]
    if missing:
        raise FileNotFoundError(f"CUDA sources not found: {missing} (the kernels build from a source checkout)")
    cpp_extension.load(name="zoo_wkv", sources=[str(s) for s in SOURCES], extra_include_paths=_wheel_cuda_includes(),
                       extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False)
    _register_python_rules()


def _register_python_rules() -> None:
    """Fake (meta) implementations, for torch.compile, and autograd rules pairing each forward with its backward."""
    from .wkv import _compute_dtype  # the kernels' arithmetic dtype: float64 for float64 inputs, else float32

    @torch.library.register_fake("zoo::wkv4_forward")
    def _(w, u, k, v, aa, bb, pp):
        state = torch.empty(aa.shape, dtype=_compute_dtype(k), device=k.device)
        return torch.empty_like(k), state, torch.empty_like(state), torch.empty_like(state)

    @torch.library.register_fake("zoo::wkv4_backward")
    def _(w, u, k, v, aa, bb, pp, pp_out, gy, gaa, gbb):
        wu = torch.empty(w.shape, dtype=_compute_dtype(k), device=k.device)
        state = torch.empty(aa.shape, dtype=_compute_dtype(k), device=k.device)
        return (wu, torch.empty_like(wu), torch.empty_like(k), torch.empty_like(v), state, torch.empty_like(state),
                torch.empty_like(state))

    @torch.library.register_fake("zoo::biwkv_forward")
    def _(w, u, k, v, keep_den):
        words = 2 if k.element_size() >= 4 else 1  # (exponent, scaled denominator) pairs, or the log (cuda/wkv.cu)
        den_shape = (*k.shape, words) if keep_den else (0,)
        return torch.empty_like(k), torch.empty(den_shape, dtype=_compute_dtype(k), device=k.device)

    @torch.library.register_fake("zoo::biwkv_backward")
    def _(w, u, k, v, y, den, gy):
        wu = torch.empty(w.shape, dtype=_compute_dtype(k), device=k.device)
        return wu, torch.empty_like(wu), torch.empty_like(k), torch.empty_like(v)

    def wkv4_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[3])

    def wkv4_backward(ctx, gy, gaa, gbb, gpp):
        """gpp is not used: pp is a normalisation (see wkv4_backward in cuda/wkv.cu)."""
        w, u, k, v, aa, bb, pp, pp_out = ctx.saved_tensors
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype)
        gaa = torch.zeros_like(aa) if gaa is None else gaa
        gbb = torch.zeros_like(bb) if gbb is None else gbb
        gw, gu, gk, gv, g_aa, g_bb, g_pp = torch.ops.zoo.wkv4_backward(w, u, k, v, aa, bb, pp, pp_out, gy, gaa, gbb)
        return (gw.to(w.dtype), gu.to(u.dtype), gk, gv, g_aa.to(aa.dtype), g_bb.to(bb.dtype), g_pp.to(pp.dtype))

    def biwkv_setup(ctx, inputs, output):
        ctx.keep_den = inputs[4]
        ctx.set_materialize_grads(False)  # no zero gradient for den: a memset as large as two wkv outputs
        ctx.save_for_backward(*inputs[:4], *output)

    def biwkv_backward(ctx, gy, _gden):
        """The denominators are kept by the forward for this backward and have no gradient of their own."""
        if not ctx.keep_den:
            raise RuntimeError("zoo::biwkv_forward ran with keep_den=False, which keeps nothing for a backward")
        w, u, k, v, y, den = ctx.saved_tensors
        if gy is None:
            return None, None, None, None, None
        gw, gu, gk, gv = torch.ops.zoo.biwkv_backward(w, u, k, v, y, den, gy.to(k.dtype))
        return gw.to(w.dtype), gu.to(u.dtype), gk, gv, None

    torch.library.register_autograd("zoo::wkv4_forward", wkv4_backward, setup_context=wkv4_setup)
    torch.library.register_autograd("zoo::biwkv_forward", biwkv_backward, setup_context=biwkv_setup)


def _forced_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def available() -> bool:
    """True when the CUDA kernels are built and loaded (building them on the first call)."""
    if torch.compiler.is_compiling():  # decided before tracing; the check below is not traceable
        return bool(_state["loaded"])
    if _forced_reference() or not torch.cuda.is_available():
        return False
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            try:
                _build()
                _state["loaded"] = True
            except Exception as e:  # noqa: BLE001 (any build failure means: fall back, and say why once)
                _state["error"] = f"{type(e).__name__}: {e}"
                log.error("building the CUDA WKV kernels failed; using the PyTorch reference paths.\n%s",
                          _state["error"])
    return bool(_state["loaded"])


def serves(*tokens: torch.Tensor) -> bool:
    """True when the kernels take these [B, T, C] tensors: CUDA, one kernel dtype, kernels available."""
    first = tokens[0]
    return (first.is_cuda and first.dtype in KERNEL_DTYPES and all(x.dtype == first.dtype for x in tokens)
            and available())


def status() -> str:
    """Which WKV path serves CUDA tensors, and why."""
    if _forced_reference():
        return f"PyTorch reference: forced by {FORCE_REFERENCE_ENV}={os.environ[FORCE_REFERENCE_ENV]}"
    if not torch.cuda.is_available():
        return "PyTorch reference: no CUDA device"
    if available():
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
        ops = "wkv4_forward/backward, biwkv_forward/backward"
        return f"CUDA kernels zoo::{{{ops}}} built for {arch} ({', '.join(str(d)[6:] for d in KERNEL_DTYPES)})"
    return f"PyTorch reference: the kernel build failed ({str(_state['error']).splitlines()[0]})"
