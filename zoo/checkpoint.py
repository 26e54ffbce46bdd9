"""Checkpoints: the native format (safetensors + JSON config) and official BlinkDL RWKV-4/5/6/7 `.pth` files.

Native checkpoint = a directory with `model.safetensors` and `config.json`
({"format": "rwkv-zoo", "arch", "name", "config"}). Official `.pth` files are read with
`torch.load(weights_only=True)`: a file whose unpickling would run code is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .models import rwkv4, rwkv5, rwkv6, rwkv7
from .registry import arch_class

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_state_dict", "load_weights",
           "export_official", "official_format", "OFFICIAL_LM_FORMATS", "atomic_dir", "write_model_files"]

FORMAT = "rwkv-zoo"
OFFICIAL_LM_FORMATS = {"rwkv4": rwkv4, "rwkv5": rwkv5, "rwkv6": rwkv6, "rwkv7": rwkv7}
"""arch -> the module that reads and writes BlinkDL's `.pth` of that version: is_state_dict (the version, told from
the keys as the `rwkv` package does), config_from_state_dict, checkpoint_filter_fn, to_official_state_dict."""
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: unsafe, malformed, or not matching the model."""


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    A crash leaves either the old directory or the new one, never a half-written `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def write_model_files(model: nn.Module, directory: Path, name: str | None = None,
                      state_dict: dict[str, Tensor] | None = None, timm_kwargs: dict | None = None) -> None:
    """Write model.safetensors and config.json into an existing directory (the weights: `state_dict`, e.g.
    gathered from shards, or the model's own). A timm model the zoo does not register (a DeiT baseline) is written
    as arch "timm": its timm name and the keyword arguments that rebuild it (`timm_kwargs`)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS))
    if timm_kwargs is not None:
        meta = {"format": FORMAT, "arch": "timm", "name": name, "config": timm_kwargs}
    else:
        meta = {"format": FORMAT, "arch": model.arch, "name": name, "config": asdict(model.config)}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save a model in the native format (a directory), atomically."""
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, name)
    return Path(path)


def _read_pth(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load: unpickling it needs more than tensors and plain containers "
            f"(it would execute code); only weights_only=True files are accepted. ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    for wrapper in ("state_dict", "model"):  # a trainer's file: mmcls and Lightning, or InternImage-style trainers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Read (state_dict, native config or None) from a native directory, a .safetensors file or a .pth."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        if not (path / WEIGHTS).exists():
            raise CheckpointError(f"{path} is a directory without {WEIGHTS}")
        path = path / WEIGHTS
    if path.suffix == ".safetensors":
        cfg_file = path.with_name(CONFIG)
        meta = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
        if meta is not None and meta.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_file}: not a {FORMAT} config (format={meta.get('format')!r})")
        return load_file(str(path)), meta
    return _read_pth(path), None


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict) with one clear error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if keys]
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def _model_from_config(meta: dict, overrides: dict) -> nn.Module:
    if meta["arch"] == "timm":
        import timm

        return timm.create_model(meta["name"], **{**meta["config"], **overrides})
    cls = arch_class(meta["arch"])
    return cls(cls.config_class(**{**meta["config"], **overrides}))


def load_checkpoint(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """Build the model a checkpoint describes and load its weights.

    Native directories carry their config; official RWKV-4/5/6/7 `.pth` files get theirs from the
    tensor shapes, the version from the keys. `overrides` change config fields that do not affect shapes
    (e.g. ctx_len).
    """
    state_dict, meta = read_state_dict(path)
    if meta is not None:
        model = _model_from_config(meta, overrides)
    else:
        arch, official = official_format(state_dict, path)
        try:
            config = official.config_from_state_dict(state_dict, **overrides)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot infer a model from this {arch} state dict: {e}") from None
        model = arch_class(arch)(config)
        state_dict = official.checkpoint_filter_fn(state_dict, model)
    load_weights(model, state_dict, str(path))
    return model.to(device=device, dtype=dtype)


def official_format(state_dict: dict[str, Tensor], source: str | os.PathLike = "state dict"):
    """(arch, its module in OFFICIAL_LM_FORMATS) of an official BlinkDL language-model state dict."""
    matches = [(arch, module) for arch, module in OFFICIAL_LM_FORMATS.items() if module.is_state_dict(state_dict)]
    if len(matches) != 1:
        some_keys = ", ".join(list(state_dict)[:6])
        found = f"it looks like {' and '.join(a for a, _ in matches)}" if matches else "no version matches its keys"
        raise CheckpointError(f"{source} is not an official RWKV-4/5/6/7 state dict ({found}; keys: {some_keys} ...)"
                              + _other_format_hint(state_dict))
    return matches[0]


def _other_format_hint(state_dict: dict[str, Tensor]) -> str:
    """For official vision and CLIP checkpoints, whose configuration the keys do not give: how to load them."""
    prefixes = {key.split(".", 1)[0] for key in state_dict}
    kind = ("an RWKV-CLIP checkpoint" if prefixes & {"image_model", "text_model"} else
            "a Vision-RWKV (mmcls) checkpoint" if "backbone" in prefixes else None)
    return f"; it looks like {kind}: load it with zoo.create_model(NAME, pretrained=PATH)" if kind else ""


def export_official(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write an RWKV-4/5/6/7 language model as an official BlinkDL `.pth` (its keys, shapes and order; dtype as
    given)."""
    if model.arch not in OFFICIAL_LM_FORMATS:
        raise CheckpointError(f"official export exists for {', '.join(OFFICIAL_LM_FORMATS)} only, not {model.arch!r}")
    torch.save(OFFICIAL_LM_FORMATS[model.arch].to_official_state_dict(model, dtype), path)
