"""Webdataset shards: writing (text, image folders, Fashion-MNIST IDX files, caption tables), streaming with
splitting over ranks and workers, seeded resampling, counted skips of corrupt samples, and training from them."""

import csv
import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.data import DataError, split_files, text_files, tokenize_files
from recipes.shards import (ShardStream, caption_samples, fashion_mnist_samples, image_folder_samples, read_idx,
                            read_token_shards, shard_info, write_shards, write_text_shards)
from test_engine import read_metrics, tiny_run
from zoo.cli import main as zoo_main
from zoo.tokenizers import get_tokenizer

CHUNK = 64


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory, text_dir) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_text_shards(str(text_dir), out, "byte", val_percent=30, chunk_tokens=CHUNK, shard_samples=8)
    return out


def numbered(n: int) -> list[dict]:
    """n samples whose one field is their own index."""
    return [{"__key__": f"{i:06d}", "tokens.npy": np.full(4, i, dtype=np.uint32)} for i in range(n)]


def first_token(sample: dict, rng) -> tuple:
    return (torch.tensor(int(sample["tokens.npy"][0])),)


def stream_ids(folder: Path, **kw) -> list[int]:
    stream = ShardStream(folder, first_token, batch_size=1, **kw)
    return [int(batch[0]) for batch in stream.loader()]


def test_text_shards_hold_the_tokenized_split_in_order(text_shards, text_dir):
    tokenizer = get_tokenizer("byte")
    train_files, _ = split_files(text_files(text_dir), text_dir, 30)
    tokens = tokenize_files(train_files, tokenizer)
    info, urls = shard_info(text_shards / "train")
    sizes = json.loads((text_shards / "train" / "sizes.json").read_text())
    assert info["kind"] == "text" and info["chunk_tokens"] == CHUNK and info["samples"] == len(tokens) // CHUNK
    assert sum(sizes.values()) == info["samples"] and len(urls) == info["shards"] == -(-info["samples"] // 8)
    np.testing.assert_array_equal(read_token_shards(text_shards / "train"), tokens[:info["samples"] * CHUNK])


def test_an_epoch_splits_shards_over_ranks_and_workers_without_overlap(tmp_path):
    write_shards(numbered(40), tmp_path, {"kind": "test"}, maxcount=5)           # 8 shards
    seen = [stream_ids(tmp_path, rank=r, world_size=2, workers=2, resampled=False) for r in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(40))
    assert set(seen[0]).isdisjoint(seen[1]) and seen[0] and seen[1]
    assert seen[0] == stream_ids(tmp_path, rank=0, world_size=2, workers=2, resampled=False)  # seeded shuffle


def test_too_few_shards_for_ranks_times_workers_is_an_error_not_a_hang(tmp_path):
    write_shards(numbered(6), tmp_path, {"kind": "test"}, maxcount=2)            # 3 shards
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 process\(es\) x 2 loader worker\(s\)"):
        ShardStream(tmp_path, first_token, 1, rank=0, world_size=2, workers=2, resampled=False)
    ShardStream(tmp_path, first_token, 1, rank=0, world_size=2, workers=2, resampled=True)  # resampling: fine


def test_resampled_streams_are_seeded_per_rank_and_the_epoch_length_is_the_loaders(tmp_path):
    write_shards(numbered(40), tmp_path, {"kind": "test"}, maxcount=5)

    def first(rank, seed, batches=12):
        stream = ShardStream(tmp_path, first_token, batch_size=2, rank=rank, world_size=2, workers=2, seed=seed)
        return [batch[0].tolist() for batch in stream.loader(batches)]

    a = first(0, seed=1)
    assert len(a) == 12                                  # 12 batches over both workers, not 12 per worker
    assert a == first(0, seed=1) and a != first(1, seed=1) and a != first(0, seed=2)


def test_an_infinite_stream_reads_every_shard_once_per_cycle(tmp_path):
    """A worker's first 40 samples are the 40 of the set (drawing 8 shards with replacement repeats one with
    probability 1 - 8!/8^8 > 99%), the next 40 again, in another order."""
    write_shards(numbered(40), tmp_path, {"kind": "test"}, maxcount=5)
    stream = ShardStream(tmp_path, first_token, batch_size=40, workers=0, seed=3, shuffle_buffer=1)
    first, second = (batch[0].tolist() for batch in stream.loader(2))
    assert sorted(first) == sorted(second) == list(range(40)) and first != second


def test_epochs_continue_one_stream_so_every_sample_is_read(tmp_path):
    """Epochs of one batch per worker: a stream restarted every epoch would read the first 4 samples of each
    worker's first shard again and again and never a shard's 5th; one continuous stream reads them all."""
    from recipes.shards import EpochStreams

    write_shards(numbered(40), tmp_path, {"kind": "test"}, maxcount=5)
    stream = ShardStream(tmp_path, first_token, batch_size=4, workers=2, shuffle_buffer=1)
    epochs = EpochStreams(stream, batches=2)
    seen = [i for epoch in range(10) for batch in epochs(epoch) for i in batch[0].tolist()]
    assert len(seen) == 80 and set(seen) == set(range(40))


def rewrite_member(tar_path: Path, name: str, data: bytes) -> None:
    """Replace one member's bytes in a tar file."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path, caplog):
    write_shards(numbered(40), tmp_path, {"kind": "test"}, maxcount=10)          # 4 shards of 10
    rewrite_member(tmp_path / "shard-000000.tar", "000003.tokens.npy", b"not an npy file")
    truncated = tmp_path / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])                          # cut inside the shard

    stream = ShardStream(tmp_path, first_token, batch_size=1, workers=2, resampled=False)
    ids, skipped = [], 0
    for value, tail in stream.loader():
        ids.append(int(value))
        skipped = stream.skipped(tail)
    assert 3 not in ids and set(range(20, 40)) <= set(ids)                       # the rest still arrive
    assert skipped == 2                                                           # one bad sample, one cut shard
    in_process = ShardStream(tmp_path, first_token, batch_size=1, workers=0, resampled=False)
    assert len(list(in_process.loader())) == len(ids)
    assert caplog.text.count("skipping a corrupt or truncated sample") == 2      # (workers log in their process)


def test_training_streams_text_shards_and_logs_skipped_samples(tmp_path, text_shards, text_dir):
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        (shards / split).mkdir(parents=True)
        for f in (text_shards / split).iterdir():
            (shards / split / f.name).write_bytes(f.read_bytes())
    for k, tar in enumerate(sorted((shards / "train").glob("*.tar"))):          # the first sample of every shard
        rewrite_member(tar, f"{8 * k:09d}.tokens.npy", b"garbage")
    out = tmp_path / "run"
    result = tiny_run(out, text_dir, f"data.source={shards}", "max_steps=12", "eval_every=6",
                      "data.shuffle_buffer=4")
    rows = [r for r in read_metrics(out)[1] if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert result["final_val"]["bpb"] < result["first_val"]["bpb"]
    assert int(rows[-1]["skipped_samples"]) >= 1   # each shard a worker opened cost one sample

    with pytest.raises(DataError, match="chunks of 64 tokens, fewer than ctx_len"):
        tiny_run(tmp_path / "long", text_dir, f"data.source={shards}", "ctx_len=100")


def test_image_folder_shards_keep_classes_and_bytes(tmp_path):
    root = tmp_path / "images"
    for cls, color in (("cat", 10), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 6), (color, i, 0)).save(root / cls / f"{i}.png")
    classes, samples = image_folder_samples(root)
    info = write_shards(samples, tmp_path / "out", {"kind": "images", "classes": classes}, maxcount=4)
    assert classes == ["cat", "dog"] and info["samples"] == 6 and info["shards"] == 2

    def decoded(sample, rng):
        return torch.tensor(sample["png"].getpixel((0, 0))), torch.tensor(sample["cls"])

    stream = ShardStream(tmp_path / "out", decoded, batch_size=1, workers=0, resampled=False, shuffle_buffer=1)
    pixels = {(int(c), tuple(p[0].tolist())) for p, c, _ in stream.loader()}
    assert pixels == {(c, (color, i, 0)) for c, color in ((0, 10), (1, 200)) for i in range(3)}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_idx_files_become_png_samples(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    samples = list(fashion_mnist_samples(tmp_path, "t10k"))
    assert [s["cls"] for s in samples] == labels.tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples[2]["png"]))), images[2])

    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        list(fashion_mnist_samples(tmp_path, "train"))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist absent")
def test_the_installed_fashion_mnist_reads():
    samples = fashion_mnist_samples(Path("/usr/share/datasets/fashion-mnist"), "t10k")
    first = next(samples)
    assert Image.open(io.BytesIO(first["png"])).size == (28, 28) and 0 <= first["cls"] < 10


def test_caption_table_rows_become_image_text_samples(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.jpg")
    with open(tmp_path / "table.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([["filepath", "title"], ["a.png", "a red apple"], ["missing.png", "gone"],
                          ["b.jpg", "  "], ["b.jpg", "a blue bird"]])
    samples = list(caption_samples(tmp_path / "table.tsv"))
    assert [(sorted(s), s["txt"]) for s in samples] == [(["__key__", "png", "txt"], "a red apple"),
                                                        (["__key__", "jpg", "txt"], "a blue bird")]
    assert "image not found" in caplog.text and "empty caption" in caplog.text
    with pytest.raises(DataError, match="no column"):
        list(caption_samples(tmp_path / "table.tsv", caption_column="caption"))


def test_cli_names_bad_shard_sources(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["data", "shards", "captions", str(tmp_path / "none.csv"), "--out", str(tmp_path / "out")])
    assert "none.csv" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        (tmp_path / "empty").mkdir()
        zoo_main(["data", "shards", "images", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "no class sub-folders" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["data", "shards", "fashion-mnist", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "dataset-fashion-mnist" in str(exit_info.value.code)
