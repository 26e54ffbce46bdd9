"""Input checks shared by the language models: clear errors instead of failures inside kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def _capturing(idx: Tensor) -> bool:
    """True while a CUDA graph is being captured: reading values would synchronise, which capture forbids (a graph's
    owner checks its inputs before each replay instead)."""
    return idx.is_cuda and torch.cuda.is_current_stream_capturing()


def check_tokens(idx: Tensor, vocab_size: int, device: torch.device) -> None:
    """idx must be an integer tensor [B, T] with T >= 1, on `device`, with ids in [0, vocab_size)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of shape [B, T], got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token ids must be an integer tensor (torch.long), got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"token ids must have shape [B, T] with T >= 1, got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"token ids are on {idx.device} but the model is on {device}")
    if idx.numel() and not torch.compiler.is_compiling() and not _capturing(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size}")
