"""Shared layers and ops of the zoo: WKV and Bi-WKV, token shift, RWKV-4..7 time-mix and channel-mix, attention."""

from .attention import CausalSelfAttention, GPTBlock, KVCache
from .biwkv import biwkv, biwkv_parallel, biwkv_recurrent, biwkv_reference
from .biwkv6 import biwkv6, biwkv6_reference
from .rrwkv import RRWKVBlock, RRWKVChannelMix, RRWKVTimeMix
from .rwkv4 import STATE_ROWS, RWKV4Block, RWKV4ChannelMix, RWKV4TimeMix, token_shift
from .rwkv5 import RWKV5Block, RWKV5TimeMix
from .rwkv6 import RWKV6Block, RWKV6ChannelMix, RWKV6TimeMix
from .rwkv7 import RWKV7Block, RWKV7ChannelMix, RWKV7TimeMix
from .vision import VRWKVBlock, VRWKVChannelMix, VRWKVSpatialMix, bi_token_shift, q_shift
from .wkv import wkv4, wkv4_chunked, wkv4_init_state, wkv4_reference, wkv4_step
from .wkv5 import wkv5, wkv5_chunked, wkv5_reference
from .wkv6 import wkv6, wkv6_chunked, wkv6_reference, wkv6_step
from .wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step

__all__ = [
    "CausalSelfAttention", "GPTBlock", "KVCache", "STATE_ROWS", "RWKV4Block", "RWKV4ChannelMix", "RWKV4TimeMix",
    "RWKV5Block", "RWKV5TimeMix", "RWKV6Block", "RWKV6ChannelMix", "RWKV6TimeMix",
    "RWKV7Block", "RWKV7ChannelMix", "RWKV7TimeMix", "RRWKVBlock", "RRWKVChannelMix", "RRWKVTimeMix",
    "biwkv", "biwkv_parallel", "biwkv_recurrent", "biwkv_reference", "biwkv6", "biwkv6_reference",
    "VRWKVBlock", "VRWKVChannelMix", "VRWKVSpatialMix", "bi_token_shift", "q_shift",
    "token_shift", "wkv4", "wkv4_chunked", "wkv4_init_state", "wkv4_reference", "wkv4_step",
    "wkv5", "wkv5_chunked", "wkv5_reference", "wkv6", "wkv6_chunked", "wkv6_reference", "wkv6_step",
    "wkv7", "wkv7_chunked", "wkv7_reference", "wkv7_step",
]
