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

__all__ = ["available", "status", "SOURCES", "FORCE_REFERENCE_ENV", "KERNEL_DTYPES"]

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "ZOO_WKV_REFERENCE"
SOURCES = [Path(__file__).resolve().parent.parent / "cuda" / "wkv4.cu"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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
    from .wkv import _log_path, wkv4_chunked

    @torch.library.register_fake("zoo::wkv4_forward")
    def _(w, u, k, v, aa, bb, pp):
        state = torch.empty(aa.shape, dtype=torch.float32, device=k.device)
        return torch.empty_like(k), state, torch.empty_like(state), torch.empty_like(state)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y, grad_aa, grad_bb, grad_pp):
        """Recomputes the forward with the chunked PyTorch path and differentiates that (no backward kernel yet)."""
        _log_path("torch-chunked recompute (backward of the CUDA forward)", grad_y.device)
        inputs = [x.detach().requires_grad_() for x in ctx.saved_tensors]
        with torch.enable_grad():
            y, state = wkv4_chunked(*inputs[:4], tuple(inputs[4:]))
            return torch.autograd.grad([y, *state], inputs, [grad_y, grad_aa, grad_bb, grad_pp], allow_unused=True)

    torch.library.register_autograd("zoo::wkv4_forward", backward, setup_context=setup_context)


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


def status() -> str:
    """Which WKV path serves CUDA tensors, and why."""
    if _forced_reference():
        return f"PyTorch reference: forced by {FORCE_REFERENCE_ENV}={os.environ[FORCE_REFERENCE_ENV]}"
    if not torch.cuda.is_available():
        return "PyTorch reference: no CUDA device"
    if available():
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
        return (f"CUDA kernel zoo::wkv4_forward built for {arch} ({', '.join(str(d) for d in KERNEL_DTYPES)}; "
                "backward recomputes with the PyTorch chunked path)")
    return f"PyTorch reference: the kernel build failed ({str(_state['error']).splitlines()[0]})"
