"""RWKV-4 language model: the three modes agree, official init, constant state, bad input."""

import math

import pytest
import torch
from lm_modes import chunked_logits, rnn_logits

import zoo
from blocks import token_shift


def randomize_(model, seed=0, scale=1.0):
    """Give every parameter random, non-trivial values (the official init zeroes several matrices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("time_decay"):
                p.copy_(r * 2 - 1)
            elif "time_mix" in name:
                p.copy_(torch.sigmoid(r * 2))
            elif p.dim() == 1:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.2 * r)
            else:
                p.copy_(r * scale / math.sqrt(p.shape[-1]))
    return model


def tiny(dtype=torch.float32, seed=0, **overrides):
    cfg = dict(vocab_size=97, n_layer=3, n_embd=24) | overrides
    return randomize_(zoo.create_model("rwkv4-tiny", **cfg), seed).to(dtype).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("T, cuts", [(1, []), (2, [1]), (9, [4, 5]), (40, [1, 17, 33]), (67, [3, 35, 36])])
def test_parallel_chunked_and_rnn_modes_agree(dtype, tol, T, cuts):
    model = tiny(dtype)
    idx = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        parallel, p_state = model(idx, return_state=True)
        chunked, c_state = chunked_logits(model, idx, cuts)
        rnn, r_state = rnn_logits(model, idx)
    assert parallel.shape == (2, T, 97) and parallel.dtype == dtype
    assert rel_err(chunked, parallel) <= tol
    assert rel_err(rnn, parallel) <= tol
    assert p_state.shape == (3, 5, 2, 24)
    # aa and bb are stored scaled by e^-pp: compare the states through the quantities they stand for
    for s in (c_state, r_state):
        assert rel_err(s[:, [0, 4]], p_state[:, [0, 4]]) <= tol
        assert torch.allclose(s[:, 1] / s[:, 2], p_state[:, 1] / p_state[:, 2], rtol=tol * 10, atol=tol)


def test_state_stays_constant_size_and_finite_over_10k_rnn_steps():
    model = zoo.create_model("rwkv4-tiny")
    randomize_(model, seed=3)
    state = model.init_state(1)
    token = torch.tensor([65])
    first_shape = state.shape
    with torch.no_grad():
        for step in range(10_000):
            logits, state = model.forward_rnn(token, state)
            token = logits.argmax(-1)
            if step % 1000 == 0:
                assert torch.isfinite(state).all() and torch.isfinite(logits).all()
    assert state.shape == first_shape and torch.isfinite(state).all() and torch.isfinite(logits).all()


def test_official_init():
    model = zoo.create_model("rwkv4-tiny", n_layer=4, n_embd=16)
    C, L = 16, 4
    c = torch.arange(C, dtype=torch.float64)
    for l, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        ratio_0_to_1, ratio_1_to_0 = l / (L - 1), 1 - l / L
        assert torch.allclose(att.time_decay.double(), -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1), atol=1e-6)
        assert torch.allclose(att.time_first.double(), math.log(0.3) + 0.5 * ((c + 1) % 3 - 1), atol=1e-6)
        assert torch.allclose(att.time_mix_k.double().flatten(), (c / C) ** ratio_1_to_0, atol=1e-6)
        assert torch.allclose(att.time_mix_v.double().flatten(), (c / C) ** ratio_1_to_0 + 0.3 * ratio_0_to_1,
                              atol=1e-6)
        assert torch.allclose(att.time_mix_r.double().flatten(), (c / C) ** (0.5 * ratio_1_to_0), atol=1e-6)
        assert torch.allclose(ffn.time_mix_k, ffn.time_mix_r)
        for zero in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
            assert (zero.weight == 0).all()
        w = att.value.weight
        assert torch.allclose(w @ w.T, torch.eye(C), atol=1e-5)  # orthogonal, gain 1
        k = ffn.key.weight  # [4C, C]: orthogonal columns, gain sqrt(4)
        assert torch.allclose(k.T @ k, 4 * torch.eye(C), atol=1e-4)
    assert model.emb.weight.abs().max() <= 1e-4
    assert model.blocks[0].ln0 is not None and not hasattr(model.blocks[1], "ln0")


def test_token_shift():
    x = torch.arange(12.0).view(1, 4, 3)
    assert torch.equal(token_shift(x)[0, 0], torch.zeros(3))
    assert torch.equal(token_shift(x)[0, 1:], x[0, :3])
    prev = torch.full((1, 3), 7.0)
    assert torch.equal(token_shift(x, prev)[0, 0], prev[0])


def test_gradients_flow_through_carried_state():
    model = tiny()
    idx = torch.randint(0, 97, (2, 12))
    _, state = model(idx[:, :5], return_state=True)
    logits = model(idx[:, 5:], state=state)
    logits.sum().backward()
    assert model.blocks[0].att.time_decay.grad is not None and torch.isfinite(model.emb.weight.grad).all()


def test_gpt_baseline_runs_and_checks_length():
    model = zoo.create_model("gpt-tiny", ctx_len=16)
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    with pytest.raises(ValueError, match="exceeds this GPT's ctx_len=16"):
        model(torch.randint(0, 256, (1, 17)))


# ---- bad input --------------------------------------------------------------------------------

def test_token_id_out_of_vocab():
    model = tiny()
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward_rnn(torch.tensor([-1]), model.init_state(1))


@pytest.mark.parametrize("idx, error, match", [
    (torch.zeros(1, 4), TypeError, "integer tensor"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"shape \[B, T\]"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "T >= 1"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
])
def test_wrong_token_dtype_or_shape(idx, error, match):
    with pytest.raises(error, match=match):
        tiny()(idx)


def test_state_from_another_batch_size_or_model():
    model = tiny()
    with pytest.raises(ValueError, match=r"state has shape \(3, 5, 2, 24\) but this model and batch need \(3, 5, 1, 24\)"):
        model.forward_rnn(torch.tensor([1]), model.init_state(2))
    other = zoo.create_model("rwkv4-tiny", vocab_size=97, n_layer=2, n_embd=24)
    with pytest.raises(ValueError, match="another model or batch size"):
        model(torch.tensor([[1, 2]]), state=other.init_state(1))
    with pytest.raises(ValueError, match=r"forward_rnn takes token ids of shape \[B\]"):
        model.forward_rnn(torch.tensor([[1]]), model.init_state(1))
    with pytest.raises(TypeError, match="state must be a tensor"):
        model(torch.tensor([[1]]), state=[torch.zeros(1)])
