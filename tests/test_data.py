"""LM data: packing text/JSONL folders into shards, file splits, training windows, bits per byte."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from recipes.config import DataConfig, load_recipe
from recipes.data import TokenData, evaluate_lm, load_lm_data, pack_text, split_files, stdlib_files, text_files
from recipes.engine import train
from zoo.tokenizers import ByteTokenizer, get_tokenizer

SEPARATOR = "\n\n"


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict[Path, list[str]]]:
    """A folder of .txt files and, in a subfolder, .jsonl files; returns it and its (unique) documents."""
    root = tmp_path / "corpus"
    (root / "more").mkdir(parents=True)
    docs: dict[Path, list[str]] = {}
    for i in range(14):
        path = root / f"note{i:02d}.txt"
        docs[path] = [f"Text file {i}: caf\u00e9 na\u00efve \u2713 " * 12]
    for i in range(4):
        path = root / "more" / f"records{i}.jsonl"
        docs[path] = [f"Record {j} of file {i}, with some words to pad it out. " * 4 for j in range(3)]
    for path, texts in docs.items():
        if path.suffix == ".jsonl":
            lines = [json.dumps({"text": t, "id": n}) for n, t in enumerate(texts)]
            lines.insert(1, "")                             # a blank line, which readers skip
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            path.write_text(texts[0], encoding="utf-8")
    return root, docs


def shard_tokens(out_dir: Path, meta: dict, split: str) -> np.ndarray:
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out_dir / name, dtype=meta["dtype"]) for name in shards])


def test_pack_text_splits_by_file_into_shards(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "shards"
    meta = pack_text(root, out, "byte", val_percent=30, shard_tokens=1000)

    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["tokenizer"] == "byte"
    train_files, val_files = split_files(text_files(root), root, 30)
    for split, files in (("train", train_files), ("val", val_files)):
        expected = "".join(doc + SEPARATOR for path in files for doc in docs[path]).encode("utf-8")
        tokens = shard_tokens(out, meta, split)
        assert tokens.tobytes() == np.frombuffer(expected, dtype=np.uint8).astype(meta["dtype"]).tobytes()
        info = meta["splits"][split]
        assert (info["files"], info["tokens"]) == (len(files), len(expected))
        sizes = [len(np.fromfile(out / name, dtype=meta["dtype"])) for name in info["shards"]]
        assert len(sizes) == math.ceil(len(expected) / 1000) >= 2 and max(sizes) == 1000
    assert set(train_files).isdisjoint(val_files) and len(train_files) + len(val_files) == len(docs)


def test_pack_text_is_deterministic(corpus, tmp_path):
    root, _ = corpus
    first = pack_text(root, tmp_path / "a", "byte", val_percent=30, shard_tokens=1000)
    second = pack_text(root, tmp_path / "b", "byte", val_percent=30, shard_tokens=1000)
    assert first["splits"] == second["splits"]
    for split in ("train", "val"):
        for name in first["splits"][split]["shards"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_zoo_data_text_cli_writes_the_same_shards_in_a_fresh_process(corpus, tmp_path):
    """The console script in another process (another str-hash seed) packs exactly what pack_text packs here."""
    root, _ = corpus
    result = subprocess.run([str(Path(sys.executable).with_name("zoo")), "data", "text", str(root), "--out",
                             str(tmp_path / "cli"), "--tokenizer", "byte", "--val-percent", "30", "--shard-tokens",
                             "1000"], capture_output=True, text=True, check=True)
    meta = pack_text(root, tmp_path / "api", "byte", val_percent=30, shard_tokens=1000)
    assert json.loads(result.stdout) == meta["splits"]
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["splits"] == meta["splits"]
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(tmp_path / "cli", meta, split), shard_tokens(tmp_path / "api", meta, split))


def packed_documents(out_dir: Path, meta: dict) -> list[str]:
    """The documents of both splits of a byte-level shard directory."""
    text = "".join(shard_tokens(out_dir, meta, s).astype(np.uint8).tobytes().decode() for s in ("train", "val"))
    return text.split(SEPARATOR)[:-1]


def test_jsonl_documents_come_from_the_configured_text_key(tmp_path):
    root = tmp_path / "jsonl"
    root.mkdir()
    bodies = [f"body number {i} " * 5 for i in range(6)]
    for i, body in enumerate(bodies):
        (root / f"part{i}.jsonl").write_text(json.dumps({"body": body, "text": "not this one"}) + "\n")
    meta = pack_text(root, tmp_path / "out", "byte", val_percent=50, text_key="body")
    assert sorted(packed_documents(tmp_path / "out", meta)) == sorted(bodies)


def test_jsonl_record_without_the_text_key_names_file_and_line(corpus, tmp_path):
    root, _ = corpus
    broken = root / "more" / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(KeyError) as error:
        pack_text(root, tmp_path / "out", "byte", val_percent=30)
    assert f"{broken}:3" in error.value.args[0] and "'text'" in error.value.args[0]


def test_training_reads_a_shard_directory(corpus, tmp_path):
    root, _ = corpus
    shards = tmp_path / "shards"
    meta = pack_text(root, shards, "byte", val_percent=30, shard_tokens=1000)

    data = load_lm_data(DataConfig(source=str(shards), tokenizer="byte"))
    for split in ("train", "val"):
        assert np.array_equal(np.concatenate(data.splits[split]), shard_tokens(shards, meta, split))
    out = tmp_path / "run"
    result = train(load_recipe("lm/rwkv4-tiny-stdlib", [
        f"data.source={shards}", f"out_dir={out}", "model_args.n_layer=1", "model_args.n_embd=32", "ctx_len=32",
        "batch_size=4", "eval_batches=1", "max_steps=2", "threads=1"]))
    assert math.isfinite(result["final_val"]["bpb"]) and (out / "model" / "model.safetensors").exists()


def test_shards_made_with_another_tokenizer_are_refused(corpus, tmp_path):
    root, _ = corpus
    pack_text(root, tmp_path / "shards", "byte", val_percent=30)
    with pytest.raises(ValueError, match="'byte'.*'neox'"):
        load_lm_data(DataConfig(source=str(tmp_path / "shards"), tokenizer="neox"))


def test_sample_gives_next_token_targets_and_is_seeded():
    """Windows of a counting sequence: each row counts up by one and y is x shifted by one token."""
    counting = np.arange(2000, dtype=np.uint16)
    too_short = np.full(10, 9999, dtype=np.uint16)      # shorter than ctx_len + 1: never sampled
    data = TokenData(ByteTokenizer(), {"train": [counting, too_short]})
    x, y = data.sample("train", 64, 16, torch.Generator().manual_seed(3))

    assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert (x[:, 0] >= 0).all() and (y[:, -1] < 2000).all()
    assert len(set(x[:, 0].tolist())) > 32                 # start positions vary
    again = data.sample("train", 64, 16, torch.Generator().manual_seed(3))
    other = data.sample("train", 64, 16, torch.Generator().manual_seed(4))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(other[0], x)


def test_stdlib_files_are_found_and_split_deterministically():
    root, files = stdlib_files()
    assert root / "os.py" in files and root / "json" / "__init__.py" in files
    assert all(p.is_relative_to(root) and "site-packages" not in p.parts for p in files)
    train_files, val_files = split_files(files, root, 5.0)
    assert train_files and val_files and set(train_files).isdisjoint(val_files)
    assert sorted(train_files + val_files) == files
    assert 0.01 < len(val_files) / len(files) < 0.10
    assert split_files(files, root, 5.0) == (train_files, val_files)
    with pytest.raises(ValueError, match="empty split"):
        split_files(files, root, 0.0)


def test_bits_per_byte_of_a_byte_model_is_loss_over_ln2():
    torch.manual_seed(0)
    model = zoo.create_model("rwkv4-tiny", n_layer=1, n_embd=32)
    tokens = np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint16)
    data = TokenData(ByteTokenizer(), {"val": [tokens]})
    metrics = evaluate_lm(model, data, batches=2, batch_size=4, ctx_len=32, seed=11)

    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                  for x, y in (data.sample("val", 4, 32, generator) for _ in range(2))]
    assert metrics["tokens"] == 2 * 4 * 32
    assert metrics["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert metrics["bpb"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-12)


class UniformLM(nn.Module):
    """Every next token equally likely: loss is ln(vocab) per token."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size) + self.anchor


def test_bits_per_byte_counts_utf8_bytes_for_the_neox_tokenizer():
    """A window covering the whole sequence: bpb = tokens * log2(V) / (UTF-8 bytes of the target text)."""
    tokenizer = get_tokenizer("neox")
    text = "café naïve ✓ 日本語, déjà vu — 😀 " * 3
    newline = tokenizer.encode("\n")
    assert len(newline) == 1 and tokenizer.decode(tokenizer.encode(text)) == text
    targets = tokenizer.encode(text)
    sequence = np.array(newline + targets + newline, dtype=np.uint16)    # windows: x = sequence[:-2], y = targets
    data = TokenData(tokenizer, {"val": [sequence]})
    metrics = evaluate_lm(UniformLM(tokenizer.vocab_size), data, batches=2, batch_size=3, ctx_len=len(targets))

    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text) > len(targets)              # counting characters or tokens would differ
    assert metrics["loss"] == pytest.approx(math.log(tokenizer.vocab_size))
    assert metrics["bpb"] == pytest.approx(len(targets) * math.log2(tokenizer.vocab_size) / n_bytes)
