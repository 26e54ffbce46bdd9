"""zoo.decode: prefill + steps give the logits of one parallel forward, for RWKV's RNN state and GPT's KV cache; bad
calls get clear errors. (The CUDA-graph path is checked in tests/test_gpu.py.)"""

from functools import partial

import pytest
import torch

import zoo
from zoo.decode import KVDecoder, RNNDecoder, make_decoder
from zoo.generate import generate, sample_logits

RNN_MODELS = ["rwkv4-tiny", "rrwkv-tiny", "rwkv5-tiny", "rwkv6-tiny", "rwkv7-tiny"]


def randomized(name, **overrides):
    """A small model with every weight perturbed (the official inits zero some projections)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, n_layer=2, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def decoded(decoder, idx, split, prefill_chunk=None):
    """Logits [B, T - split, V] predicted after idx[:, :split] by prefill and after each later token by step."""
    if prefill_chunk:
        decoder.prefill_chunk = prefill_chunk
    out = [decoder.prefill(idx[:, :split])]
    out += [decoder.step(idx[:, t]).clone() for t in range(split, idx.shape[1] - 1)]
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", RNN_MODELS)
def test_rnn_decoder_matches_parallel_forward(name):
    model = randomized(name)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(idx)
    decoder = make_decoder(model, batch_size=2)
    assert isinstance(decoder, RNNDecoder) and decoder.path == "eager"
    torch.testing.assert_close(decoded(decoder, idx, 9, prefill_chunk=4), full[:, 8:-1], rtol=1e-5, atol=1e-5)
    decoder.reset()
    torch.testing.assert_close(decoded(decoder, idx, 1), full[:, :-1], rtol=1e-5, atol=1e-5)


def test_compiled_rnn_step_matches():
    model = randomized("rwkv4-tiny")
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(idx)
    decoder = RNNDecoder(model, compile=True)
    assert decoder.path == "compiled+eager"
    torch.testing.assert_close(decoded(decoder, idx, 4), full[:, 3:-1], rtol=1e-5, atol=1e-5)


def test_kv_decoder_matches_parallel_forward():
    model = randomized("gpt-tiny", ctx_len=64)
    idx = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        full = model(idx)
    decoder = make_decoder(model, batch_size=3, capacity=40)
    assert isinstance(decoder, KVDecoder) and decoder.cache.capacity == 40
    # 17 prompt tokens in chunks of 5: the first chunk fills an empty cache, the others attend over it
    torch.testing.assert_close(decoded(decoder, idx, 17, prefill_chunk=5), full[:, 16:-1], rtol=1e-5, atol=1e-5)
    assert decoder.cache.filled == int(decoder.cache.length) == 39


def test_gpt_forward_with_cache_counts_positions():
    model = randomized("gpt-tiny", ctx_len=16)
    idx = torch.randint(0, 256, (1, 16))
    cache = model.new_cache(1)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([model(idx[:, :10], cache), model(idx[:, 10:], cache)], 1), model(idx),
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="sequence length 17 exceeds this GPT's ctx_len=16"):
            model(idx[:, :1], cache)


def step_loop_ids(decoder, logits, steps, pick):
    """`steps` ids the plain way: pick on the host's side of each step, the ids sent back through `step`."""
    ids = []
    for _ in range(steps):
        ids.append(pick(logits))
        logits = decoder.step(ids[-1])
    return torch.stack(ids)


def greedy(logits):
    return logits.argmax(-1)


def sampler():
    """A sampling pick with its own seeded generator (a fresh one draws the same ids again)."""
    return partial(sample_logits, temperature=0.9, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rwkv7-tiny", "gpt-tiny"])
def test_stream_generates_what_a_step_loop_generates(name):
    """stream feeds each pick back without the host: the same ids as a loop over step, greedy and sampled."""
    model = randomized(name)
    prompt = torch.randint(0, 256, (2, 7))
    for make_pick in (lambda: greedy, sampler):
        decoder = make_decoder(model, 2, capacity=20)
        streamed = torch.stack(list(decoder.stream(decoder.prefill(prompt), 12, make_pick())))
        assert streamed.shape == (12, 2) and streamed.device.type == "cpu"
        decoder = make_decoder(model, 2, capacity=20)
        assert torch.equal(streamed, step_loop_ids(decoder, decoder.prefill(prompt), 12, make_pick()))


def test_generate_greedy_equals_argmax_of_full_forward():
    for name in ("rwkv4-tiny", "gpt-tiny"):
        model = randomized(name)
        prompt = [3, 1, 4, 1, 5]
        tokens = list(generate(model, prompt, 6, temperature=0))
        idx = torch.tensor([prompt])
        for token in tokens:
            with torch.no_grad():
                assert token == int(model(idx)[0, -1].argmax())
            idx = torch.cat([idx, torch.tensor([[token]])], 1)


def test_generate_gpt_beyond_ctx_len_reads_a_window():
    model = randomized("gpt-tiny", ctx_len=8)
    assert len(list(generate(model, [1, 2, 3, 4, 5, 6], 10, temperature=0))) == 10


def test_bad_calls_get_clear_errors():
    gpt = randomized("gpt-tiny", ctx_len=8)
    with pytest.raises(ValueError, match="holds 1 to ctx_len=8 positions, got 9"):
        gpt.new_cache(1, 9)
    decoder = make_decoder(gpt, batch_size=1, capacity=4)
    with pytest.raises(ValueError, match="needs a prefill first"):
        decoder.step(torch.tensor([1]))
    decoder.prefill(torch.tensor([[1, 2, 3]]))
    decoder.step(torch.tensor([4]))
    with pytest.raises(ValueError, match="the KV cache is full"):
        decoder.step(torch.tensor([5]))
    rnn = make_decoder(randomized("rwkv4-tiny"), batch_size=2)
    with pytest.raises(ValueError, match=r"step takes token ids of shape \[2\]"):
        rnn.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="token id 256 is out of range"):
        rnn.step(torch.tensor([1, 256]))
    with pytest.raises(ValueError, match=r"prefill takes token ids of shape \[2, T\]"):
        rnn.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        RNNDecoder(randomized("rwkv4-tiny"), cuda_graph=True)
    logits = rnn.prefill(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match=r"pick must return integer ids of shape \[2\], got torch.float32 \(2, 256\)"):
        next(rnn.stream(logits, 3, pick=lambda x: x))
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        next(rnn.stream(logits, -1))
    with pytest.raises(TypeError, match="neither an RNN mode"):
        make_decoder(torch.nn.Linear(2, 2))
    for options in ({"compile": True}, {"cuda_graph": True}):
        with pytest.raises(ValueError, match="RRWKVLM's steps read the state on the host"):
            RNNDecoder(randomized("rrwkv-tiny"), **options)


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rwkv7-tiny", "gpt-tiny"])
def test_logits_to_keep_gives_the_last_positions(name):
    model = randomized(name)
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, logits_to_keep=3), full[:, -3:], rtol=1e-6, atol=1e-6)
        if name != "gpt-tiny":
            logits, state = model(idx, return_state=True, logits_to_keep=1)
            assert logits.shape == (2, 1, 256)
            torch.testing.assert_close(state, model(idx, return_state=True)[1])
