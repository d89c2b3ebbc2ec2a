"""PVT spatial-reduction attention core: full-resolution queries (B, N, C) against reduced keys and
values (B, M, 2C) -> (B, N, C)."""

from typing import Optional

from torch import Tensor

from .attention import attention_with_lse
from .self_attention import merge_heads, split_qkv


def sr_attention_with_lse(q: Tensor, kv: Tensor, num_heads: int, scale: Optional[float] = None):
    (qh,) = split_qkv(q, num_heads, parts=1)
    kh, vh = split_qkv(kv, num_heads, parts=2)
    out, lse = attention_with_lse(qh, kh, vh, None, scale)
    return merge_heads(out), lse


def sr_attention(q: Tensor, kv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    return sr_attention_with_lse(q, kv, num_heads, scale)[0]
