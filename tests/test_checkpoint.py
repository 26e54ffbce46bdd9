"""Native checkpoints and official .pth files: round trips, and clear errors for bad files."""

import os
import pickle

import pytest
import torch

import zoo
from zoo.checkpoint import CheckpointError, read_state_dict


def small_model(**overrides):
    torch.manual_seed(0)
    model = zoo.create_model("rwkv4-tiny", **({"n_layer": 2, "n_embd": 32} | overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_native_round_trip_is_exact(tmp_path):
    model = small_model()
    path = zoo.save_checkpoint(model, tmp_path / "ckpt", name="rwkv4-tiny")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = zoo.load_checkpoint(path).eval()
    idx = torch.randint(0, 256, (2, 9))
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.config == model.config
    # the .safetensors file alone works too, and so does create_model(pretrained=)
    assert torch.equal(zoo.load_checkpoint(path / "model.safetensors").eval()(idx), model(idx))
    again = zoo.create_model("rwkv4-tiny", pretrained=str(path), n_layer=2, n_embd=32).eval()
    assert torch.equal(again(idx), model(idx))


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "ckpt"
    zoo.save_checkpoint(small_model(), path)
    zoo.save_checkpoint(small_model(n_layer=1), path)
    assert zoo.load_checkpoint(path).config.n_layer == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_official_pth_infers_config_and_exports_exactly(tmp_path):
    model = small_model(n_layer=3, n_embd=48)
    official = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(official, tmp_path / "RWKV-4-x.pth")
    loaded = zoo.load_checkpoint(tmp_path / "RWKV-4-x.pth")
    assert (loaded.config.n_layer, loaded.config.n_embd, loaded.config.vocab_size) == (3, 48, 256)
    assert loaded.config.tokenizer == "byte" and loaded.emb.weight.dtype == torch.float32
    zoo.export_official(loaded, tmp_path / "back.pth", dtype=torch.bfloat16)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) and back[k].dtype == torch.bfloat16 for k in official)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    sd = small_model().state_dict()
    sd.pop("blocks.1.att.time_first")
    sd["blocks.1.att.extra"] = torch.zeros(3)
    sd["blocks.0.att.key.weight"] = torch.zeros(5, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        zoo.load_checkpoint(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys (1): blocks.1.att.time_first" in msg
    assert "unexpected keys (1): blocks.1.att.extra" in msg
    assert "blocks.0.att.key.weight: checkpoint (5, 32) vs model (32, 32)" in msg


def test_pretrained_of_another_size_names_the_mismatch(tmp_path):
    zoo.save_checkpoint(small_model(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"emb.weight: checkpoint \(256, 32\) vs model \(256, 128\)"):
        zoo.create_model("rwkv4-tiny", pretrained=str(tmp_path / "ckpt"))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pth_that_needs_code_execution_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as f:
        pickle.dump({"emb.weight": Exploit()}, f)
    torch.save({"x": Exploit()}, "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to load.*execute code"):
            zoo.load_checkpoint(name)
    assert not (tmp_path / "pwned").exists()


def test_non_state_dict_files(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        read_state_dict(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        zoo.load_checkpoint(tmp_path / "absent.pth")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an official RWKV-4/5/6/7 state dict .no version matches") as e:
        zoo.load_checkpoint(tmp_path / "other.pth")
    assert "it looks like" not in str(e.value).split(")", 1)[1]
    for keys, kind in ((["image_model.patch_embed.projection.weight", "text_model.emb.weight"], "an RWKV-CLIP"),
                       (["backbone.layers.0.att.key.weight", "head.fc.weight"], "a Vision-RWKV .mmcls.")):
        torch.save(dict.fromkeys(keys, torch.zeros(2)), tmp_path / "foreign.pth")
        with pytest.raises(CheckpointError, match=f"it looks like {kind} checkpoint: load it with zoo.create_model"):
            zoo.load_checkpoint(tmp_path / "foreign.pth")


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv5", "rwkv6", "rwkv7"])
def test_official_files_of_every_version_are_told_apart_loaded_and_exported(tmp_path, arch):
    """load_checkpoint reads the version off the keys (exactly one format claims each file), builds that model,
    and export_official writes the same file back."""
    from zoo.checkpoint import OFFICIAL_LM_FORMATS, official_format

    torch.manual_seed(0)
    model = zoo.create_model(f"{arch}-tiny", n_layer=2)
    zoo.export_official(model, tmp_path / "official.pth")
    state_dict = torch.load(tmp_path / "official.pth", weights_only=True)
    assert [a for a, m in OFFICIAL_LM_FORMATS.items() if m.is_state_dict(state_dict)] == [arch]
    assert official_format(state_dict)[0] == arch
    loaded = zoo.load_checkpoint(tmp_path / "official.pth")
    assert loaded.arch == arch and loaded.config.n_layer == 2
    zoo.export_official(loaded, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(state_dict) and all(torch.equal(back[k], state_dict[k]) for k in state_dict)
    with pytest.raises(CheckpointError, match="official export exists for rwkv4, rwkv5, rwkv6, rwkv7 only"):
        zoo.export_official(zoo.create_model("gpt-tiny"), tmp_path / "gpt.pth")
