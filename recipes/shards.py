"""Webdataset shards: writing them (`zoo data shards ...`) and streaming them to training processes.

A shard directory holds `shard-NNNNNN.tar` files, `sizes.json` (samples per shard, as open_clip reads it)
and `info.json` (what the samples are). Kinds and their sample fields:

- text: `tokens.npy`, a run of `chunk_tokens` consecutive token ids of the tokenized files;
- images (an image folder, one sub-folder per class, or Fashion-MNIST's IDX files): the image's bytes
  under its format (`png`, `jpg`, ...) and `cls`, the class index;
- captions (a CSV/TSV table of image path and caption, or OpenClipart's drawings captioned with their SVG
  titles and keywords): the image's bytes and `txt`.

Reading follows webdataset's pipeline (as open_clip does): finite epochs split shards over ranks and
loader workers; infinite streams cycle through the shards in a fresh seeded order per rank, worker and
cycle (drawing them with replacement would repeat samples within a batch on small data); samples are
shuffled in a buffer seeded per rank and worker; a sample that fails to read or decode is skipped and counted
(`SkipCounter`), and the count reaches the training logs. The number of batches per epoch is set on the
loader (`WebLoader.with_epoch`), not per worker.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import random
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .data import DataError

__all__ = ["SIZES", "INFO", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "write_shards", "text_samples",
           "image_folder_samples", "fashion_mnist_samples", "caption_samples", "openclipart_pairs",
           "caption_pair_samples", "write_openclipart_shards", "read_idx", "shard_info", "SkipCounter",
           "ShardStream", "EpochStreams", "image_of", "write_text_shards", "read_token_shards", "lm_windows"]

log = logging.getLogger(__name__)

SIZES, INFO = "sizes.json", "info.json"
PATTERN = "shard-%06d.tar"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
IMAGE_FIELDS = ("png", "jpg", "webp", "bmp", "gif")  # the sample fields images are written under


# --- writing --------------------------------------------------------------------------------------------------


def write_shards(samples: Iterable[dict], out_dir: Path, info: dict, maxcount: int = 10_000,
                 maxsize: float = 1e9) -> dict:
    """Write samples (dicts with `__key__` and one entry per field) into shards; returns info.json's content,
    which also records the number of samples and shards."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    writer = wds.ShardWriter(str(out_dir / PATTERN), maxcount=maxcount, maxsize=maxsize, verbose=0)
    writer.post = lambda fname: sizes.__setitem__(Path(fname).name, writer.count)
    try:
        for sample in samples:
            writer.write(sample)
    finally:
        writer.close()
    sizes = {name: count for name, count in sizes.items() if count}
    for name in {p.name for p in out_dir.glob("shard-*.tar")} - sizes.keys():  # ShardWriter's empty first shard
        (out_dir / name).unlink()
    if not sizes:
        raise DataError(f"no samples to write into {out_dir}")
    (out_dir / SIZES).write_text(json.dumps(sizes, indent=1) + "\n")
    info = {**info, "samples": sum(sizes.values()), "shards": len(sizes)}
    (out_dir / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


def text_samples(tokens: np.ndarray, chunk_tokens: int) -> Iterator[dict]:
    """Consecutive chunks of `chunk_tokens` ids of a token array (the remainder is dropped)."""
    for index in range(len(tokens) // chunk_tokens):
        chunk = tokens[index * chunk_tokens:(index + 1) * chunk_tokens]
        yield {"__key__": f"{index:09d}", "tokens.npy": chunk.astype(np.uint32)}


def image_folder_samples(root: Path) -> tuple[list[str], Iterator[dict]]:
    """(class names, samples) of a folder with one sub-folder of images per class (torchvision's ImageFolder)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ROOT/CLASS/IMAGE files)")

    def samples():
        index = 0
        for label, name in enumerate(classes):
            for path in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                yield {"__key__": f"{index:09d}", _image_field(path): path.read_bytes(), "cls": label}
                index += 1

    return classes, samples()


def _image_field(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, big-endian data), gzipped or not, as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    dims = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * raw[3])
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} values for dimensions {dims} (truncated?)")
    return data.reshape(dims)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def fashion_mnist_samples(folder: Path, split: str) -> Iterator[dict]:
    """Fashion-MNIST's `split` ("train" or "t10k") from its IDX files, each image as a PNG."""
    from PIL import Image

    def find(kind: str) -> Path:
        for name in (f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (folder / name).exists():
                return folder / name
        raise FileNotFoundError(f"no {split} {kind} IDX file in {folder} (Debian: apt-get install "
                                "dataset-fashion-mnist)")

    images, labels = read_idx(find("images")), read_idx(find("labels"))
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in split {split}")
    for i, (image, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(png, format="PNG")
        yield {"__key__": f"{i:09d}", "png": png.getvalue(), "cls": int(label)}


def caption_samples(table: Path, image_root: Path | None = None, image_column: str = "filepath",
                    caption_column: str = "title") -> Iterator[dict]:
    """(image, caption) pairs from a CSV or TSV table (open_clip's --csv-img-key / --csv-caption-key);
    relative image paths are under `image_root` (default: the table's folder). Rows whose image is missing
    or whose caption is empty are skipped with a warning."""
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    root = image_root or table.parent
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {image_column, caption_column} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{table}: no column(s) {sorted(missing)}; columns are {reader.fieldnames}")
        index = 0
        for row in reader:
            path, caption = root / row[image_column], (row[caption_column] or "").strip()
            if not caption or not path.is_file():
                log.warning("%s: skipping %s (%s)", table, row[image_column],
                            "empty caption" if not caption else "image not found")
                continue
            yield {"__key__": f"{index:09d}", _image_field(path): path.read_bytes(), "txt": caption}
            index += 1


OPENCLIPART_DIR = Path("/usr/share/openclipart")
_SVG_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
           "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
_CLIPART_BY = re.compile(r"^clip\s*art by [^-]*-\s*", re.IGNORECASE)   # "Clipart by Nicu Buculei - pear"


def _clean_words(text: str | None) -> str:
    """Underscores and dashes to spaces, whitespace collapsed, a trailing number dropped ("Aircraft3")."""
    text = re.sub(r"[_\s-]+", " ", text or "").strip()
    return re.sub(r"\s*\d+$", "", text).strip()


def _svg_metadata(path: Path) -> tuple[str, list[str]]:
    """(title, keywords) of an SVG's Dublin Core metadata, cleaned; keywords that repeat words of the title or an
    earlier keyword, or name the author, are dropped."""
    import xml.etree.ElementTree as ET

    work = ET.parse(path).getroot().find(".//cc:Work", _SVG_NS)
    if work is None:
        return "", []
    title = _clean_words(_CLIPART_BY.sub("", work.findtext("dc:title", "", _SVG_NS)))
    author = _clean_words(work.findtext("dc:creator/cc:Agent/dc:title", "", _SVG_NS)).lower()
    keywords: list[str] = []
    seen = set(title.lower().split())
    for item in work.findall("dc:subject/rdf:Bag/rdf:li", _SVG_NS):
        keyword = _clean_words(item.text)
        if len(keyword) > 1 and keyword.lower() not in (author, "hash") and not set(keyword.lower().split()) <= seen:
            keywords.append(keyword)
            seen |= set(keyword.lower().split())
    return title, keywords


def openclipart_pairs(root: Path = OPENCLIPART_DIR, max_title_repeats: int = 20) -> tuple[list[tuple[Path, str]], dict]:
    """(PNG path, caption) pairs of Debian's openclipart-png + openclipart-svg, and counts of what was skipped.

    The caption is the SVG's title then its keywords ("Soft Blue Couch: furniture"). An entry without a usable
    title is skipped: no PNG or unreadable SVG, a title without two letters in a row, or a collection's name
    rather than the drawing's (a title shared by more than `max_title_repeats` drawings, e.g. "Lemon SVG theme")."""
    svgs = sorted((root / "svg").rglob("*.svg"))
    if not svgs:
        raise FileNotFoundError(f"no SVG files under {root / 'svg'} (Debian: apt-get install openclipart-svg "
                                "openclipart-png)")
    skipped = {"no png": 0, "unreadable svg": 0, "no usable title": 0, "collection title": 0}
    entries = []
    for svg in tqdm(svgs, desc="reading SVG metadata", unit="file", mininterval=1):
        png = root / "png" / svg.relative_to(root / "svg").with_suffix(".png")
        if not png.is_file():
            skipped["no png"] += 1
            continue
        try:
            title, keywords = _svg_metadata(svg)
        except Exception:  # noqa: BLE001 - ElementTree raises ParseError and encoding errors alike
            skipped["unreadable svg"] += 1
            continue
        if not re.search("[A-Za-z]{2}", title):
            skipped["no usable title"] += 1
            continue
        entries.append((png, title, keywords))
    repeats = Counter(title.lower() for _, title, _ in entries)
    pairs = []
    for png, title, keywords in entries:
        if repeats[title.lower()] > max_title_repeats:
            skipped["collection title"] += 1
        else:
            pairs.append((png, f"{title}: {', '.join(keywords)}" if keywords else title))
    return pairs, skipped


MAX_PIXELS = 50_000_000   # larger drawings (OpenClipart has a few of 100+ megapixels) are skipped, not decoded


def _flattened_image(path: Path, max_side: int) -> bytes | str:
    """An image file as lossless WebP (about 40% smaller than PNG for drawings): transparency flattened onto white,
    the longer side scaled down to `max_side`; or, for a file that does not open or has more than MAX_PIXELS
    pixels, the reason as text."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                return f"{image.width} x {image.height} pixels, more than {MAX_PIXELS:,}"
            rgba = image.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    flat.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    webp = io.BytesIO()
    flat.save(webp, format="WEBP", lossless=True)
    return webp.getvalue()


def caption_pair_samples(pairs: list[tuple[Path, str]], max_side: int = 256,
                         skipped: dict | None = None) -> Iterator[dict]:
    """Samples (`webp`, `txt`) of (image path, caption) pairs, images flattened and scaled by one process per CPU;
    an image that does not open, or is too large, is skipped with a warning and counted in
    `skipped["unreadable image"]`."""
    import multiprocessing
    from functools import partial

    with multiprocessing.get_context("spawn").Pool() as pool:
        images = pool.imap(partial(_flattened_image, max_side=max_side), [path for path, _ in pairs], chunksize=8)
        index = 0
        for (path, caption), image in zip(pairs, images):
            if isinstance(image, str):
                log.warning("skipping %s: %s", path, image)
                if skipped is not None:
                    skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
                continue
            yield {"__key__": f"{index:09d}", "webp": image, "txt": caption}
            index += 1


def write_openclipart_shards(out_dir: Path, root: Path = OPENCLIPART_DIR, val_percent: float = 5.0,
                             max_side: int = 256, max_title_repeats: int = 20, shard_samples: int = 1000) -> dict:
    """OpenClipart's (drawing, caption) pairs as caption shards in out_dir/train and out_dir/val; the split is
    fixed by a hash of each drawing's path, and each split is written in a seeded random order (the files sort
    by category, and a shard stream's first batches would otherwise come from one category). Returns both
    splits' info (with what was skipped and why)."""
    pairs, skipped = openclipart_pairs(root, max_title_repeats)
    held_out = [zlib.crc32(str(path.relative_to(root)).encode()) % 10_000 < val_percent * 100 for path, _ in pairs]
    result = {}
    for split, keep in (("train", False), ("val", True)):
        chosen = [pair for pair, h in zip(pairs, held_out) if h == keep]
        random.Random(0).shuffle(chosen)
        info = {"kind": "captions", "source": f"openclipart:{root}", "max_side": max_side,
                "skipped": dict(skipped)}   # the whole source's, plus this split's unreadable images when written
        samples = caption_pair_samples(chosen, max_side, info["skipped"])
        result[split] = write_shards(tqdm(samples, desc=f"writing {split}", total=len(chosen), unit="image",
                                          mininterval=1), out_dir / split, info, shard_samples)
    return result


# --- reading --------------------------------------------------------------------------------------------------


def shard_info(folder: Path) -> tuple[dict, list[str]]:
    """(info.json, shard paths) of a shard directory, with clear errors for what is missing."""
    if not (folder / INFO).exists() or not (folder / SIZES).exists():
        raise DataError(f"{folder} is not a shard directory (no {INFO} / {SIZES}; write one with `zoo data shards`)")
    sizes = json.loads((folder / SIZES).read_text())
    urls = [str(folder / name) for name in sorted(sizes)]
    absent = [u for u in urls if not Path(u).exists()]
    if absent:
        raise DataError(f"{folder}: shards listed in {SIZES} are missing: {absent[:4]}")
    return json.loads((folder / INFO).read_text()), urls


class SkipCounter:
    """A webdataset handler: a sample that fails to read or decode is logged, counted and skipped (webdataset's
    warn_and_continue, with a count). Each loader worker holds its own copy; ShardStream adds them up."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping a corrupt or truncated sample (%d in this reader so far): %s", self.count, exn)
        return True


@dataclass
class ShardStream:
    """Batches from a shard directory for one rank of a job.

    `make_sample(sample, rng)` turns a decoded sample dict (images as `image_decoder` gives them) into a tuple of
    tensors (rng: this worker's seeded random.Random, for crops or windows); batches are the stacked tuples plus,
    last, (worker id, samples that worker skipped so far). With `resampled`, each worker reads the shards forever,
    every shard once per cycle in an order seeded per rank, worker and cycle; without, each epoch splits the
    shards over ranks and workers, which needs at least world_size x workers shards.
    """

    folder: Path
    make_sample: Callable[[dict, random.Random], tuple]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    workers: int = 2
    seed: int = 0
    resampled: bool = True
    shuffle_buffer: int = 1000
    image_decoder: str = "pil"      # webdataset's name for how images decode: pil, rgb8, torchrgb, ...
    partial: bool = False           # keep each worker's last, short batch (evaluation)

    def __post_init__(self):
        self.info, self.urls = shard_info(self.folder)
        if not self.resampled and len(self.urls) < self.world_size * max(1, self.workers):
            raise DataError(
                f"{self.folder} has {len(self.urls)} shard(s) for {self.world_size} process(es) x "
                f"{max(1, self.workers)} loader worker(s): each needs at least one shard per epoch. Write more, "
                f"smaller shards (zoo data shards ... --shard-samples N), use fewer workers (data.workers), or "
                f"stream with resampling")
        self._skipped: dict[int, int] = {}

    def _worker_seed(self) -> int:
        """A seed for this rank and loader worker (read inside the worker)."""
        return (self.seed * 1_000_003 + self.rank) * 1009 + _worker_id()

    def loader(self, batches: int | None = None):
        """A WebLoader yielding `batches` batches in all (over every worker); when None, one pass over the shards
        (split streams) or batches without end (resampled streams)."""
        import webdataset as wds

        counter = SkipCounter()

        def shuffled(source):
            rng = random.Random(2 * self._worker_seed())
            yield from wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(source)

        def as_tuples(source):
            rng = random.Random(2 * self._worker_seed() + 1)
            for sample in source:
                try:
                    yield self.make_sample(sample, rng)
                except Exception as e:  # noqa: BLE001 - whatever fails on one sample skips that sample
                    if not counter(e):
                        raise

        def with_skip_count(batch):
            return (*batch, (_worker_id(), counter.count))

        if self.resampled:
            stages = [self._shard_cycles]
        else:
            stages = [wds.SimpleShardList(self.urls), self._split_by_rank, wds.split_by_worker]
        pipeline = wds.DataPipeline(*stages, wds.tarfile_to_samples(handler=counter), shuffled,
                                    wds.decode(self.image_decoder, handler=counter), as_tuples,
                                    wds.batched(self.batch_size, partial=self.partial), wds.map(with_skip_count))
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.workers)
        return loader.with_epoch(batches) if batches is not None else loader

    def _shard_cycles(self) -> Iterator[dict]:
        """Every shard once per cycle, in an order drawn afresh each cycle (seeded per rank and worker), forever.
        Unlike drawing shards with replacement (webdataset's ResampledShards), a worker never reads a shard twice
        within a cycle, so a small dataset's batches repeat a sample only where a cycle's last shards meet the next
        cycle's first in the shuffle buffer (a repeated pair is a false negative for a contrastive loss)."""
        rng = random.Random(2 * self._worker_seed() + 2**40)
        while True:
            for url in rng.sample(self.urls, len(self.urls)):
                yield {"url": url}

    def _split_by_rank(self, shards: Iterable[dict]) -> Iterator[dict]:
        """Every world_size-th shard from this rank's (webdataset's split_by_node, for this Ranks' rank)."""
        for i, shard in enumerate(shards):
            if i % self.world_size == self.rank:
                yield shard

    def skipped(self, batch_tail: tuple[int, int]) -> int:
        """Samples skipped so far by all workers, given a batch's last element (worker id, its count)."""
        worker, count = batch_tail
        self._skipped[int(worker)] = int(count)
        return self.skipped_so_far

    @property
    def skipped_so_far(self) -> int:
        return sum(self._skipped.values())


class EpochStreams:
    """Training epochs of `batches` batches each, cut from one continuous resampled stream, seeded by the epoch it
    starts at (a resumed run draws a fresh, reproducible stream). The stream is not restarted each epoch: with
    many loader workers and few batches per epoch, restarting would read the first samples of each worker's first
    shards over and over and rarely the rest. `skipped(batch_tail)` counts the samples the stream has skipped."""

    def __init__(self, stream: ShardStream, batches: int):
        self.stream, self.batches, self._batches = stream, batches, None

    def __call__(self, epoch: int) -> Iterator:
        if self._batches is None:
            from dataclasses import replace

            self.stream = replace(self.stream, seed=self.stream.seed * 1009 + epoch)
            self._batches = iter(self.stream.loader())
        return itertools.islice(self._batches, self.batches)

    def skipped(self, batch_tail: tuple) -> int | None:
        """batch_tail: what follows a batch's tensors (the (worker, count) pair), or () for none."""
        return self.stream.skipped(batch_tail[0]) if batch_tail else None


def image_of(fields: dict):
    """The image of a decoded sample, under whichever format it was written."""
    for key in IMAGE_FIELDS:
        if key in fields:
            return fields[key]
    raise DataError(f"sample {fields.get('__key__')} has no image (fields: {sorted(fields)})")


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0



# --- language-model text ------------------------------------------------------------------------------------


def write_text_shards(source: str, out_dir: Path, tokenizer_name: str, val_percent: float = 5.0,
                      text_key: str = "text", chunk_tokens: int = 4097, shard_samples: int = 10_000) -> dict:
    """Tokenize a folder of text/JSONL files (or "stdlib") into out_dir/train and out_dir/val text shards of
    `chunk_tokens` ids per sample (split by file, as `zoo data text`); returns both splits' info."""
    from zoo.tokenizers import get_tokenizer

    from .data import split_text_source, tokenize_files

    tokenizer = get_tokenizer(tokenizer_name)
    result = {}
    for split, split_files_ in split_text_source(source, val_percent).items():
        tokens = tokenize_files(split_files_, tokenizer, text_key, desc=f"tokenizing {split}")
        if len(tokens) < chunk_tokens:
            raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than chunk_tokens={chunk_tokens}")
        info = {"kind": "text", "tokenizer": tokenizer.name, "chunk_tokens": chunk_tokens, "source": str(source),
                "val_percent": val_percent, "files": len(split_files_)}
        result[split] = write_shards(text_samples(tokens, chunk_tokens), out_dir / split, info, shard_samples)
    return result


def read_token_shards(folder: Path) -> np.ndarray:
    """Every chunk of a text shard directory, in order, as one token array (for a held-out split)."""
    import webdataset as wds

    _, urls = shard_info(folder)
    chunks = [sample["tokens.npy"] for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(),
                                                                   wds.decode())]
    return np.concatenate(chunks)


def lm_windows(ctx_len: int) -> Callable[[dict, random.Random], tuple]:
    """make_sample for text shards: a random window of ctx_len + 1 ids of a chunk -> (inputs, targets)."""
    def window(sample: dict, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = sample["tokens.npy"]
        if len(tokens) < ctx_len + 1:
            raise DataError(f"a chunk of {len(tokens)} tokens is shorter than ctx_len + 1 = {ctx_len + 1}")
        start = rng.randrange(len(tokens) - ctx_len)
        ids = torch.from_numpy(tokens[start:start + ctx_len + 1].astype(np.int64))
        return ids[:-1], ids[1:]

    return window
