"""vitkernels.space_time_attention: divided space-time attention (TimeSformer / ViViT) without rearranges.

qkv (B, S·T, 3C) holds T = frames frames of S patch tokens, layout "st" (token s·T + t, TimeSformer)
or "ts" (token t·S + s, ViViT). axis "time": each spatial position attends over its T frames; axis
"space": each frame over its S tokens, with an optional shared class token (cls_qkv (B, 3C))
prepended to every frame. The torch op returns (out, cls_out) — cls_out (B, T, C) is the class
query's output per frame, or an empty (B, 0, C) tensor without a class token; the Python function
returns `out` alone when there is no class token. Backends: "triton" (every axis and layout,
without the class token: the FlashAttention kernels on strided views of qkv) and "reference".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ._common import (
    check_heads,
    check_int,
    check_same,
    check_tensor,
    default_scale,
    describe,
    empty_if_none,
    fresh,
    head_dim_reasons,
    reference_vjp,
    triton_reasons,
)
from ._library import composite
from .attention import last_dim_contiguous

OP = "space_time_attention"


def validate(qkv, frames, num_heads, axis, cls_qkv, layout) -> int:
    check_tensor(OP, "qkv", qkv, ndim=3)
    if qkv.shape[-1] % 3:
        raise ValueError(f"vitkernels.space_time_attention: qkv must be (B, S*T, 3C), its last dim {qkv.shape[-1]} "
                         f"is not divisible by 3 (qkv shape {tuple(qkv.shape)})")
    d = check_heads(OP, "qkv", qkv.shape[-1] // 3, num_heads, t=qkv)
    check_int(OP, "frames", frames)
    if qkv.shape[1] % frames:
        raise ValueError(f"vitkernels.space_time_attention: frames must be a positive int dividing the token count "
                         f"{qkv.shape[1]} (S*T), got frames = {frames!r} (qkv shape {tuple(qkv.shape)})")
    if axis not in ("time", "space"):
        raise ValueError(f"vitkernels.space_time_attention: axis must be 'time' or 'space', got {axis!r}")
    if layout not in ("st", "ts"):
        raise ValueError(f"vitkernels.space_time_attention: layout must be 'st' or 'ts', got {layout!r}")
    if cls_qkv is not None:
        if axis != "space":
            raise ValueError("vitkernels.space_time_attention: cls_qkv is only valid with axis 'space', "
                             f"got axis {axis!r} and cls_qkv {describe(cls_qkv)}")
        check_tensor(OP, "cls_qkv", cls_qkv, ndim=2)
        check_same(OP, "qkv", qkv, cls_qkv=cls_qkv)
        if cls_qkv.shape != (qkv.shape[0], qkv.shape[2]):
            raise ValueError(f"vitkernels.space_time_attention: cls_qkv must be (B, 3C) = "
                             f"{(qkv.shape[0], qkv.shape[2])}, got {describe(cls_qkv)}")
    return d


@composite(OP)
def _space_time_attention(qkv, frames, num_heads, axis, cls_qkv=None, layout="st", scale=None):
    d = validate(qkv, frames, num_heads, axis, cls_qkv, layout)
    return torch.ops.vitkernels._space_time_attention_fwd(qkv, frames, num_heads, axis, cls_qkv, layout,
                                                          default_scale(scale, d))


def space_time_attention(qkv: Tensor, frames: int, num_heads: int, axis: str, cls_qkv: Optional[Tensor] = None,
                         layout: str = "st", scale: Optional[float] = None):
    """Divided space-time attention; returns `out` (B, S·T, C), or `(out, cls_out)` with a class token."""
    check_int(OP, "frames", frames)
    check_int(OP, "num_heads", num_heads)
    out, cls_out = torch.ops.vitkernels.space_time_attention(qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    return out if cls_qkv is None else (out, cls_out)


def _empty_cls(qkv: Tensor) -> Tensor:
    return qkv.new_empty(qkv.shape[0], 0, qkv.shape[2] // 3)


@torch.library.custom_op("vitkernels::_space_time_attention_fwd", mutates_args=())
def _space_time_attention_fwd(qkv: Tensor, frames: int, num_heads: int, axis: str, cls_qkv: Optional[Tensor],
                              layout: str, scale: float) -> tuple[Tensor, Tensor]:
    args = (qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    return backends.select(OP, *args).forward(*args)


@_space_time_attention_fwd.register_fake
def _(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    b, n, c3 = qkv.shape
    cls_out = _empty_cls(qkv) if cls_qkv is None else qkv.new_empty(b, frames, c3 // 3)
    return qkv.new_empty(b, n, c3 // 3), cls_out


@torch.library.custom_op("vitkernels::_space_time_attention_bwd", mutates_args=())
def _space_time_attention_bwd(dout: Tensor, dcls_out: Tensor, qkv: Tensor, frames: int, num_heads: int, axis: str,
                              cls_qkv: Optional[Tensor], layout: str, scale: float) -> tuple[Tensor, Tensor]:
    args = (qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    dqkv, dcls = backends.select(OP, *args, backward=True).backward(dout, dcls_out, *args)
    return dqkv.contiguous(), empty_if_none(dcls, qkv)


@_space_time_attention_bwd.register_fake
def _(dout, dcls_out, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            qkv.new_empty(0) if cls_qkv is None else torch.empty_like(cls_qkv, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    qkv, frames, num_heads, axis, cls_qkv, layout, scale = inputs
    ctx.save_for_backward(qkv, cls_qkv)
    ctx.config = (frames, num_heads, axis, layout, scale)


def _backward(ctx, dout, dcls_out):
    qkv, cls_qkv = ctx.saved_tensors
    frames, num_heads, axis, layout, scale = ctx.config
    dqkv, dcls = torch.ops.vitkernels._space_time_attention_bwd(dout, dcls_out, qkv, frames, num_heads, axis,
                                                                cls_qkv, layout, scale)
    return dqkv, None, None, None, (None if cls_qkv is None else dcls), None, None


_space_time_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    out, cls_out = ref.space_time_attention(qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    return fresh(out), (_empty_cls(qkv) if cls_out is None else fresh(cls_out))


def _reference_backward(dout, dcls_out, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    def f(x, cls):
        out, cls_out = ref.space_time_attention(x, frames, num_heads, axis, cls, layout, scale)
        return out if cls is None else (out, cls_out)
    grads = (dout,) if cls_qkv is None else (dout, dcls_out)
    dqkv, dcls = reference_vjp(f, (qkv, cls_qkv), (0, 1), grads)
    return dqkv, dcls


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward)


# ----------------------------------------------------------------------------- fused (Triton) path
# Every (axis, layout) pair is a set of sequences at fixed strides in the token buffer, so the
# FlashAttention kernels read q, k, v as 5-D (B, groups, heads, length, D) views of qkv and write
# out / dqkv through the same views of token-layout buffers: no rearrange copies. The shared
# class token (TimeSformer's space axis) runs on the reference for now.

def _seq_view(t, frames, axis, layout, parts):
    """(B, groups, parts, heads?, length, ·) view of a token buffer t (B, S·T, parts·C') whose
    sequences are those of (axis, layout): groups = S for the time axis, T for the space axis."""
    b, n, width = t.shape
    s = n // frames
    grid = t.view(b, s, frames, width) if layout == "st" else t.view(b, frames, s, width).transpose(1, 2)
    seqs = grid if axis == "time" else grid.transpose(1, 2)  # (B, groups, length, width)
    return seqs.unflatten(-1, (parts, -1))                     # (B, groups, length, parts, C')


def _heads(seqs, part, num_heads):
    """The (B, groups, heads, length, D) view of one part (q, k or v) of _seq_view's result."""
    x = seqs[:, :, :, part]
    return x.unflatten(-1, (num_heads, -1)).transpose(2, 3)


def _triton_reasons(qkv, frames, num_heads, axis, cls_qkv=None, layout="st", *_):
    why = triton_reasons(qkv, cls_qkv) + head_dim_reasons(qkv.shape[-1] // 3 // num_heads)
    if cls_qkv is not None:
        why.append("the fused kernel does not take the shared class token (cls_qkv) yet")
    return why


def _views(qkv, frames, num_heads, axis, layout):
    seqs = _seq_view(last_dim_contiguous(qkv), frames, axis, layout, 3)
    return [_heads(seqs, i, num_heads) for i in range(3)]


def _triton_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    from ..triton import attention as tk
    q, k, v = _views(qkv, frames, num_heads, axis, layout)
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    tk.attention_forward(q, k, v, None, scale, _heads(_seq_view(out, frames, axis, layout, 1), 0, num_heads))
    return out, _empty_cls(qkv)


def _triton_backward(dout, dcls_out, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    # v1: the forward saves no logsumexp for this op, so the backward recomputes it (one extra forward).
    from ..triton import attention as tk
    q, k, v = _views(qkv, frames, num_heads, axis, layout)
    o = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    (oh,) = [_heads(_seq_view(o, frames, axis, layout, 1), 0, num_heads)]
    lse = tk.attention_forward(q, k, v, None, scale, oh)
    do = _heads(_seq_view(last_dim_contiguous(dout.to(qkv.dtype)), frames, axis, layout, 1), 0, num_heads)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _views(dqkv, frames, num_heads, axis, layout)
    tk.attention_backward(do, q, k, v, None, oh, lse, scale, dq, dk, dv, False)
    return dqkv, None


backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, reasons=_triton_reasons)
