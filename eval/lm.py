"""The local language-model suite (`zoo eval lm`): loss, bits per byte and perplexity on the held-out (val) split of a
text source, and a LAMBADA-style last-word task built from the same held-out text.

The last-word task is our own rule, in the spirit of LAMBADA (Paperno et al., 2016: passages whose last word people
guess from the whole passage). In each held-out document, split into words at whitespace, a target is a word of at
least 4 letters (A-Z) that ends a sentence (followed by . ! or ?, then optionally closing quotes or brackets), comes
after a single space, and also occurs, case-insensitively, in its context. The context is the document's own text
from the latest sentence start at least `context_words` words before the target up to that space (sentences end at
. ! or ? as above, except after Mr, Mrs, Ms, Dr and St); the target's closing punctuation is dropped. Of all such
passages, `items` are drawn with random.Random(seed) and kept in document order. A passage counts as right when
greedy decoding after the context produces " " + target (every token the argmax, lm-eval's `acc` on LAMBADA); the
mean log-likelihood of " " + target is reported too, and the binomial standard error of the accuracy.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from recipes.config import DataConfig
from recipes.data import documents, evaluate_lm, load_lm_data, split_text_source
from recipes.distributed import init_ranks

from .common import load_language_model
from .scoring import LMScorer

__all__ = ["LastWordItem", "last_word_items", "last_word_accuracy", "evaluate_language_model"]

WORD = re.compile(r"\S+")
TARGET = re.compile(r"([A-Za-z]{4,})[.!?][\"')\]]*")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
TITLE = re.compile(r"(Mr|Mrs|Ms|Dr|St)\.")


@dataclass(frozen=True)
class LastWordItem:
    context: str
    target: str     # the word alone; it is scored as the continuation " " + target


def last_word_items(texts: Iterable[str], items: int = 200, seed: int = 0,
                    context_words: int = 50) -> list[LastWordItem]:
    """The last-word passages of `texts` (the rule is in the module docstring): `items` of them, drawn with `seed`."""
    candidates = []
    for text in texts:
        words = list(WORD.finditer(text))
        sentence_starts = [j for j in range(len(words)) if j == 0 or _ends_sentence(words[j - 1].group())]
        for i in range(context_words, len(words)):
            match = TARGET.fullmatch(words[i].group())
            if not match or text[words[i - 1].end():words[i].start()] != " ":
                continue
            start = sentence_starts[bisect.bisect_right(sentence_starts, i - context_words) - 1]
            context = text[words[start].start():words[i - 1].end()]
            if match.group(1).lower() in re.findall(r"[a-z]+", context.lower()):
                candidates.append(LastWordItem(context, match.group(1)))
    picked = random.Random(seed).sample(range(len(candidates)), min(items, len(candidates)))
    return [candidates[k] for k in sorted(picked)]


def _ends_sentence(word: str) -> bool:
    return bool(SENTENCE_END.search(word)) and not TITLE.fullmatch(word)


def last_word_accuracy(scorer: LMScorer, items: list[LastWordItem]) -> dict:
    """Share of passages whose target greedy decoding produces (and its standard error), and the mean
    log-likelihood of " " + target."""
    if not items:
        return {"items": 0, "accuracy": None, "accuracy_stderr": None, "mean_logprob": None}
    scores = scorer.loglikelihood([(item.context, " " + item.target) for item in items])
    accuracy = sum(greedy for _, greedy in scores) / len(items)
    return {"items": len(items), "accuracy": accuracy,
            "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / len(items)),
            "mean_logprob": sum(logprob for logprob, _ in scores) / len(items)}


def evaluate_language_model(model_or_path: str, source: str = "stdlib", tokenizer: str | None = None,
                            batches: int = 16, batch_size: int = 16, ctx_len: int = 256, device: str = "cpu",
                            last_word: int = 200, seed: int = 1234) -> dict:
    """Loss (nats/token), bits per byte and perplexity (per token) of a checkpoint or registered language model on
    fixed, seeded windows of `source`'s val split, and the last-word task on `last_word` passages of that split
    (None when the source holds token ids only, or last_word is 0)."""
    device = init_ranks(device, "ddp").device
    model = (load_language_model(None, model_or_path, device) if Path(model_or_path).exists()
             else load_language_model(model_or_path, None, device))
    cfg = DataConfig(source=source, tokenizer=tokenizer or model.config.tokenizer)
    metrics = evaluate_lm(model, load_lm_data(cfg, ("val",)), batches, batch_size, ctx_len, seed=seed)
    result = {"model": model_or_path, "data": source, "split": "val", **metrics,
              "perplexity": math.exp(metrics["loss"]), "last_word": None}
    if last_word:
        try:
            held_out = split_text_source(cfg.source, cfg.val_percent)["val"]
        except FileNotFoundError:   # token shards (`zoo data text`, `zoo data shards text`): no text to draw from
            return result
        items = last_word_items((text for path in held_out for text in documents(path, cfg.text_key)),
                                last_word, seed)
        scorer = LMScorer(model, device, batch_size, precision="fp32", tokenizer=cfg.tokenizer)   # as the windows
        result["last_word"] = last_word_accuracy(scorer, items)
    return result
