"""RWKV model zoo: language, vision and image-text RWKV models by registry name.

    import zoo
    zoo.list_models("rwkv4*")
    model = zoo.create_model("rwkv4-169m", pretrained=None)
    zoo.model_info("rwkv4-tiny")
    model = zoo.load_checkpoint("RWKV-4-Pile-169M.pth")
"""

from . import models  # noqa: F401  (registers the models)
from .checkpoint import CheckpointError, export_official, load_checkpoint, save_checkpoint
from .factory import create_model, create_model_and_transforms, model_info
from .registry import UnknownModelError, list_models
from .tokenizers import get_tokenizer

__all__ = ["create_model", "create_model_and_transforms", "list_models", "model_info", "load_checkpoint", "save_checkpoint", "export_official",
           "get_tokenizer", "CheckpointError", "UnknownModelError"]
__version__ = "0.1.0"
