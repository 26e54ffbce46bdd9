"""RWKV-CLIP's published RWKV-6 towers (deepglint/RWKV-CLIP): the RWKV-CLIP-6-B-32 / -B-16 configs and their parameter
counts, official checkpoints (keys and shapes of the official module tree, random values) loading tensor for tensor,
and the forward against an independent float64 re-implementation of the official one."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.checkpoint import load_weights
from zoo.models import vrwkv
from zoo.models.clip import RWKVCLIPConfig, checkpoint_filter_fn

# widths 40: image heads of 20 (Q-Shift quarters of 5, like the published 80's 20), text heads of 8; a 4 x 4 grid
SMALL = dict(embed_dim=40, image_width=40, text_width=40, image_head_size=20, head_size=8, image_layers=2,
             text_layers=2, image_size=32, patch_size=8, drop_path_rate=0.0)


def official_shapes(width=640, depth=12, image_head=80, patch=32, grid=7, image_ffn=3200, text_layers=6, text_head=64,
                    text_ffn=2240, vocab=49408) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of the state dict deepglint/RWKV-CLIP's train.py saves (a DDP model's, so `module.`):
    model/utils.py's get_model holding Image_RWKV (model/Image_rwkv.py) and Text_RWKV (model/Text_rwkv.py)."""
    C, f32, bf16 = width, torch.float32, torch.bfloat16

    def time_mix(prefix, heads, head_size, decay_dtype):
        mixes = {f"{prefix}.time_maa_{m}": ((1, 1, C), f32) for m in "xwkvrg"}
        return {**mixes, f"{prefix}.time_maa_w1": ((C, 5 * 32), f32), f"{prefix}.time_maa_w2": ((5, 32, C), f32),
                f"{prefix}.time_decay": ((1, 1, C), decay_dtype), f"{prefix}.time_decay_w1": ((C, 64), f32),
                f"{prefix}.time_decay_w2": ((64, C), f32), f"{prefix}.time_faaaa": ((heads, head_size), decay_dtype),
                **{f"{prefix}.{n}.weight": ((C, C), f32) for n in ("key", "value", "receptance", "gate", "output")},
                f"{prefix}.ln_x.weight": ((C,), f32), f"{prefix}.ln_x.bias": ((C,), f32)}

    def norms(prefix, *names):
        return {f"{prefix}.{n}.{p}": ((C,), f32) for n in names for p in ("weight", "bias")}

    out = {"module.image_model.patch_embed.projection.weight": ((C, 3, patch, patch), f32),
           "module.image_model.patch_embed.projection.bias": ((C,), f32),
           "module.image_model.pos_embed": ((1, grid * grid, C), f32)}
    for i in range(depth):
        p = f"module.image_model.layers.{i}"
        out.update(norms(p, "ln1", "ln2", *(["ln0"] if i == 0 else [])))
        out.update(time_mix(f"{p}.att", C // image_head, image_head, f32))
        out.update({f"{p}.ffn.spatial_mix_k": ((1, 1, C), f32), f"{p}.ffn.spatial_mix_r": ((1, 1, C), f32),
                    f"{p}.ffn.key.weight": ((image_ffn, C), f32), f"{p}.ffn.receptance.weight": ((C, C), f32),
                    f"{p}.ffn.value.weight": ((C, image_ffn), f32)})
    out.update(norms("module.image_model", "ln1"))
    out["module.text_model.emb.weight"] = ((vocab, C), f32)
    for i in range(text_layers):
        p = f"module.text_model.blocks.{i}"
        out.update(norms(p, "ln1", "ln2", *(["ln0"] if i == 0 else [])))
        out.update(time_mix(f"{p}.att", C // text_head, text_head, bf16))    # created as bf16 tensors officially
        out.update({f"{p}.ffn.time_maa_k": ((1, 1, C), f32), f"{p}.ffn.time_maa_r": ((1, 1, C), f32),
                    f"{p}.ffn.key.weight": ((text_ffn, C), f32), f"{p}.ffn.receptance.weight": ((C, C), f32),
                    f"{p}.ffn.value.weight": ((C, text_ffn), f32)})
    out.update(norms("module.text_model", "ln_out"))
    out["module.logit_scale"] = ((), f32)
    return out


def small_shapes():
    return official_shapes(width=40, depth=2, image_head=20, patch=8, grid=4, image_ffn=200, text_layers=2, text_head=8,
                           text_ffn=140)


def random_official(shapes, seed=0) -> dict[str, torch.Tensor]:
    """Random values at scales where the towers' outputs stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in shapes.items():
        x = torch.randn(shape, generator=g)
        if "maa" in key or "spatial_mix" in key:
            x = torch.rand(shape, generator=g)
        elif key.endswith("time_decay"):
            x = x * 0.5 - 1
        elif ("ln" in key.split(".")[-2]) and key.endswith("weight"):
            x = 1 + 0.1 * x
        elif key.endswith(("bias", "time_faaaa", "pos_embed", "logit_scale")) or len(shape) == 3:
            x = 0.3 * x
        else:
            x = x / shape[-1] ** 0.5 if len(shape) == 2 else x / (shape[1] * shape[2] * shape[3]) ** 0.5
        out[key] = x.to(dtype)
    return out


def our_key(key: str) -> str:
    """The test's own table of where each official tensor goes."""
    key = key.removeprefix("module.")
    for theirs, ours in (("image_model.patch_embed.projection.", "visual.patch_embed.proj."),
                         ("image_model.layers.", "visual.blocks."), ("image_model.ln1.", "visual.norm."),
                         ("image_model.", "visual."), ("text_model.emb.", "text.token_embedding."),
                         ("text_model.ln_out.", "text.ln_final."), ("text_model.", "text.")):
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    return key


@pytest.mark.parametrize("name, patch, grid, image_params", [("RWKV-CLIP-6-B-32", 32, 7, 84_207_360),
                                                             ("RWKV-CLIP-6-B-16", 16, 14, 82_826_880)])
def test_published_configs_and_their_parameter_counts(name, patch, grid, image_params):
    """The counts the official module tree gives (image tower + text tower 65,354,240 + logit_scale), and the full-size
    official key set mapping onto the model shape for shape (on the meta device)."""
    info = zoo.model_info(name)
    cfg = info["config"]
    assert info["family"] == "clip" and cfg["block"] == "rwkv6-bi" and not cfg["projection"]
    assert (cfg["image_width"] // cfg["image_head_size"], cfg["text_width"] // cfg["head_size"]) == (8, 10)
    assert (cfg["patch_size"], cfg["context_length"], cfg["text_pool"]) == (patch, 77, "normalized-mean")
    model = zoo.create_model(name, device="meta")
    assert sum(p.numel() for p in model.visual.parameters()) == image_params
    assert sum(p.numel() for p in model.text.parameters()) == 65_354_240
    assert info["params"] == image_params + 65_354_240 + 1
    shapes = official_shapes(patch=patch, grid=grid)
    assert len(shapes) == 517 and sum(torch.Size(s).numel() for s, _ in shapes.values()) == info["params"]
    official = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}
    mapped = checkpoint_filter_fn(official, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(mapped) == {our_key(k) for k in shapes}


def test_official_checkpoints_load_every_tensor(tmp_path):
    official = random_official(small_shapes())
    torch.save(official, tmp_path / "model_31.pt")
    model = zoo.create_model("RWKV-CLIP-6-B-32", pretrained=str(tmp_path / "model_31.pt"), **SMALL).eval()
    ours = model.state_dict()
    assert len(ours) == len(official)
    for key, value in official.items():
        torch.testing.assert_close(ours[our_key(key)], value.float(), rtol=0, atol=0, msg=key)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = zoo.get_tokenizer("clip")(["a photo of a cat", "two dogs playing in the snow"])
    with torch.no_grad():
        first, again = model(images, text), model(images, text)
    for key in ("image_features", "text_features"):
        assert first[key].isfinite().all() and torch.equal(first[key], again[key])
    assert first["logit_scale"] == official["module.logit_scale"].exp()

    # the image tower is a Vision-RWKV-6 backbone: its keys, as mmcls's `backbone.*`, load through vrwkv's own mapping
    image = {k.replace("module.image_model.", "backbone."): v for k, v in official.items() if "image_model." in k}
    torch.save({"state_dict": image}, tmp_path / "image_tower.pth")
    tower = zoo.create_model("vrwkv6_tiny", embed_dim=40, depth=2, head_size=20, mlp_ratio=5.0, num_classes=0,
                             img_size=32, patch_size=8, pretrained=str(tmp_path / "image_tower.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(images), model.encode_image(images), rtol=0, atol=0)
    load_weights(model.visual, vrwkv.checkpoint_filter_fn(image, model.visual))


# ---- an independent float64 re-implementation of the official forward, from the official state dict ----------------

def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _bi_wkv6(r, k, v, w, u):
    """The official kernel's two scans, per head: a backward one without the bonus, then a forward one with it."""
    B, T, H, N = r.shape
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros_like(v)
    for b in range(B):
        state = r.new_zeros(H, N, N)                                    # [head, key channel, value channel]
        for t in reversed(range(T)):
            y[b, t] = torch.einsum("hk,hkv->hv", r[b, t], state)
            state = decay[b, t, :, :, None] * state + k[b, t, :, :, None] * v[b, t, :, None, :]
        state = r.new_zeros(H, N, N)
        for t in range(T):
            kv = k[b, t, :, :, None] * v[b, t, :, None, :]
            y[b, t] += torch.einsum("hk,hkv->hv", r[b, t], state + u[:, :, None] * kv)
            state = decay[b, t, :, :, None] * state + kv
    return y


def _time_mix(x, shifted, sd, p, head_size, eps):
    B, T, C = x.shape
    xx = shifted - x
    lora = torch.tanh((x + xx * sd[f"{p}.time_maa_x"]) @ sd[f"{p}.time_maa_w1"]).view(B * T, 5, -1).transpose(0, 1)
    mw, mk, mv, mr, mg = torch.bmm(lora, sd[f"{p}.time_maa_w2"]).view(5, B, T, C)
    xw, xk, xv, xr, xg = (x + xx * (sd[f"{p}.time_maa_{n}"] + m) for n, m in zip("wkvrg", (mw, mk, mv, mr, mg)))
    r, k, v = (F.linear(y, sd[f"{p}.{n}.weight"]) for y, n in ((xr, "receptance"), (xk, "key"), (xv, "value")))
    g = F.silu(F.linear(xg, sd[f"{p}.gate.weight"]))
    w = sd[f"{p}.time_decay"] + torch.tanh(xw @ sd[f"{p}.time_decay_w1"]) @ sd[f"{p}.time_decay_w2"]
    H = C // head_size
    y = _bi_wkv6(*(z.reshape(B, T, H, head_size) for z in (r, k, v, w)), sd[f"{p}.time_faaaa"]).reshape(B * T, C)
    y = F.group_norm(y, H, sd[f"{p}.ln_x.weight"], sd[f"{p}.ln_x.bias"], eps).view(B, T, C)
    return F.linear(y * g, sd[f"{p}.output.weight"])


def _ffn(xk, xr, sd, p):
    k = torch.relu(F.linear(xk, sd[f"{p}.key.weight"])) ** 2
    return torch.sigmoid(F.linear(xr, sd[f"{p}.receptance.weight"])) * F.linear(k, sd[f"{p}.value.weight"])


def _q_shift_heads(x, side, head_size):
    """Inside every head, channel quarter 0 from the left pixel, 1 from the right, 2 from above, 3 from below."""
    B, T, C = x.shape
    padded = F.pad(x.view(B, side, side, C), (0, 0, 1, 1, 1, 1))
    left, right = padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
    up, down = padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]
    quarter = (torch.arange(C) % head_size) // (head_size // 4)
    out = torch.stack([left, right, up, down])[quarter, :, :, :, torch.arange(C)]      # [C, B, side, side]
    return out.permute(1, 2, 3, 0).reshape(B, T, C)


def _bi_shift(x, head_size):
    padded = F.pad(x, (0, 0, 1, 1))
    earlier = (torch.arange(x.shape[-1]) % head_size) < head_size // 2
    return torch.where(earlier, padded[:, :-2], padded[:, 2:])


def official_image(sd, images, patch, depth, head_size):
    sd = {k.removeprefix("module.image_model."): v.double() for k, v in sd.items() if "image_model." in k}
    x = F.conv2d(images, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=patch)
    side = x.shape[-1]
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    for i in range(depth):
        p = f"layers.{i}"
        if i == 0:
            x = _ln(x, sd, f"{p}.ln0")
        h = _ln(x, sd, f"{p}.ln1")
        x = x + _time_mix(h, _q_shift_heads(h, side, head_size), sd, f"{p}.att", head_size, 1e-5)
        h = _ln(x, sd, f"{p}.ln2")
        hh = _q_shift_heads(h, side, head_size)
        mk, mr = sd[f"{p}.ffn.spatial_mix_k"], sd[f"{p}.ffn.spatial_mix_r"]
        x = x + _ffn(h * mk + hh * (1 - mk), h * mr + hh * (1 - mr), sd, f"{p}.ffn")
    return _ln(x, sd, "ln1").mean(1)


def official_text(sd, text, layers, head_size):
    sd = {k.removeprefix("module.text_model."): v.double() for k, v in sd.items() if "text_model." in k}
    x = sd["emb.weight"][text]
    for i in range(layers):
        p = f"blocks.{i}"
        if i == 0:
            x = _ln(x, sd, f"{p}.ln0")
        h = _ln(x, sd, f"{p}.ln1")
        x = x + _time_mix(h, _bi_shift(h, head_size), sd, f"{p}.att", head_size, 1e-5 * 8 ** 2)
        h = _ln(x, sd, f"{p}.ln2")
        xx = _bi_shift(h, head_size) - h
        x = x + _ffn(h + xx * sd[f"{p}.ffn.time_maa_k"], h + xx * sd[f"{p}.ffn.time_maa_r"], sd, f"{p}.ffn")
    return F.normalize(_ln(x, sd, "ln_out"), dim=-1).mean(1)       # every one of the 77 positions, padding included


def test_forward_matches_a_float64_reimplementation_of_the_official_one():
    official = random_official(small_shapes(), seed=2)
    model = zoo.create_model("RWKV-CLIP-6-B-32", **SMALL)
    load_weights(model, checkpoint_filter_fn(official, model))
    model = model.double().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    text = zoo.get_tokenizer("clip")(["a diagram", "a photo of a red bicycle leaning on a wall"])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(text)
    expected_text = official_text(official, text, 2, 8)
    torch.testing.assert_close(image_features, official_image(official, images, 8, 2, 20), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(text_features, expected_text, rtol=1e-9, atol=1e-10)
    assert text_features.norm(dim=-1).max() < 0.99     # a mean of unit vectors that differ: the pads count too,
    with torch.no_grad():                               # so the same captions with fewer pads embed differently
        assert (model.encode_text(text[:, :40]) - text_features).abs().max() > 1e-3


def test_gradients_flow_through_both_towers():
    torch.manual_seed(0)
    model = zoo.create_model("RWKV-CLIP-6-B-32", **SMALL)
    out = model(torch.randn(2, 3, 32, 32), zoo.get_tokenizer("clip")(["a cat", "a dog"]))
    (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    assert grads["text.blocks.1.ffn.value.weight"].abs().sum() > 0 and grads["visual.pos_embed"].abs().sum() > 0


def test_bad_checkpoints_and_configs_get_clear_errors(tmp_path):
    official = random_official(small_shapes())
    del official["module.text_model.blocks.1.att.time_faaaa"]
    official["module.text_model.blocks.1.att.time_first"] = torch.zeros(5, 8)
    official["module.image_model.pos_embed"] = torch.zeros(1, 16, 48)
    torch.save(official, tmp_path / "bad.pt")
    with pytest.raises(zoo.CheckpointError, match=r"missing keys \(1\): text.blocks.1.att.time_faaaa; unexpected keys "
                                                  r"\(1\): text.blocks.1.att.time_first; shape mismatches \(1\): "
                                                  r"visual.pos_embed: checkpoint \(1, 16, 48\) vs model \(1, 16, 40\)"):
        zoo.create_model("RWKV-CLIP-6-B-32", pretrained=str(tmp_path / "bad.pt"), **SMALL)
    with pytest.raises(ValueError, match="has RWKV-6 towers; this model's block is 'rwkv4-bi'"):
        checkpoint_filter_fn(official, zoo.create_model("RWKV-CLIP-tiny", device="meta"))
    with pytest.raises(ValueError, match="image_width=64 and text_width=40 must be equal"):
        zoo.create_model("RWKV-CLIP-6-B-32", device="meta", **{**SMALL, "image_width": 64})
    with pytest.raises(ValueError, match="text_pool must be one of mean, normalized-mean"):
        RWKVCLIPConfig(text_pool="eot")
    with pytest.raises(ValueError, match="not a multiple of head_size=48"):
        zoo.create_model("RWKV-CLIP-6-B-32", device="meta", **{**SMALL, "image_head_size": 48})
