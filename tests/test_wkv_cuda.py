"""The CUDA WKV kernels (causal and bidirectional, forward and backward) against float64 references, on fresh
random inputs with poisoned outputs (GPU only)."""

import logging

import pytest
import torch

from blocks import wkv_cuda
from blocks.biwkv import biwkv, biwkv_recurrent, biwkv_reference
from blocks.wkv import wkv4, wkv4_chunked, wkv4_reference
from wkv_inputs import biwkv_inputs

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


def rel_err(a, b, floor=1e-30):
    """Largest error over the largest reference value (or `floor` where every value is smaller)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


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


# The one-pass forward at fp32 and one channel a thread stages 96 tokens a chunk: T = 999 gives each row eleven
# chunks, each adding the sums published before it; T = 100 two.
@pytest.mark.parametrize("T", [999, 100], ids=["eleven-chunks", "two-chunks"])
def test_state_carried_across_calls(T):
    w, u, k, v = inputs(3, 2 * T, 33)
    whole, whole_state = kernel_forward(w, u, k, v)
    first, state = kernel_forward(w, u, k[:, :T], v[:, :T])
    second, end_state = kernel_forward(w, u, k[:, T:], v[:, T:], [s.cpu() for s in state])
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


def causal_grads(w, u, k, v, state, gy, device, dtype=None):
    """Gradients of sum(wkv * gy) + sum(aa / bb) + sum(log(bb) + pp) (a loss that sees the final state only
    through e^pp (aa, bb)) with respect to w, u, k, v and the incoming state, on `device` in `dtype`
    (float64 on the CPU: the sequential reference)."""
    fn = wkv4_reference if device == "cpu" else wkv4
    leaves = [x.detach().to(device, dtype or x.dtype).requires_grad_() for x in (w, u, k, v, *state)]
    poison_allocator()
    y, (aa, bb, pp) = fn(*leaves[:4], tuple(leaves[4:]))
    ((y * gy.to(device, y.dtype)).sum() + (aa / bb).sum() + (bb.log() + pp).sum()).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 3, 1), (1, 200, 1000), (3, 100, 7), (2, 1000, 33)])
def test_backward_fp32(B, T, C):
    """Errors over the largest gradient of all seven: w, u and the state's gradients are sums that can cancel far
    below their terms (T = 3 and a fast decay give gradients of 1e-7), where fp32 leaves errors of the terms' size
    (measured over 600 draws: at most 7e-6 this way; up to 7e-5 of such a cancelled gradient's own size)."""
    w, u, k, v = inputs(B, T, C)
    _, _, k0, v0 = inputs(B, 5, C)
    _, s0 = wkv4_reference(w, u, k0 * 2, v0)
    gy = torch.randn(B, T, C)
    ref = causal_grads(w, u, k, v, s0, gy, "cpu", torch.float64)
    ours = causal_grads(w, u, k, v, [s.float() for s in s0], gy, "cuda", torch.float32)
    scale = max(b.abs().max() for b in ref).item()
    for name, a, b in zip(("w", "u", "k", "v", "aa", "bb", "pp"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b, floor=scale) <= 1e-5, name


def test_backward_long_sequence():
    """T = 65537, against the chunked path in float64 (exact; checked against the sequential one on CPU)."""
    w, u, k, v = (x.cuda() for x in inputs(1, 65537, 4))
    gy = torch.randn_like(k)
    grads = []
    for dtype, fn in ((torch.float32, wkv4), (torch.float64, lambda *a: wkv4_chunked(*a, chunk_len=64))):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (w, u, k, v)]
        poison_allocator()
        y, _ = fn(*leaves)
        (y * gy.to(dtype)).sum().backward()
        grads.append([x.grad for x in leaves])
    for ours, ref in zip(*grads):
        assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half(dtype):
    w, u, k, v = inputs(2, 500, 40, dtype, k_scale=1.0)
    gy = torch.randn(2, 500, 40).to(dtype)
    state = [torch.zeros(2, 40), torch.zeros(2, 40), torch.full((2, 40), -1e38)]
    ref = causal_grads(w, u, k, v, state, gy, "cpu", torch.float64)
    ours = causal_grads(w, u, k, v, state, gy, "cuda")
    assert ours[2].dtype == dtype
    for a, b in zip(ours[:4], ref[:4]):
        assert rel_err(a, b) <= 1e-2


def test_backward_extreme_inputs():
    B, T, C = 2, 2000, 64
    g = torch.Generator().manual_seed(0)
    w = -torch.logspace(-4, torch.log10(torch.tensor(50.0)).item(), C)
    u = torch.linspace(-20, 20, C)
    k = torch.rand(B, T, C, generator=g) * 120 - 60
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    state = [torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), -1e38)]
    ref = causal_grads(w, u, k, v, state, gy, "cpu", torch.float64)
    ours = causal_grads(w, u, k, v, state, gy, "cuda", torch.float32)
    for a, b in zip(ours[:4], ref[:4]):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 5e-5


def test_gradcheck_fp64_kernel():
    """The kernel's own backward against finite differences of its forward, in float64 (state outputs as
    e^pp (aa, bb), the quantity they stand for)."""
    w, u, k, v = (x.cuda().double() for x in inputs(2, 37, 3, k_scale=1.0))
    _, s0 = wkv4_reference(w, u, k[:, :4], v[:, :4])

    def fn(*args):
        y, (aa, bb, pp) = wkv4(*args[:4], args[4:])
        return y, aa * pp.exp(), bb * pp.exp()

    leaves = [x.clone().requires_grad_() for x in (w, u, k, v, *s0)]
    assert torch.autograd.gradcheck(fn, leaves)


def test_gradients_through_a_carried_state_equal_one_call():
    w, u, k, v = inputs(2, 2 * 300, 9)
    gy = torch.randn_like(k).cuda()
    grads = []
    for split in (False, True):
        leaves = [x.cuda().requires_grad_() for x in (w, u, k, v)]
        w_, u_, k_, v_ = leaves
        if split:
            first, state = wkv4(w_, u_, k_[:, :300], v_[:, :300])
            second, _ = wkv4(w_, u_, k_[:, 300:], v_[:, 300:], state)
            y = torch.cat([first, second], 1)
        else:
            y, _ = wkv4(*leaves)
        (y * gy).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 3, 1), (1, 100, 1000), (3, 257, 7), (2, 1000, 34),
                                   (4, 4096, 8)])
def test_biwkv_forward_fp32(B, T, C):
    w, u, k, v = (x.cuda() for x in biwkv_inputs(B, T, C))
    ref = biwkv_reference(w, u, k, v)
    poison_allocator()
    y = biwkv(w, u, k, v)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-5


def test_biwkv_long_sequence():
    w, u, k, v = biwkv_inputs(1, 65537, 2)
    ref = biwkv_recurrent(*(x.cuda() for x in (w, u, k, v)))
    poison_allocator()
    assert rel_err(biwkv(w.cuda(), u.cuda(), k.cuda(), v.cuda()), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_biwkv_half(dtype):
    w, u, k, v = (x.cuda() for x in biwkv_inputs(2, 777, 33, dtype, k_scale=1.0))
    ref = biwkv_reference(w, u, k, v)
    poison_allocator()
    y = biwkv(w, u, k, v)
    assert y.dtype == dtype and rel_err(y, ref) <= 1e-2


def bi_grads(w, u, k, v, gy, fn, dtype):
    leaves = [x.cuda().to(dtype).requires_grad_() for x in (w, u, k, v)]
    poison_allocator()
    (fn(*leaves) * gy.cuda().to(dtype)).sum().backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 5, 3), (1, 300, 1000), (3, 257, 7), (2, 2000, 16)])
def test_biwkv_backward_fp32(B, T, C):
    w, u, k, v = biwkv_inputs(B, T, C)
    gy = torch.randn(B, T, C)
    ref = bi_grads(w, u, k, v, gy, biwkv_reference, torch.float64)
    for name, a, b in zip("wukv", bi_grads(w, u, k, v, gy, biwkv, torch.float32), ref):
        assert torch.isfinite(a).all(), name
        if T == 1 and name != "v":  # wkv = v exactly: only v has a gradient, the others are rounding-size
            assert a.abs().max() <= 1e-6 * gy.abs().max(), name
        else:
            assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("C", [24, 33])  # an odd C: one channel a thread, whose 2-byte inputs cp.async cannot stage
def test_biwkv_backward_bf16(C):
    w, u, k, v = biwkv_inputs(2, 500, C, torch.bfloat16, k_scale=1.0)
    gy = torch.randn(2, 500, C).bfloat16()
    ref = bi_grads(w, u, k, v, gy, biwkv_reference, torch.float64)
    for a, b in zip(bi_grads(w, u, k, v, gy, biwkv, torch.bfloat16)[2:], ref[2:]):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) <= 1e-2


def test_biwkv_extreme_inputs():
    """|k| up to 60, |w| T up to 50 of both signs."""
    B, T, C = 2, 1500, 32
    g = torch.Generator().manual_seed(2)
    w, u = torch.linspace(-50, 50, C) / T, torch.linspace(-20, 20, C) / T
    k, v = torch.rand(B, T, C, generator=g) * 120 - 60, torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    ref = bi_grads(w, u, k, v, gy, biwkv_reference, torch.float64)
    assert rel_err(biwkv(w.cuda(), u.cuda(), k.cuda(), v.cuda()), biwkv_reference(w, u, k, v)) <= 5e-5
    for a, b in zip(bi_grads(w, u, k, v, gy, biwkv, torch.float32), ref):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 5e-5


@pytest.mark.parametrize("dtype,words,span", [(torch.float32, 2, 16), (torch.bfloat16, 1, 32)])
def test_inference_keeps_nothing_for_a_backward(dtype, words, span):
    """Without keep_den / keep_states the forwards write nothing for a backward. With keep_den Bi-WKV keeps
    (exponent, scaled denominator) pairs for fp32 and the log for 16-bit inputs, per token and channel; with
    keep_states the causal forward keeps the state entering every span of tokens, which the fake kernel's shape
    (torch.compile) must match. The two builds of a kernel may round differently."""
    w, u, k, v = (x.cuda() for x in biwkv_inputs(2, 100, 6))
    k, v = k.to(dtype), v.to(dtype)
    y, den = torch.ops.zoo.biwkv_forward(w, u, k, v, False)
    y_kept, den_kept = torch.ops.zoo.biwkv_forward(w, u, k, v, True)
    assert den.numel() == 0 and rel_err(y, y_kept) <= 1e-6 and den_kept.shape == (2, 100, 6, words)
    s = torch.zeros(2, 6, device="cuda")
    args = (-w.exp(), u, k, v, s, s, s - 1e38)
    y, *_, states = torch.ops.zoo.wkv4_forward(*args, False)
    y_kept, *_, states_kept = torch.ops.zoo.wkv4_forward(*args, True)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        fake_states = torch.ops.zoo.wkv4_forward(*args, True)[4]
    spans = -(-100 // span)
    assert states.numel() == 0 and rel_err(y, y_kept) <= 1e-6
    assert states_kept.shape == fake_states.shape == (3, 2, spans, 6) and states_kept.dtype == torch.float32


def test_backward_after_a_forward_that_kept_nothing_is_an_error():
    """A forward called with keep_den=False or keep_states=False (inference) has nothing for a backward: the autograd
    rule says so instead of running the backward kernel on an empty tensor."""
    w, u, k, v = (x.cuda().requires_grad_() for x in biwkv_inputs(1, 5, 3))
    y, _ = torch.ops.zoo.biwkv_forward(w, u, k, v, False)
    with pytest.raises(RuntimeError, match="zoo::biwkv_forward ran with keep_den=False"):
        y.sum().backward()
    s = torch.zeros(1, 3, device="cuda")
    y, *_ = torch.ops.zoo.wkv4_forward(-w.exp(), u, k, v, s, s, s - 1e38, False)
    with pytest.raises(RuntimeError, match="zoo::wkv4_forward ran with keep_states=False"):
        y.sum().backward()


def test_biwkv_gradcheck_fp64_kernel():
    leaves = [x.cuda().double().requires_grad_() for x in biwkv_inputs(2, 41, 3, k_scale=1.0)]
    assert torch.autograd.gradcheck(biwkv, leaves)


def test_biwkv_noncontiguous_and_compiled():
    w, u, k, v = (x.cuda() for x in biwkv_inputs(3, 64, 8))
    k_nc = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not k_nc.is_contiguous() and torch.equal(biwkv(w, u, k_nc, v), biwkv(w, u, k, v))
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    compiled = torch.compile(lambda *a: biwkv(*a).square().sum(), fullgraph=True)
    compiled(*leaves).backward()
    expected = torch.autograd.grad(biwkv(*leaves).square().sum(), leaves)
    for a, b in zip((x.grad for x in leaves), expected):
        assert rel_err(a, b) <= 1e-6


def test_dispatch_logs_the_kernel_and_env_forces_reference(monkeypatch, caplog):
    import blocks.wkv as wkv_module

    wkv_module._logged_paths.clear()
    w, u, k, v = (x.cuda() for x in inputs(1, 8, 4))
    with caplog.at_level(logging.INFO, logger="blocks.wkv"):
        wkv4(w, u, k, v)
        biwkv(w, u, k, v)
        monkeypatch.setenv(wkv_cuda.FORCE_REFERENCE_ENV, "1")
        wkv4(w, u, k, v)
        biwkv(w, u, k, v)
    assert "wkv4 on cuda: using the cuda-kernel path" in caplog.text
    assert "wkv4 on cuda: using the torch-chunked path" in caplog.text
    assert "biwkv on cuda: using the cuda-kernel path" in caplog.text
    assert "biwkv on cuda: using the torch-parallel path" in caplog.text
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


_BAD_OP_CALLS = """
import torch
from blocks import wkv_cuda
assert wkv_cuda.available()
w, u, k, v = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda"), *torch.zeros(2, 1, 3, 4, device="cuda")
s = torch.zeros(1, 4, device="cuda")
forward = torch.ops.zoo.wkv4_forward
calls = {
    "k must be [B, T, C], got [3, 4]": lambda: forward(w, u, k[0], v[0], s, s, s, False),
    "must share k's shape [1, 3, 4], got [1, 3, 2]": lambda: forward(w, u, k, v[..., :2], s, s, s, False),
    "w and u must have C = 4 elements": lambda: forward(w[:3], u, k, v, s, s, s, False),
    "state tensors must be [B, C]": lambda: forward(w, u, k, v, s[:, :2], s, s, False),
    "B, T and C must be >= 1, got [1, 0, 4]": lambda: torch.ops.zoo.biwkv_forward(w, u, k[:, :0], v[:, :0], False),
    "wkv4_backward: states must be [3, 1, 1, 4] Float (the forward's, with keep_states), got [0]":
        lambda: torch.ops.zoo.wkv4_backward(w, u, k, v, s, s, s, s, forward(w, u, k, v, s, s, s, False)[4], k, s, s),
    "biwkv_backward: den must be [1, 3, 4, 2] Float (the forward's, with keep_den), got [1, 3, 4]":
        lambda: torch.ops.zoo.biwkv_backward(w, u, k, v, k, k, k),
}
for expected, call in calls.items():
    try:
        call()
    except RuntimeError as e:
        assert expected in str(e), (expected, str(e))
    else:
        raise AssertionError(f"no error for: {expected}")
print("ok")
"""


def test_op_errors_name_the_problem():
    """The ops' own checks (reached by direct torch.ops.zoo calls; blocks/ checks first) give messages with the
    shapes, in a subprocess so that a crash while formatting them fails this test instead of ending the run."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BAD_OP_CALLS], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]
