"""The matrix-state CUDA kernels (WKV-6 causal and reversed, bidirectional WKV-6, WKV-7; forward and backward, state in
and out) against float64 references, on fresh random inputs with poisoned outputs (GPU only)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from blocks import wkv_cuda
from blocks.biwkv6 import biwkv6, biwkv6_reference
from blocks.wkv5 import wkv5
from blocks.wkv6 import wkv6, wkv6_reference
from blocks.wkv7 import wkv7, wkv7_reference
from test_wkv_cuda import poison_allocator, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert wkv_cuda.available("matrix"), wkv_cuda.status()


def generator(seed=None):
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed())


def wkv6_inputs(B, T, H, N, dtype=torch.float32, decay=(-6.0, 2.0), seed=None):
    """r, k, v, decay logits d (w = exp(-exp(d)) from about 0.9975 to 6e-4 by default) [B, T, H*N], u [H, N] and a
    state [B, H, N, N] of the size a few hundred tokens leave."""
    g = generator(seed)
    r, k, v = (torch.randn(B, T, H * N, generator=g) for _ in range(3))
    d = decay[0] + (decay[1] - decay[0]) * torch.rand(B, T, H * N, generator=g)
    u = torch.randn(H, N, generator=g) * 0.5
    s0 = torch.randn(B, H, N, N, generator=g) * 3
    return [x.to(dtype) for x in (r, k, v, d)] + [u, s0]


def wkv7_inputs(B, T, H, N, dtype=torch.float32, log_w=(-0.6065, -1e-4), seed=None):
    """RWKV-7's inputs [B, T, H, N]: log decays in RWKV-7's range by default (w >= 0.545), a = -kk, b = kk * iclr with
    kk unit keys per head, and a state [B, H, N, N]."""
    g = generator(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    lw = log_w[0] + (log_w[1] - log_w[0]) * torch.rand(B, T, H, N, generator=g)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    return [x.to(dtype) for x in (r, lw, k, v, a, b)] + [s0]


def grads(fn, inputs, gy, gs, device, dtype=None):
    """Gradients of sum(y * gy) + sum(state * gs) with respect to every input (state included)."""
    leaves = [x.detach().to(device, dtype or x.dtype).requires_grad_() for x in inputs]
    poison_allocator()
    y, state = fn(*leaves)
    ((y * gy.to(device, y.dtype)).sum() + (state * gs.to(device, state.dtype)).sum()).backward()
    return [x.grad for x in leaves]


def assert_grads(ours, ref, names, tol, tols=None):
    """Each gradient's error over the largest reference gradient of the call (sums such as dw cancel far below
    their terms, where an fp32 error of the terms' size is all one can ask); `tols` overrides `tol` by name."""
    scale = max(b.abs().max() for b in ref).item()
    for name, a, b in zip(names, ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b, floor=scale) <= (tols or {}).get(name, tol), (name, rel_err(a, b, floor=scale))


# ------------------------------------------------------------------------------------------------- WKV-6

@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 64), (2, 3, 2, 32), (1, 257, 3, 64), (2, 100, 2, 80), (1, 50, 1, 128),
                                     (1, 4097, 2, 64)])
def test_wkv6_forward_fp32(B, T, H, N):
    r, k, v, w, u, s0 = wkv6_inputs(B, T, H, N)
    ref, ref_state = wkv6_reference(r, k, v, w, u, s0)
    poison_allocator()
    y, state = wkv6(*(x.cuda() for x in (r, k, v, w, u, s0)))
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 32), (2, 33, 2, 64), (1, 200, 2, 80), (1, 60, 1, 128),
                                     (1, 4097, 1, 64)])
def test_wkv6_backward_fp32(B, T, H, N):
    inputs = wkv6_inputs(B, T, H, N)
    gy, gs = torch.randn(B, T, H * N), torch.randn(B, H, N, N)
    ref = grads(wkv6_reference, inputs, gy, gs, "cpu", torch.float64)
    ours = grads(wkv6, inputs, gy, gs, "cuda")
    assert_grads(ours, ref, ("r", "k", "v", "w", "u", "state"), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wkv6_half(dtype):
    inputs = wkv6_inputs(2, 300, 2, 64, dtype)
    gy, gs = torch.randn(2, 300, 128).to(dtype), torch.randn(2, 2, 64, 64)
    ref_y, _ = wkv6_reference(*inputs)
    poison_allocator()
    y, state = wkv6(*(x.cuda() for x in inputs))
    assert y.dtype == dtype and state.dtype == torch.float32 and rel_err(y, ref_y) <= 1e-2
    ref = grads(wkv6_reference, inputs, gy, gs, "cpu", torch.float64)
    ours = grads(wkv6, inputs, gy, gs, "cuda")
    assert ours[0].dtype == dtype
    assert_grads(ours, ref, ("r", "k", "v", "w", "u", "state"), 1e-2)


def test_wkv6_extreme_decays():
    """Decays from exp(-exp(-12)) (1 - 6e-6) to exp(-exp(4)) (2e-24), the whole float32 range of the recurrence.
    The decay logits' gradient is looser (measured 1.1e-5): it is the suffix sum of r dr - k dk (cuda/wkv_matrix.cu),
    terms that cancel to about w for a fast decay, times log w = -exp(d), up to 55 here."""
    inputs = wkv6_inputs(1, 1500, 2, 64, decay=(-12.0, 4.0))
    gy, gs = torch.randn(1, 1500, 128), torch.randn(1, 2, 64, 64)
    ref_y, ref_state = wkv6_reference(*inputs)
    poison_allocator()
    y, state = wkv6(*(x.cuda() for x in inputs))
    assert rel_err(y, ref_y) <= 1e-5 and rel_err(state, ref_state) <= 1e-5
    ref = grads(wkv6_reference, inputs, gy, gs, "cpu", torch.float64)
    assert_grads(grads(wkv6, inputs, gy, gs, "cuda"), ref, ("r", "k", "v", "w", "u", "state"), 1e-5, {"w": 5e-5})


def test_wkv6_state_carried_across_calls():
    r, k, v, w, u, s0 = (x.cuda() for x in wkv6_inputs(2, 2 * 333, 2, 64))
    whole, whole_state = wkv6(r, k, v, w, u, s0)
    first, state = wkv6(r[:, :333], k[:, :333], v[:, :333], w[:, :333], u, s0)
    second, end_state = wkv6(r[:, 333:], k[:, 333:], v[:, 333:], w[:, 333:], u, state)
    assert rel_err(torch.cat([first, second], 1), whole) <= 1e-6 and rel_err(end_state, whole_state) <= 1e-6


def test_wkv5_takes_the_wkv6_kernel(caplog):
    import blocks.wkv as wkv_module

    wkv_module._logged_paths.clear()
    g = generator()
    r, k, v = (torch.randn(2, 40, 2, 64, generator=g).cuda() for _ in range(3))
    td, u = torch.randn(2, 64, generator=g).cuda(), torch.randn(2, 64, generator=g).cuda()
    with caplog.at_level(logging.INFO, logger="blocks.wkv"):
        y, state = wkv5(r, k, v, td, u)
    assert "wkv6 on cuda: using the cuda-kernel path" in caplog.text
    ref, ref_state = wkv6_reference(*(x.cpu().reshape(2, 40, 128) for x in (r, k, v)),
                                    td.cpu().reshape(1, 1, 128).expand(2, 40, 128), u.cpu())
    assert rel_err(y.reshape(2, 40, 128), ref) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


# ------------------------------------------------------------------------------------------------- WKV-7

@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 64), (2, 3, 2, 32), (1, 257, 3, 64), (2, 100, 2, 80), (1, 50, 1, 128),
                                     (1, 4097, 2, 64)])
def test_wkv7_forward_fp32(B, T, H, N):
    *inputs, s0 = wkv7_inputs(B, T, H, N)
    ref, ref_state = wkv7_reference(*inputs, s0)
    poison_allocator()
    y, state = wkv7(*(x.cuda() for x in inputs), state=s0.cuda())
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 32), (2, 33, 2, 64), (1, 200, 2, 80), (1, 60, 1, 128),
                                     (1, 4097, 1, 64)])
def test_wkv7_backward_fp32(B, T, H, N):
    inputs = wkv7_inputs(B, T, H, N)
    gy, gs = torch.randn(B, T, H, N), torch.randn(B, H, N, N)
    ref = grads(wkv7_reference, inputs, gy, gs, "cpu", torch.float64)
    ours = grads(lambda *x: wkv7(*x[:6], state=x[6]), inputs, gy, gs, "cuda")
    assert_grads(ours, ref, ("r", "log_w", "k", "v", "a", "b", "state"), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wkv7_half(dtype):
    inputs = wkv7_inputs(2, 300, 2, 64, dtype)
    gy, gs = torch.randn(2, 300, 2, 64).to(dtype), torch.randn(2, 2, 64, 64)
    ref_y, _ = wkv7_reference(*inputs)
    poison_allocator()
    y, state = wkv7(*(x.cuda() for x in inputs[:6]), state=inputs[6].cuda())
    assert y.dtype == dtype and state.dtype == torch.float32 and rel_err(y, ref_y) <= 1e-2
    ref = grads(wkv7_reference, inputs, gy, gs, "cpu", torch.float64)
    ours = grads(lambda *x: wkv7(*x[:6], state=x[6]), inputs, gy, gs, "cuda")
    assert ours[0].dtype == dtype
    assert_grads(ours, ref, ("r", "log_w", "k", "v", "a", "b", "state"), 1e-2)


def test_wkv7_extreme_decays():
    """log w from -20 (w = 2e-9) to -1e-6, beyond RWKV-7's own range (log w >= -0.61): nothing is divided by w."""
    inputs = wkv7_inputs(1, 1500, 2, 64, log_w=(-20.0, -1e-6))
    gy, gs = torch.randn(1, 1500, 2, 64), torch.randn(1, 2, 64, 64)
    ref_y, ref_state = wkv7_reference(*inputs)
    poison_allocator()
    y, state = wkv7(*(x.cuda() for x in inputs[:6]), state=inputs[6].cuda())
    assert rel_err(y, ref_y) <= 1e-5 and rel_err(state, ref_state) <= 1e-5
    ref = grads(wkv7_reference, inputs, gy, gs, "cpu", torch.float64)
    ours = grads(lambda *x: wkv7(*x[:6], state=x[6]), inputs, gy, gs, "cuda")
    assert_grads(ours, ref, ("r", "log_w", "k", "v", "a", "b", "state"), 1e-5)


def test_wkv7_state_carried_across_calls():
    *x, s0 = (t.cuda() for t in wkv7_inputs(2, 2 * 333, 2, 64))
    whole, whole_state = wkv7(*x, state=s0)
    first, state = wkv7(*(t[:, :333] for t in x), state=s0)
    second, end_state = wkv7(*(t[:, 333:] for t in x), state=state)
    assert rel_err(torch.cat([first, second], 1), whole) <= 1e-6 and rel_err(end_state, whole_state) <= 1e-6


def test_wkv7_inference_keeps_no_sa():
    *x, s0 = (t.cuda() for t in wkv7_inputs(1, 20, 1, 64))
    y, _, sa = torch.ops.zoo.wkv7_forward(*x, s0, False)
    assert sa.numel() == 0
    y_kept, _, sa = torch.ops.zoo.wkv7_forward(*x, s0, True)
    assert torch.equal(y, y_kept) and sa.shape == x[0].shape
    leaves = [t.clone().requires_grad_() for t in x]
    y, _, _ = torch.ops.zoo.wkv7_forward(*leaves, s0, False)
    with pytest.raises(RuntimeError, match="keep_sa=False"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------------- bidirectional

@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 64), (2, 5, 2, 32), (1, 197, 3, 64), (2, 77, 2, 80)])
def test_biwkv6_fp32(B, T, H, N):
    r, k, v, w, u, _ = wkv6_inputs(B, T, H, N)
    gy = torch.randn(B, T, H * N)
    ref = biwkv6_reference(r, k, v, w, u)
    poison_allocator()
    assert rel_err(biwkv6(*(x.cuda() for x in (r, k, v, w, u))), ref) <= 1e-5
    ref_grads = grads(lambda *x: (biwkv6_reference(*x), x[4]), (r, k, v, w, u), gy, torch.zeros(H, N), "cpu",
                      torch.float64)
    ours = grads(lambda *x: (biwkv6(*x), x[4]), (r, k, v, w, u), gy, torch.zeros(H, N), "cuda")
    assert_grads(ours, ref_grads, "rkvwu", 1e-5)


def test_biwkv6_long_and_bf16():
    """T = 4097 against the two float64 sequential scans it is made of (tests/test_biwkv6.py ties those to the O(T^2)
    sum), and bf16 against float32."""
    r, k, v, w, u, _ = wkv6_inputs(1, 4097, 2, 64)
    forward, _ = wkv6_reference(r, k, v, w, u)
    backward, _ = wkv6_reference(*(x.flip(1) for x in (r, k, v, w)), torch.zeros_like(u))
    poison_allocator()
    y = biwkv6(*(x.cuda() for x in (r, k, v, w, u)))
    assert rel_err(y, forward + backward.flip(1)) <= 1e-5
    y16 = biwkv6(*(x.cuda().bfloat16() for x in (r, k, v, w)), u.cuda())
    assert y16.dtype == torch.bfloat16 and rel_err(y16, y) <= 1e-2


# ------------------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_fp64_kernels():
    """Each kernel's backward against finite differences of its forward, in float64 (head size 32)."""
    r, k, v, w, u, s0 = (x.cuda().double() for x in wkv6_inputs(1, 5, 1, 32, seed=1))
    s0 = s0 / 3
    leaves = [x.clone().requires_grad_() for x in (r, k, v, w, u, s0)]
    assert torch.autograd.gradcheck(wkv6, leaves)
    assert torch.autograd.gradcheck(biwkv6, leaves[:5])
    leaves = [x.cuda().double().requires_grad_() for x in wkv7_inputs(1, 5, 1, 32, seed=2)]
    assert torch.autograd.gradcheck(lambda *x: wkv7(*x[:6], state=x[6]), leaves)


# ------------------------------------------------------------------------------------------------- dispatch and API

def test_dispatch_logs_the_kernel_and_falls_back_for_other_head_sizes(monkeypatch, caplog):
    import blocks.wkv as wkv_module

    wkv_module._logged_paths.clear()
    r, k, v, w, u, _ = (x.cuda() for x in wkv6_inputs(1, 8, 2, 64))
    *x7, _ = (t.cuda() for t in wkv7_inputs(1, 8, 2, 64))
    r48, k48, v48, w48, u48, _ = (x.cuda() for x in wkv6_inputs(1, 8, 2, 48))
    with caplog.at_level(logging.INFO):
        wkv6(r, k, v, w, u)
        wkv7(*x7)
        biwkv6(r, k, v, w, u)
        y48, _ = wkv6(r48, k48, v48, w48, u48)
        monkeypatch.setenv(wkv_cuda.FORCE_REFERENCE_ENV, "1")
        wkv6(r, k, v, w, u)
        wkv7(*x7)
    for op in ("wkv6", "wkv7", "biwkv6"):
        assert f"{op} on cuda: using the cuda-kernel path" in caplog.text
    assert "wkv6: no CUDA kernel for head size 48" in caplog.text
    assert "wkv6 on cuda: using the torch-chunked path" in caplog.text
    assert "wkv7 on cuda: using the torch-chunked path" in caplog.text
    assert rel_err(y48, wkv6_reference(r48, k48, v48, w48, u48)[0]) <= 1e-5


def test_noncontiguous_inputs_and_compile():
    r, k, v, w, u, s0 = (x.cuda() for x in wkv6_inputs(3, 64, 2, 64))
    k_nc = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not k_nc.is_contiguous() and torch.equal(wkv6(r, k_nc, v, w, u)[0], wkv6(r, k, v, w, u)[0])
    # contiguous views that start off the kernels' 16-byte load alignment (element 1 of a larger buffer)
    shifted = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view_as(t) for t in (r, k, v, w)]
    assert shifted[0].data_ptr() % 16 and torch.equal(wkv6(*shifted, u)[0], wkv6(r, k, v, w, u)[0])
    *x7, s7 = (t.cuda() for t in wkv7_inputs(2, 50, 2, 64))
    for fn, inputs in ((lambda *a: wkv6(*a)[0].square().sum(), (r, k, v, w, u)),
                       (lambda *a: biwkv6(*a).square().sum(), (r, k, v, w, u)),
                       (lambda *a: wkv7(*a[:6], state=a[6])[1].square().sum(), (*x7, s7))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.compile(fn, fullgraph=True)(*leaves).backward()
        expected = torch.autograd.grad(fn(*leaves), leaves)
        for a, b in zip((t.grad for t in leaves), expected):
            assert rel_err(a, b) <= 1e-6


def test_op_errors_name_the_problem():
    r, k, v, w, u, s0 = (x.cuda() for x in wkv6_inputs(1, 4, 1, 48))
    x = [t.view(1, 4, 1, 48) for t in (r, k, v, w)]
    with pytest.raises(RuntimeError, match="head sizes with kernels: 32, 64, 80, 128"):
        torch.ops.zoo.wkv6_forward(*x, u, s0, False)
    r, k, v, w, u, s0 = (x.cuda() for x in wkv6_inputs(1, 4, 1, 64))
    x = [t.view(1, 4, 1, 64) for t in (r, k, v, w)]
    with pytest.raises(RuntimeError, match="w is BFloat16 but r is Float"):
        torch.ops.zoo.wkv6_forward(*x[:3], x[3].bfloat16(), u, s0, False)
    with pytest.raises(RuntimeError, match="state must have shape"):
        torch.ops.zoo.wkv6_forward(*x, u, s0[:, :, :32], False)
