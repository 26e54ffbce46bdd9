"""RWKV-5 (5.2, and the 5.0 / 5.1 preview): the WKV op against its float64 reference, the LM's three modes, official
init, official checkpoints, parity with the `rwkv` PyPI package on random official-format weights of each version,
and clear errors for bad input."""

import math

import pytest
import torch
from lm_modes import chunked_logits, rnn_logits
from rwkv_oracle import package_outputs

import zoo
import zoo.models.rwkv5 as rwkv5  # registers rwkv5-*
from blocks.rwkv5 import VERSIONS, pack_wkv_state, unpack_wkv_state
from blocks.wkv5 import wkv5, wkv5_chunked, wkv5_reference
from zoo.models.rwkv4 import RWKV4LM, RWKV4Config


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def wkv_inputs(B, T, H, N, decay_range=(-6.0, 1.5), dtype=torch.float32, seed=0, with_state=False):
    """r, k, v ~ N(0, 1); time_decay uniform in decay_range (w = exp(-exp(time_decay))); bonus uniform in [-1, 1.5];
    optionally a random incoming state of the size a few hundred tokens would leave."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    lo, hi = decay_range
    time_decay = lo + (hi - lo) * torch.rand(H, N, generator=g)
    u = -1 + 2.5 * torch.rand(H, N, generator=g)
    state = 10 * torch.randn(B, H, N, N, generator=g) if with_state else None
    return [None if x is None else x.to(dtype) for x in (r, k, v, time_decay, u, state)]


# ---- the WKV op ---------------------------------------------------------------------------------------------------

def test_reference_matches_the_closed_form():
    """y_t = r_t^T (diag(u) k_t v_t^T + sum_{i<t} diag(w)^(t-1-i) k_i v_i^T + diag(w)^t S0), term by term."""
    r, k, v, td, u, s0 = wkv_inputs(2, 9, 2, 3, dtype=torch.float64, with_state=True)
    y, _ = wkv5_reference(r, k, v, td, u, s0)
    w = torch.exp(-torch.exp(td))
    for t in range(9):
        mem = w[..., None] ** t * s0 + u[..., None] * k[:, t, ..., None] * v[:, t, :, None, :]
        for i in range(t):
            mem = mem + w[..., None] ** (t - 1 - i) * k[:, i, ..., None] * v[:, i, :, None, :]
        assert torch.allclose(y[:, t], (r[:, t, ..., None] * mem).sum(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B, T, H, N", [(1, 1, 1, 4), (2, 2, 2, 8), (2, 37, 3, 8), (1, 129, 2, 16), (1, 700, 2, 8)])
def test_chunked_matches_reference_fp32(B, T, H, N, with_state):
    r, k, v, td, u, s0 = wkv_inputs(B, T, H, N, seed=T, with_state=with_state)
    ref, ref_state = wkv5_reference(r, k, v, td, u, s0)
    y, state = wkv5(r, k, v, td, u, s0)
    assert y.dtype == torch.float32 and state.dtype == torch.float32 and state.shape == (B, H, N, N)
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(state, ref_state) <= 1e-5


@pytest.mark.parametrize("chunk_len", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_fp64_is_exact_for_any_chunk_length(chunk_len, with_state):
    r, k, v, td, u, s0 = wkv_inputs(2, 71, 2, 6, dtype=torch.float64, seed=chunk_len, with_state=with_state)
    ref, ref_state = wkv5_reference(r, k, v, td, u, s0)
    y, state = wkv5_chunked(r, k, v, td, u, s0, chunk_len=chunk_len)
    assert y.dtype == torch.float64
    assert rel_err(y, ref) <= 1e-12 and rel_err(state, ref_state) <= 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_extreme_decays_stay_finite_and_exact(dtype, tol):
    """Decays from w = 1 - 2e-9 (time_decay -20) to w = 0 (time_decay 8: log w = -2981), large inputs."""
    B, T, H, N = 2, 300, 2, 8
    r, k, v, _, u, s0 = wkv_inputs(B, T, H, N, dtype=torch.float64, seed=7, with_state=True)
    td = torch.linspace(-20, 8, H * N, dtype=torch.float64).view(H, N)
    k, v = 30 * k, 100 * v
    ref, ref_state = wkv5_reference(r, k, v, td, u, s0)
    y, state = wkv5(*(x.to(dtype) for x in (r, k, v, td, u, s0)))
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel_err(y, ref) <= tol and rel_err(state, ref_state) <= tol


def test_state_carried_between_calls_equals_one_call():
    r, k, v, td, u, _ = wkv_inputs(2, 50, 2, 8, seed=3)
    whole, whole_state = wkv5(r, k, v, td, u)
    first, state = wkv5(r[:, :17], k[:, :17], v[:, :17], td, u)
    single, state = wkv5(r[:, 17:18], k[:, 17:18], v[:, 17:18], td, u, state)
    rest, state = wkv5(r[:, 18:], k[:, 18:], v[:, 18:], td, u, state)
    assert rel_err(torch.cat([first, single, rest], 1), whole) <= 1e-6
    assert rel_err(state, whole_state) <= 1e-6


def test_bf16_inputs_accumulate_in_fp32():
    r, k, v, td, u, _ = wkv_inputs(1, 20, 2, 8, seed=4)
    ref, ref_state = wkv5_reference(*(x.bfloat16() for x in (r, k, v)), td, u)
    y, state = wkv5(r.bfloat16(), k.bfloat16(), v.bfloat16(), td, u)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(state, ref_state) <= 1e-5 and rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("chunk_len", [2, 8])
def test_chunked_gradients_gradcheck(chunk_len):
    """Gradients in r, k, v, time_decay, u and the incoming state, T = 5 (a partial last chunk for chunk_len 2)."""
    inputs = [x.requires_grad_() for x in wkv_inputs(1, 5, 2, 3, dtype=torch.float64, seed=5, with_state=True)]

    def fn(r, k, v, td, u, s0):
        return wkv5_chunked(r, k, v, td, u, s0, chunk_len=chunk_len)

    assert torch.autograd.gradcheck(fn, inputs)


def test_wkv5_rejects_bad_shapes():
    r, k, v, td, u, s0 = wkv_inputs(2, 4, 2, 8, with_state=True)
    with pytest.raises(ValueError, match=r"r, k and v must all be \[B, T, H, N\]"):
        wkv5(r, k[:, :3], v, td, u)
    with pytest.raises(ValueError, match=r"time_decay and u must be \[H=2, N=8\]"):
        wkv5(r, k, v, td.flatten(), u)
    with pytest.raises(ValueError, match=r"state must be \[B=2, H=2, N=8, N=8\]"):
        wkv5(r, k, v, td, u, s0[:1])
    with pytest.raises(TypeError, match="floating-point"):
        wkv5(r, k.long(), v, td, u)


def test_state_packing_round_trip():
    s = torch.randn(3, 4, 5, 5)
    rows = pack_wkv_state(s)
    assert rows.shape == (5, 3, 20)
    assert torch.equal(rows[2, 1, 5:10], s[1, 1, 2])      # row i, batch b, head h's columns: S[b, h, i, :]
    assert torch.equal(unpack_wkv_state(rows, 5), s)


# ---- the language model -------------------------------------------------------------------------------------------

def random_official_state_dict(vocab_size, n_layer, n_embd, head_size, dim_ffn, seed=0, dtype=torch.float32,
                               version="5.2"):
    """A random RWKV-5 state dict of `version` with official keys, shapes and order, every tensor at a realistic,
    non-trivial value: time_decay uniform in [-6, 1.5] (w from 0.9975 to 0.011; [H, N] in 5.2, [H] before),
    time_faaaa in [-1, 1.5] (5.2) or time_first in [-3, 1] (5.0 / 5.1: u = e^time_first), time_mix_* in (0, 1),
    LayerNorm / GroupNorm weights near 1 and biases near 0, matrices N(0, 1/fan_in). 5.0 has no gate; 5.1 declares
    it before the other projections, as the preview trainer did."""
    g = torch.Generator().manual_seed(seed)
    C, H = n_embd, n_embd // head_size

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def norm(prefix):
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(C, generator=g),
                f"{prefix}.bias": 0.2 * torch.randn(C, generator=g)}

    sd = {"emb.weight": torch.randn(vocab_size, C, generator=g)}
    for i in range(n_layer):
        b = f"blocks.{i}"
        sd |= norm(f"{b}.ln1") | norm(f"{b}.ln2") | (norm(f"{b}.ln0") if i == 0 else {})
        sd |= {f"{b}.att.time_mix_{x}": uniform(1, 1, C) for x in ("kvr" if version == "5.0" else "kvrg")}
        if version == "5.2":
            sd |= {f"{b}.att.time_decay": uniform(H, head_size, low=-6.0, high=1.5),
                   f"{b}.att.time_faaaa": uniform(H, head_size, low=-1.0, high=1.5)}
        else:
            sd |= {f"{b}.att.time_decay": uniform(H, low=-6.0, high=1.5),
                   f"{b}.att.time_first": uniform(H, low=-3.0, high=1.0)}
        projections = {"5.0": ("receptance", "key", "value", "output"), "5.1": ("gate", "receptance", "key", "value",
                       "output"), "5.2": ("receptance", "key", "value", "output", "gate")}[version]
        sd |= {f"{b}.att.{x}.weight": matrix(C, C) for x in projections}
        sd |= norm(f"{b}.att.ln_x")
        sd |= {f"{b}.ffn.time_mix_k": uniform(1, 1, C), f"{b}.ffn.time_mix_r": uniform(1, 1, C),
               f"{b}.ffn.key.weight": matrix(dim_ffn, C), f"{b}.ffn.receptance.weight": matrix(C, C),
               f"{b}.ffn.value.weight": matrix(C, dim_ffn)}
    sd |= norm("ln_out")
    sd["head.weight"] = matrix(vocab_size, C)
    return {k: v.to(dtype) for k, v in sd.items()}


def load_official(state_dict):
    """An RWKV5LM from an official state dict, through config_from_state_dict and checkpoint_filter_fn."""
    model = rwkv5.RWKV5LM(rwkv5.config_from_state_dict(state_dict))
    model.load_state_dict(rwkv5.checkpoint_filter_fn(state_dict, model), strict=True)
    return model.eval()


def tiny(dtype=torch.float32, seed=0, version="5.2"):
    """3 layers, width 32 in 4 heads of 8, vocab 97, random official-range weights."""
    return load_official(random_official_state_dict(97, 3, 32, 8, 64, seed, version=version)).to(dtype)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("T, cuts", [(1, []), (2, [1]), (9, [4, 5]), (40, [1, 17, 33]), (67, [3, 35, 36])])
def test_parallel_chunked_and_rnn_modes_agree(dtype, tol, T, cuts, version):
    model = tiny(dtype, version=version)
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        parallel, p_state = model(idx, return_state=True)
        chunked, c_state = chunked_logits(model, idx, cuts)
        rnn, r_state = rnn_logits(model, idx)
    assert parallel.shape == (2, T, 97) and parallel.dtype == dtype
    assert p_state.shape == (3, 8 + 2, 2, 32) and p_state.dtype == dtype
    assert rel_err(chunked, parallel) <= tol and rel_err(rnn, parallel) <= tol
    assert rel_err(c_state, p_state) <= tol and rel_err(r_state, p_state) <= tol


def test_state_size_does_not_grow_and_stays_finite():
    model = tiny()
    short = model(torch.randint(0, 97, (1, 3)), return_state=True)[1]
    long = model(torch.randint(0, 97, (1, 500)), return_state=True)[1]
    assert short.shape == long.shape == model.init_state(1).shape == (3, 10, 1, 32)
    state, token = model.init_state(1), torch.tensor([5])
    with torch.no_grad():
        for _ in range(1000):
            logits, state = model.forward_rnn(token, state)
            token = logits.argmax(-1)
    assert state.shape == short.shape and torch.isfinite(state).all() and torch.isfinite(logits).all()


def test_batch_rows_of_the_state_are_each_sequence_alone():
    """zoo.generate and eval.scoring slice and concatenate the state on dim 2: each row must be its sequence's."""
    model = tiny()
    idx = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        _, batch_state = model(idx, return_state=True)
        for b in range(3):
            _, alone = model(idx[b:b + 1], return_state=True)
            assert rel_err(batch_state[:, :, b:b + 1], alone) <= 1e-6
        rows = torch.cat([batch_state[:, :, 2:3], batch_state[:, :, 0:1]], dim=2)
        logits = model(idx[[2, 0], :3], state=rows)
        expected = torch.cat([model(idx[b:b + 1, :3], state=batch_state[:, :, b:b + 1]) for b in (2, 0)])
    assert rel_err(logits, expected) <= 1e-6


@pytest.mark.parametrize("version", VERSIONS)
def test_gradients_flow_through_carried_state(version):
    model = tiny(version=version).train()
    idx = torch.randint(0, 97, (2, 12))
    _, state = model(idx[:, :5], return_state=True)
    model(idx[:, 5:], state=state).sum().backward()
    att = model.blocks[0].att
    for p in (att.time_decay, att.time_faaaa if version == "5.2" else att.time_first, model.emb.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_official_init():
    L, C, N = 4, 64, 16
    model = zoo.create_model("rwkv5-tiny", n_layer=L, n_embd=C, head_size=N, dim_ffn=224)
    c = torch.arange(C, dtype=torch.float64)
    for l, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        depth, shallow = l / (L - 1), 1 - l / L
        decay = -6 + 5 * (c / (C - 1)) ** (0.7 + 1.3 * depth)
        bonus = depth * (1 - c / (C - 1)) + 0.1 * ((c + 1) % 3 - 1)
        assert att.time_decay.shape == att.time_faaaa.shape == (C // N, N)
        assert torch.allclose(att.time_decay.double().flatten(), decay, atol=1e-6)
        assert torch.allclose(att.time_faaaa.double().flatten(), bonus, atol=1e-6)
        for mu, expected in ((att.time_mix_k, (c / C) ** shallow), (att.time_mix_v, (c / C) ** shallow + 0.3 * depth),
                             (att.time_mix_r, (c / C) ** (0.5 * shallow)), (att.time_mix_g, (c / C) ** (0.5 * shallow)),
                             (ffn.time_mix_k, (c / C) ** shallow), (ffn.time_mix_r, (c / C) ** shallow)):
            assert mu.shape == (1, 1, C) and torch.allclose(mu.double().flatten(), expected, atol=1e-6)
        assert torch.allclose(att.ln_x.weight, torch.full((C,), ((1 + l) / L) ** 0.7)) and (att.ln_x.bias == 0).all()
        assert att.ln_x.eps == pytest.approx(64e-5) and att.ln_x.num_groups == C // N
        for lin in (att.receptance, att.key, att.value, att.gate):
            assert torch.allclose(lin.weight @ lin.weight.T, torch.eye(C), atol=1e-5)
        for zero in (att.output, ffn.value, ffn.receptance):
            assert (zero.weight == 0).all()
        assert torch.allclose(ffn.key.weight.T @ ffn.key.weight, 224 / C * torch.eye(C), atol=1e-4)
    assert model.emb.weight.abs().max() <= 1e-4
    assert hasattr(model.blocks[0], "ln0") and not hasattr(model.blocks[1], "ln0")


@pytest.mark.parametrize("version", ["5.0", "5.1"])
def test_official_init_of_the_preview_versions(version):
    """5.0 / 5.1: time_decay[h] = -6 + 5 (h/(H-1))^(0.7 + 1.3 l/(L-1)) and time_first = -3, one per head; the gate
    (5.1) declared first, none in 5.0."""
    L, C, N = 3, 64, 16
    model = zoo.create_model("rwkv5-tiny", n_layer=L, n_embd=C, head_size=N, version=version)
    h = torch.arange(C // N, dtype=torch.float64)
    for l, block in enumerate(model.blocks):
        att = block.att
        assert not hasattr(att, "time_faaaa") and att.time_first.shape == att.time_decay.shape == (C // N,)
        assert torch.allclose(att.time_decay.double(), -6 + 5 * (h / (C // N - 1)) ** (0.7 + 1.3 * l / (L - 1)))
        assert (att.time_first == -3).all()
    names = [n for n, _ in model.blocks[0].att.named_parameters()]
    if version == "5.0":
        assert model.blocks[0].att.gate is None and not any("_g" in n or "gate" in n for n in names)
    else:
        assert names.index("gate.weight") == names.index("time_first") + 1
        weight = model.blocks[0].att.gate.weight
        assert torch.allclose(weight @ weight.T, torch.eye(C), atol=1e-5)


def test_registered_sizes():
    expected = {"rwkv5-0.1b": (12, 768, 2688, 192_807_936), "rwkv5-0.4b": (24, 1024, 3584, 461_721_600),
                "rwkv5-1b5": (24, 2048, 7168, 1_577_754_624), "rwkv5-3b": (32, 2560, 8960, 3_062_999_040),
                "rwkv5-7b": (32, 4096, 14336, 7_518_044_160)}
    assert zoo.list_models("rwkv5*") == sorted([*expected, "rwkv5-tiny"])
    for name, (layers, width, ffn, params) in expected.items():
        model = zoo.create_model(name, device="meta")
        cfg = model.config
        assert (cfg.n_layer, cfg.n_embd, cfg.ffn_size, cfg.head_size) == (layers, width, ffn, 64)
        assert (cfg.vocab_size, cfg.tokenizer, model.arch) == (65536, "world", "rwkv5")
        assert sum(p.numel() for p in model.parameters()) == params
    tiny_cfg = zoo.create_model("rwkv5-tiny", device="meta").config
    assert (tiny_cfg.vocab_size, tiny_cfg.tokenizer, tiny_cfg.n_layer, tiny_cfg.n_embd) == (256, "byte", 4, 128)


def test_no_weight_decay_and_grad_checkpointing():
    model = tiny().train()
    skip = model.no_weight_decay()
    assert "blocks.0.att.time_decay" in skip and "blocks.1.att.ln_x.weight" in skip
    assert "blocks.0.att.gate.weight" not in skip
    idx = torch.randint(0, 97, (2, 10))
    plain = model(idx)
    model.set_grad_checkpointing()
    checkpointed = model(idx)
    checkpointed.sum().backward()
    assert torch.allclose(plain, checkpointed) and model.blocks[2].att.time_faaaa.grad is not None


# ---- official checkpoints and the `rwkv` package ------------------------------------------------------------------

VOCAB, N_LAYER, N_EMBD, HEAD_SIZE, DIM_FFN = 300, 2, 128, 64, 448
SEQ_LEN, PREFILL_SPLITS, ATOL = 48, (19, 20), 1e-4


@pytest.fixture(scope="module", params=VERSIONS)
def official_version(request):
    return request.param


@pytest.fixture(scope="module")
def official_pth(official_version, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"rwkv{official_version}") / "RWKV-5-test.pth"
    torch.save(random_official_state_dict(VOCAB, N_LAYER, N_EMBD, HEAD_SIZE, DIM_FFN, seed=2024,
                                          version=official_version), path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def rwkv_package_logits(official_pth, official_version, tokens):
    """The `rwkv` package's logits [T, V] on the file, "cpu fp32": (sequence mode, token-by-token mode)."""
    outputs = package_outputs(official_pth, tokens[0])
    assert outputs["version"] == float(official_version)
    return outputs["sequence"], outputs["token_by_token"]


@pytest.fixture(scope="module")
def ours(official_pth):
    return load_official(torch.load(official_pth, map_location="cpu", weights_only=True))


def chunked_prefill(model, tokens):
    return chunked_logits(model, tokens, list(PREFILL_SPLITS))[0][0]


MODES = {"parallel": lambda model, tokens: model(tokens)[0], "chunked_prefill": chunked_prefill,
         "rnn": lambda model, tokens: rnn_logits(model, tokens)[0][0]}


@pytest.mark.parametrize("oracle_mode", [0, 1], ids=["package_sequence", "package_token_by_token"])
@pytest.mark.parametrize("mode", list(MODES))
def test_logits_match_rwkv_package(ours, tokens, rwkv_package_logits, mode, oracle_mode):
    expected = rwkv_package_logits[oracle_mode]
    with torch.no_grad():
        got = MODES[mode](ours, tokens)
    assert got.shape == expected.shape == (SEQ_LEN, VOCAB)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{mode}: max abs logit difference {diff:.3g} > {ATOL}"


def test_config_from_official_state_dict(official_pth, official_version):
    sd = torch.load(official_pth, map_location="cpu", weights_only=True)
    cfg = rwkv5.config_from_state_dict(sd)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.dim_ffn) == (VOCAB, N_LAYER, N_EMBD,
                                                                                   HEAD_SIZE, DIM_FFN)
    assert cfg.version == official_version
    assert rwkv5.config_from_state_dict(sd, ctx_len=77).ctx_len == 77


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_reproduces_the_official_file(tmp_path, dtype, version):
    """to_official_state_dict(load(file)) has the file's keys (in order), shapes, dtypes and values."""
    source = random_official_state_dict(VOCAB, N_LAYER, N_EMBD, HEAD_SIZE, DIM_FFN, seed=3, dtype=dtype,
                                        version=version)
    torch.save(source, tmp_path / "source.pth")
    model = load_official(torch.load(tmp_path / "source.pth", map_location="cpu", weights_only=True))
    assert model.emb.weight.dtype == torch.float32
    exported = rwkv5.to_official_state_dict(model, dtype=dtype)
    assert list(exported) == list(source)
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def test_is_state_dict_tells_the_versions_apart(official_pth):
    v5 = torch.load(official_pth, map_location="cpu", weights_only=True)
    assert rwkv5.is_state_dict(v5)
    assert rwkv5.is_state_dict(rwkv5.to_official_state_dict(tiny()))
    v4 = RWKV4LM(RWKV4Config(vocab_size=50, n_layer=2, n_embd=16)).state_dict()
    assert not rwkv5.is_state_dict(v4)
    v6 = dict(v5) | {"blocks.0.att.time_maa_x": torch.zeros(1, 1, N_EMBD),
                     "blocks.0.att.time_decay_w1": torch.zeros(N_EMBD, 64)}
    assert not rwkv5.is_state_dict(v6)
    v7_keys = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "g1", "g2", "k_k", "k_a",
               "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight", "ln_x.bias"]
    v7 = {"emb.weight": torch.zeros(VOCAB, N_EMBD)} | {f"blocks.0.att.{k}": torch.zeros(1) for k in v7_keys}
    assert not rwkv5.is_state_dict(v7)


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_token_ids_out_of_vocab_or_misshaped():
    model = tiny()
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward_rnn(torch.tensor([-1]), model.init_state(1))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"forward_rnn takes token ids of shape \[B\]"):
        model.forward_rnn(torch.tensor([[1]]), model.init_state(1))


def test_state_from_another_batch_size_or_model():
    model = tiny()
    with pytest.raises(ValueError, match=r"state has shape \(3, 10, 2, 32\) but this model and batch need "
                                         r"\(3, 10, 1, 32\)"):
        model.forward_rnn(torch.tensor([1]), model.init_state(2))
    rwkv4_state = RWKV4LM(RWKV4Config(vocab_size=97, n_layer=3, n_embd=32)).init_state(1)
    with pytest.raises(ValueError, match="another model or batch size"):
        model(torch.tensor([[1, 2]]), state=rwkv4_state)
    other_heads = load_official(random_official_state_dict(97, 3, 32, 16, 64))
    with pytest.raises(ValueError, match="another model or batch size"):
        model(torch.tensor([[1, 2]]), state=other_heads.init_state(1))
    with pytest.raises(TypeError, match="state must be a tensor"):
        model(torch.tensor([[1]]), state=[torch.zeros(1)])


def test_bad_state_dicts_and_configs():
    sd = random_official_state_dict(97, 2, 32, 8, 64)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.att.time_faaaa"}
    with pytest.raises(KeyError, match="missing.*blocks.0.att.time_faaaa"):
        rwkv5.config_from_state_dict(missing)
    with pytest.raises(ValueError, match="one per head but the bonus is time_faaaa.*'r2' variant"):
        rwkv5.config_from_state_dict(dict(sd) | {"blocks.0.att.time_decay": torch.zeros(4)})
    preview = random_official_state_dict(97, 2, 32, 8, 64, version="5.1")
    with pytest.raises(KeyError, match="not an RWKV-5.1 state dict: missing.*blocks.0.att.time_first"):
        rwkv5.config_from_state_dict({k: v for k, v in preview.items() if k != "blocks.0.att.time_first"})
    with pytest.raises(ValueError, match=r"shape \(4, 8, 1\).*per channel \[H, N\] \(5.2\) or per head"):
        rwkv5.config_from_state_dict(dict(sd) | {"blocks.0.att.time_decay": torch.zeros(4, 8, 1)})
    with pytest.raises(ValueError, match="RWKV-6"):
        rwkv5.config_from_state_dict(dict(sd) | {"blocks.0.att.time_maa_x": torch.zeros(1, 1, 32)})
    with pytest.raises(ValueError, match="dim_att = n_embd"):
        rwkv5.config_from_state_dict(dict(sd) | {"blocks.0.att.key.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match="multiple of head_size=64"):
        zoo.create_model("rwkv5-tiny", n_embd=96, head_size=64)
    with pytest.raises(ValueError, match="version must be one of 5.0, 5.1, 5.2, got '5.3'"):
        zoo.create_model("rwkv5-tiny", version="5.3")
