"""Model assemblies; importing this package registers every model."""

from . import clip, gpt, rrwkv, rwkv4, rwkv5, rwkv6, rwkv7, vrwkv  # noqa: F401  (registration side effects)
from .clip import RWKVCLIP, RWKVCLIPConfig
from .gpt import GPTConfig, GPTLM
from .rrwkv import RRWKVConfig, RRWKVLM
from .rwkv4 import RWKV4Config, RWKV4LM
from .rwkv5 import RWKV5Config, RWKV5LM
from .rwkv6 import RWKV6Config, RWKV6LM
from .rwkv7 import RWKV7Config, RWKV7LM
from .vrwkv import VisionRWKV, VRWKVConfig

__all__ = ["RWKVCLIP", "RWKVCLIPConfig", "GPTConfig", "GPTLM", "RRWKVConfig", "RRWKVLM", "RWKV4Config", "RWKV4LM",
           "RWKV5Config", "RWKV5LM", "RWKV6Config", "RWKV6LM", "RWKV7Config", "RWKV7LM", "VisionRWKV", "VRWKVConfig"]
