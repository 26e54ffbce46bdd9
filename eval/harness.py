"""EleutherAI's lm-evaluation-harness (`lm-eval`, the optional extra of that name) for the zoo's language models.

Importing this module registers them with lm-eval as the model "rwkv-zoo" (model_args: model=NAME and/or
checkpoint=PATH, device, batch_size, max_length, precision); the requests are scored by eval.scoring.LMScorer (RWKV
models reuse the state of a context shared by several continuations and carry it through whole documents).
`zoo eval lm-harness` runs tasks on them: custom tasks from local YAML files, or lm-eval's own tasks by name (those
download their data from a hub, so they need internet). A custom task reads local JSONL through `datasets`' JSON
loader, e.g. a last-word task over {"context": ..., "target": ...} lines:

    task: austen_lastword
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /data/austen_lastword.jsonl}   # relative paths are read from the current directory
    test_split: test
    output_type: loglikelihood
    doc_to_text: "{{context}}"
    doc_to_target: "{{' ' + target}}"
    metric_list: [{metric: acc}, {metric: perplexity}]
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from recipes.data import DOC_SEPARATOR

from .scoring import LMScorer

__all__ = ["ZooLM", "lm_harness"]


@register_model("rwkv-zoo")
class ZooLM(LM):
    """lm-eval's model interface over LMScorer. generate_until decodes greedily up to the request's `until` strings
    (default: the document separator, a blank line) or max_gen_toks (default 256)."""

    def __init__(self, model: str | None = None, checkpoint: str | None = None, device: str = "auto",
                 batch_size: int | str = 16, max_length: int | None = None, precision: str = "auto"):
        from recipes.distributed import init_ranks

        from .common import load_language_model

        super().__init__()
        if not (model or checkpoint):
            raise ValueError("rwkv-zoo needs model=NAME (a registered language model) or checkpoint=PATH")
        if not str(batch_size).isdigit():
            raise ValueError(f"rwkv-zoo takes a number as batch_size, got {batch_size!r}")
        self.model_name, self.checkpoint = model, checkpoint
        self._device = init_ranks(device, "ddp").device
        self.scorer = LMScorer(load_language_model(model, checkpoint, self._device), self._device, int(batch_size),
                               max_length, precision)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([request.args[0] for request in requests])

    def generate_until(self, requests) -> list[str]:
        return [self._generate(*request.args)
                for request in tqdm(requests, desc="generating", unit="request", mininterval=1)]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0) > 0:
            raise ValueError(f"rwkv-zoo decodes greedily; the task asks for sampling ({gen_kwargs})")
        until = gen_kwargs.get("until") or [DOC_SEPARATOR]
        return self.scorer.generate_until(context, [until] if isinstance(until, str) else list(until),
                                          int(gen_kwargs.get("max_gen_toks", 256)))

    def get_model_info(self) -> dict:
        """What lm-eval records in the results' config."""
        model = self.scorer.model
        return {"zoo_model": self.model_name, "zoo_checkpoint": self.checkpoint, "arch": model.arch,
                "params": sum(p.numel() for p in model.parameters()), "tokenizer": self.scorer.tokenizer.name,
                "max_length": self.scorer.max_length}


def _task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index: the YAML folder `include_path`, and lm-eval's own tasks only when a task name is not
    found there (indexing them takes seconds); an unknown name is an error naming the closest ones."""
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a folder")
    for task in tasks:
        if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
            raise FileNotFoundError(f"no task file {task}")
    names = [task for task in tasks if not Path(task).is_file()]
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            raise ValueError(f"unknown task {name!r}" + (f"; closest: {', '.join(close)}" if close else "")
                             + " (give a task YAML file, or --include-path a folder of them)")
    return manager


def lm_harness(model_name: str | None, checkpoint: str | None, tasks: list[str], include_path: str | None = None,
               num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 16,
               max_length: int | None = None, precision: str = "auto", device: str = "auto",
               out_json: str | None = None) -> dict:
    """`zoo eval lm-harness`: run lm-eval's simple_evaluate on a zoo language model; prints lm-eval's table and
    writes its results (metrics, task configs, versions) as JSON."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    model_args = {"model": model_name, "checkpoint": checkpoint, "device": device, "batch_size": batch_size,
                  "max_length": max_length, "precision": precision}
    results = simple_evaluate(model="rwkv-zoo", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
                              limit=limit, task_manager=_task_manager(tasks, include_path), log_samples=False)
    print(make_table(results))
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return results
