"""The model registry: names -> (model class, default config, family, paper)."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelEntry", "UnknownModelError", "register_model", "list_models", "get_entry", "arch_class"]


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists the closest registered names."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_class: type
    config: Any               # a dataclass instance: the defaults that overrides change
    family: str               # "language", "vision" or "clip"
    paper: str
    pretrained: tuple[str, ...] = field(default=())


_MODELS: dict[str, ModelEntry] = {}
_ARCHS: dict[str, type] = {}


def register_model(name: str, model_class: type, config: Any, family: str, paper: str,
                   pretrained: tuple[str, ...] = ()) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, model_class, config, family, paper, pretrained)
    _ARCHS.setdefault(model_class.arch, model_class)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def _unknown(kind: str, name: str, known) -> UnknownModelError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else f"; known: {', '.join(sorted(known))}"
    return UnknownModelError(f"unknown {kind} {name!r}{hint}")


def get_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise _unknown("model", name, _MODELS)
    return _MODELS[name]


def arch_class(arch: str) -> type:
    """The model class that writes checkpoints with config.json 'arch' = arch."""
    if arch not in _ARCHS:
        raise _unknown("architecture", arch, _ARCHS)
    return _ARCHS[arch]
