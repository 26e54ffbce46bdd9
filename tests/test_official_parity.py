"""Parity of our RWKV-4 with two independent implementations on the same official BlinkDL `.pth` file.

Oracles: the `rwkv` PyPI package (strategy "cpu fp32") and HF transformers' `RwkvForCausalLM`
(after the key renaming of transformers' `convert_rwkv_checkpoint_to_hf.py`). The weights are random
but non-trivial (the official init zeroes several matrices, which would hide mistakes), and every
mode of ours (parallel, chunked prefill from a state, RNN) must match each oracle to 1e-4 in the logits.
"""

import math
import os
import re

import pytest
import torch
from transformers import RwkvConfig, RwkvForCausalLM

import zoo

os.environ["RWKV_JIT_ON"] = "0"   # the rwkv package reads these when rwkv.model is imported
os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV  # noqa: E402

VOCAB, N_EMBD, N_LAYER, DIM_FFN = 307, 64, 3, 256
SEQ_LEN = 80
PREFILL_SPLITS = (23, 61)          # uneven chunks [0, 23), [23, 61), [61, 80)
ATOL = 1e-4
SEED = 20230522


def random_official_state_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random RWKV-4 state dict with official keys, shapes and key order, every tensor non-trivial.

    Matrices are N(0, 1/fan_in) (att.key x3, so the running maximum of WKV matters), LayerNorms
    near (1, 0), time_decay raw in [-6, 3] (w = -exp(time_decay)), time_first = log 0.3 +- 1,
    time_mix in (0, 1).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=gen)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=gen)

    def matrix(out_features, in_features, gain=1.0):
        return normal(out_features, in_features, std=gain / math.sqrt(in_features))

    def layer_norm(prefix):
        return {f"{prefix}.weight": normal(N_EMBD, std=0.1, mean=1.0), f"{prefix}.bias": normal(N_EMBD, std=0.1)}

    C = N_EMBD
    sd = {"emb.weight": normal(VOCAB, C)}
    for i in range(N_LAYER):
        b = f"blocks.{i}"
        if i == 0:
            sd.update(layer_norm(f"{b}.ln0"))
        sd.update(layer_norm(f"{b}.ln1"))
        sd.update(layer_norm(f"{b}.ln2"))
        sd.update({
            f"{b}.att.time_decay": uniform(C, low=-6.0, high=3.0),
            f"{b}.att.time_first": uniform(C, low=math.log(0.3) - 1, high=math.log(0.3) + 1),
            f"{b}.att.time_mix_k": uniform(1, 1, C),
            f"{b}.att.time_mix_v": uniform(1, 1, C),
            f"{b}.att.time_mix_r": uniform(1, 1, C),
            f"{b}.att.key.weight": matrix(C, C, gain=3.0),
            f"{b}.att.value.weight": matrix(C, C),
            f"{b}.att.receptance.weight": matrix(C, C),
            f"{b}.att.output.weight": matrix(C, C),
            f"{b}.ffn.time_mix_k": uniform(1, 1, C),
            f"{b}.ffn.time_mix_r": uniform(1, 1, C),
            f"{b}.ffn.key.weight": matrix(DIM_FFN, C),
            f"{b}.ffn.receptance.weight": matrix(C, C),
            f"{b}.ffn.value.weight": matrix(C, DIM_FFN),
        })
    sd.update(layer_norm("ln_out"))
    sd["head.weight"] = matrix(VOCAB, C)
    return {k: v.to(dtype) for k, v in sd.items()}


def hf_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> RwkvForCausalLM keys, as transformers' convert_rwkv_checkpoint_to_hf.py renames them
    (that script is in the transformers repository, not in its wheel, so it cannot be imported).

    emb -> embeddings, blocks.0.ln0 -> blocks.0.pre_ln, att -> attention, ffn -> feed_forward,
    time_mix_k/v/r -> time_mix_key/value/receptance, and an `rwkv.` prefix on all but head.weight.
    """
    suffixes = {".time_mix_k": ".time_mix_key", ".time_mix_v": ".time_mix_value",
                ".time_mix_r": ".time_mix_receptance"}
    renamed = {}
    for name, tensor in official.items():
        name = re.sub(r"^emb\.", "embeddings.", name)
        name = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", name)
        name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
        name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
        for old, new in suffixes.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        renamed[name if name == "head.weight" else f"rwkv.{name}"] = tensor
    return renamed


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    """The random official state dict saved as fp32 `.pth`."""
    path = tmp_path_factory.mktemp("official") / "RWKV-4-test.pth"
    torch.save(random_official_state_dict(SEED), path)
    return path


@pytest.fixture(scope="module")
def tokens():
    """[1, SEQ_LEN] random token ids covering the vocabulary."""
    return torch.randint(VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(SEED + 1))


@pytest.fixture(scope="module")
def rwkv_package_logits(official_pth, tokens):
    """Logits [T, V] of the `rwkv` package (sequence mode, all positions) on the file."""
    oracle = RWKV(model=str(official_pth), strategy="cpu fp32", verbose=False)
    assert oracle.version == 4
    logits, _ = oracle.forward(tokens[0].tolist(), None, full_output=True)
    return logits


@pytest.fixture(scope="module")
def hf_logits(official_pth, tokens):
    """Logits [T, V] of HF transformers' RwkvForCausalLM (pure PyTorch CPU path, fp32) on the file."""
    official = torch.load(official_pth, map_location="cpu", weights_only=True)
    config = RwkvConfig(vocab_size=VOCAB, hidden_size=N_EMBD, num_hidden_layers=N_LAYER,
                        attention_hidden_size=N_EMBD, intermediate_size=DIM_FFN, context_length=SEQ_LEN,
                        rescale_every=0, layer_norm_epsilon=1e-5)
    model = RwkvForCausalLM(config).eval()
    model.load_state_dict(hf_state_dict(official), strict=True)
    with torch.no_grad():
        return model(tokens, use_cache=False).logits[0]


@pytest.fixture(scope="module")
def ours(official_pth):
    """Our model loaded from the file."""
    return zoo.load_checkpoint(official_pth).eval()


def parallel_logits(model, tokens):
    return model(tokens)[0]


def chunked_prefill_logits(model, tokens):
    state, chunks = model.init_state(tokens.shape[0]), []
    for lo, hi in zip((0, *PREFILL_SPLITS), (*PREFILL_SPLITS, tokens.shape[1])):
        logits, state = model(tokens[:, lo:hi], state=state, return_state=True)
        chunks.append(logits)
    return torch.cat(chunks, dim=1)[0]


def rnn_logits(model, tokens):
    state, steps = model.init_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        logits, state = model.forward_rnn(tokens[:, t], state)
        steps.append(logits)
    return torch.stack(steps, dim=1)[0]


MODES = {"parallel": parallel_logits, "chunked_prefill": chunked_prefill_logits, "rnn": rnn_logits}


@pytest.mark.parametrize("oracle", ["rwkv_package_logits", "hf_logits"])
@pytest.mark.parametrize("mode", list(MODES))
def test_logits_match_oracle(ours, tokens, mode, oracle, request):
    """Each of our modes matches each oracle to ATOL at every one of the SEQ_LEN positions."""
    expected = request.getfixturevalue(oracle)
    with torch.no_grad():
        got = MODES[mode](ours, tokens)
    assert got.shape == expected.shape == (SEQ_LEN, VOCAB)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{mode} vs {oracle}: max abs logit difference {diff:.3g} > {ATOL}"


def test_oracles_agree(rwkv_package_logits, hf_logits):
    """The two oracles agree with each other, so a failure above points at our code."""
    diff = (rwkv_package_logits - hf_logits).abs().max().item()
    assert diff <= ATOL, f"rwkv package vs HF: max abs logit difference {diff:.3g} > {ATOL}"


def test_create_model_pretrained_matches_load_checkpoint(official_pth, ours):
    """create_model(pretrained=.pth) with the matching config loads the same weights as load_checkpoint."""
    model = zoo.create_model("rwkv4-tiny", pretrained=str(official_pth), vocab_size=VOCAB, n_layer=N_LAYER,
                             n_embd=N_EMBD, dim_ffn=DIM_FFN)
    expected = ours.state_dict()
    got = model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bf16_file_loads_as_its_fp32_upcast(tmp_path, tokens):
    """A bf16 official file gives the same model (and logits) as the fp32 file of its upcast values."""
    bf16 = random_official_state_dict(SEED + 2, torch.bfloat16)
    torch.save(bf16, tmp_path / "bf16.pth")
    torch.save({k: v.float() for k, v in bf16.items()}, tmp_path / "upcast.pth")
    from_bf16 = zoo.load_checkpoint(tmp_path / "bf16.pth").eval()
    from_upcast = zoo.load_checkpoint(tmp_path / "upcast.pth").eval()
    assert from_bf16.emb.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(from_bf16(tokens), from_upcast(tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_official_reproduces_file(tmp_path, dtype):
    """export_official(load_checkpoint(file)) writes the file's keys (in order), shapes, dtypes and values."""
    source = random_official_state_dict(SEED + 3, dtype)
    torch.save(source, tmp_path / "source.pth")
    zoo.export_official(zoo.load_checkpoint(tmp_path / "source.pth"), tmp_path / "export.pth", dtype=dtype)
    exported = torch.load(tmp_path / "export.pth", map_location="cpu", weights_only=True)
    assert list(exported) == list(source)
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype, key
        assert exported[key].shape == tensor.shape, key
        assert torch.equal(exported[key], tensor), key
