"""zoo bench vision's CPU-checkable parts: ratios per compile mode, the plot, bad arguments (the measurements run on
a GPU)."""

import json

import pytest

from eval import bench_vision


def test_ratios_compare_like_with_like_and_with_deit_eager(monkeypatch, tmp_path):
    """Stand-in measurements: vrwkv 3 and DeiT 2 images/s eager; compiled, vrwkv 12 and DeiT 4; vrwkv training with
    selective checkpointing at half the speed and memory. DeiT (not the zoo's) trains only without checkpointing,
    and is every vrwkv row's anchor."""
    speed = {("vrwkv_tiny", "none"): 3.0, ("deit_tiny_patch16_224", "none"): 2.0,
             ("vrwkv_tiny", "reduce-overhead"): 12.0, ("deit_tiny_patch16_224", "reduce-overhead"): 4.0}

    def measure(name, resolution, batch, train, compile="none", grad_checkpointing="none"):
        assert train or grad_checkpointing == "none"
        scale = 0.5 if grad_checkpointing == "selective" else 1.0
        return {"images_per_s": speed[name, compile] * scale,
                "peak_gb": (1.0 if name.startswith("vrwkv") else 2.0) * scale}

    monkeypatch.setattr(bench_vision, "_measure", measure)
    monkeypatch.setattr(bench_vision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_vision.torch.cuda, "get_device_name", lambda: "stand-in GPU")
    rows = bench_vision.bench_vision(str(tmp_path / "v.json"), str(tmp_path / "v.png"),
                                     models=("vrwkv_tiny", "deit_tiny_patch16_224"), resolutions=(224, 2048),
                                     compile=("none", "reduce-overhead"), grad_checkpointing=("none", "selective"))
    assert len(rows) == 2 * 2 * 2 * 2 + 2 * 2   # + vrwkv training with selective checkpointing
    for row in rows:
        if row["model"] == "vrwkv_tiny":
            scale = 0.5 if row["grad_checkpointing"] == "selective" else 1.0
            assert row["speed_vs_deit"] == (1.5 if row["compile"] == "none" else 3.0) * scale
            assert row["memory_vs_deit"] == 0.5 * scale
            assert row.get("speed_vs_deit_eager") == (None if row["compile"] == "none" else 6.0 * scale)
        else:
            assert "speed_vs_deit" not in row and row["grad_checkpointing"] == "none"
    assert len(json.loads((tmp_path / "v.json").read_text())["rows"]) == 20
    assert (tmp_path / "v.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs,message", [({"models": ("vrwkv_tny",)}, r"unknown models \['vrwkv_tny'\]; close: "
                                             r"\[\['vrwkv_tiny'"),
                                            ({"resolutions": (300,)}, "resolutions must be among"),
                                            ({"compile": ("fast",)}, "compile modes must be among"),
                                            ({"grad_checkpointing": ("some",)},
                                             "grad checkpointing modes must be among")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_vision.bench_vision(None, None, **kwargs)
