"""`zoo train` and `zoo data`, registered on the zoo CLI through the `zoo.commands` entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_train(args) -> None:
    from zoo.checkpoint import CheckpointError

    from .config import RecipeError, load_recipe
    from .data import DataError
    from .engine import NonFiniteLossError, train

    if args.nproc < 1 or (args.nproc > 1 and "WORLD_SIZE" in os.environ):
        sys.exit(f"zoo train: --nproc {args.nproc}: give N >= 1, and leave --nproc out under torchrun "
                 "(it starts torchrun itself)")
    if args.nproc > 1:
        from .distributed import launch_torchrun

        sys.exit(launch_torchrun(args.nproc, ["train", args.recipe, *args.overrides]))
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if cfg.task == "classify":
            from .classify import train_classifier

            result = train_classifier(cfg)
        elif cfg.task == "clip":
            from .clip import train_clip

            result = train_clip(cfg)
        else:
            result = train(cfg)
    except (RecipeError, DataError, CheckpointError, NonFiniteLossError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"zoo train: {e}")
    final = result.get("final")
    if cfg.task == "classify" and final:
        print(f"evaluation: top-1 {final['top1']:.2f}%, top-5 {final['top5']:.2f}% on {final['samples']:.0f} images")
    if cfg.task == "clip" and final:
        print(f"evaluation: val mean retrieval recall {final['mean_recall']:.2%}, image R@1 "
              f"{final['image_retrieval_recall@1']:.2%}, text R@1 {final['text_retrieval_recall@1']:.2%}"
              + (f", zero-shot top-1 {final['zeroshot_acc1']:.2%}" if "zeroshot_acc1" in final else ""))
    if cfg.task in ("classify", "clip"):
        print(f"model saved to {result['model_dir']}")
        return
    first, final = result["first_val"], result["final_val"]
    if first and final:
        print(f"validation bits/byte: {first['bpb']:.4f} before training, {final['bpb']:.4f} after")
    print(f"model saved to {result['model_dir']}")


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train from a recipe (a YAML path or a packaged name such as "
                                   "lm/rwkv4-tiny-stdlib), with key=value overrides, e.g. max_steps=100 "
                                   "out_dir=runs/x seed=1 resume=auto optim.lr=1e-3 strategy=fsdp. Under "
                                   "torchrun (torchrun --nproc_per_node N -m zoo train ...) every process "
                                   "trains its share of the global batch.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes on this machine (one per GPU): runs the same command under "
                        "`torchrun --standalone --nproc_per_node N`")
    p.set_defaults(func=_cmd_train)


def _cmd_data_text(args) -> None:
    from .data import DataError, pack_text

    try:
        meta = pack_text(Path(args.source), Path(args.out), args.tokenizer, args.val_percent, args.text_key,
                         args.shard_tokens)
    except (DataError, FileNotFoundError, KeyError) as e:
        sys.exit(f"zoo data text: {e}")
    print(json.dumps(meta["splits"], indent=2))


def _cmd_data_shards(args) -> None:
    from . import shards
    from .data import DataError

    out = Path(args.out)
    try:
        if args.kind == "text":
            info = shards.write_text_shards(args.source, out, args.tokenizer, args.val_percent, args.text_key,
                                            args.chunk_tokens, args.shard_samples)
        elif args.kind == "images":
            classes, samples = shards.image_folder_samples(Path(args.source))
            info = shards.write_shards(samples, out, {"kind": "images", "classes": classes, "source": args.source},
                                       args.shard_samples)
        elif args.kind == "fashion-mnist":
            folder = Path(args.source) if args.source else shards.FASHION_MNIST_DIR
            info = {split: shards.write_shards(shards.fashion_mnist_samples(folder, idx_split), out / split,
                                               {"kind": "images", "classes": shards.FASHION_MNIST_CLASSES,
                                                "source": str(folder)}, args.shard_samples)
                    for split, idx_split in (("train", "train"), ("test", "t10k"))}
        elif args.kind == "openclipart":
            info = shards.write_openclipart_shards(out, Path(args.root), args.val_percent, args.max_side,
                                                   args.max_title_repeats, args.shard_samples)
        else:
            info = shards.write_shards(
                shards.caption_samples(Path(args.source), args.image_root and Path(args.image_root),
                                       args.image_column, args.caption_column),
                out, {"kind": "captions", "source": args.source}, args.shard_samples)
    except (DataError, FileNotFoundError, KeyError) as e:
        sys.exit(f"zoo data shards {args.kind}: {e}")
    print(json.dumps(info, indent=2))


def _cmd_data_austen(args) -> None:
    from .austen import write_austen
    from .data import DataError

    try:
        info = write_austen(Path(args.out))
    except DataError as e:
        sys.exit(f"zoo data austen: {e}")
    print(json.dumps(info, indent=2))


def add_data_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare datasets", description="Prepare training data.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="KIND")
    t = data_sub.add_parser("text", help="pack a folder of text/JSONL files into token shards",
                            description="Tokenize every .txt/.md/.rst/.py/.jsonl file under SOURCE into "
                                        "train/val token shards (split by file) plus meta.json; point a "
                                        "recipe's data.source at OUT.")
    t.add_argument("source", metavar="SOURCE")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--tokenizer", default="byte", help="byte, neox or world")
    t.add_argument("--val-percent", type=float, default=5.0)
    t.add_argument("--text-key", default="text", help="JSONL field holding the text")
    t.add_argument("--shard-tokens", type=int, default=100_000_000)
    t.set_defaults(func=_cmd_data_text)
    a = data_sub.add_parser("austen", help="Jane Austen's six novels (Debian's r-cran-janeaustenr) as chapter files",
                            description="Write Jane Austen's six novels, read through R from Debian's "
                                        "r-cran-janeaustenr, as OUT/NOVEL/chapter-NNN.txt plus info.json: a text "
                                        "folder (split into train and val by file when loaded) for data.source= "
                                        "and zoo eval lm --data.")
    a.add_argument("--out", required=True, help="output directory")
    a.set_defaults(func=_cmd_data_austen)

    from . import shards

    w = data_sub.add_parser("shards", help="write webdataset shards (text, images, Fashion-MNIST, captions)",
                            description="Write webdataset shards (shard-NNNNNN.tar, sizes.json, info.json) for "
                                        "streaming, e.g. with torchrun on many processes.")
    kinds = w.add_subparsers(dest="kind", required=True, metavar="KIND")
    text = kinds.add_parser("text", help="tokenized text: OUT/train and OUT/val (split by file)")
    text.add_argument("source", metavar="SOURCE", help="a folder of .txt/.md/.rst/.py/.jsonl files, or stdlib")
    text.add_argument("--tokenizer", default="byte", help="byte, neox or world")
    text.add_argument("--val-percent", type=float, default=5.0)
    text.add_argument("--text-key", default="text", help="JSONL field holding the text")
    text.add_argument("--chunk-tokens", type=int, default=4097, help="token ids per sample (>= ctx_len + 1)")
    images = kinds.add_parser("images", help="an image folder with one sub-folder per class")
    images.add_argument("source", metavar="ROOT")
    fmnist = kinds.add_parser("fashion-mnist", help="Fashion-MNIST's IDX files: OUT/train and OUT/test")
    fmnist.add_argument("source", metavar="FOLDER", nargs="?", default=None,
                        help="folder of the IDX files (default: /usr/share/datasets/fashion-mnist, from Debian's "
                             "dataset-fashion-mnist)")
    captions = kinds.add_parser("captions", help="a CSV/TSV table of image paths and captions")
    captions.add_argument("source", metavar="TABLE")
    captions.add_argument("--image-root", default=None, help="folder relative image paths start from "
                                                             "(default: the table's)")
    captions.add_argument("--image-column", default="filepath")
    captions.add_argument("--caption-column", default="title")
    clipart = kinds.add_parser("openclipart", help="OpenClipart drawings captioned from their SVG metadata: "
                                                   "OUT/train and OUT/val",
                               description="Caption shards of Debian's openclipart-png drawings, each captioned with "
                                           "its SVG's title and keywords (openclipart-svg); drawings without a usable "
                                           "title (none, or a collection's name) are skipped and counted.")
    clipart.add_argument("--root", default=str(shards.OPENCLIPART_DIR), help="folder holding png/ and svg/")
    clipart.add_argument("--val-percent", type=float, default=5.0)
    clipart.add_argument("--max-side", type=int, default=256, help="longer image side after downscaling")
    clipart.add_argument("--max-title-repeats", type=int, default=20,
                         help="a title shared by more drawings is a collection's name, not a caption")
    for kind in (text, images, fmnist, captions, clipart):
        kind.add_argument("--out", required=True, help="output directory")
        kind.add_argument("--shard-samples", type=int, default=1000 if kind is clipart else 10_000,
                          help="samples per shard")
        kind.set_defaults(func=_cmd_data_shards)
