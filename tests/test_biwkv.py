"""Bi-WKV (Vision-RWKV) on the CPU: the parallel form, the two-scan RNN form and the formula term by term."""

import importlib

import pytest
import torch

from blocks.biwkv import biwkv, biwkv_parallel, biwkv_recurrent, biwkv_reference
from wkv_inputs import biwkv_inputs


def term_by_term(w, u, k, v):
    """The formula with plain exponentials, one output at a time, in float64 (small inputs only)."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    B, T, C = k.shape
    out = torch.empty(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(T):
            if i != t:
                weight = torch.exp(-(abs(t - i) - 1) * w + k[:, i])
                num, den = num + weight * v[:, i], den + weight
        out[:, t] = num / den
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 2, 3), (2, 13, 5)])
def test_parallel_and_recurrent_forms_match_the_formula(B, T, C):
    w, u, k, v = biwkv_inputs(B, T, C, k_scale=1.0, dtype=torch.float64)
    expected = term_by_term(w, u, k, v)
    assert rel_err(biwkv_reference(w, u, k, v), expected) <= 1e-12
    assert rel_err(biwkv_recurrent(w, u, k, v), expected) <= 1e-12


def test_parallel_form_blocks_query_rows(monkeypatch):
    module = importlib.import_module("blocks.biwkv")  # the package's `biwkv` attribute is the function
    w, u, k, v = biwkv_inputs(2, 40, 3, dtype=torch.float64)
    whole = biwkv_parallel(w, u, k, v)
    monkeypatch.setattr(module, "PARALLEL_BLOCK_ELEMENTS", 2 * 40 * 3 * 7)  # 7 rows a block, 6 blocks
    assert rel_err(biwkv_parallel(w, u, k, v), whole) <= 1e-15


def test_fp32_path_matches_reference_with_extreme_inputs():
    """|k| up to 60 and |w| T up to 50 (both signs): finite, and as close as fp32 allows."""
    B, T, C = 2, 300, 16
    g = torch.Generator().manual_seed(1)
    w = torch.linspace(-50, 50, C) / T
    u = torch.linspace(-20, 20, C) / T
    k = torch.rand(B, T, C, generator=g) * 120 - 60
    v = torch.randn(B, T, C, generator=g)
    y = biwkv(w, u, k, v)
    assert torch.isfinite(y).all()
    assert rel_err(y, biwkv_recurrent(w, u, k, v)) <= 1e-5


def test_half_inputs_return_their_dtype():
    w, u, k, v = biwkv_inputs(2, 30, 4, k_scale=1.0)
    y = biwkv(w, u, k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y, biwkv_reference(w, u, k, v)) <= 1e-2


def test_gradcheck():
    w, u, k, v = (x.requires_grad_() for x in biwkv_inputs(2, 9, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(biwkv, (w, u, k, v))


def test_bad_input_is_named():
    w, u, k, v = biwkv_inputs(1, 4, 3)
    with pytest.raises(ValueError, match=r"biwkv: w and u must be \[C=3\]"):
        biwkv(w[:2], u, k, v)
    with pytest.raises(ValueError, match="biwkv: k and v must both be"):
        biwkv(w, u, k, v[:, :2])
