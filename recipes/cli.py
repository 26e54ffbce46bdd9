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
        result = train(load_recipe(args.recipe, args.overrides))
    except (RecipeError, DataError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        sys.exit(f"zoo train: {e}")
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
