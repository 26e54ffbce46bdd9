"""Fast autoregressive decoding: a prompt read in parallel, then one token per step with static shapes.

    decoder = make_decoder(model, batch_size=1)
    logits = decoder.prefill(prompt_ids)        # [B, T] -> logits of the last position [B, V]
    logits = decoder.step(next_ids)             # [B] -> [B, V]
    for ids in decoder.stream(logits, 100):     # or: ids picked on the device, the host one step behind
        ...

RWKV models (anything with forward_rnn) keep their constant-size RNN state (RNNDecoder); GPT keeps a KV cache of
fixed capacity (KVDecoder). On CUDA, the step is captured once in a CUDA graph and replayed: one launch per token
instead of hundreds, which is what bounds small models at batch 1 (the `rwkv` package runs a 169M RWKV-4 at
6 ms/token for this reason). The logits a step returns live in a static buffer that the next step overwrites.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from blocks.wkv import wkv4_step

from .models._validate import check_tokens

__all__ = ["RNNDecoder", "RWKV4Step", "KVDecoder", "make_decoder"]

log = logging.getLogger(__name__)

PREFILL_GRAPHS = 4
"""CUDA graphs of RNNDecoder.prefill kept, one per chunk length."""


class _GraphedStep:
    """A step with static inputs and outputs: `_run()` reads self.tokens and writes self.logits; on CUDA it is
    recorded once in a CUDA graph (after warm-up runs on a side stream, as torch.cuda.graphs asks) and replayed."""

    def __init__(self, model: nn.Module, batch_size: int, cuda_graph: bool | None, prefill_chunk: int = 4096):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device; this one is on {self.device}")
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logits: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.prefill_chunk = prefill_chunk

    @torch.no_grad()
    def prefill(self, idx: Tensor) -> Tensor:
        """Read idx [B, T] after whatever was read before, in chunks of prefill_chunk tokens (activations of one chunk
        at a time; the head only at the last position); returns the last position's logits [B, V]."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[0] != self.batch_size:
            shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"prefill takes token ids of shape [{self.batch_size}, T], got {shape}")
        check_tokens(idx, self.model.config.vocab_size, self.device)  # here: a compiled forward skips the ids' range
        for chunk in idx.split(self.prefill_chunk, dim=1):
            last = self._prefill_chunk(chunk)
        return last

    def _prefill_chunk(self, idx: Tensor) -> Tensor:
        """Read one chunk; return its last position's logits [B, V]."""
        raise NotImplementedError

    @property
    def path(self) -> str:
        return "cuda-graph" if self.use_graph else "eager"

    def _run(self) -> None:
        raise NotImplementedError

    def _save(self) -> None:
        """Snapshot of the state a warm-up or capture run advances, restored afterwards."""
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError

    def _capture(self, run) -> torch.cuda.CUDAGraph:
        """`run` recorded in a CUDA graph, after two warm-up runs on a side stream (as torch.cuda.graphs asks);
        whatever the runs advance (state, cache position) is put back."""
        self._save()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        self._restore()
        return graph

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """One token per row, token_ids [B]: returns the logits [B, V] (a static buffer, overwritten next step)."""
        if not isinstance(token_ids, Tensor) or tuple(token_ids.shape) != (self.batch_size,):
            shape = tuple(token_ids.shape) if isinstance(token_ids, Tensor) else type(token_ids).__name__
            raise ValueError(f"step takes token ids of shape [{self.batch_size}], got {shape}")
        # graph replays, compiled steps and RWKV4Step read ids unchecked (a sync on a GPU; an eager model step
        # checks them once more)
        check_tokens(token_ids[:, None], self.model.config.vocab_size, token_ids.device)
        self.tokens.copy_(token_ids, non_blocking=True)
        self._advance()
        return self.logits

    @torch.no_grad()
    def stream(self, logits: Tensor, steps: int, pick: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
        """Generate `steps` ids per row from logits [B, V] (prefill's or step's): each pick (argmax by default; e.g.
        functools.partial(zoo.generate.sample_logits, temperature=0.8)) runs on the device and feeds the next step
        there. Yields the ids [B] on the host, one step behind the device: they are copied out while the next step
        runs, where a loop over `step` leaves the device idle while the host reads the ids and sends them back.
        The last ids are not fed (`step(ids)` goes on from them). `pick` must return ids in [0, vocab_size)
        (argmax and sampling do; they are not read back to be checked)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        pick = pick or (lambda last: last.argmax(-1))
        on_cuda = self.device.type == "cuda"
        host = torch.empty(self.batch_size, dtype=torch.long, pin_memory=on_cuda)
        copied = torch.cuda.Event() if on_cuda else None
        for i in range(steps):
            ids = pick(logits)
            if not isinstance(ids, Tensor) or tuple(ids.shape) != (self.batch_size,) or ids.is_floating_point():
                got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
                raise ValueError(f"pick must return integer ids of shape [{self.batch_size}], got {got}")
            host.copy_(ids, non_blocking=on_cuda)
            if on_cuda:
                copied.record()
            if i + 1 < steps:
                self.tokens.copy_(ids)
                self._advance()
                logits = self.logits
            if on_cuda:
                copied.synchronize()
            yield host.clone()

    def _advance(self) -> None:
        """One step on self.tokens: the model's step, or a replay of its CUDA graph (captured on first use)."""
        self._before_step()
        if not self.use_graph:
            self._run()
        else:
            if self.graph is None:
                self.graph = self._capture(self._run)
                log.info("%s: decoding step captured in a CUDA graph (batch %d)", type(self).__name__, self.batch_size)
            self.graph.replay()
        self._after_step()

    def _before_step(self) -> None:
        pass

    def _after_step(self) -> None:
        pass


def _matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., B, K] @ weight[..., N, K]^T. Compiled at batch 1, as a multiply-and-sum that inductor turns into its own
    reduction kernel, fused with the ops that make x: cuBLAS's kernels for these M = 1 products give each thread block
    64 outputs, 12-60 blocks for the H100's 132 SMs (a compiled RWKV-4 169M step took 0.47 ms of GPU time with them,
    0.34 ms this way, on an H100)."""
    if torch.compiler.is_compiling() and x.shape[-2] == 1:
        return (x.unsqueeze(-2) * weight.unsqueeze(-3)).sum(-1)
    return x @ weight.transpose(-1, -2)


class RWKV4Step(nn.Module):
    """RWKV-4's RNN step for decoding: RWKV4LM.forward_rnn's math (same state layout and logits, up to rounding) with
    the time-mix's three projections as one batched product over their token-shift mixes,

        [k; v; r] = [W_k (mu_k x + (1 - mu_k) x'); W_v (...); W_r (...)],

    and every matrix-vector product through _matvec. The stacked W_k, W_v, W_r are a copy of those weights taken at
    construction (a quarter of the block weights; build a new decoder after changing the weights)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.kvr = [torch.stack([b.att.key.weight, b.att.value.weight, b.att.receptance.weight])
                        for b in model.blocks]
            self.kvr_mix = [torch.stack([b.att.time_mix_k, b.att.time_mix_v, b.att.time_mix_r]).view(3, 1, -1)
                            for b in model.blocks]

    def forward(self, token_ids: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        x, rows = m.emb(token_ids), []
        for i, block in enumerate(m.blocks):
            x = block.ln0(x) if i == 0 else x
            xa = block.ln1(x)
            k, v, r = _matvec(torch.lerp(state[i, 0].to(x.dtype), xa, self.kvr_mix[i]), self.kvr[i])
            w = -torch.exp(block.att.time_decay.float())
            wkv, (aa, bb, pp) = wkv4_step(w, block.att.time_first.float(), k.float(), v.float(), tuple(state[i, 1:4]))
            x = x + _matvec(torch.sigmoid(r) * wkv.to(x.dtype), block.att.output.weight)
            xf, ffn = block.ln2(x), block.ffn
            shifted = state[i, 4].to(x.dtype)
            k = _matvec(torch.lerp(shifted, xf, ffn.time_mix_k.view(1, -1)), ffn.key.weight)
            r = _matvec(torch.lerp(shifted, xf, ffn.time_mix_r.view(1, -1)), ffn.receptance.weight)
            x = x + torch.sigmoid(r) * _matvec(torch.square(torch.relu(k)), ffn.value.weight)
            rows.append(torch.stack([xa.to(aa.dtype), aa, bb, pp, xf.to(aa.dtype)]))
        return m.head(m.ln_out(x)), torch.stack(rows)


class RNNDecoder(_GraphedStep):
    """RWKV decoding: parallel (kernel) prefill in chunks with the state carried, then RNN steps (RWKV-4 through
    RWKV4Step, the other versions through their forward_rnn).

    compile=True (or a torch.compile mode) runs both through torch.compile (the elementwise work fused; one
    compilation per prefill chunk length). On CUDA, steps replay a CUDA graph, and prefill chunks too with
    graph_prefill, except for models whose `static_step` is False (RRWKV), which run eagerly. Logits equal the
    model's parallel forward over the same tokens."""

    def __init__(self, model: nn.Module, batch_size: int = 1, cuda_graph: bool | None = None,
                 compile: bool | str = False, graph_prefill: bool = False):
        if not getattr(model, "static_step", True):
            if compile or cuda_graph:
                raise ValueError(f"{type(model).__name__}'s steps read the state on the host (static_step = False): "
                                 "they cannot be compiled or captured in a CUDA graph; use compile=False, "
                                 "cuda_graph=False")
            cuda_graph = False
        super().__init__(model, batch_size, cuda_graph)
        if graph_prefill and not self.use_graph:
            raise ValueError("graph_prefill needs cuda_graph (a model on a CUDA device)")
        self.graph_prefill = graph_prefill
        self.state = model.init_state(batch_size, self.device)
        self.compiled = bool(compile)
        mode = compile if isinstance(compile, str) else None  # a torch.compile mode, e.g. max-autotune-no-cudagraphs
        step = RWKV4Step(model) if model.arch == "rwkv4" else model.forward_rnn
        self.forward_rnn = torch.compile(step, fullgraph=True, mode=mode) if compile else step
        self.parallel = torch.compile(model, fullgraph=True, dynamic=False, mode=mode) if compile else model
        self._prefill_graphs: OrderedDict[int, tuple] = OrderedDict()
        self._saved: Tensor | None = None

    @property
    def path(self) -> str:
        return ("compiled+" if self.compiled else "") + super().path

    def _read(self, idx: Tensor) -> Tensor:
        logits, state = self.parallel(idx, state=self.state, return_state=True, logits_to_keep=1)
        self.state.copy_(state)
        return logits[:, -1]

    def _prefill_chunk(self, idx: Tensor) -> Tensor:
        """Eager, or with graph_prefill a CUDA graph per chunk length (the last PREFILL_GRAPHS lengths kept; a graph
        pays when chunks of one length recur, as when serving: its capture costs three reads of the chunk)."""
        if not self.graph_prefill:
            return self._read(idx)
        T = idx.shape[1]
        if T not in self._prefill_graphs:
            tokens, last = torch.zeros_like(idx), torch.empty(0, device=self.device)

            def run():
                logits = self._read(tokens)
                if last.numel() == 0:
                    last.resize_(logits.shape)
                last.copy_(logits)

            self._prefill_graphs[T] = (self._capture(run), tokens, last)
            if len(self._prefill_graphs) > PREFILL_GRAPHS:
                self._prefill_graphs.popitem(last=False)
        self._prefill_graphs.move_to_end(T)
        graph, tokens, last = self._prefill_graphs[T]
        tokens.copy_(idx)
        graph.replay()
        return last

    def reset(self) -> None:
        self.state.copy_(self.model.init_state(self.batch_size, self.device))

    def _run(self) -> None:
        logits, state = self.forward_rnn(self.tokens, self.state)
        self.state.copy_(state)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _save(self) -> None:
        self._saved = self.state.clone()

    def _restore(self) -> None:
        self.state.copy_(self._saved)
        self._saved = None


class KVDecoder(_GraphedStep):
    """Transformer decoding over a KV cache of `capacity` positions: a causal (flash) prefill, then steps that
    attend over the whole cache, masked to the filled positions, so that every step has the same shapes."""

    def __init__(self, model: nn.Module, batch_size: int = 1, capacity: int | None = None,
                 cuda_graph: bool | None = None, dtype: torch.dtype | None = None):
        self.cache = model.new_cache(batch_size, capacity, dtype)
        # one chunk by default: a prompt into an empty cache takes the flash kernel; later chunks a masked attention
        super().__init__(model, batch_size, cuda_graph, prefill_chunk=self.cache.capacity)
        self._saved: tuple[Tensor, int] | None = None

    def _prefill_chunk(self, idx: Tensor) -> Tensor:
        return self.model(idx, self.cache, logits_to_keep=1)[:, -1]

    def reset(self) -> None:
        self.cache.reset()

    def _before_step(self) -> None:
        if self.cache.filled >= self.cache.capacity:
            raise ValueError(f"the KV cache is full ({self.cache.capacity} positions)")
        if self.cache.filled == 0:
            raise ValueError("KVDecoder.step needs a prefill first (at least one token)")

    def _after_step(self) -> None:
        if self.use_graph:  # a replay advanced cache.length on the device; the host count follows
            self.cache.filled += 1

    def _run(self) -> None:
        logits = self.model(self.tokens[:, None], self.cache)[:, 0]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _save(self) -> None:
        self._saved = (self.cache.length.clone(), self.cache.filled)

    def _restore(self) -> None:
        length, filled = self._saved
        self.cache.length.copy_(length)
        self.cache.filled = filled
        self._saved = None
        # positions written by the warm-up and capture runs lie beyond `filled`: masked out, then overwritten


def make_decoder(model: nn.Module, batch_size: int = 1, capacity: int | None = None,
                 cuda_graph: bool | None = None, compile: bool | str = False) -> RNNDecoder | KVDecoder:
    """The decoder for this model: RNNDecoder for RWKV models (forward_rnn; `compile` as RNNDecoder takes it),
    KVDecoder for GPT (new_cache)."""
    if hasattr(model, "forward_rnn"):
        return RNNDecoder(model, batch_size, cuda_graph, compile=compile)
    if compile:
        raise ValueError(f"compile is offered for RWKV models' RNN decoding, not for {type(model).__name__}")
    if hasattr(model, "new_cache"):
        return KVDecoder(model, batch_size, capacity, cuda_graph)
    raise TypeError(f"{type(model).__name__} has neither an RNN mode (forward_rnn) nor a KV cache (new_cache)")
