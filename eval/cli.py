"""`zoo eval SUITE ...`, registered on the zoo CLI through the `zoo.commands` entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_eval_lm(args) -> None:
    from .lm import evaluate_language_model

    def evaluate():
        m = evaluate_language_model(args.model, args.data, args.tokenizer, args.batches, args.batch_size,
                                    args.ctx_len, args.device, args.last_word, args.seed)
        print(f"{args.model} on {args.data} (val split, {m['tokens']:,.0f} tokens): loss {m['loss']:.4f} nats/token, "
              f"{m['bpb']:.4f} bits/byte, perplexity {m['perplexity']:.2f} per token")
        last_word = m["last_word"]
        if last_word and last_word["items"]:
            print(f"last word: accuracy {last_word['accuracy']:.2%} (± {last_word['accuracy_stderr']:.2%}) on "
                  f"{last_word['items']} held-out passages, mean log-likelihood {last_word['mean_logprob']:.3f} nats")
        elif last_word:
            print("last word: no passage of the held-out text fits the rule (see eval/lm.py)")
        elif args.last_word:
            print(f"last word: skipped, {args.data} holds token ids, not text")
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=2) + "\n")

    _run_eval("lm", evaluate)


def _cmd_eval_lm_harness(args) -> None:
    _require_model("lm-harness", args)
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):   # read when `datasets` is imported, just below
        os.environ.setdefault(variable, "1")
    try:
        from .harness import lm_harness
    except ImportError as e:
        sys.exit(f"zoo eval lm-harness: needs lm-eval ({e}): pip install 'rwkv-zoo[lm-eval]'")
    _run_eval("lm-harness", lambda: lm_harness(
        args.model, args.checkpoint, args.tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size,
        args.max_length, args.precision, args.device, args.json))


def _run_eval(suite: str, evaluate) -> None:
    """Run `evaluate()`; a mistake a user can make (a bad source, checkpoint, name or value) ends the command with
    its message instead of a traceback."""
    from recipes.data import DataError
    from zoo import CheckpointError, UnknownModelError

    try:
        evaluate()
    except (DataError, CheckpointError, UnknownModelError, FileNotFoundError, ValueError) as e:
        sys.exit(f"zoo eval {suite}: {e}")


def _require_model(suite: str, args) -> None:
    if not (args.model or args.checkpoint):
        sys.exit(f"zoo eval {suite}: give --model NAME or --checkpoint DIR")


def _cmd_eval_classify(args) -> None:
    from .classify import evaluate_classification

    _run_eval("classify", lambda: evaluate_classification(
        args.model, args.checkpoint, args.data, args.img_size, args.crop_pct, args.batch_size, args.workers,
        args.device, args.json))


def _cmd_eval_zeroshot(args) -> None:
    from .zeroshot import zero_shot_classification

    _require_model("zeroshot", args)
    _run_eval("zeroshot", lambda: zero_shot_classification(
        args.model, args.checkpoint, args.dataset, args.batch_size, args.workers, args.device, args.json))


def _cmd_eval_retrieval(args) -> None:
    from .retrieval import retrieval

    _require_model("retrieval", args)
    _run_eval("retrieval", lambda: retrieval(
        args.model, args.checkpoint, args.data, args.batch_size, args.device, args.json))


def _model_args(items: list[str]) -> dict:
    """--model-arg key=value items, typed by OmegaConf's dotlist as zoo train's overrides are."""
    from omegaconf import OmegaConf

    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-arg {item!r}: give key=value, e.g. n_layer=2")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def _cmd_eval_runs(args) -> None:
    from .runs import compare_runs

    try:
        compare_runs(args.runs, args.metric, args.json, args.plot)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"zoo eval runs: {e}")


def _cmd_eval_mqar(args) -> None:
    from .mqar import MQARTask, mqar

    _require_model("mqar", args)

    def evaluate():
        mqar(args.model, args.checkpoint, MQARTask(args.seq_len, args.pairs, args.vocab), args.steps,
             args.batch_size, args.lr, args.seed, args.device, _model_args(args.model_arg), args.json)

    _run_eval("mqar", evaluate)


def _add_image_text_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a registered image-text model (random weights without --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="a native checkpoint directory")


def _add_run_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results here")


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run an evaluation suite", description="Evaluate models.")
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    lm = suites.add_parser("lm", help="loss, bits per byte, perplexity and last-word accuracy on held-out text",
                           description="Loss, bits per byte and perplexity on the validation split of a text source, "
                                       "and a LAMBADA-style last-word task built from that split's text (the rule is "
                                       "in eval/lm.py); e.g. --data DIR of `zoo data austen`.")
    lm.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    lm.add_argument("--data", default="stdlib", help="'stdlib', a `zoo data text` directory or a text folder")
    lm.add_argument("--tokenizer", default=None, help="default: the model's")
    lm.add_argument("--batches", type=int, default=16)
    lm.add_argument("--batch-size", type=int, default=16)
    lm.add_argument("--ctx-len", type=int, default=256)
    lm.add_argument("--device", default="cpu")
    lm.add_argument("--last-word", type=int, default=200, metavar="N", help="last-word passages at most (0: none)")
    lm.add_argument("--seed", type=int, default=1234, help="draws the windows and the passages")
    lm.add_argument("--json", default=None, help="also write the results here")
    lm.set_defaults(func=_cmd_eval_lm)
    c = suites.add_parser("classify", help="top-1 / top-5 of an image classifier (like timm's validate.py)",
                          description="Top-1 and top-5 accuracy of a classifier on the evaluation split of "
                                      "fashion-mnist, an image folder (val/) or image shards (val/ or test/); prints "
                                      "and writes JSON.")
    c.add_argument("--model", default=None, help="a registered vision model (with --checkpoint FILE: official)")
    c.add_argument("--checkpoint", default=None, help="a native checkpoint directory or an official .pth")
    c.add_argument("--data", required=True, help="fashion-mnist[:DIR], a folder with train/ and val/ class folders, "
                                                 "or image shards (zoo data shards)")
    c.add_argument("--img-size", type=int, default=None, help="default: the model's")
    c.add_argument("--crop-pct", type=float, default=None, help="centre crop (default: the model's, 0.875)")
    c.add_argument("--workers", type=int, default=4)
    _add_run_args(c, batch_size=128)
    c.set_defaults(func=_cmd_eval_classify)
    z = suites.add_parser("zeroshot", help="zero-shot classification of an image-text model (CLIP_benchmark's JSON)",
                          description="Zero-shot top-1 / top-5 accuracy and mean per-class recall, with open_clip's "
                                      "template-ensembled classifier, on a dataset's evaluation split.")
    _add_image_text_model_args(z)
    z.add_argument("--dataset", required=True, help="fashion-mnist[:DIR], a folder with train/ and val/, or shards")
    z.add_argument("--workers", type=int, default=4)
    _add_run_args(z, batch_size=64)
    z.set_defaults(func=_cmd_eval_zeroshot)
    r = suites.add_parser("retrieval", help="image-text retrieval recall@1/5/10 on caption shards",
                          description="Image and text retrieval recall@1/5/10 of an image-text model on caption "
                                      "shards (zoo data shards captions), in CLIP_benchmark's JSON layout.")
    _add_image_text_model_args(r)
    r.add_argument("--data", required=True, help="a caption shard directory")
    _add_run_args(r, batch_size=64)
    r.set_defaults(func=_cmd_eval_retrieval)
    _add_mqar_suite(suites)
    _add_runs_suite(suites)
    _add_lm_harness_suite(suites)


def _add_lm_harness_suite(suites) -> None:
    h = suites.add_parser("lm-harness", help="EleutherAI's lm-evaluation-harness tasks on a language model",
                          description="Run lm-evaluation-harness (pip install 'rwkv-zoo[lm-eval]') on a language "
                                      "model, registered with it as 'rwkv-zoo': tasks from local YAML files (local "
                                      "JSONL data through dataset_path: json and dataset_kwargs: {data_files: ...}; "
                                      "an example is in eval/harness.py), or lm-eval's own tasks by name. The "
                                      "command is offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1) unless those "
                                      "are set: lm-eval's own tasks download their data. RWKV models read a context "
                                      "shared by several continuations once and continue from its state, and carry "
                                      "the state through whole documents (no windows). Prints lm-eval's table and "
                                      "writes its results JSON.")
    h.add_argument("--model", default=None, help="a registered language model (random weights without --checkpoint)")
    h.add_argument("--checkpoint", default=None, help="a native checkpoint directory or an official .pth (read into "
                                                      "--model's config when given)")
    h.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="task YAML files or task names")
    h.add_argument("--include-path", default=None, help="a folder of task YAML files, for tasks given by name")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    h.add_argument("--max-length", type=int, default=None,
                   help="tokens per forward (for GPT models also the window); default: the model's ctx_len")
    h.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    _add_run_args(h, batch_size=16)
    h.set_defaults(func=_cmd_eval_lm_harness)


def _add_runs_suite(suites) -> None:
    runs = suites.add_parser("runs", help="training runs side by side: a logged metric's curves, final and best values",
                             description="Read the run folders' metrics.csv and config.yaml; print each model's final "
                                         "and best value of a metric (mean +- std over its runs), write JSON and a "
                                         "PNG of the curves.")
    runs.add_argument("runs", nargs="+", metavar="RUN_DIR")
    runs.add_argument("--metric", default="val_loss", help="a metrics.csv column (val_loss, val_bpb, val_top1, ...)")
    runs.add_argument("--json", default=None, help="also write the summary and the curves here")
    runs.add_argument("--plot", default=None, help="write the curves as a PNG here")
    runs.set_defaults(func=_cmd_eval_runs)


def _add_mqar_suite(suites) -> None:
    q = suites.add_parser("mqar", help="multi-query associative recall: train a language model on it, report accuracy",
                          description="Multi-query associative recall (Zoology's MQAR): a registered language model is "
                                      "built for the task's vocabulary and length and trained from scratch on "
                                      "seeded, freshly generated sequences (or a checkpoint is evaluated); reports "
                                      "the accuracy on the queried values of held-out sequences.")
    q.add_argument("--model", default=None, help="a registered language model (built with vocab_size=--vocab, "
                                                 "ctx_len=--seq-len)")
    q.add_argument("--checkpoint", default=None, help="a native checkpoint to evaluate (trained further with --steps)")
    q.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, repeatable: --model-arg n_layer=2 --model-arg n_embd=128")
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence (and as many queries)")
    q.add_argument("--vocab", type=int, default=8192)
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--seed", type=int, default=0)
    _add_run_args(q, batch_size=64)
    q.set_defaults(func=_cmd_eval_mqar)


def _cmd_bench_kernels(args) -> None:
    from .bench import bench_kernels

    try:
        bench_kernels(args.json, args.official_sources)
    except RuntimeError as e:
        sys.exit(f"zoo bench kernels: {e}")


def _cmd_bench_vision(args) -> None:
    from .bench_vision import bench_vision

    try:
        chosen = {k: tuple(getattr(args, k)) for k in ("models", "resolutions", "compile", "grad_checkpointing")
                  if getattr(args, k)}
        bench_vision(args.json, args.plot, **chosen)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"zoo bench vision: {e}")


def _cmd_bench_mqar(args) -> None:
    from recipes.distributed import init_ranks

    from .bench_mqar import bench_mqar, parse_tasks

    try:
        bench_mqar(args.models, parse_tasks(args.tasks, args.vocab), args.seeds, args.steps, args.batch_size, args.lrs,
                   _model_args(args.model_arg), init_ranks(args.device, "ddp").device, args.json, args.plot,
                   args.eval_every)
    except ValueError as e:    # unknown model (with close names), bad task or device: the message, not a traceback
        sys.exit(f"zoo bench mqar: {e}")


def _cmd_bench_lm(args) -> None:
    from .bench_lm import bench_lm

    try:
        bench_lm(args.json, args.plot, tuple(args.sizes), tuple(args.parts), package=not args.no_package)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"zoo bench lm: {e}")


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    k = kinds.add_parser("kernels", help="WKV kernels against the official kernel, SDPA and copy bandwidth (GPU)",
                         description="Time our WKV kernels, the official RWKV-4 kernel (from an installed "
                                     "transformers 4.57) and torch SDPA in one process; print a table, write JSON.")
    k.add_argument("--json", default="bench_kernels.json", help="where to write the rows")
    k.add_argument("--official-sources", default=None,
                   help="folder with wkv_op.cpp, wkv_cuda.cu, wkv_cuda_bf16.cu (default: the installed transformers')")
    k.set_defaults(func=_cmd_bench_kernels)
    v = kinds.add_parser("vision", help="vrwkv_tiny/small against timm's DeiT, 224 to 2048 px (GPU)",
                         description="Images/s and peak memory, inference and training step, of vrwkv_tiny and "
                                     "vrwkv_small against timm's deit_tiny/small_patch16_224 at 224, 512, 1024 and "
                                     "2048 px, eager or compiled, in one process; print a table, write JSON and a "
                                     "PNG plot.")
    v.add_argument("--models", nargs="+", help="timm model names (default: vrwkv_tiny/small and their DeiTs; a "
                   "vrwkv measured beside its DeiT gets ratios)")
    v.add_argument("--resolutions", nargs="+", type=int, help="among 224 512 1024 2048 (default: all)")
    v.add_argument("--compile", nargs="+", metavar="MODE",
                   help="torch.compile modes to run each model in (default: none): none (eager), default, "
                        "reduce-overhead (with CUDA graphs), max-autotune, max-autotune-no-cudagraphs")
    v.add_argument("--grad-checkpointing", nargs="+", metavar="MODE",
                   help="modes the zoo's models also train in (default: none): none, full (each block recomputed), "
                        "selective (only the elementwise work between products and kernels); DeiT trains without")
    v.add_argument("--json", default="bench_vision.json", help="where to write the rows")
    v.add_argument("--plot", default="bench_vision.png", help="where to write the plot")
    v.set_defaults(func=_cmd_bench_vision)
    lm = kinds.add_parser("lm", help="rwkv4 against gpt: training, decoding, generation; the rwkv package (GPU)",
                          description="Training tokens/s at T = 1024/4096/16384, per-token decoding latency and "
                                      "memory after 1k..64k tokens of context, batched generation throughput, and "
                                      "RWKV-4 at batch 1 against the rwkv package (ms/token, 1024-token prefill), in "
                                      "one process; print tables (RWKV / GPT ratios), write JSON and a PNG plot.")
    lm.add_argument("--sizes", nargs="+", default=["169m", "430m"], help="registered sizes of rwkv4-* and gpt-*")
    lm.add_argument("--parts", nargs="+", default=["train", "decode", "batched", "rnn"],
                    choices=["train", "decode", "batched", "rnn"])
    lm.add_argument("--no-package", action="store_true", help="skip the rwkv package in the rnn part")
    lm.add_argument("--json", default="bench_lm.json", help="where to write the rows")
    lm.add_argument("--plot", default="bench_lm.png", help="where to write the plot")
    lm.set_defaults(func=_cmd_bench_lm)
    q = kinds.add_parser("mqar", help="MQAR recall and throughput of language models at equal size and steps",
                         description="Train every model x task x seed from scratch on multi-query associative recall "
                                     "(same batches, optimizer and steps), score held-out sequences, time a training "
                                     "step and an inference forward; print a table (ratios to the first model), "
                                     "write JSON and a PNG plot.")
    q.add_argument("--models", nargs="+", default=["rwkv4-tiny", "rrwkv-tiny", "gpt-tiny"])
    q.add_argument("--tasks", default="256:32,1024:64", help="SEQ_LEN:PAIRS, comma-separated")
    q.add_argument("--vocab", type=int, default=8192)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--steps", type=int, default=3000)
    q.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                   help="learning rates tried for every model; each model's best (mean over seeds) is reported")
    q.add_argument("--eval-every", type=int, default=500, help="held-out accuracy every N steps (learning curves)")
    q.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every model, repeatable")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--device", default="auto")
    q.add_argument("--json", default="bench_mqar.json", help="where to write the runs and the summary")
    q.add_argument("--plot", default="bench_mqar.png", help="where to write the plot")
    q.set_defaults(func=_cmd_bench_mqar)
