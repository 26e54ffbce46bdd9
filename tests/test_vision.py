"""Vision-RWKV: Q-Shift, blocks, the four classifiers in timm's registry with timm's model API, official (mmcls)
checkpoints through checkpoint_filter_fn, native checkpoints, and clear errors for bad input."""

import re

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import zoo
from blocks import VRWKVBlock, biwkv, q_shift


def q_shift_loop(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Q-Shift pixel by pixel: the quarters of C take the left, right, upper and lower neighbour (zero outside)."""
    B, N, C = x.shape
    grid, out, q = x.view(B, H, W, C), torch.zeros(B, H, W, C, dtype=x.dtype), C // 4
    for h in range(H):
        for w in range(W):
            for lo, hi, (dh, dw) in ((0, q, (0, -1)), (q, 2 * q, (0, 1)), (2 * q, 3 * q, (-1, 0)),
                                     (3 * q, 4 * q, (1, 0))):
                if 0 <= h + dh < H and 0 <= w + dw < W:
                    out[:, h, w, lo:hi] = grid[:, h + dh, w + dw, lo:hi]
            out[:, h, w, 4 * q:] = grid[:, h, w, 4 * q:]
    return out.view(B, N, C)


@pytest.mark.parametrize("H, W, C", [(3, 5, 8), (4, 4, 10), (1, 6, 7)])
def test_q_shift_moves_each_quarter_from_its_neighbour(H, W, C):
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    torch.testing.assert_close(q_shift(x, (H, W)), q_shift_loop(x, H, W), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fill a 2 x 2 grid"):
        q_shift(x, (2, 2))


def test_multi_head_q_shift_shifts_the_quarters_of_every_head():
    """Vision-RWKV-6's Q-Shift: each head's channels are quartered on their own (head_size C: the one-head shift)."""
    H, W, heads, N = 3, 4, 3, 8
    x = torch.randn(2, H * W, heads * N, dtype=torch.float64)
    expected = torch.cat([q_shift_loop(x[..., h * N:(h + 1) * N].contiguous(), H, W) for h in range(heads)], -1)
    torch.testing.assert_close(q_shift(x, (H, W), head_size=N), expected, rtol=0, atol=0)
    torch.testing.assert_close(q_shift(x, (H, W), head_size=heads * N), q_shift(x, (H, W)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="24 channels are not whole heads of 5"):
        q_shift(x, (H, W), head_size=5)


@pytest.mark.parametrize("post_norm, layer_scale", [(False, None), (True, 1e-2)])
def test_block_follows_the_pre_and_post_norm_formulas(post_norm, layer_scale):
    torch.manual_seed(0)
    block = VRWKVBlock(16, layer_id=1, depth=4, layer_scale=layer_scale, post_norm=post_norm).double()
    x, grid = torch.randn(2, 12, 16, dtype=torch.float64), (3, 4)
    gamma1 = block.gamma1 if layer_scale else 1
    gamma2 = block.gamma2 if layer_scale else 1
    if post_norm:
        h = x + gamma1 * block.ln1(block.att(x, grid))
        expected = h + gamma2 * block.ln2(block.ffn(h, grid))
    else:
        h = x + gamma1 * block.att(block.ln1(x), grid)
        expected = h + gamma2 * block.ffn(block.ln2(h), grid)
    torch.testing.assert_close(block(x, grid), expected)

    att = block.att                                     # the spatial mix is Bi-WKV over the shifted, mixed tokens
    shifted = q_shift(x, grid)
    k = att.key(x * att.spatial_mix_k + shifted * (1 - att.spatial_mix_k))
    v = att.value(x * att.spatial_mix_v + shifted * (1 - att.spatial_mix_v))
    r = torch.sigmoid(att.receptance(x * att.spatial_mix_r + shifted * (1 - att.spatial_mix_r)))
    wkv = biwkv(att.spatial_decay / 12, att.spatial_first / 12, k, v)
    torch.testing.assert_close(att(x, grid), att.output(r * wkv))


@pytest.mark.parametrize("name, millions", [
    ("vrwkv_tiny", 6.2), ("vrwkv_small", 23.8), ("vrwkv_base", 93.7),
    ("vrwkv6_tiny", 7.6), ("vrwkv6_small", 27.7), ("vrwkv6_base", 104.9), ("vrwkv_large", 334.9),
])
def test_parameter_counts_match_the_paper(name, millions):
    assert zoo.model_info(name)["params"] / 1e6 == pytest.approx(millions, rel=0.01)
    assert zoo.model_info(name)["family"] == "vision"


def test_timm_creates_the_models_with_its_model_api():
    assert set(timm.list_models("vrwkv_*")) == {"vrwkv_tiny", "vrwkv_small", "vrwkv_base", "vrwkv_large"}
    model = timm.create_model("vrwkv_tiny", num_classes=10, img_size=64, drop_path_rate=0.05).eval()
    cfg = model.pretrained_cfg
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["classifier"] == "head"
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10) and model.num_features == 192
    features = model.forward_features(x)
    assert features.shape == (2, 16, 192)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean(1))
    torch.testing.assert_close(model.forward_head(features), model(x))

    final, maps = model.forward_intermediates(x, indices=[0, 11])
    assert [m.shape for m in maps] == [(2, 192, 4, 4)] * 2
    torch.testing.assert_close(final, features)
    assert len(model.forward_intermediates(x, indices=3, intermediates_only=True, stop_early=True)) == 3

    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    assert "pos_embed" in model.no_weight_decay()
    groups = list(timm.models.group_parameters(model, model.group_matcher()).values())
    assert len(groups) == 1 + 12 and set(groups[0]) == {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(name.startswith(f"blocks.{i}.") for i, group in enumerate(groups[1:12]) for name in group)
    assert "norm.weight" in groups[-1]                  # the final norm joins the last block (timm's layer decay)


def test_other_input_sizes_resample_the_position_embedding():
    model = timm.create_model("vrwkv_tiny", num_classes=3, img_size=64, depth=1).eval()
    torch.nn.init.normal_(model.pos_embed)
    x = torch.randn(1, 3, 96, 48)
    tokens = model.patch_embed(x).flatten(1, 2)
    pos = resample_abs_pos_embed(model.pos_embed, [6, 3], [4, 4], num_prefix_tokens=0)
    grid = (6, 3)
    expected = model.norm(model.blocks[0](tokens + pos, grid))
    torch.testing.assert_close(model.forward_features(x), expected)


def official_state_dict(model) -> dict:
    """Our weights under the official mmcls keys (what Vision-RWKV's checkpoints hold)."""
    renames = [(r"^blocks\.", "backbone.layers."), (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
               (r"^norm\.", "backbone.ln1."), (r"^pos_embed$", "backbone.pos_embed"), (r"^head\.", "head.fc.")]
    out = {}
    for key, value in model.state_dict().items():
        for pattern, new in renames:
            key = re.sub(pattern, new, key)
        out[key] = value.clone()
    return out


def test_official_checkpoints_load_through_timm_and_the_zoo(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vrwkv_small", depth=2, num_classes=1000)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "vrwkv_s_in1k_224.pth"
    torch.save({"meta": {"mmcls_version": "0.25.0", "CLASSES": ["a"] * 1000},
                "state_dict": official_state_dict(source)}, path)
    expected = source.state_dict()

    loaded = timm.create_model("vrwkv_small", depth=2, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    ours = zoo.create_model("vrwkv_small", depth=2, pretrained=str(path))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    # another resolution resamples the position embedding; another class count gets a fresh head (timm)
    resized = timm.create_model("vrwkv_small", depth=2, img_size=320, num_classes=7, pretrained=True,
                                pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(resized.pos_embed, resample_abs_pos_embed(
        expected["pos_embed"], [20, 20], [14, 14], num_prefix_tokens=0))
    assert resized.head.weight.shape == (7, 384)
    with pytest.raises(zoo.CheckpointError, match="missing keys"):
        bad = official_state_dict(source)
        del bad["backbone.layers.1.att.spatial_decay"]
        torch.save({"state_dict": bad}, tmp_path / "bad.pth")
        zoo.create_model("vrwkv_small", depth=2, pretrained=str(tmp_path / "bad.pth"))


def test_large_has_the_official_tanh_head_and_loads_its_trainers_files(tmp_path):
    """vrwkv_large's head (official, for depth > 12): pooled -> Linear(C, 3072) -> tanh -> Linear(3072, classes),
    the 5.2M parameters that make its published 334.9M; its InternImage-style file ({"model": ...}, head.0 / head.2)
    loads key for key."""
    torch.manual_seed(0)
    source = zoo.create_model("vrwkv_large", depth=2, embed_dim=64, head_hidden_dim=96, num_classes=10, img_size=32)
    assert zoo.model_info("vrwkv_large")["config"]["head_hidden_dim"] == 3072
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    source.eval()
    pooled = source.forward_features(x).mean(1)
    torch.testing.assert_close(source.forward_head(source.forward_features(x), pre_logits=True),
                               torch.tanh(source.pre_logits.fc(pooled)))
    torch.testing.assert_close(source(x), source.head(torch.tanh(source.pre_logits.fc(pooled))))
    official = {re.sub(r"^pre_logits\.fc\.", "head.0.", re.sub(r"^head\.fc\.", "head.2.", k)): v
                for k, v in official_state_dict(source).items()}
    assert {"head.0.weight", "head.2.weight", "backbone.layers.1.ffn.key_norm.weight"} <= set(official)
    torch.save({"model": official, "epoch": 19}, tmp_path / "vrwkv_l_22kto1k_384.pth")
    loaded = zoo.create_model("vrwkv_large", depth=2, embed_dim=64, head_hidden_dim=96, num_classes=10, img_size=32,
                              pretrained=str(tmp_path / "vrwkv_l_22kto1k_384.pth")).eval()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0, msg=key)
    loaded.reset_classifier(3)
    assert loaded(x).shape == (2, 3) and loaded.head.in_features == 96


def test_native_checkpoints_round_trip(tmp_path):
    model = zoo.create_model("vrwkv_tiny", num_classes=10, img_size=32, depth=2)
    zoo.save_checkpoint(model, tmp_path / "ckpt", name="vrwkv_tiny")
    again = zoo.load_checkpoint(tmp_path / "ckpt")
    assert again.config == model.config
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_bad_input_gets_clear_errors():
    model = timm.create_model("vrwkv_tiny", num_classes=2, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"takes images \[B, 3, H, W\], got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"image size \(40, 32\) is not divisible by the patch size 16"):
        model(torch.randn(1, 3, 40, 32))
    with pytest.raises(zoo.UnknownModelError, match="closest: vrwkv_tiny"):
        zoo.create_model("vrwkv_tiyn")


def test_vrwkv6_loads_official_keys_and_every_patch_reads_the_whole_image(tmp_path):
    """Vision-RWKV-6 (bidirectional WKV-6, Q-Shift inside each head): official mmcls-format random weights load
    key for key (the official file's key names: att.time_maa_*, time_decay_w1, time_faaaa [H, 64], ffn.spatial_mix_*,
    gamma1/2), and a change in one patch reaches the features of patches before and after it."""
    torch.manual_seed(0)
    source = timm.create_model("vrwkv6_small", depth=2, num_classes=10, img_size=64)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.1)
    official = official_state_dict(source)
    assert official["backbone.layers.1.att.time_faaaa"].shape == (6, 64)
    assert official["backbone.layers.0.att.time_maa_w1"].shape == (384, 160)
    assert {"backbone.layers.0.gamma1", "backbone.layers.0.ffn.spatial_mix_k", "backbone.layers.0.ln0.weight"} <= set(
        official)
    torch.save({"state_dict": official}, tmp_path / "vrwkv6_s_in1k_224.pth")
    loaded = zoo.create_model("vrwkv6_small", depth=2, num_classes=10, img_size=64,
                              pretrained=str(tmp_path / "vrwkv6_s_in1k_224.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), source.eval().forward_features(x), rtol=0, atol=0)
        x2 = x.clone()
        x2[:, :, 32:48, 32:48] += 1.0                                   # patch (2, 2) of the 4 x 4 grid
        changed = (loaded.forward_features(x2) - loaded.forward_features(x)).abs().amax(-1)[0]
    assert (changed[:10] > 0).all() and (changed[11:] > 0).all()
    with pytest.raises(ValueError, match="key_norm is not offered with version 6"):
        timm.create_model("vrwkv6_tiny", key_norm=True)
