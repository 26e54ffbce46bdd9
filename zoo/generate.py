"""Sampling: temperature, top-k and top-p (nucleus) over the last logits, streamed token by token."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from .decode import make_decoder

__all__ = ["sample_logits", "generate"]


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Draw one id per row of logits [B, V]. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, compile: bool = False) -> Iterator[int]:
    """Yield new token ids. The prompt is read in parallel, then each token takes one decoding step (zoo.decode: an
    RNN state for RWKV, a KV cache for GPT; a CUDA graph on CUDA), sampled on the device and fed back there while
    the host reads the previous one (zoo.decode: `stream`). A GPT whose context would outgrow ctx_len re-reads its
    last ctx_len tokens for every token instead. compile=True compiles an RWKV model's steps and prefill
    (torch.compile; RNNDecoder), which pays on CUDA for long generations."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    idx = torch.tensor([prompt_ids], device=device)
    pick = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    ctx_len = model.config.ctx_len
    # compile goes to make_decoder in every case: it refuses it for a GPT before building anything
    if compile or hasattr(model, "forward_rnn") or len(prompt_ids) + max_new_tokens <= ctx_len:
        decoder = make_decoder(model, 1, capacity=len(prompt_ids) + max_new_tokens, compile=compile)
        for ids in decoder.stream(decoder.prefill(idx), max_new_tokens, pick):
            yield int(ids[0])
        return
    for _ in range(max_new_tokens):
        idx = idx[:, -ctx_len:]
        token = pick(model(idx)[:, -1])
        yield int(token)
        idx = torch.cat([idx, token[:, None]], dim=1)
