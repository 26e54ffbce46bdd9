"""Bidirectional WKV-6 (Vision-RWKV-6, RWKV-CLIP): the two-scan op against the defining O(T^2) sum in float64."""

import pytest
import torch

from blocks.biwkv6 import biwkv6, biwkv6_reference


def inputs(B, T, H, N, dtype=torch.float64, seed=0, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H * N, generator=g, dtype=torch.float64) for _ in range(3))
    w = decay_scale * (torch.rand(B, T, H * N, generator=g, dtype=torch.float64) * 7 - 6)   # w from 0.9975 to 0.07
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (r, k, v, w, u)]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_reference_is_the_definition_written_out():
    r, k, v, w, u = inputs(1, 4, 1, 2)
    decay = torch.exp(-torch.exp(w[0]))                       # [T, N]
    y = torch.zeros(4, 2, dtype=torch.float64)
    for t in range(4):
        for s in range(4):
            weight = u[0] if s == t else torch.prod(decay[min(s, t) + 1:max(s, t)], 0)
            y[t] += (r[0, t] * weight * k[0, s]).sum() * v[0, s]
    assert torch.allclose(biwkv6_reference(r, k, v, w, u)[0], y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 7, 33, 130])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_two_scans_equal_the_sum(T, dtype, tol):
    r, k, v, w, u = inputs(2, T, 3, 4, dtype=dtype, seed=T)
    expected = biwkv6_reference(r, k, v, w, u)
    y = biwkv6(r, k, v, w, u)
    assert y.dtype == dtype and rel_err(y, expected) < tol


def test_extreme_decays_stay_finite_and_exact():
    r, k, v, w, u = inputs(1, 50, 2, 4, seed=5)
    w = torch.where(torch.rand_like(w) < 0.5, torch.full_like(w, -20.0), torch.full_like(w, 4.0))  # w ~ 1 and w ~ 0
    y = biwkv6(r.float(), k.float(), v.float(), w.float(), u.float())
    assert torch.isfinite(y).all() and rel_err(y, biwkv6_reference(r, k, v, w, u)) < 1e-5


def test_every_token_reads_both_directions():
    """A change at one position reaches tokens before and after it (the causal WKV-6 would reach only after)."""
    r, k, v, w, u = inputs(1, 9, 1, 4, seed=2)
    v2 = v.clone()
    v2[:, 4] += 1.0
    changed = (biwkv6(r, k, v2, w, u) - biwkv6(r, k, v, w, u)).abs().amax(-1)[0]
    assert (changed[:4] > 0).all() and (changed[5:] > 0).all()


def test_gradients_pass_gradcheck():
    r, k, v, w, u = (x.requires_grad_() for x in inputs(1, 5, 2, 2, seed=3))
    assert torch.autograd.gradcheck(biwkv6, (r, k, v, w, u))
