"""Activation checkpointing (blocks.checkpointing): full and selective give the plain backward's gradients for every
model family, the selective policy keeps what it says, compiled it is one region, and bad modes are named."""

import pytest
import timm
import torch

import zoo
from blocks import checkpointing
from blocks.vision import VRWKVBlock
from recipes.config import RecipeError, load_recipe

LANGUAGE = ["rwkv4-tiny", "rwkv5-tiny", "rwkv6-tiny", "rwkv7-tiny", "rrwkv-tiny", "gpt-tiny"]
VISION = ["vrwkv_tiny", "vrwkv6_tiny"]


def model_and_input(name: str, depth: int = 2, **vision_args):
    """A small model with non-zero weights everywhere (official inits zero some outputs, which would hide gradients)
    and an input for it."""
    torch.manual_seed(0)
    if name in VISION:
        model = timm.create_model(name, num_classes=4, img_size=32, depth=depth, drop_path_rate=0.0, **vision_args)
        x = torch.randn(2, 3, 32, 32)
    else:
        model = zoo.create_model(name, n_layer=depth)
        x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train(), x


def model_and_loss(name: str):
    """A 2-block model and a closure computing a scalar loss on a fixed input."""
    model, x = model_and_input(name)
    return model, lambda: model(x).logsumexp(-1).sum()


@pytest.mark.parametrize("mode", [True, "selective"], ids=["full", "selective"])
@pytest.mark.parametrize("name", LANGUAGE + VISION)
def test_checkpointed_gradients_match_the_plain_backward(name, mode):
    model, loss = model_and_loss(name)

    def grads():
        model.zero_grad()
        loss().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(mode)
    assert model.grad_checkpointing == mode
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_selective_policy_keeps_narrow_products_and_recomputes_the_rest(monkeypatch):
    """In a Vision-RWKV block: the four C -> C products of the spatial mix and the channel mix's C -> C
    receptance and 4C -> C value are kept; the C -> 4C key and every elementwise op are recomputed."""
    decisions, policy = [], checkpointing.keep_products_and_kernels

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute:
            decisions.append((op, tuple(args[-1].shape) if op in checkpointing.PRODUCTS else None, decision))
        return decision

    monkeypatch.setattr(checkpointing, "keep_products_and_kernels", recording)
    C = 16
    block = VRWKVBlock(C, layer_id=1, depth=2)
    x = torch.randn(2, 9, C, requires_grad=True)
    checkpointing.run_block("selective", block, x, (3, 3)).sum().backward()
    kept = checkpointing.CheckpointPolicy.MUST_SAVE
    products = [(shape, d) for op, shape, d in decisions if shape is not None]
    assert sorted(shape for shape, d in products if d == kept) == [(C, C)] * 5 + [(4 * C, C)]
    assert [shape for shape, d in products if d != kept] == [(C, 4 * C)]
    elementwise = [op for op, shape, d in decisions if shape is None]
    assert len(elementwise) > 20 and not any(d == kept for op, shape, d in decisions if shape is None)


@pytest.mark.parametrize("name", ["vrwkv_tiny", "rwkv4-tiny", "rwkv7-tiny", "gpt-tiny"])
def test_the_one_region_keeps_each_blocks_output(monkeypatch, name):
    """run_stack's region (entered here in eager by claiming to compile) marks each block's residual-stream output
    with zoo::keep, which the policy keeps; the gradients stay those of the plain backward."""
    decisions, policy = [], checkpointing.keep_products_and_kernels

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if op == torch.ops.zoo.keep.default and not ctx.is_recompute:
            decisions.append((tuple(args[0].shape), decision))
        return decision

    model, x = model_and_input(name, depth=3)
    plain = torch.autograd.grad(model(x).logsumexp(-1).sum(), list(model.parameters()))
    model.set_grad_checkpointing("selective")
    monkeypatch.setattr(checkpointing, "keep_products_and_kernels", recording)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    regions = torch.autograd.grad(model(x).logsumexp(-1).sum(), list(model.parameters()))
    stream = (2, 4, model.num_features) if name in VISION else (*x.shape, model.config.n_embd)  # 2 x 2 patches
    assert decisions == [(stream, checkpointing.CheckpointPolicy.MUST_SAVE)] * 3
    for a, b in zip(regions, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_checkpointing_without_grad():
    """Under no_grad (evaluation) run_block calls the block as it is, whatever the mode."""
    calls = []
    for mode in checkpointing.GRAD_CHECKPOINTING:
        with torch.no_grad():
            checkpointing.run_block(mode, lambda t: calls.append(torch.is_grad_enabled()) or t, torch.ones(1))
    assert calls == [False] * 3


@pytest.mark.parametrize("name", ["rwkv4-tiny", "gpt-tiny", "vrwkv_tiny", "RWKV-CLIP-tiny"])
@pytest.mark.parametrize("bad", ["sometimes", 1, None])
def test_unknown_modes_are_named(name, bad):
    model = timm.create_model(name) if name in VISION else zoo.create_model(name)
    with pytest.raises(ValueError, match=r"grad checkpointing must be False, True \(full\) or 'selective'"):
        model.set_grad_checkpointing(bad)


def test_open_clip_towers_refuse_selective_checkpointing():
    model = zoo.create_model("openclip-ViT-S-32")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="open_clip's towers take grad checkpointing True or False"):
        model.set_grad_checkpointing("selective")


def test_recipes_take_selective_and_name_bad_modes():
    assert load_recipe("vision/vrwkv_tiny_fmnist", ["grad_checkpointing=selective"]).grad_checkpointing == "selective"
    assert load_recipe("lm/rwkv4-tiny-stdlib", ["grad_checkpointing=true"]).grad_checkpointing is True
    with pytest.raises(RecipeError, match="grad checkpointing must be"):
        load_recipe("vision/vrwkv_tiny_fmnist", ["grad_checkpointing=some"])


def saved_bytes_and_grads(model, x, forward):
    """Bytes of activations the forward keeps for the backward (saved-tensor hooks; parameters and their views
    left out), and the parameters' gradients."""
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(x).logsumexp(-1).sum()
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["vrwkv_tiny", pytest.param("rwkv7-tiny", marks=pytest.mark.slow),
                                  pytest.param("gpt-tiny", marks=pytest.mark.slow)])   # each compiles twice
def test_compiled_selective_checkpointing_is_one_region_and_keeps_less(monkeypatch, name):
    """Under torch.compile the selective stack is one checkpointed region (traced once, not once per block), gives
    the eager gradients and keeps under half the activation bytes the compiled plain step keeps."""
    torch.compiler.reset()
    regions, selective = [], checkpointing._selective
    monkeypatch.setattr(checkpointing, "_selective", lambda fn, *a: regions.append(fn) or selective(fn, *a))
    model, x = model_and_input(name, depth=3, **({"patch_size": 4} if name in VISION else {}))
    _, eager = saved_bytes_and_grads(model, x, model)
    plain_bytes, _ = saved_bytes_and_grads(model, x, torch.compile(model))
    torch.compiler.reset()
    model.set_grad_checkpointing("selective")
    assert not regions
    kept, grads = saved_bytes_and_grads(model, x, torch.compile(model))
    assert len(regions) == 1
    assert kept < plain_bytes / 2, (kept, plain_bytes)
    for n in eager:
        assert (grads[n] - eager[n]).abs().max() <= 1e-4 * eager[n].abs().max(), n
