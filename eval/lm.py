"""Language-model evaluation: loss and bits per byte on the held-out split of a text source."""

from __future__ import annotations

from recipes.config import DataConfig
from recipes.data import evaluate_lm, load_lm_data
from zoo.cli import load_model

__all__ = ["evaluate_bpb"]


def evaluate_bpb(model_or_path: str, source: str = "stdlib", tokenizer: str | None = None, batches: int = 16,
                 batch_size: int = 16, ctx_len: int = 256, device: str = "cpu", seed: int = 1234) -> dict:
    """Loss (nats/token) and bits per byte of a checkpoint or registered model on `source`'s val split."""
    model = load_model(model_or_path, device)
    data = load_lm_data(DataConfig(source=source, tokenizer=tokenizer or model.config.tokenizer), ("val",))
    return evaluate_lm(model, data, batches, batch_size, ctx_len, seed=seed)
