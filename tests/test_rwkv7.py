"""RWKV-7: the WKV op against its float64 reference, the language model's three modes, official checkpoints, and
parity with the `rwkv` package on random official-format weights (tests/rwkv_oracle.py runs it in a subprocess).
"""

import math

import pytest
import torch
from lm_modes import chunked_logits, rnn_logits
from rwkv_oracle import package_outputs

import zoo
from blocks.rwkv7 import pack_state, unpack_state
from blocks.wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step
from zoo.models.rwkv4 import RWKV4LM, RWKV4Config
from zoo.models.rwkv7 import (
    RWKV7LM,
    RWKV7Config,
    checkpoint_filter_fn,
    config_from_state_dict,
    is_state_dict,
    to_official_state_dict,
)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# The WKV op

def wkv_inputs(B, T, H, N, dtype=torch.float64, seed=0, log_w=None):
    """Inputs as RWKV-7 makes them: log w = -0.606531 sigmoid(z) with z ~ 3 N(0, 1), a = -kk, b = kk * iclr
    (kk unit-norm per head, iclr uniform in (0, 1)); r, k, v standard normal."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    if log_w is None:
        log_w = -0.606531 * torch.sigmoid(3 * torch.randn(B, T, H, N, generator=g))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    return [x.to(dtype) for x in (r, log_w, k, v, -kk, kk * iclr)]


def random_state(B, H, N, dtype=torch.float64, seed=0):
    return torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_step_is_the_recurrence():
    """S' = S (diag(w) + a b^T) + v k^T and y = S' r, written out with explicit matrices."""
    r, log_w, k, v, a, b = (x[:, 0] for x in wkv_inputs(2, 1, 3, 5))
    S = random_state(2, 3, 5)
    transition = torch.diag_embed(log_w.exp()) + a[..., :, None] * b[..., None, :]
    expected = S @ transition + v[..., :, None] * k[..., None, :]
    y, new = wkv7_step(r, log_w, k, v, a, b, S)
    torch.testing.assert_close(new, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y, (expected @ r[..., None])[..., 0], rtol=1e-14, atol=1e-14)


def test_delta_rule_with_full_learning_rate():
    """No decay and iclr = 1: the state then maps kk to v exactly (it replaces what it held along kk)."""
    B, H, N = 1, 2, 6
    r, _, _, v, a, _ = (x[:, 0] for x in wkv_inputs(B, 1, H, N))
    kk = torch.nn.functional.normalize(-a, dim=-1)   # unit norm in float64
    _, S = wkv7_step(r, torch.zeros_like(r), kk, v, -kk, kk, random_state(B, H, N))
    torch.testing.assert_close((S @ kk[..., None])[..., 0], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 7, 16, 37, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(T, with_state):
    """fp64: equal to rounding; fp32: relative error <= 1e-5 in outputs and final state (measured: ~2e-7)."""
    B, H, N = 2, 3, 8
    inputs = wkv_inputs(B, T, H, N, seed=T)
    state = random_state(B, H, N, seed=T + 1) if with_state else None
    ref, ref_state = wkv7_reference(*inputs, state=state)
    y, new_state = wkv7_chunked(*inputs, state=state)
    assert y.dtype == new_state.dtype == torch.float64
    assert rel_err(y, ref) < 1e-12 and rel_err(new_state, ref_state) < 1e-12
    y, new_state = wkv7_chunked(*(x.float() for x in inputs), state=None if state is None else state.float())
    assert y.dtype == new_state.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5 and rel_err(new_state, ref_state) < 1e-5


@pytest.mark.parametrize("chunk_len", [1, 2, 5, 64])
def test_chunked_fp64_is_exact_for_any_chunk_length(chunk_len):
    inputs = wkv_inputs(2, 45, 2, 4, seed=chunk_len)
    ref, ref_state = wkv7_reference(*inputs)
    y, state = wkv7_chunked(*inputs, chunk_len=chunk_len)
    assert rel_err(y, ref) < 1e-12 and rel_err(state, ref_state) < 1e-12


@pytest.mark.parametrize("decays", ["fastest", "slowest", "mixed", "beyond_rwkv7"])
def test_chunked_extreme_decays(decays):
    """The edges of RWKV-7's decays (log w -> -0.606531, log w -> 0) and decays far beyond them (log w down to -40,
    where the chunks shorten so e^{-sum log w} stays finite): finite and exact, in fp32 too."""
    B, T, H, N = 2, 100, 2, 8
    g = torch.Generator().manual_seed(7)
    shape = (B, T, H, N)
    log_w = {"fastest": torch.full(shape, -0.606531),
             "slowest": torch.full(shape, -1e-9),
             "mixed": torch.where(torch.rand(shape, generator=g) < 0.5, -0.606531, -1e-9),
             "beyond_rwkv7": -40 * torch.rand(shape, generator=g)}[decays]
    inputs = wkv_inputs(B, T, H, N, seed=8, log_w=log_w)
    ref, ref_state = wkv7_reference(*inputs)
    y, state = wkv7_chunked(*inputs)
    assert rel_err(y, ref) < 1e-12 and rel_err(state, ref_state) < 1e-12
    y, state = wkv7_chunked(*(x.float() for x in inputs))
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel_err(y, ref) < 1e-5 and rel_err(state, ref_state) < 1e-5


def test_chunked_gradcheck():
    """Gradients of the chunked form (every input and the incoming state), several chunks, against finite
    differences in float64."""
    inputs = [x.requires_grad_() for x in wkv_inputs(1, 5, 2, 3, seed=3)]
    state = random_state(1, 2, 3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda *xs: wkv7_chunked(*xs, chunk_len=2), (*inputs, state))


def test_wkv7_entry_point_and_errors():
    """One token goes through the step, longer inputs through the chunked form; both match the reference."""
    for T in (1, 20):
        inputs = wkv_inputs(2, T, 2, 4, seed=T)
        state = random_state(2, 2, 4)
        ref, ref_state = wkv7_reference(*inputs, state=state)
        y, new_state = wkv7(*inputs, state=state)
        assert rel_err(y, ref) < 1e-12 and rel_err(new_state, ref_state) < 1e-12
    y, new_state = wkv7(*(x.bfloat16() for x in inputs))
    assert y.dtype == torch.bfloat16 and new_state.dtype == torch.float32      # output in v's dtype, state fp32
    r, log_w, k, v, a, b = wkv_inputs(2, 4, 2, 4)
    with pytest.raises(ValueError, match="must be \\[B, T, H, N\\]"):
        wkv7(r[0], log_w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="log_w must have k's shape"):
        wkv7(r, log_w[:, :, :1], k, v, a, b)
    with pytest.raises(ValueError, match="state must be"):
        wkv7(r, log_w, k, v, a, b, state=torch.zeros(2, 2, 4, 3, dtype=torch.float64))


def test_a_decay_bound_from_the_caller_spares_reading_log_w():
    """With max_decay (RWKV-7's layers pass their bound) the chunk length is set without reading log_w back from the
    device (a meta tensor has no values to read), and the result is the same."""
    from blocks.rwkv7 import LOG_DECAY_SCALE
    from blocks.wkv7 import _safe_chunk_len

    assert _safe_chunk_len(torch.empty(2, 64, 2, 4, device="meta"), 16, max_decay=LOG_DECAY_SCALE) == 16
    with pytest.raises((NotImplementedError, RuntimeError)):
        _safe_chunk_len(torch.empty(2, 64, 2, 4, device="meta"), 16)
    inputs = wkv_inputs(2, 37, 2, 4, seed=3)                                # decays in RWKV-7's range
    assert all(torch.equal(x, y) for x, y in zip(wkv7(*inputs, max_decay=LOG_DECAY_SCALE), wkv7(*inputs)))


# ---------------------------------------------------------------------------------------------------------------
# Random official-format weights

def random_official_state_dict(config: RWKV7Config, seed: int) -> dict[str, torch.Tensor]:
    """Official keys (in order) and shapes, every tensor drawn at realistic ranges rather than the official init
    (which zeroes the LoRA downs, W_o and the FFN's W_v, and would hide mistakes): matrices N(0, 1/fan_in), LoRA
    factors N(0, 1/rows), norms near (1, 0), mixes x_* in (0, 1), decay logits w0 in (-6, 2) (w from 0.998 to
    0.59), a0 and v0 in (-2, 2), k_k and k_a in (0.3, 1.7), bonus r_k ~ N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(shape, generator=g)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=g)

    draws = {"x_": lambda s: uniform(s, 0, 1), "w0": lambda s: uniform(s, -6, 2), "a0": lambda s: uniform(s, -2, 2),
             "v0": lambda s: uniform(s, -2, 2), "k_k": lambda s: uniform(s, 0.3, 1.7),
             "k_a": lambda s: uniform(s, 0.3, 1.7), "r_k": lambda s: normal(s, 0.5)}
    sd = {}
    for key, tensor in to_official_state_dict(RWKV7LM(config)).items():
        shape, name = tensor.shape, key.rsplit(".", 1)[-1]
        if key.endswith(".bias"):
            sd[key] = normal(shape, 0.1)
        elif key.endswith(".weight") and tensor.dim() == 1:
            sd[key] = normal(shape, 0.2, mean=1.0)
        elif key == "emb.weight":
            sd[key] = normal(shape)
        elif key.endswith(".weight"):
            sd[key] = normal(shape, 1 / math.sqrt(shape[1]))
        elif name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            sd[key] = normal(shape, 1 / math.sqrt(shape[0]))
        else:
            sd[key] = draws["x_" if name.startswith("x_") else name](shape)
    return sd


def random_model(config: RWKV7Config, seed: int, dtype=torch.float32) -> RWKV7LM:
    model = RWKV7LM(config)
    model.load_state_dict(checkpoint_filter_fn(random_official_state_dict(config, seed), model))
    return model.to(dtype).eval()


SMALL = RWKV7Config(vocab_size=97, n_layer=3, n_embd=64, head_size=16, dim_ffn=160, ctx_len=64, tokenizer="byte",
                    decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=16)


# ---------------------------------------------------------------------------------------------------------------
# The language model

def parallel(model, tokens):
    return model(tokens, return_state=True)


def chunked_prefill(model, tokens):
    return chunked_logits(model, tokens, (17, 33))


rnn = rnn_logits


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_three_modes_agree(dtype, tol):
    """Parallel, state-carrying chunks and RNN mode give the same logits and final state on a random model."""
    model = random_model(SMALL, seed=1, dtype=dtype)
    tokens = torch.randint(SMALL.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, expected_state = parallel(model, tokens)
        assert expected.shape == (2, 50, SMALL.vocab_size) and expected_state.dtype == dtype
        for mode in (chunked_prefill, rnn):
            logits, state = mode(model, tokens)
            assert rel_err(logits, expected) <= tol, mode.__name__
            assert rel_err(state, expected_state) <= tol, mode.__name__


def test_state_has_a_fixed_size_and_batch_on_dim_2():
    """[n_layer, head_size + 2, B, C] after 3 or 120 tokens; one row of a batch's state continues as that sequence
    alone would (zoo.generate and eval.scoring slice and concatenate states on dim 2)."""
    model = random_model(SMALL, seed=3)
    tokens = torch.randint(SMALL.vocab_size, (2, 120), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        shapes = {model(tokens[:, :T], return_state=True)[1].shape for T in (3, 120)}
        assert shapes == {(SMALL.n_layer, SMALL.head_size + 2, 2, SMALL.n_embd)}
        _, state = model(tokens[:, :60], return_state=True)
        both, _ = model(tokens[:, 60:], state=state, return_state=True)
        second, _ = model(tokens[1:, 60:], state=state[:, :, 1:2].contiguous(), return_state=True)
    assert rel_err(second[0], both[1]) < 1e-5


def test_pack_state_round_trip():
    att, ffn = torch.randn(3, 8), torch.randn(3, 8)
    wkv_state = torch.randn(3, 2, 4, 4)
    packed = pack_state(att, wkv_state, ffn)
    assert packed.shape == (6, 3, 8)
    for got, expected in zip(unpack_state(packed, 4), (att, wkv_state, ffn)):
        assert torch.equal(got, expected)


def test_official_init_and_weight_decay_groups():
    """Spot checks of the x070 init on rwkv7-tiny, and the official weight-decay split."""
    model = zoo.create_model("rwkv7-tiny")
    n_layer = model.config.n_layer
    for i, block in enumerate(model.blocks):
        assert torch.all(block.att.output.weight == 0) and torch.all(block.ffn.value.weight == 0)
        assert torch.allclose(block.att.ln_x.weight, torch.tensor(((i + 1) / n_layer) ** 0.7))
        assert -6.5 - 1e-6 <= block.att.w0.min() and block.att.w0.max() <= -1.5 + 1e-6
        assert torch.all(block.att.w1 == 0) and torch.all(block.att.k_k == 0.85)
    assert "blocks.0.att.v0" not in dict(model.named_parameters())        # layer 0's are buffers
    assert "blocks.0.att.v0" in model.state_dict() and "blocks.1.att.v0" in dict(model.named_parameters())
    no_decay = model.no_weight_decay()
    assert {"blocks.0.att.x_r", "blocks.0.att.w1", "blocks.0.att.r_k", "blocks.0.ln1.weight"} <= no_decay
    assert not {"emb.weight", "head.weight", "blocks.0.att.key.weight", "blocks.0.ffn.value.weight"} & no_decay


OFFICIAL_SIZES = {"rwkv7-0.1b": (12, 768, [64, 64, 32, 128], 191_034_624),
                  "rwkv7-0.4b": (24, 1024, [64, 64, 32, 128], 450_767_872),
                  "rwkv7-1b5": (24, 2048, [96, 96, 64, 256], 1_527_404_544),
                  "rwkv7-2b9": (32, 2560, [96, 96, 64, 320], 2_947_735_040)}
"""(n_layer, n_embd, decay/iclr/value/gate LoRA sizes, parameters) of the released RWKV-7 World models; the paper
calls them 0.19B, 0.45B, 1.5B and 2.9B (layer 0's unused v0/v1/v2, buffers here, are not counted)."""


def test_registered_sizes():
    assert zoo.list_models("rwkv7*") == sorted([*OFFICIAL_SIZES, "rwkv7-tiny"])
    for name, (n_layer, n_embd, ranks, params) in OFFICIAL_SIZES.items():
        model = zoo.create_model(name, device="meta")
        c = model.config
        assert (c.n_layer, c.n_embd, c.head_size, c.ffn_size, c.vocab_size, c.tokenizer) == (
            n_layer, n_embd, 64, 4 * n_embd, 65536, "world")
        assert [c.lora_ranks[k] for k in ("decay", "iclr", "value", "gate")] == ranks
        assert tuple(model.blocks[1].att.g1.shape) == (n_embd, ranks[3])
        assert sum(p.numel() for p in model.parameters()) == params


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_official_round_trip(tmp_path, dtype):
    """A .pth in the official format loads into a float32 model (config inferred from shapes) and exports back key
    for key, in order, with the file's dtype and values."""
    source = {k: v.to(dtype) for k, v in random_official_state_dict(SMALL, seed=9).items()}
    torch.save(source, tmp_path / "rwkv7.pth")
    loaded = torch.load(tmp_path / "rwkv7.pth", map_location="cpu", weights_only=True)
    config = config_from_state_dict(loaded, ctx_len=SMALL.ctx_len, tokenizer=SMALL.tokenizer)
    assert config == SMALL
    model = RWKV7LM(config)
    model.load_state_dict(checkpoint_filter_fn(loaded, model))
    assert model.emb.weight.dtype == torch.float32
    exported = to_official_state_dict(model, dtype=dtype)
    assert list(exported) == list(source)
    assert all(exported[k].dtype == dtype and torch.equal(exported[k], source[k]) for k in source)


def test_filter_fills_layer_0_unused_value_mix():
    """Files without layer 0's v0/v1/v2 (unused there; some conversions drop them) still load."""
    source = random_official_state_dict(SMALL, seed=10)
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        del source[key]
    config = config_from_state_dict(source)
    assert config.value_lora == SMALL.value_lora
    model = RWKV7LM(config)
    model.load_state_dict(checkpoint_filter_fn(source, model))


def test_is_state_dict_tells_the_versions_apart():
    assert is_state_dict(random_official_state_dict(SMALL, seed=11))
    rwkv4_dict = RWKV4LM(RWKV4Config(vocab_size=50, n_layer=2, n_embd=32)).state_dict()
    assert not is_state_dict(rwkv4_dict)
    H, N, C = 2, 16, 32
    rwkv5_dict = {"emb.weight": torch.zeros(50, C), "blocks.0.att.time_decay": torch.zeros(H, N),
                  "blocks.0.att.time_faaaa": torch.zeros(H, N), "blocks.0.att.ln_x.weight": torch.zeros(C),
                  "blocks.0.att.gate.weight": torch.zeros(C, C), "blocks.0.att.time_mix_k": torch.zeros(1, 1, C)}
    rwkv6_dict = {**rwkv5_dict, "blocks.0.att.time_maa_x": torch.zeros(1, 1, C),
                  "blocks.0.att.time_decay_w1": torch.zeros(C, 64), "blocks.0.att.time_maa_w1": torch.zeros(C, 160)}
    assert not is_state_dict(rwkv5_dict) and not is_state_dict(rwkv6_dict)


def test_state_dict_errors():
    good = random_official_state_dict(SMALL, seed=12)
    with pytest.raises(KeyError, match="blocks.0.att.r_k"):
        config_from_state_dict({k: v for k, v in good.items() if k != "blocks.0.att.r_k"})
    with pytest.raises(KeyError, match="not an RWKV-7 state dict"):
        config_from_state_dict(RWKV4LM(RWKV4Config(vocab_size=50, n_layer=2, n_embd=32)).state_dict())
    with pytest.raises(ValueError, match="n_head \\* head_size"):
        config_from_state_dict({**good, "blocks.0.att.r_k": torch.zeros(3, 16)})
    with pytest.raises(ValueError, match="DeepEmbed"):
        config_from_state_dict({**good, "blocks.0.ffn.s_emb.weight": torch.zeros(97, 32)})
    with pytest.raises(ValueError, match="head_size must divide"):
        RWKV7Config(n_embd=64, head_size=48)


def test_bad_inputs_get_clear_errors():
    model = random_model(SMALL, seed=13)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, SMALL.vocab_size]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="another model or batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), state=model.init_state(3))
    rwkv4_state = RWKV4LM(RWKV4Config(vocab_size=50, n_layer=3, n_embd=64)).init_state(1)
    with pytest.raises(ValueError, match="another model or batch size"):
        model.forward_rnn(torch.zeros(1, dtype=torch.long), rwkv4_state)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the `rwkv` package (v0.8.32, RWKV_x070, strategy "cpu fp32")

PARITY = RWKV7Config(vocab_size=300, n_layer=2, n_embd=128, head_size=64, dim_ffn=448, ctx_len=64, tokenizer="byte",
                     decay_lora=32, iclr_lora=32, value_lora=32, gate_lora=64)
PARITY_LEN, ATOL = 48, 1e-4

@pytest.fixture(scope="module")
def parity_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rwkv7_parity")
    torch.save(random_official_state_dict(PARITY, seed=20250318), folder / "RWKV-x070-test.pth")
    tokens = torch.randint(PARITY.vocab_size, (PARITY_LEN,), generator=torch.Generator().manual_seed(14))
    torch.save(tokens, folder / "tokens.pt")
    return folder, tokens


@pytest.fixture(scope="module")
def package_logits(parity_files):
    """{"sequence", "token_by_token"}: the package's logits [T, V] in its two modes."""
    folder, tokens = parity_files
    return package_outputs(folder / "RWKV-x070-test.pth", tokens, rwkv7=True)


@pytest.fixture(scope="module")
def ours(parity_files):
    folder, _ = parity_files
    state_dict = torch.load(folder / "RWKV-x070-test.pth", map_location="cpu", weights_only=True)
    assert is_state_dict(state_dict)
    model = RWKV7LM(config_from_state_dict(state_dict))
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model.eval()


@pytest.mark.parametrize("oracle_mode", ["sequence", "token_by_token"])
@pytest.mark.parametrize("mode", [parallel, chunked_prefill, rnn], ids=lambda f: f.__name__)
def test_parity_with_rwkv_package(ours, parity_files, package_logits, mode, oracle_mode):
    """Each of our modes matches each of the package's to 1e-4 in the logits at every position."""
    _, tokens = parity_files
    with torch.no_grad():
        got = mode(ours, tokens[None])[0][0]
    expected = package_logits[oracle_mode]
    assert got.shape == expected.shape == (PARITY_LEN, PARITY.vocab_size)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{mode.__name__} vs the package's {oracle_mode} mode: max abs logit difference {diff:.3g}"
