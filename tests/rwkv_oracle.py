"""The `rwkv` PyPI package (strategy "cpu fp32") as a parity oracle for official RWKV-4..7 `.pth` files.

It runs in a subprocess: the package reads RWKV_JIT_ON, RWKV_CUDA_ON and RWKV_V7_ON when rwkv.model is imported
(RWKV_V7_ON=1 makes its `RWKV` the RWKV-7-only class and sets torch's global backend flags), so each call gets a
fresh interpreter with the environment its version needs, and the test process is left as it was.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = """
import sys, torch
from rwkv.model import RWKV
model = RWKV(sys.argv[1], "cpu fp32")
tokens = torch.load(sys.argv[2], weights_only=True).tolist()
sequence, _ = model.forward(tokens, None, full_output=True)
state, steps = None, []
for token in tokens:
    logits, state = model.forward([token], state)
    steps.append(logits)
torch.save({"version": float(getattr(model, "version", 7)), "sequence": sequence, "token_by_token": torch.stack(steps),
            "state": state}, sys.argv[3])
"""


def package_outputs(pth: Path, tokens: torch.Tensor, rwkv7: bool = False) -> dict:
    """The package on `pth` over `tokens` [T]: {"version", "sequence": logits [T, V] of its sequence mode,
    "token_by_token": logits [T, V] of its RNN mode, "state": its state after the tokens (a list of tensors)}."""
    folder = Path(pth).parent
    torch.save(tokens.cpu(), folder / "tokens.pt")
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "1" if rwkv7 else "0"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(Path(pth).with_suffix("")), str(folder / "tokens.pt"),
                          str(folder / "outputs.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "outputs.pt", weights_only=True)
