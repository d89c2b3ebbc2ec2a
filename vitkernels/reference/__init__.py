"""Eager PyTorch math of every op: the in-package oracle (float64-capable) and the CPU backend.

Each function follows SPEC.md literally and favours clarity over speed; it may materialise the
score matrices the fused kernels avoid. Half-precision inputs are computed in float32.
"""

from .attention import attention, attention_with_lse
from .dwconv import dwconv
from .mix_ffn import mix_ffn
from .pool_attention import pool_attention, pool_attention_with_lse
from .self_attention import self_attention, self_attention_with_lse
from .space_time_attention import space_time_attention, space_time_attention_with_lse
from .sr_attention import sr_attention, sr_attention_with_lse
from .window_attention import window_attention
from .xca import xca

__all__ = [
    "attention",
    "attention_with_lse",
    "self_attention",
    "self_attention_with_lse",
    "window_attention",
    "sr_attention",
    "sr_attention_with_lse",
    "xca",
    "space_time_attention",
    "space_time_attention_with_lse",
    "dwconv",
    "mix_ffn",
    "pool_attention",
    "pool_attention_with_lse",
]
