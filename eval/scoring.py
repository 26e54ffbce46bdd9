"""Log-likelihoods and greedy continuations of text under a zoo language model: what lm-evaluation-harness asks of
a model (eval.harness wraps this for it) and what the local LM suite scores (eval.lm), without importing lm-eval.

Text to tokens, as lm-evaluation-harness's Hugging Face models do it: trailing whitespace of a context moves to its
continuation, and the continuation's tokens are the tail of the encoding of context + continuation past the
context's own encoding (a BPE merge across the boundary counts for the continuation). An empty context, and the
start of every document scored whole, is the document separator the zoo's data pipeline puts between documents
(recipes.data.DOC_SEPARATOR, a blank line), the "start of document" the zoo's models are trained to see.

RWKV models (anything with `forward_rnn`) carry their state instead of re-reading text: requests are grouped by
context, and a context that several continuations share is read once (all but its last token, "prefill") and its
state copied into every row that continues it; a context of its own is read together with its continuation, in
right-padded batches. Every pass runs in chunks of `max_length` tokens carrying the state, so a whole document is
scored with everything before each token in the state, never windowed. Models without a state (the GPT baseline)
read windows of at most ctx_len tokens: a continuation longer than a window is scored in consecutive windows, each
with as much preceding text as fits (lm-evaluation-harness's rolling windows).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from recipes.data import DOC_SEPARATOR
from zoo.generate import generate
from zoo.tokenizers import StreamDecoder, get_tokenizer

__all__ = ["LMScorer"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class _Row:
    """One forward row: `tokens` read from a state (a prefilled context's, or the empty one), the last
    `n_targets` of them scored; its log-likelihood adds to request `request`'s."""

    request: int
    tokens: list[int]
    n_targets: int
    prefix: tuple[int, ...] = ()


class LMScorer:
    """Scores text under a language model: log-likelihoods of continuations and of whole documents, and greedy
    generation up to stop strings (see the module docstring for tokenization, state reuse and windows)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 16,
                 max_length: int | None = None, precision: str = "auto", tokenizer: str | None = None):
        device = torch.device(device)
        if precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be auto, {' or '.join(PRECISIONS)}; got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length or model.config.ctx_len
        self.amp_dtype = torch.bfloat16 if precision == "auto" and device.type == "cuda" else PRECISIONS.get(precision)
        self.tokenizer = get_tokenizer(tokenizer or model.config.tokenizer)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer.name} has {self.tokenizer.vocab_size} ids but the model only "
                             f"{model.config.vocab_size}")
        self.stateful = hasattr(model, "forward_rnn")
        self.document_start = self.tokenizer.encode(DOC_SEPARATOR)

    # -- text -----------------------------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids); an empty context becomes the document separator."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tokenizer.encode(stripped + continuation)
        context_ids = self.tokenizer.encode(stripped)
        return context_ids or self.document_start, whole[len(context_ids):]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-probability of each continuation given its context, whether greedy decoding produces it)."""
        return self.score_tokens([self.encode_pair(context, continuation) for context, continuation in pairs])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Log-probability of each whole text, after the document separator."""
        return [logprob for logprob, _ in self.score_tokens([(self.document_start, self.tokenizer.encode(text))
                                                             for text in texts])]

    @torch.no_grad()
    def generate_until(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """The greedy continuation of `context`, cut before the first stop string, at most max_new_tokens tokens."""
        decode = StreamDecoder(self.tokenizer)
        text = ""
        with self._autocast():
            for token in generate(self.model, self.tokenizer.encode(context) or self.document_start, max_new_tokens,
                                  temperature=0):
                text += decode(token)
                stops = [text.find(stop) for stop in until if stop in text]
                if stops:
                    return text[:min(stops)]
        return text + decode.flush()

    # -- tokens ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_tokens(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation ids given the context ids, whether each is the argmax)
        per (context ids, continuation ids); contexts must not be empty."""
        if any(not context for context, _ in requests):
            raise ValueError("every context must hold at least one token (the document separator for none)")
        rows = self._stateful_rows(requests) if self.stateful else self._window_rows(requests)
        totals = [[0.0, True] for _ in requests]
        by_prefix = defaultdict(list)
        for row in rows:
            by_prefix[row.prefix].append(row)
        with tqdm(total=len(rows), desc="scoring", unit="row", leave=False, mininterval=1) as bar:
            self._score_rows(by_prefix.pop((), []), totals, bar)
            # shared contexts, shortest first, prefilled together when their lengths agree
            for _, same_length in itertools.groupby(sorted(by_prefix, key=len), key=len):
                same_length = list(same_length)
                for start in range(0, len(same_length), self.batch_size):
                    block = same_length[start:start + self.batch_size]
                    self._score_rows([row for prefix in block for row in by_prefix[prefix]], totals, bar,
                                     self._prefill(block))
        return [(logprob, greedy) for logprob, greedy in totals]

    def _stateful_rows(self, requests) -> list[_Row]:
        """A context shared by several requests becomes a prefix (prefilled once); the others are read whole."""
        uses = Counter(tuple(context) for context, _ in requests)
        rows = []
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                continue
            if uses[tuple(context)] > 1:
                rows.append(_Row(i, context[-1:] + continuation, len(continuation), tuple(context[:-1])))
            else:
                rows.append(_Row(i, context + continuation, len(continuation)))
        return rows

    def _window_rows(self, requests) -> list[_Row]:
        """Windows of at most ctx_len input tokens: targets [start, end) of context + continuation are read after
        as many of the tokens before them as fit."""
        window = min(self.max_length, self.model.config.ctx_len)
        rows = []
        for i, (context, continuation) in enumerate(requests):
            tokens = context + continuation
            for start in range(len(context), len(tokens), window):
                end = min(start + window, len(tokens))
                rows.append(_Row(i, tokens[max(0, end - 1 - window):end], end - start))
        return rows

    def _prefill(self, prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
        """The state [n_layer, rows, 1, C] after reading each prefix (all of one length, at least one token), read in
        one batch."""
        ids = torch.tensor(prefixes, device=self.device)
        state = None
        with self._autocast():
            for start in range(0, ids.shape[1], self.max_length):
                _, state = self.model(ids[:, start:start + self.max_length], state=state, return_state=True)
        return {prefix: state[:, :, i:i + 1] for i, prefix in enumerate(prefixes)}

    def _score_rows(self, rows: list[_Row], totals: list, bar: tqdm, states: dict | None = None) -> None:
        """Add each row's log-likelihood to its request's total, in right-padded batches of similar length, each row
        read from its prefix's state (`states`) or the empty one."""
        rows = sorted(rows, key=lambda row: -len(row.tokens))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            length = len(batch[0].tokens) - 1
            inputs = torch.zeros(len(batch), length, dtype=torch.long)
            targets = torch.zeros(len(batch), length, dtype=torch.long)
            scored = torch.zeros(len(batch), length, dtype=torch.bool)
            for b, row in enumerate(batch):
                n = len(row.tokens) - 1
                inputs[b, :n] = torch.tensor(row.tokens[:-1])
                targets[b, :n] = torch.tensor(row.tokens[1:])
                scored[b, n - row.n_targets:n] = True
            state = torch.cat([states[row.prefix] for row in batch], dim=2) if states else None
            logprobs, greedy = self._target_logprobs(inputs.to(self.device), targets.to(self.device), state)
            scored = scored.to(self.device)
            row_logprob = torch.where(scored, logprobs, 0).double().sum(1).tolist()
            row_greedy = (greedy | ~scored).all(1).tolist()
            for row, logprob, is_greedy in zip(batch, row_logprob, row_greedy):
                totals[row.request][0] += logprob
                totals[row.request][1] &= is_greedy
            bar.update(len(batch))

    def _target_logprobs(self, inputs: Tensor, targets: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log-probability of each target after the inputs up to it, whether it is the argmax), both [B, T]; RWKV
        models read the inputs from `state` (None: the empty state) in chunks of max_length."""
        pieces = []
        with self._autocast():
            if self.stateful:
                for start in range(0, inputs.shape[1], self.max_length):
                    logits, state = self.model(inputs[:, start:start + self.max_length], state=state,
                                               return_state=True)
                    pieces.append(_logprobs_and_greedy(logits, targets[:, start:start + self.max_length]))
            else:
                pieces.append(_logprobs_and_greedy(self.model(inputs), targets))
        logprobs, greedy = zip(*pieces)
        return torch.cat(logprobs, 1), torch.cat(greedy, 1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def _logprobs_and_greedy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    log_softmax = logits.float().log_softmax(-1)
    return log_softmax.gather(-1, targets[..., None])[..., 0], log_softmax.argmax(-1) == targets
