"""The CUDA WKV kernel against the float64 reference, on fresh random inputs with poisoned outputs (GPU only)."""

import logging

import pytest
import torch

from blocks import wkv_cuda
from blocks.wkv import wkv4, wkv4_chunked, wkv4_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert wkv_cuda.available(), wkv_cuda.status()


def poison_allocator():
    """Fill freed memory with NaN so that an output the kernel fails to write shows up as NaN."""
    torch.empty(256 * 1024 * 1024, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def inputs(B, T, C, dtype=torch.float32, k_scale=3.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    w = -torch.exp(torch.randn(C, generator=g) * 2)
    u = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * k_scale
    v = torch.randn(B, T, C, generator=g)
    return w, u, k.to(dtype), v.to(dtype)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def kernel_forward(w, u, k, v, state=None):
    poison_allocator()
    y, new_state = wkv4(w.cuda(), u.cuda(), k.cuda(), v.cuda(), None if state is None else [s.cuda() for s in state])
    return y, new_state


# C = 1000 and 256 take the 4-channel vector path, 6 the 2-channel one, 1 and 7 the scalar one
@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (1, 1, 1000), (2, 3, 1), (3, 100, 7), (2, 50, 6), (1, 65537, 4),
                                   (2, 4096, 256)])
def test_forward_fp32(B, T, C):
    w, u, k, v = inputs(B, T, C)
    ref, ref_state = wkv4_reference(w, u, k, v)
    y, state = kernel_forward(w, u, k, v)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(state[1].log() + state[2], (ref_state[1].log() + ref_state[2])) <= 1e-5


@pytest.mark.parametrize("C", [96, 34, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_half(dtype, C):
    w, u, k, v = inputs(2, 777, C, dtype, k_scale=1.0)
    ref, _ = wkv4_reference(w, u, k, v)
    y, state = kernel_forward(w, u, k, v)
    assert y.dtype == dtype and state[0].dtype == torch.float32
    assert rel_err(y, ref) <= 1e-2


def test_extreme_inputs():
    """|k| up to 60 and per-step decays from 1e-4 to 50: no inf or NaN. The bound is looser than 1e-5 because
    fp32 itself is: the plain fp32 token-by-token recurrence is off by 8.8e-5 on these inputs."""
    B, T, C = 2, 3000, 64
    g = torch.Generator().manual_seed(0)
    w = -torch.logspace(-4, torch.log10(torch.tensor(50.0)).item(), C)
    u = torch.linspace(-20, 20, C)
    k = (torch.rand(B, T, C, generator=g) * 120 - 60)
    v = torch.randn(B, T, C, generator=g)
    ref, _ = wkv4_reference(w, u, k, v)
    y, _ = kernel_forward(w, u, k, v)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= 5e-5


def test_state_carried_across_calls():
    w, u, k, v = inputs(3, 2 * 999, 33)
    whole, whole_state = kernel_forward(w, u, k, v)
    first, state = kernel_forward(w, u, k[:, :999], v[:, :999])
    second, end_state = kernel_forward(w, u, k[:, 999:], v[:, 999:], [s.cpu() for s in state])
    assert rel_err(torch.cat([first, second], 1), whole) <= 1e-5
    for a, b in zip(end_state, whole_state):
        assert rel_err(a, b) <= 1e-5


def test_state_in_matches_reference():
    w, u, k, v = inputs(2, 300, 16)
    _, s0 = wkv4_reference(w, u, k[:, :50], v[:, :50])
    ref, _ = wkv4_reference(w, u, k[:, 50:], v[:, 50:], s0)
    y, _ = kernel_forward(w, u, k[:, 50:], v[:, 50:], [s.float() for s in s0])
    assert rel_err(y, ref) <= 1e-5


def test_noncontiguous_inputs():
    w, u, k, v = inputs(4, 64, 8)
    k_nc, v_nc = (x.cuda().transpose(0, 1).contiguous().transpose(0, 1) for x in (k, v))
    assert not k_nc.is_contiguous()
    assert torch.equal(wkv4(w.cuda(), u.cuda(), k_nc, v_nc)[0], wkv4(w.cuda(), u.cuda(), k.cuda(), v.cuda())[0])


def test_gradients_match_reference():
    w, u, k, v = inputs(2, 200, 8)
    _, s0 = wkv4_reference(w, u, k[:, :20], v[:, :20])
    grads = []
    for device, fn in (("cuda", wkv4), ("cpu", wkv4_reference)):
        leaves = [x.to(device).double() if device == "cpu" else x.to(device).float()
                  for x in (w, u, k, v, *s0)]
        leaves = [x.requires_grad_() for x in leaves]
        y, (aa, bb, pp) = fn(*leaves[:4], tuple(leaves[4:]))
        (y.sin().sum() + (aa / bb).sum()).backward()
        grads.append([x.grad for x in leaves])
    for ours, ref in zip(*grads):
        assert rel_err(ours, ref) <= 1e-4


def test_dispatch_logs_the_kernel_and_env_forces_reference(monkeypatch, caplog):
    import blocks.wkv as wkv_module

    wkv_module._logged_paths.clear()
    w, u, k, v = (x.cuda() for x in inputs(1, 8, 4))
    with caplog.at_level(logging.INFO, logger="blocks.wkv"):
        wkv4(w, u, k, v)
        monkeypatch.setenv(wkv_cuda.FORCE_REFERENCE_ENV, "1")
        wkv4(w, u, k, v)
    assert "cuda: using the cuda-kernel path" in caplog.text
    assert "cuda: using the torch-chunked path" in caplog.text
    assert "forced by" in wkv_cuda.status()


def test_torch_compile_traces_a_block_without_graph_breaks():
    import zoo

    model = zoo.create_model("rwkv4-tiny", n_layer=1, n_embd=64).cuda()
    block = model.blocks[0]
    x = torch.randn(2, 50, 64, device="cuda")
    compiled = torch.compile(block, fullgraph=True)
    out, state = compiled(x)
    ref_out, ref_state = block(x)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(state, ref_state, atol=1e-5)
    out.sum().backward()
    assert block.att.time_decay.grad is not None


def test_chunked_path_agrees_with_kernel_on_gpu():
    w, u, k, v = (x.cuda() for x in inputs(2, 1000, 40))
    y_kernel, _ = wkv4(w, u, k, v)
    y_torch, _ = wkv4_chunked(w, u, k, v)
    assert rel_err(y_kernel, y_torch) <= 2e-5
