"""Divided space-time attention (TimeSformer / ViViT) on the packed (B, S·T, 3C) projection."""

from typing import Optional

import torch
from torch import Tensor

from .attention import attention_with_lse


def space_time_attention(*args, **kwargs):
    """(out (B, S·T, C), cls_out (B, T, C) or None) of `space_time_attention_with_lse` (the same arguments)."""
    return space_time_attention_with_lse(*args, **kwargs)[:2]


def space_time_attention_with_lse(
    qkv: Tensor,
    frames: int,
    num_heads: int,
    axis: str,
    cls_qkv: Optional[Tensor] = None,
    layout: str = "st",
    scale: Optional[float] = None,
):
    """(out, cls_out or None, lse, cls_lse or None). lse (B, groups, heads, length) is the float32
    logsumexp of every patch query's score row — groups = S and length = T on the time axis, T and
    S on the space axis, whatever the layout; cls_lse (B, T, heads, 1) is the class query's."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    t = frames
    s = n // t
    if layout == "st":  # token s·T + t
        x = qkv.reshape(b, s, t, 3, num_heads, d)
    else:  # "ts": token t·S + s
        x = qkv.reshape(b, t, s, 3, num_heads, d).transpose(1, 2)
    # x: (B, S, T, 3, heads, D)
    cls_out = cls_lse = None
    if axis == "time":
        q, k, v = x.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, S, heads, T, D): sequences over frames
        out, lse = attention_with_lse(q, k, v, None, scale)
        out = out.permute(0, 1, 3, 2, 4)  # (B, S, T, heads, D)
    else:
        q, k, v = x.permute(3, 0, 2, 4, 1, 5).unbind(0)  # (B, T, heads, S, D): sequences over a frame
        if cls_qkv is not None:
            cls = cls_qkv.reshape(b, 1, 3, num_heads, 1, d).expand(b, t, 3, num_heads, 1, d)
            q, k, v = (torch.cat([cls[:, :, i], x_], dim=-2) for i, x_ in enumerate((q, k, v)))
        out, lse = attention_with_lse(q, k, v, None, scale)  # (B, T, heads, [1+]S, D)
        if cls_qkv is not None:
            cls_out = out[:, :, :, 0].reshape(b, t, c)
            cls_lse, lse = lse[..., :1], lse[..., 1:]
            out = out[:, :, :, 1:]
        out = out.permute(0, 3, 1, 2, 4)  # (B, S, T, heads, D)
    if layout == "ts":
        out = out.transpose(1, 2)
    return out.reshape(b, n, c), cls_out, lse, cls_lse
