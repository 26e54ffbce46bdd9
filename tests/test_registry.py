"""Registry, factory and the list/info CLI."""

import json

import pytest
import torch

import zoo
from zoo.cli import main

PAPER_SIZES = {"169m": (12, 768), "430m": (24, 1024), "1b5": (24, 2048), "3b": (32, 2560), "7b": (32, 4096),
               "14b": (40, 5120)}


def test_list_models_pattern_and_order():
    rwkv = zoo.list_models("rwkv4*")
    assert rwkv == sorted(rwkv)
    assert set(rwkv) == {f"rwkv4-{s}" for s in PAPER_SIZES} | {"rwkv4-tiny"}
    assert set(zoo.list_models("gpt-*")) == {f"gpt-{s}" for s in PAPER_SIZES} | {"gpt-tiny"}
    assert zoo.list_models("nothing*") == []


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_shapes_and_parameter_count(size):
    info = zoo.model_info(f"rwkv4-{size}")
    L, D = PAPER_SIZES[size]
    V = 50277
    assert (info["config"]["n_layer"], info["config"]["n_embd"], info["config"]["vocab_size"]) == (L, D, V)
    formula = 2 * V * D + 13 * D * D * L + D * (11 * L + 4)
    assert abs(info["params"] / formula - 1) <= 1e-3
    assert info["family"] == "language" and "2305.13048" in info["paper"]
    assert info["shapes"]["blocks.0.ffn.key.weight"] == [4 * D, D]


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_gpt_baseline_matches_rwkv_size(size):
    gpt, rwkv = zoo.model_info(f"gpt-{size}"), zoo.model_info(f"rwkv4-{size}")
    assert {k: gpt["config"][k] for k in ("vocab_size", "n_layer", "n_embd")} == \
           {k: rwkv["config"][k] for k in ("vocab_size", "n_layer", "n_embd")}
    assert abs(gpt["params"] / rwkv["params"] - 1) < 0.1


def test_meta_device_builds_14b_without_memory():
    model = zoo.create_model("rwkv4-14b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 14e9


def test_unknown_name_lists_close_matches():
    with pytest.raises(zoo.UnknownModelError, match=r"unknown model 'rwkv4-196m'.*rwkv4-169m"):
        zoo.create_model("rwkv4-196m")
    with pytest.raises(zoo.UnknownModelError, match="closest: rwkv4-tiny, "):    # the nearest name comes first
        zoo.model_info("rwkv4-tinny")


def test_overrides_change_config_and_unknown_fields_fail():
    model = zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32)
    assert len(model.blocks) == 2 and model.head.weight.shape == (256, 32)
    assert model.blocks[0].ffn.key.weight.shape == (128, 32)
    with pytest.raises(TypeError, match="n_layers.*did you mean n_layer"):
        zoo.create_model("rwkv4-tiny", n_layers=2)


def test_create_model_dtype():
    assert zoo.create_model("rwkv4-tiny", dtype=torch.bfloat16).emb.weight.dtype == torch.bfloat16


def test_cli_list_and_info(capsys):
    main(["list", "rwkv4-1*"])
    assert capsys.readouterr().out.split() == ["rwkv4-14b", "rwkv4-169m", "rwkv4-1b5"]
    main(["info", "rwkv4-169m"])
    out = capsys.readouterr().out
    assert "169,342,464" in out and "language" in out and "2305.13048" in out and "[50277, 768]" in out
    main(["info", "gpt-tiny", "--json"])
    assert json.loads(capsys.readouterr().out)["family"] == "language"


def test_cli_help_for_every_command(capsys):
    for command in (["--help"], ["list", "--help"], ["info", "--help"], ["generate", "--help"], ["train", "--help"],
                    ["data", "--help"], ["data", "text", "--help"], ["eval", "--help"], ["eval", "lm", "--help"], ["bench", "kernels", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
        assert "usage: zoo" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cli_bench_kernels_needs_a_gpu():
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernels"])
    assert str(exit_info.value.code) == "zoo bench kernels: needs a CUDA GPU"
