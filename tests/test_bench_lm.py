"""zoo bench lm's CPU-checkable parts (the measurements themselves run on a GPU: tests/test_gpu.py)."""

import subprocess

import torch

import zoo
from eval import bench_lm


def test_a_stalled_package_run_becomes_an_error_row(monkeypatch):
    """The `rwkv` package runs in a subprocess (it builds its own kernel); past PACKAGE_TIMEOUT_S the bench reports
    that, with the subprocess's last output, instead of waiting on it."""
    def stalled(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], stderr=b"ninja: building wkv_cuda")

    monkeypatch.setattr(bench_lm.subprocess, "run", stalled)
    result = bench_lm._package_run(zoo.create_model("rwkv4-tiny", n_layer=1), torch.zeros(4, dtype=torch.long))
    assert result["error"].startswith(f"no result within {bench_lm.PACKAGE_TIMEOUT_S} s")
    assert "ninja: building wkv_cuda" in result["error"]
