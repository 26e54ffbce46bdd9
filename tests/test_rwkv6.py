"""RWKV-6 ("Finch", arXiv 2404.05892): the WKV-6 op against its float64 reference on fresh random inputs, its
gradients, the language model's three modes, its constant-size state, the official x060 init and sizes, and parity
with the `rwkv` PyPI package on a random official-format `.pth` written by our exporter."""

import dataclasses
import math

import pytest
import torch
from lm_modes import chunked_logits, rnn_logits
from rwkv_oracle import package_outputs

import zoo
import zoo.models.rwkv6 as rwkv6  # registers rwkv6-*
from blocks.rwkv5 import unpack_wkv_state
from blocks.wkv6 import wkv6, wkv6_chunked, wkv6_reference
from zoo.checkpoint import CheckpointError, load_weights

VOCAB = 97


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def wkv_inputs(B, T, H, N, dtype=torch.float32, decays=(-6.0, 1.0), with_state=True, seed=None):
    """r, k, v ~ N(0, 1); decay logits d uniform in `decays` (w = exp(-e^d): (-6, 1) spans 0.998 .. 0.07 per token);
    u ~ N(0, 1); an initial state ~ N(0, 1) or None. Returns (inputs, seed)."""
    seed = torch.seed() if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H * N, generator=g) for _ in range(3))
    lo, hi = decays
    w = lo + (hi - lo) * torch.rand(B, T, H * N, generator=g)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g) if with_state else None
    return [None if x is None else x.to(dtype) for x in (r, k, v, w, u, state)], seed


# ---- the WKV-6 op ------------------------------------------------------------------------------

def test_reference_matches_the_defining_sum():
    """y_t = sum_{s<t} (r_t . k_s prod_{s<j<t} w_j) v_s + (r_t . u k_t) v_t + (r_t prod_{j<t} w_j)^T S_0, per head."""
    (r, k, v, w, u, s0), _ = wkv_inputs(2, 6, 2, 3, torch.float64)
    y, _ = wkv6_reference(r, k, v, w, u, s0)
    B, T, C = k.shape
    H, N = u.shape
    r, k, v, w = (x.view(B, T, H, N) for x in (r, k, v, w))
    decay = torch.exp(-torch.exp(w))
    for t in range(T):
        expected = torch.einsum("bhi,bhij->bhj", r[:, t] * decay[:, :t].prod(1), s0)
        expected += (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        for s in range(t):
            expected += (r[:, t] * k[:, s] * decay[:, s + 1:t].prod(1)).sum(-1, keepdim=True) * v[:, s]
        assert torch.allclose(y.view(B, T, H, N)[:, t], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decays", [(-6.0, 1.0), (-20.0, 8.0)], ids=["realistic", "extreme"])
@pytest.mark.parametrize("with_state", [False, True], ids=["empty", "state"])
@pytest.mark.parametrize("B,T,H,N", [(2, 1, 2, 4), (1, 7, 1, 8), (2, 8, 2, 4), (2, 29, 3, 4), (1, 300, 2, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["fp64", "fp32"])
def test_chunked_matches_reference(B, T, H, N, dtype, tol, decays, with_state):
    """Outputs and final state; T = 1, shorter than a chunk, one chunk, ragged, many chunks. Extreme decay logits
    (-20 .. 8) give per-token decays from 1 - 2e-9 to exp(-2981), mixed inside chunks."""
    (r, k, v, w, u, s0), seed = wkv_inputs(B, T, H, N, dtype, decays, with_state)
    y_ref, s_ref = wkv6_reference(r, k, v, w, u, s0)
    y, s = wkv6_chunked(r, k, v, w, u, s0)
    assert y.dtype == dtype and s.dtype == dtype and s.shape == (B, H, N, N)
    assert rel_err(y, y_ref) < tol, f"seed {seed}"
    assert rel_err(s, s_ref) < tol, f"seed {seed}"


@pytest.mark.parametrize("chunk_len", [1, 2, 5, 8, 16, 64])
def test_chunked_is_exact_for_any_chunk_length(chunk_len):
    (r, k, v, w, u, s0), seed = wkv_inputs(2, 37, 2, 4, torch.float64)
    y_ref, s_ref = wkv6_reference(r, k, v, w, u, s0)
    y, s = wkv6_chunked(r, k, v, w, u, s0, chunk_len=chunk_len)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12, f"seed {seed}"


def test_entry_point_step_and_chunked_paths_and_dtypes():
    """wkv6: one token through the step path, longer sequences through the chunked form; bf16 inputs are computed
    in float32 and the output comes back in v's dtype, the state in float32."""
    (r, k, v, w, u, s0), seed = wkv_inputs(2, 12, 2, 4)
    y_ref, s_ref = wkv6_reference(r, k, v, w, u, s0)
    y, s = wkv6(r, k, v, w, u, s0)
    assert rel_err(y, y_ref) < 2e-6 and rel_err(s, s_ref) < 2e-6, f"seed {seed}"
    y1, s1 = wkv6(r[:, :1], k[:, :1], v[:, :1], w[:, :1], u, s0)
    assert rel_err(y1, y_ref[:, :1]) < 2e-6, f"seed {seed}"
    y_bf16, s_bf16 = wkv6(*(x.bfloat16() for x in (r, k, v, w)), u, s0)
    assert y_bf16.dtype == torch.bfloat16 and s_bf16.dtype == torch.float32
    assert rel_err(y_bf16, y_ref) < 3e-2, f"seed {seed}"      # the inputs' bf16 rounding: 1.0e-2 worst of 500 draws


def test_chunked_gradients_pass_gradcheck():
    """All inputs, the initial state included, over two chunks and a ragged third (T = 5, chunk_len = 2)."""
    (r, k, v, w, u, s0), _ = wkv_inputs(1, 5, 2, 2, torch.float64, decays=(-3.0, 1.0), seed=0)
    inputs = [x.requires_grad_() for x in (r, k, v, w, u, s0)]

    def run(*xs):
        return wkv6_chunked(*xs, chunk_len=2)

    assert torch.autograd.gradcheck(run, inputs)


def test_chunked_gradients_match_the_reference_recurrence():
    """Backpropagation through the chunked form and through the token-by-token reference agree (T = 29, 4 chunks)."""
    (r, k, v, w, u, s0), seed = wkv_inputs(2, 29, 2, 4, torch.float64)
    inputs = [x.requires_grad_() for x in (r, k, v, w, u, s0)]
    weights = torch.randn(2, 29, 8, dtype=torch.float64)
    grads = []
    for op in (wkv6_reference, wkv6_chunked):
        y, s = op(*inputs)
        grads.append(torch.autograd.grad((y * weights).sum() + s.square().sum(), inputs))
    for name, got, expected in zip(("r", "k", "v", "w", "u", "state"), grads[1], grads[0]):
        assert rel_err(got, expected) < 1e-11, f"d/d{name}, seed {seed}"


@pytest.mark.parametrize("change, match", [
    ({"k": torch.zeros(2, 5, 7)}, r"r, k, v and w must all be \[B, T, C\]"),
    ({"u": torch.zeros(3, 4)}, r"u must be \[H, N\] with H \* N = C = 8"),
    ({"state": torch.zeros(2, 2, 4, 3)}, r"state must be \[B, H, N, N\] = \(2, 2, 4, 4\)"),
    ({"v": torch.zeros(2, 5, 8, dtype=torch.long)}, "v must be a floating-point tensor"),
])
def test_wkv6_bad_inputs(change, match):
    (r, k, v, w, u, s0), _ = wkv_inputs(2, 5, 2, 4)
    args = dict(r=r, k=k, v=v, w=w, u=u, state=s0) | change
    with pytest.raises((ValueError, TypeError), match=match):
        wkv6(**args)


# ---- the language model -----------------------------------------------------------------------

def randomize_(model, seed=0):
    """Non-trivial weights at realistic ranges (the official init zeroes W_o, the FFN's W_r and W_v and the LoRAs' A):
    time_maa_* uniform in (0, 1); LoRA A ~ N(0, 1/C) and B ~ N(0, 0.25/rank), so the data-dependent mixes and decay
    offsets are O(0.5); time_decay uniform in (-6, 1) (decays 0.998 .. 0.07 per token before the LoRA); time_faaaa
    uniform in (-1, 1); LayerNorm and GroupNorm weights 1 +- 0.1, biases +- 0.1; matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            normal = torch.randn(p.shape, generator=g, dtype=torch.float64)
            uniform = torch.rand(p.shape, generator=g, dtype=torch.float64)
            if name.endswith(("time_maa_w1", "time_decay_w1")):
                value = normal / math.sqrt(p.shape[0])
            elif name.endswith(("time_maa_w2", "time_decay_w2")):
                value = normal * 0.5 / math.sqrt(p.shape[-2])
            elif name.endswith("time_decay"):
                value = -6 + 7 * uniform
            elif name.endswith("time_faaaa"):
                value = 2 * uniform - 1
            elif "time_maa" in name:
                value = uniform
            elif p.dim() == 1:
                value = 1 + 0.1 * normal if name.endswith("weight") else 0.1 * normal
            else:
                value = normal / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))
    return model


def tiny(dtype=torch.float32, seed=0, **overrides):
    cfg = dict(vocab_size=VOCAB, n_layer=3, n_embd=32, head_size=8, dim_ffn=64, mix_lora=4, decay_lora=8) | overrides
    return randomize_(zoo.create_model("rwkv6-tiny", **cfg), seed).to(dtype).eval()
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("T, cuts", [(1, []), (2, [1]), (11, [4, 5]), (45, [1, 17, 33])])
def test_parallel_chunked_and_rnn_modes_agree(dtype, tol, T, cuts):
    model = tiny(dtype)
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        parallel, p_state = model(idx, return_state=True)
        chunked, c_state = chunked_logits(model, idx, cuts)
        rnn, r_state = rnn_logits(model, idx)
    assert parallel.shape == (2, T, VOCAB) and parallel.dtype == dtype
    assert p_state.shape == (3, 8 + 2, 2, 32) and p_state.dtype == dtype
    assert rel_err(chunked, parallel) <= tol and rel_err(rnn, parallel) <= tol
    assert rel_err(c_state, p_state) <= tol and rel_err(r_state, p_state) <= tol


def test_state_has_a_constant_size_and_batch_on_dim_2():
    """The state of 1 token and of 300 has one shape; batch rows are independent and sit on dim 2 (zoo.generate and
    eval.scoring slice and concatenate states there); 400 RNN steps stay finite."""
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, short = model(idx[:, :1], return_state=True)
        logits, long = model(idx, return_state=True)
        row_logits, row_state = model(idx[1:], return_state=True)
        assert short.shape == long.shape == model.init_state(2).shape == (3, 10, 2, 32)
        assert rel_err(row_state, long[:, :, 1:]) < 1e-5 and rel_err(row_logits, logits[1:]) < 1e-5
        swapped = torch.cat([long[:, :, 1:], long[:, :, :1]], dim=2)
        assert rel_err(model(idx[:, :5].flip(0), state=swapped)[0], model(idx[:, :5], state=long)[1]) < 1e-6
        state, token = model.init_state(1), torch.tensor([3])
        for _ in range(400):
            step_logits, state = model.forward_rnn(token, state)
            token = step_logits.argmax(-1)
        assert state.shape == (3, 10, 1, 32) and torch.isfinite(state).all() and torch.isfinite(step_logits).all()


@pytest.mark.parametrize("mode", [True, "selective"], ids=["full", "selective"])
def test_gradients_flow_through_carried_state_and_checkpointing_keeps_them(mode):
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        _, state = model(idx[:, :5], return_state=True)
        model(idx[:, 5:], state=state).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert plain["blocks.0.att.time_decay_w1"].abs().max() > 0 and plain["blocks.0.att.time_faaaa"].abs().max() > 0
    model.set_grad_checkpointing(mode)
    checkpointed = grads()
    assert all(torch.allclose(checkpointed[n], g, rtol=1e-5, atol=1e-7) for n, g in plain.items())


def test_official_init():
    """x060 (RWKV-LM RWKV-v5/src/model.py): fancy maa / decay / bonus ramps, LoRA A zero and B +-0.01, zero W_o and
    FFN W_r, W_v, orthogonal W_r, W_v, W_k (x0.1), W_g (x0.1), FFN W_k, ln_x weight ((l+1)/L)^0.7."""
    C, L, N = 64, 4, 16
    model = zoo.create_model("rwkv6-tiny", n_layer=L, n_embd=C, head_size=N)
    c = torch.arange(C, dtype=torch.float64)
    eye = torch.eye(C)
    for l, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        depth, shallow = l / (L - 1), 1 - l / L
        for name, expected in (("x", 1 - (c / C) ** shallow), ("w", 1 - (c / C) ** shallow),
                               ("k", 1 - (c / C) ** shallow), ("v", 1 - (c / C) ** shallow - 0.3 * depth),
                               ("r", 1 - (c / C) ** (0.5 * shallow)), ("g", 1 - (c / C) ** (0.5 * shallow))):
            got = getattr(att, f"time_maa_{name}")
            assert got.shape == (1, 1, C) and torch.allclose(got.double().flatten(), expected, atol=1e-6), name
        assert torch.allclose(att.time_decay.double().flatten(), -6 + 5 * (c / (C - 1)) ** (0.7 + 1.3 * depth),
                              atol=1e-6)
        bonus = depth * (1 - c / (C - 1)) + 0.1 * ((c + 1) % 3 - 1)
        assert att.time_faaaa.shape == (C // N, N) and torch.allclose(att.time_faaaa.double().flatten(), bonus,
                                                                      atol=1e-6)
        assert (att.time_maa_w1 == 0).all() and (att.time_decay_w1 == 0).all()
        assert 0 < att.time_maa_w2.abs().max() <= 0.01 and 0 < att.time_decay_w2.abs().max() <= 0.01
        for zero in (att.output, ffn.receptance, ffn.value):
            assert (zero.weight == 0).all()
        for lin, gain in ((att.receptance, 1.0), (att.value, 1.0), (att.key, 0.1), (att.gate, 0.1)):
            assert torch.allclose(lin.weight @ lin.weight.T, gain ** 2 * eye, atol=1e-5)
        assert torch.allclose(ffn.key.weight.T @ ffn.key.weight, eye, atol=1e-5)      # [3.5C, C]: orthonormal columns
        assert torch.allclose(ffn.time_maa_k.double().flatten(), 1 - (c / C) ** (shallow ** 3), atol=1e-6)
        assert torch.equal(ffn.time_maa_k, ffn.time_maa_r)
        assert torch.allclose(att.ln_x.weight, torch.full((C,), ((l + 1) / L) ** 0.7))
        assert att.ln_x.num_groups == C // N and att.ln_x.eps == 64e-5
    assert model.emb.weight.abs().max() <= 1e-4
    assert hasattr(model.blocks[0], "ln0") and not hasattr(model.blocks[1], "ln0")
    assert {"blocks.0.att.time_maa_w1", "blocks.0.att.time_decay_w2", "blocks.0.att.ln_x.weight"} <= \
        model.no_weight_decay()


OFFICIAL_SHAPES = {  # name: (n_layer, n_embd, ffn.key [F, C], time_maa_w1 [C, 5R], time_decay_w1 [C, D], parameters)
    "rwkv6-0.1b": (12, 768, 2688, 160, 64, 196_955_136),
    "rwkv6-1b6": (24, 2048, 7168, 160, 64, 1_599_873_024),
    "rwkv6-3b": (32, 2560, 8960, 160, 64, 3_099_863_040),
    "rwkv6-7b": (32, 4096, 14336, 320, 128, 7_635_746_816),
    "rwkv6-14b": (61, 4096, 14336, 320, 128, 14_069_088_256),
}


@pytest.mark.parametrize("name", list(OFFICIAL_SHAPES))
def test_official_sizes(name):
    n_layer, C, F, mix, decay, params = OFFICIAL_SHAPES[name]
    model = zoo.create_model(name, device="meta")
    assert model.config.vocab_size == 65536 and model.config.tokenizer == "world" and model.config.head_size == 64
    assert len(model.blocks) == n_layer and model.state_rows == 66
    att = model.blocks[0].att
    assert model.blocks[0].ffn.key.weight.shape == (F, C)
    assert att.time_maa_w1.shape == (C, mix) and att.time_maa_w2.shape == (5, mix // 5, C)
    assert att.time_decay_w1.shape == (C, decay) and att.time_faaaa.shape == (C // 64, 64)
    assert sum(p.numel() for p in model.parameters()) == params


# ---- bad input --------------------------------------------------------------------------------

def test_bad_tokens_and_states():
    model = tiny()
    with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range for vocab_size={VOCAB}"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"forward_rnn takes token ids of shape \[B\]"):
        model.forward_rnn(torch.tensor([[1]]), model.init_state(1))
    with pytest.raises(ValueError, match=r"state has shape \(3, 10, 2, 32\) but this model and batch need "
                                         r"\(3, 10, 1, 32\)"):
        model.forward_rnn(torch.tensor([1]), model.init_state(2))
    for other in (tiny(head_size=16), zoo.create_model("rwkv4-tiny", vocab_size=VOCAB, n_layer=3, n_embd=32)):
        with pytest.raises(ValueError, match="another model or batch size"):
            model(torch.tensor([[1, 2]]), state=other.init_state(1))
    with pytest.raises(TypeError, match="state must be a tensor"):
        model(torch.tensor([[1]]), state=[torch.zeros(1)])


def test_config_errors():
    with pytest.raises(ValueError, match="n_embd=48 is not a multiple of head_size=32"):
        zoo.create_model("rwkv6-tiny", n_embd=48)
    with pytest.raises(ValueError, match="head_size must be >= 1"):
        rwkv6.RWKV6Config(head_size=0)


# ---- official checkpoints: the rwkv package as oracle -------------------------------------------

ORACLE_CONFIG = dict(vocab_size=300, n_layer=2, n_embd=128, head_size=64)   # dim_ffn 448, LoRA ranks 32 / 64
PROMPT_LEN = 40
PREFILL_SPLITS = (13, 29)
ATOL = 1e-4


@pytest.fixture(scope="module")
def source_model():
    return randomize_(rwkv6.RWKV6LM(rwkv6.RWKV6Config(**ORACLE_CONFIG)), seed=20240410).eval()


@pytest.fixture(scope="module")
def official_pth(source_model, tmp_path_factory):
    """Random official-format RWKV-6 weights, written by our exporter as an fp32 `.pth`."""
    path = tmp_path_factory.mktemp("official") / "RWKV-x060-test.pth"
    torch.save(rwkv6.to_official_state_dict(source_model), path)
    return path


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(ORACLE_CONFIG["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def oracle_logits(official_pth, prompt):
    """The rwkv package's logits [T, V] on the file, in sequence mode (all positions) and token by token, and its
    state after the prompt (per layer: att x_prev [C], WKV state [H, N, N], ffn x_prev [C])."""
    outputs = package_outputs(official_pth, prompt[0])
    assert outputs["version"] == 6
    return outputs


@pytest.fixture(scope="module")
def loaded(official_pth):
    """Our model built from the file: config_from_state_dict + checkpoint_filter_fn + a strict load."""
    state_dict = torch.load(official_pth, map_location="cpu", weights_only=True)
    model = rwkv6.RWKV6LM(rwkv6.config_from_state_dict(state_dict))
    model.load_state_dict(rwkv6.checkpoint_filter_fn(state_dict, model), strict=True)
    return model.eval()


OUR_MODES = {
    "parallel": lambda model, idx: model(idx)[0],
    "chunked_prefill": lambda model, idx: chunked_logits(model, idx, PREFILL_SPLITS)[0][0],
    "rnn": lambda model, idx: rnn_logits(model, idx)[0][0],
}


@pytest.mark.parametrize("oracle_mode", ["sequence", "token_by_token"])
@pytest.mark.parametrize("mode", list(OUR_MODES))
def test_logits_match_rwkv_package(loaded, prompt, oracle_logits, mode, oracle_mode):
    expected = oracle_logits[oracle_mode]
    with torch.no_grad():
        got = OUR_MODES[mode](loaded, prompt)
    assert got.shape == expected.shape == (PROMPT_LEN, ORACLE_CONFIG["vocab_size"])
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{mode} vs rwkv {oracle_mode}: max abs logit difference {diff:.3g} > {ATOL}"


def test_state_matches_rwkv_package(loaded, prompt, oracle_logits):
    """Our packed state holds the rwkv package's three parts per layer, the WKV state in its [H, key, value] layout."""
    with torch.no_grad():
        _, state = loaded(prompt, return_state=True)
    for layer in range(ORACLE_CONFIG["n_layer"]):
        att_x, wkv_state, ffn_x = oracle_logits["state"][3 * layer:3 * layer + 3]
        assert rel_err(state[layer, 0, 0], att_x) < 1e-5 and rel_err(state[layer, -1, 0], ffn_x) < 1e-5
        assert rel_err(unpack_wkv_state(state[layer, 1:-1], ORACLE_CONFIG["head_size"])[0], wkv_state) < 1e-5


def test_load_and_export_round_trip(source_model, loaded, official_pth):
    """The config read off the file is the source's; the loaded weights are the source's; exporting them again
    writes the file's keys (in order), shapes, dtypes and values; a bf16 export is the bf16 cast of each tensor."""
    assert loaded.config == dataclasses.replace(source_model.config, dim_ffn=448)
    file = torch.load(official_pth, map_location="cpu", weights_only=True)
    assert list(file) == list(source_model.state_dict())
    exported = rwkv6.to_official_state_dict(loaded)
    assert list(exported) == list(file)
    assert all(exported[k].dtype == v.dtype and torch.equal(exported[k], v) for k, v in file.items())
    bf16 = rwkv6.to_official_state_dict(loaded, torch.bfloat16)
    assert all(torch.equal(bf16[k], v.bfloat16()) for k, v in file.items())
    squeezed = {k: v.squeeze() if ".time_maa_" in k and v.dim() == 3 else v for k, v in file.items()}
    restored = rwkv6.checkpoint_filter_fn(squeezed, loaded)
    assert all(torch.equal(restored[k], v) for k, v in file.items())


def test_is_state_dict_tells_rwkv6_from_the_other_versions(official_pth):
    file = torch.load(official_pth, map_location="cpu", weights_only=True)
    assert rwkv6.is_state_dict(file)
    rwkv4_dict = zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32).state_dict()
    C, H = 64, 1
    rwkv5_dict = {"emb.weight": torch.zeros(10, C), "blocks.0.att.time_mix_k": torch.zeros(1, 1, C),
                  "blocks.0.att.time_mix_g": torch.zeros(1, 1, C), "blocks.0.att.time_decay": torch.zeros(H, 64),
                  "blocks.0.att.time_faaaa": torch.zeros(H, 64), "blocks.0.att.ln_x.weight": torch.zeros(C),
                  "blocks.0.att.gate.weight": torch.zeros(C, C)}
    rwkv7_dict = {"emb.weight": torch.zeros(10, C), **{f"blocks.0.att.{n}": torch.zeros(1, 1, C) for n in
                                                       ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k")},
                  "blocks.0.att.w1": torch.zeros(C, 64), "blocks.0.att.ln_x.weight": torch.zeros(C)}
    for other in (rwkv4_dict, rwkv5_dict, rwkv7_dict):
        assert not rwkv6.is_state_dict(other)


def test_config_from_state_dict_errors(official_pth):
    file = torch.load(official_pth, map_location="cpu", weights_only=True)
    assert rwkv6.config_from_state_dict(file, ctx_len=128).ctx_len == 128
    with pytest.raises(KeyError, match="blocks.0.att.time_decay_w1"):
        rwkv6.config_from_state_dict({k: v for k, v in file.items() if k != "blocks.0.att.time_decay_w1"})
    with pytest.raises(KeyError, match="not an RWKV-6 state dict"):
        rwkv6.config_from_state_dict(zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32).state_dict())
    with pytest.raises(ValueError, match=r"time_faaaa has shape \(128,\)"):
        rwkv6.config_from_state_dict(file | {"blocks.0.att.time_faaaa": file["blocks.0.att.time_faaaa"].flatten()})
    model = rwkv6.RWKV6LM(rwkv6.config_from_state_dict(file))
    partial = rwkv6.checkpoint_filter_fn({k: v for k, v in file.items() if not k.startswith("blocks.1.ffn")}, model)
    with pytest.raises(CheckpointError, match=r"missing keys \(5\): blocks.1.ffn.time_maa_k"):
        load_weights(model, partial, "file")
    with pytest.raises(ValueError, match="takes an RWKV-6 model"):
        rwkv6.to_official_state_dict(zoo.create_model("rwkv4-tiny"))
