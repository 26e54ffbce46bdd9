"""The `zoo` command: list, info, generate here; train, data and eval come from the recipes and eval
packages through the `zoo.commands` entry-point group, so zoo never imports the layers above it."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["main", "load_model"]


def load_model(name_or_path: str, device: str = "cpu"):
    """A model from a checkpoint path, or a registered name with freshly initialised weights."""
    from . import create_model, load_checkpoint

    if Path(name_or_path).exists():
        return load_checkpoint(name_or_path, device=device)
    logging.getLogger("zoo").warning("%s is not a checkpoint path: using randomly initialised weights", name_or_path)
    return create_model(name_or_path, device=device)


def _cmd_list(args) -> None:
    from . import list_models

    for name in list_models(args.pattern):
        print(name)


def _cmd_info(args) -> None:
    from . import model_info

    if args.kernels:
        from blocks import wkv_cuda

        print("WKV ops on CUDA tensors:\n  " + wkv_cuda.status().replace("\n", "\n  "))
        print("wkv4 on other devices: PyTorch chunked path (torch-step for single tokens)")
        print("biwkv on other devices: PyTorch parallel path (the formula in blocks of query rows)")
        print("wkv5/wkv6/wkv7, biwkv6 on other devices: PyTorch chunked paths (torch-step for single tokens)")
        if args.name is None:
            return
    if args.name is None:
        raise SystemExit("zoo info: give a model NAME (or --kernels)")
    info = model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['name']}  ({info['family']}, arch {info['arch']})")
    print(f"  parameters: {info['params']:,}")
    print(f"  paper: {info['paper']}")
    print("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    print("  shapes:")
    for k, shape in info["shapes"].items():
        print(f"    {k:<40} {shape}")


def _cmd_generate(args) -> None:
    from .generate import generate
    from .tokenizers import StreamDecoder, get_tokenizer

    model = load_model(args.model, args.device).eval()
    tokenizer = get_tokenizer(args.tokenizer or model.config.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}")
    decode = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    try:
        for token in generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, args.temperature,
                              args.top_k, args.top_p, args.seed, args.compile):
            sys.stdout.write(decode(token))
            sys.stdout.flush()
    except ValueError as e:   # bad sampling settings, compile for a model without an RNN mode
        raise SystemExit(f"zoo generate: {e}") from None
    sys.stdout.write(decode.flush() + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="RWKV model zoo: build, train, evaluate RWKV models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (e.g. which WKV path ran)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models", description="List registered model names.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'rwkv4*'")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a model's family, size, shapes and paper",
                       description="Show a registered model's family, parameter count, config, shapes, paper.")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="print the info as JSON")
    p.add_argument("--kernels", action="store_true", help="report which WKV path is active and why")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="sample text from a model", description="Stream sampled text from a "
                       "checkpoint (native directory or official .pth) or a registered model name.")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="byte, neox or world (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="compile an RWKV model's decoding steps (torch.compile: "
                   "a first step that takes seconds, then the fastest steps on a GPU)")
    p.set_defaults(func=_cmd_generate)

    for ep in sorted(entry_points(group="zoo.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    if hasattr(signal, "SIGPIPE"):  # `zoo info NAME | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
