"""Recipe configs: YAML files validated into dataclasses by OmegaConf, overridden by `key=value` dotlists."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blocks.checkpointing import check_grad_checkpointing
from zoo import UnknownModelError, list_models
from zoo.factory import build_config
from zoo.registry import get_entry

__all__ = ["RunConfig", "DataConfig", "OptimConfig", "TrainConfig", "load_recipe", "recipe_path", "RecipeError"]


class RecipeError(ValueError):
    """A recipe file or override that does not fit the config schema."""


PRECISIONS = ("auto", "bf16", "fp32")
TASK_FAMILIES = {"lm": "language", "classify": "vision", "clip": "clip"}   # the registry family each task trains
STRATEGIES = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile modes a recipe's `compile` may name (reduce-overhead and max-autotune add CUDA graphs)."""


@dataclass
class DataConfig:
    source: str = "stdlib"          # "stdlib" (the Python standard library's sources), a `zoo data text`
                                    # token directory, a `zoo data shards text` webdataset directory
                                    # (streamed), or a folder of .txt/.md/.py/.jsonl files
    tokenizer: str = "byte"         # byte, neox or world; must fit the model's vocab
    val_percent: float = 5.0        # share of files held out for validation (split by file, deterministic)
    text_key: str = "text"          # field holding the text in JSONL files
    workers: int = 2                # loader worker processes per training process, for shard streams
    shuffle_buffer: int = 1000      # samples shuffled together in a shard stream


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 1e-5            # end of the cosine decay (for the 1x group; scaled groups scale it too)
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0       # applied to matrices only
    layerwise_lr: bool = True       # official RWKV groups: time_decay at 2x lr, time_first at 3x
    grad_clip: float = 1.0          # max global grad norm; 0 disables


@dataclass
class RunConfig:
    """How a recipe runs, whatever it trains: the fields every task's schema (TrainConfig, ClassifyConfig,
    ClipConfig) shares and checks alike. A schema names its fields that must be >= 1 in `positive`."""

    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32
    device: str = "auto"            # auto (under torchrun: this process's GPU, cuda:LOCAL_RANK), cpu, cuda, cuda:N
    strategy: str = "ddp"           # data parallelism over torchrun's processes: ddp, or fsdp (FSDP2, per block)
    grad_checkpointing: Any = False  # recompute each block's activations in the backward (less memory): true
                                    # (all of it) or selective (all but products' and kernels' outputs)
    compile: Optional[str] = None   # a torch.compile mode (COMPILE_MODES), e.g. reduce-overhead; fsdp: per block
    threads: int = 0                # CPU threads for torch (0: torch's default)
    seed: int = 0
    resume: Optional[str] = None    # a step checkpoint, a run directory (its latest checkpoint) or "auto"

    positive: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise RecipeError(f"compile must be one of {', '.join(COMPILE_MODES)} (or null), got {self.compile!r}")
        try:
            check_grad_checkpointing(self.grad_checkpointing)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        for name in self.positive:
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig(RunConfig):
    task: str = "lm"                # lm (this schema), classify (recipes.classify.ClassifyConfig) or clip
                                    # (recipes.clip.ClipConfig)
    model: str = "rwkv4-tiny"
    model_args: dict[str, Any] = field(default_factory=dict)   # config overrides, e.g. {n_layer: 6}
    init_from: Optional[str] = None  # checkpoint (native or official .pth) to start from
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ctx_len: int = 128
    batch_size: int = 16            # sequences per micro-batch and process (global batch: x grad_accum x processes)
    grad_accum: int = 1             # micro-batches per optimizer step
    max_steps: int = 1000
    l2wrap: bool = True             # official L2Wrap: push the largest logit of each position towards 0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3              # step checkpoints kept
    out_dir: str = "runs/default"

    positive: ClassVar[tuple[str, ...]] = ("ctx_len", "batch_size", "grad_accum", "eval_every", "eval_batches",
                                           "save_every")


def recipe_path(recipe: str) -> Path:
    """A recipe file: a path, or a name inside the recipes package such as 'lm/rwkv4-tiny-stdlib'."""
    path = Path(recipe)
    if path.exists():
        return path
    packaged = importlib.resources.files("recipes").joinpath(recipe if recipe.endswith(".yaml") else recipe + ".yaml")
    if packaged.is_file():
        return Path(str(packaged))
    known = sorted(str(p.relative_to(Path(str(importlib.resources.files("recipes")))).with_suffix(""))
                   for p in Path(str(importlib.resources.files("recipes"))).rglob("*.yaml"))
    raise FileNotFoundError(f"no recipe {recipe!r}: not a file, and not one of the packaged recipes {known}")


def load_recipe(recipe: str | None, overrides: list[str] = ()):
    """Schema defaults <- recipe YAML <- `key=value` overrides (dotted keys: optim.lr=1e-3).

    The recipe's `task` picks the schema (lm: TrainConfig; classify: recipes.classify.ClassifyConfig; clip:
    recipes.clip.ClipConfig). The model name and model_args are checked against the registry here, before any
    work starts.
    """
    try:
        given = OmegaConf.merge(OmegaConf.load(recipe_path(recipe)) if recipe is not None else OmegaConf.create(),
                                OmegaConf.from_dotlist(list(overrides)))
        schemas = {"lm": TrainConfig, **_task_schemas()}
        task = given.get("task", "lm")
        if task not in schemas:
            raise RecipeError(f"task must be one of {', '.join(schemas)}, got {task!r}")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schemas[task]), given))
        if task == "classify" and _timm_only(cfg.model):  # timm's own classifiers (e.g. DeiT) as baselines
            return cfg
        family = get_entry(cfg.model).family
        if family != TASK_FAMILIES[task]:
            raise RecipeError(f"{cfg.model} is a {family} model; task {task} trains {TASK_FAMILIES[task]} models "
                              f"({', '.join(_models_of(TASK_FAMILIES[task]))})")
        build_config(cfg.model, **cfg.model_args)
        return cfg
    except (OmegaConfBaseException, yaml.YAMLError, FileNotFoundError, UnknownModelError, TypeError) as e:
        raise RecipeError(f"invalid recipe {recipe or '(defaults)'}: {e}") from None


def _timm_only(name: str) -> bool:
    """A model timm has and the zoo's registry does not."""
    import timm

    return name not in list_models() and timm.is_model(name)


def _models_of(family: str) -> list[str]:
    """Registered model names of a family, for error messages."""
    return [name for name in list_models() if get_entry(name).family == family]


def _task_schemas() -> dict[str, type]:
    from .classify import ClassifyConfig
    from .clip import ClipConfig

    return {"classify": ClassifyConfig, "clip": ClipConfig}


def to_yaml(cfg) -> str:
    """The config as YAML: the task's own fields first, then the RunConfig fields every task shares."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    shared = [f.name for f in fields(RunConfig)]
    return OmegaConf.to_yaml({**{k: v for k, v in tree.items() if k not in shared}, **{k: tree[k] for k in shared}})
