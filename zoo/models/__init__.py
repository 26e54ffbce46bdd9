"""Model assemblies; importing this package registers every model."""

from . import clip, gpt, rrwkv, rwkv4, vrwkv  # noqa: F401  (registration side effects)
from .clip import RWKVCLIP, RWKVCLIPConfig
from .gpt import GPTConfig, GPTLM
from .rrwkv import RRWKVConfig, RRWKVLM
from .rwkv4 import RWKV4Config, RWKV4LM
from .vrwkv import VisionRWKV, VRWKVConfig

__all__ = ["RWKVCLIP", "RWKVCLIPConfig", "GPTConfig", "GPTLM", "RRWKVConfig", "RRWKVLM", "RWKV4Config", "RWKV4LM",
           "VisionRWKV", "VRWKVConfig"]
