"""Shared layers and ops of the zoo: WKV and Bi-WKV, token shift, RWKV time-mix and channel-mix, attention."""

from .attention import CausalSelfAttention, GPTBlock
from .biwkv import biwkv, biwkv_parallel, biwkv_recurrent, biwkv_reference
from .rrwkv import RRWKVBlock, RRWKVChannelMix, RRWKVTimeMix
from .rwkv4 import STATE_ROWS, RWKV4Block, RWKV4ChannelMix, RWKV4TimeMix, token_shift
from .vision import VRWKVBlock, VRWKVChannelMix, VRWKVSpatialMix, bi_token_shift, q_shift
from .wkv import wkv4, wkv4_chunked, wkv4_init_state, wkv4_reference, wkv4_step

__all__ = [
    "CausalSelfAttention", "GPTBlock", "STATE_ROWS", "RWKV4Block", "RWKV4ChannelMix", "RWKV4TimeMix",
    "RRWKVBlock", "RRWKVChannelMix", "RRWKVTimeMix",
    "biwkv", "biwkv_parallel", "biwkv_recurrent", "biwkv_reference",
    "VRWKVBlock", "VRWKVChannelMix", "VRWKVSpatialMix", "bi_token_shift", "q_shift",
    "token_shift", "wkv4", "wkv4_chunked", "wkv4_init_state", "wkv4_reference", "wkv4_step",
]
