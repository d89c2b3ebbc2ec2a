"""ViT/DeiT attention core on the packed qkv projection: (B, N, 3C) -> (B, N, C)."""

from typing import Optional

from torch import Tensor

from .attention import attention_with_lse


def split_qkv(qkv: Tensor, num_heads: int, parts: int = 3):
    """(B, N, parts·C) with channel s·C + h·D + d  ->  `parts` tensors (B, heads, N, D) (views)."""
    b, n, pc = qkv.shape
    d = pc // parts // num_heads
    return qkv.reshape(b, n, parts, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, D) -> (B, N, heads·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def self_attention_with_lse(qkv: Tensor, num_heads: int, scale: Optional[float] = None):
    q, k, v = split_qkv(qkv, num_heads)
    out, lse = attention_with_lse(q, k, v, None, scale)
    return merge_heads(out), lse


def self_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    return self_attention_with_lse(qkv, num_heads, scale)[0]
