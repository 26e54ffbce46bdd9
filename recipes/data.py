"""Language-model data: documents -> token arrays (split by file) -> random training windows.

Sources: the Python standard library's own sources (the embedded default: present wherever Python
is), any folder of text/JSONL files, or token shards written by `zoo data text`.
"""

from __future__ import annotations

import json
import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from zoo.tokenizers import Tokenizer, get_tokenizer

from .config import DataConfig
from .distributed import Ranks

__all__ = ["DataError", "TokenData", "stdlib_files", "text_files", "split_files", "split_text_source", "documents",
           "tokenize_files", "pack_text", "load_lm_data", "evaluate_lm"]


class DataError(ValueError):
    """A data source that cannot serve the run as configured (wrong tokenizer, too short, unknown kind)."""


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}
DOC_SEPARATOR = "\n\n"
META = "meta.json"


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted .py files) of this Python's standard library, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: this Python ships without its standard library sources")
    return root, files


def text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {folder}")
    return files


def split_files(files: list[Path], root: Path, val_percent: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file: a file is held out when crc32(its relative path) falls in val_percent."""
    def held_out(p: Path) -> bool:
        return zlib.crc32(p.relative_to(root).as_posix().encode()) % 10000 < val_percent * 100

    val = [p for p in files if held_out(p)]
    train = [p for p in files if not held_out(p)]
    if not train or not val:
        raise DataError(f"val_percent={val_percent} leaves an empty split of {len(files)} files under {root}")
    return train, val


def split_text_source(source: str, val_percent: float) -> dict[str, list[Path]]:
    """{"train": files, "val": files} of a text source ('stdlib' or a folder of text files), split by file."""
    if source == "stdlib":
        root, files = stdlib_files()
    elif Path(source).is_dir():
        root, files = Path(source), text_files(Path(source))
    else:
        raise DataError(f"data.source={source!r} is neither 'stdlib', a shard directory nor a folder")
    return dict(zip(("train", "val"), split_files(files, root, val_percent)))


def documents(path: Path, text_key: str = "text"):
    """The documents of a file: the whole file, or the `text_key` field of each line of a .jsonl file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_key not in record:
                        raise KeyError(f"{path}:{n}: no {text_key!r} field (set data.text_key)")
                    yield record[text_key]
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def tokenize_files(files: list[Path], tokenizer: Tokenizer, text_key: str = "text", desc: str = "tokenizing"):
    """All documents of `files`, tokenized and joined with a blank line, as one numpy array."""
    sep = tokenizer.encode(DOC_SEPARATOR)
    ids: list[int] = []
    for path in tqdm(files, desc=desc, unit="file", leave=False, mininterval=1):
        for doc in documents(path, text_key):
            ids += tokenizer.encode(doc) + sep
    return np.asarray(ids, dtype=_token_dtype(tokenizer))


def pack_text(source: Path, out_dir: Path, tokenizer_name: str, val_percent: float = 5.0, text_key: str = "text",
              shard_tokens: int = 100_000_000) -> dict:
    """Tokenize a folder into `{train,val}_NNNNN.bin` shards plus meta.json; returns the meta."""
    tokenizer = get_tokenizer(tokenizer_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": tokenizer.name, "dtype": np.dtype(_token_dtype(tokenizer)).name, "source": str(source),
            "val_percent": val_percent, "splits": {}}
    for split, split_files_ in split_text_source(str(source), val_percent).items():
        tokens = tokenize_files(split_files_, tokenizer, text_key, desc=f"tokenizing {split}")
        shards = []
        for i in range(math.ceil(len(tokens) / shard_tokens)):
            name = f"{split}_{i:05d}.bin"
            tokens[i * shard_tokens:(i + 1) * shard_tokens].tofile(out_dir / name)
            shards.append(name)
        meta["splits"][split] = {"files": len(split_files_), "tokens": int(len(tokens)), "shards": shards}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class TokenData:
    """Token arrays per split and the tokenizer that made them."""

    tokenizer: Tokenizer
    splits: dict[str, list[np.ndarray]]
    train_shards: Path | None = None   # text shards streamed for training instead of splits["train"]

    def sample(self, split: str, batch_size: int, ctx_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """batch_size random windows: inputs x [B, ctx_len] and next-token targets y."""
        arrays = [a for a in self.splits[split] if len(a) > ctx_len + 1]
        if not arrays:
            raise DataError(f"the {split} split has no shard longer than ctx_len + 1 = {ctx_len + 1} tokens")
        weights = torch.tensor([len(a) - ctx_len - 1 for a in arrays], dtype=torch.float64)
        which = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        starts = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * weights[which]).long()
        windows = np.stack([arrays[a][s:s + ctx_len + 1] for a, s in zip(which.tolist(), starts.tolist())])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def bytes_per_token(self) -> Tensor:
        """UTF-8 length of every id, for bits-per-byte."""
        return torch.tensor([len(self.tokenizer.decode_bytes([i])) for i in range(self.tokenizer.vocab_size)])


def load_lm_data(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val")) -> TokenData:
    """Token arrays of the requested splits of cfg.source, tokenized now or memory-mapped from shards."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    source = Path(cfg.source)
    if (source / "train" / "info.json").exists():  # `zoo data shards text`: stream train, hold val in memory
        from .shards import read_token_shards, shard_info

        info, _ = shard_info(source / "train")
        if info.get("kind") != "text" or info.get("tokenizer") != tokenizer.name:
            raise DataError(f"{source}/train holds {info.get('kind')} shards tokenized with {info.get('tokenizer')!r}; "
                            f"the recipe needs text shards tokenized with {tokenizer.name!r}")
        val = {"val": [read_token_shards(source / "val")]} if "val" in splits else {}
        return TokenData(tokenizer, val, train_shards=source / "train")
    if cfg.source != "stdlib" and (source / META).exists():
        meta = json.loads((source / META).read_text())
        if meta["tokenizer"] != tokenizer.name:
            raise DataError(f"{source} was tokenized with {meta['tokenizer']!r}, the recipe asks for {tokenizer.name!r}")
        return TokenData(tokenizer, {s: [np.memmap(source / name, dtype=meta["dtype"], mode="r")
                                         for name in meta["splits"][s]["shards"]] for s in splits})
    by_split = split_text_source(cfg.source, cfg.val_percent)
    return TokenData(tokenizer, {s: [tokenize_files(by_split[s], tokenizer, cfg.text_key, f"tokenizing {s}")]
                                 for s in splits})


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: TokenData, batches: int, batch_size: int, ctx_len: int,
                split: str = "val", seed: int = 1234, amp_dtype: torch.dtype | None = None,
                ranks: Ranks | None = None) -> dict[str, float]:
    """Mean loss (nats/token) and bits per byte on fixed, seeded windows of a split.

    Under several processes (`ranks`) each evaluates every world_size-th batch and the sums are reduced; every
    rank runs the same number of forwards (a rank out of batches repeats one uncounted), as FSDP needs.
    """
    ranks = ranks or Ranks()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_len = data.bytes_per_token().to(device)
    generator = torch.Generator().manual_seed(seed)
    windows = [data.sample(split, batch_size, ctx_len, generator) for _ in range(batches)]
    nll = n_bytes = n_tokens = 0.0
    for first in range(0, batches, ranks.world_size):
        i = first + ranks.rank
        x, y = (t.to(device) for t in windows[min(i, batches - 1)])
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        if i < batches:
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            n_bytes += byte_len[y].sum().item()
            n_tokens += y.numel()
    nll, n_bytes, n_tokens = ranks.sum([nll, n_bytes, n_tokens])
    model.train(was_training)
    return {"loss": nll / n_tokens, "bpb": nll / math.log(2) / n_bytes, "tokens": n_tokens}
