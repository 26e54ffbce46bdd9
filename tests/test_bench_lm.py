"""zoo bench lm's CPU-checkable parts (the measurements themselves run on a GPU: tests/test_gpu.py)."""

import json
import subprocess

import pytest
import torch

import zoo
from eval import bench_lm


def test_a_stalled_package_run_becomes_an_error_row(monkeypatch, tmp_path):
    """The `rwkv` package runs in a subprocess (it builds its own kernel); past PACKAGE_TIMEOUT_S the bench reports
    that, with the subprocess's last output and any extension build lock left behind (torch waits on one forever),
    instead of waiting on it."""
    def stalled(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], stderr=b"ninja: building wkv_cuda")

    monkeypatch.setattr(bench_lm.subprocess, "run", stalled)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    model, tokens = zoo.create_model("rwkv4-tiny", n_layer=1), torch.zeros(4, dtype=torch.long)
    result = bench_lm._package_run(model, tokens)
    assert result["error"].startswith(f"no result within {bench_lm.PACKAGE_TIMEOUT_S} s")
    assert "ninja: building wkv_cuda" in result["error"] and "lock" not in result["error"]

    lock = tmp_path / "py312_cu130" / "wkv_cuda" / "lock"   # where torch's versioned build folders put it
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert str(lock) in bench_lm._package_run(model, tokens)["error"]


def test_each_part_is_printed_and_saved_when_done(monkeypatch, tmp_path, capsys):
    """A run cut short (here: the batched part fails) keeps the parts it finished, in the JSON and on screen, with
    RWKV/GPT ratios. The measurements are stand-ins; only the bookkeeping runs."""
    def batched_fails(arch, size, batch):
        raise RuntimeError("cut short")

    monkeypatch.setattr(bench_lm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_lm.torch.cuda, "get_device_name", lambda: "stand-in GPU")
    monkeypatch.setattr("blocks.wkv_cuda.status", lambda: "stand-in kernels")
    monkeypatch.setattr(bench_lm, "train_throughput", lambda a, s, T: {"tokens_per_s": 2.0 if a == "gpt" else 1.0})
    monkeypatch.setattr(bench_lm, "decode_latency", lambda a, s, L: {"context": L, "ms_per_token": float(L)})
    monkeypatch.setattr(bench_lm, "batched_throughput", batched_fails)
    out = tmp_path / "lm.json"
    with pytest.raises(RuntimeError, match="cut short"):
        bench_lm.bench_lm(str(out), None, sizes=("tiny",), parts=("train", "decode", "batched"))
    saved = json.loads(out.read_text())
    assert [r["rwkv_over_gpt"] for r in saved["train"] if r["arch"] == "rwkv4"] == [0.5] * 3
    assert [r["context"] for r in saved["decode"] if r["arch"] == "gpt"] == list(bench_lm.CONTEXTS)
    assert "batched" not in saved
    printed = capsys.readouterr().out
    assert "[train]" in printed and "[decode]" in printed
