"""RRWKV layers (docs/rrwkv.md): parallel, state-carrying and RNN modes agree across segment boundaries, tokens read
only completed segments, the untrained layer is RWKV-4's, and the state does not grow with the sequence."""

import pytest
import torch

from blocks import RWKV4Block
from blocks.rrwkv import STATE_ROWS, RRWKVBlock, segment_means

C, FFN, SEGMENT = 8, 32, 5


def block(dtype=torch.float64, medium=True, seed=0) -> RRWKVBlock:
    """A block with every weight random (the zero-initialised ones too), so each path carries signal."""
    torch.manual_seed(seed)
    b = RRWKVBlock(C, FFN, 0, 2, SEGMENT).to(dtype)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if p.dim() == 2 or (medium and name.endswith(("medium_gate", "medium_mix"))):
                p.normal_(0, 0.5)
    return b


def rnn(b: RRWKVBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state, outs = None, []
    for t in range(x.shape[1]):
        out, state = b(x[:, t:t + 1], state)
        outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_parallel_state_carrying_and_rnn_modes_agree(dtype, tol):
    b = block(dtype)
    x = torch.randn(2, 37, C, dtype=dtype)
    y, state = b(x)
    got, got_state = rnn(b, x)
    assert (got - y).abs().max() / y.abs().max() < tol
    assert (got_state - state).abs().max() / state[:3].abs().max() < tol
    outs, s = [], None
    for start, end in ((0, 3), (3, 17), (17, 18), (18, 37)):                  # cuts inside and at segment ends
        out, s = b(x[:, start:end], s)
        outs.append(out)
    assert (torch.cat(outs, 1) - y).abs().max() / y.abs().max() < tol
    assert int(s[12, 0, 0]) == 37 % SEGMENT


def test_tokens_read_only_completed_segments():
    b = block()
    x = torch.randn(1, 23, C, dtype=torch.float64)
    y, _ = b(x)
    reference = RWKV4Block(C, FFN, 0, 2).double()
    reference.load_state_dict(b.state_dict(), strict=False)
    y4, _ = reference(x)
    assert torch.allclose(y[:, :SEGMENT], y4[:, :SEGMENT], atol=1e-12)    # no medium before the first is complete
    assert (y[:, SEGMENT:] - y4[:, SEGMENT:]).abs().max() > 1e-3
    for t in (4, 5, 13):                                                    # causal: a change at t moves nothing before
        changed = x.clone()
        changed[:, t] += 1
        assert torch.equal(b(changed)[0][:, :t], y[:, :t])


def test_an_untrained_layer_is_rwkv4_and_its_medium_parameters_get_gradients():
    b = RRWKVBlock(C, FFN, 0, 2, SEGMENT).double()
    with torch.no_grad():                                                   # RWKV-4's zero inits made random
        for lin in (b.att.key, b.att.receptance, b.att.output, b.ffn.receptance, b.ffn.value):
            lin.weight.normal_(0, 0.5)
    reference = RWKV4Block(C, FFN, 0, 2).double()
    reference.load_state_dict(b.state_dict(), strict=False)
    x = torch.randn(2, 17, C, dtype=torch.float64)
    y = b(x)[0]
    assert torch.allclose(y, reference(x)[0], atol=1e-12)
    y.square().sum().backward()
    assert b.att.medium_gate.grad.abs().max() > 0 and b.ffn.medium_mix.grad.abs().max() > 0


def test_the_state_has_a_constant_size():
    b = block(torch.float32)
    short = b(torch.randn(3, 4, C))[1]
    long = b(torch.randn(3, 400, C))[1]
    assert short.shape == long.shape == (STATE_ROWS, 3, C)


def test_segment_means_continue_a_segment_in_progress():
    x = torch.arange(1.0, 8.0).view(1, 7, 1)                                # tokens 1..7, 2 already in the segment
    means, partial, index = segment_means(x, torch.tensor([[10.0]]), phase=2, segment_len=4)
    assert means.flatten().tolist() == [(10 + 1 + 2) / 4, (3 + 4 + 5 + 6) / 4]
    assert partial.flatten().tolist() == [7.0] and index.tolist() == [0, 0, 1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="segment_len must be >= 1"):
        RRWKVBlock(C, FFN, 0, 2, 0)


def test_language_model_modes_agree_and_sizes_match_rwkv4(tmp_path):
    import zoo

    for size in ("169m", "430m", "tiny"):
        ours, theirs = zoo.model_info(f"rrwkv-{size}")["params"], zoo.model_info(f"rwkv4-{size}")["params"]
        assert abs(ours / theirs - 1) < 0.01
    count = lambda name: sum(p.numel() for p in zoo.create_model(name, n_embd=48, device="meta").parameters())
    assert abs(count("rrwkv-tiny") / count("rwkv4-tiny") - 1) < 0.01     # the 3C default follows a width override
    torch.manual_seed(0)
    model = zoo.create_model("rrwkv-tiny", n_layer=2, n_embd=32, dim_ffn=96, segment_len=3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("medium_gate", "medium_mix")) or ("blocks" in name and p.dim() == 2):
                p.normal_(0, 0.3)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        logits, state = model(idx, return_state=True)
        first, mid = model(idx[:, :7], return_state=True)
        rest = model(idx[:, 7:], state=mid)
        step_state, steps = model.init_state(2), []
        for t in range(20):
            out, step_state = model.forward_rnn(idx[:, t], step_state)
            steps.append(out)
    scale = logits.abs().max()
    assert (torch.cat([first, rest], 1) - logits).abs().max() / scale < 1e-5
    assert (torch.stack(steps, 1) - logits).abs().max() / scale < 1e-5
    assert state.shape == step_state.shape == (2, STATE_ROWS, 2, 32)
    with pytest.raises(ValueError, match=r"\(n_layer, 13, batch, n_embd\)"):
        model(idx, state=zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32).init_state(2))
    zoo.save_checkpoint(model, tmp_path / "rrwkv", name="rrwkv-tiny")
    again = zoo.load_checkpoint(tmp_path / "rrwkv").eval()
    assert again.config.segment_len == 3 and torch.equal(again(idx), model(idx))
