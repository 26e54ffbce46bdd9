"""Random inputs shared by the CPU and GPU tests of Bi-WKV."""

import torch


def biwkv_inputs(B, T, C, dtype=torch.float32, k_scale=3.0, seed=None):
    """w and u as Vision-RWKV passes them: per-channel parameters divided by T; w of both signs."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    w = torch.randn(C, generator=g) * 4 / T
    u = torch.randn(C, generator=g) * 4 / T
    k = torch.randn(B, T, C, generator=g) * k_scale
    v = torch.randn(B, T, C, generator=g)
    return [x.to(dtype) for x in (w, u, k, v)]
