"""vitkernels.space_time_attention: divided space-time attention (TimeSformer / ViViT) without rearranges.

qkv (B, S·T, 3C) holds T = frames frames of S patch tokens, layout "st" (token s·T + t, TimeSformer)
or "ts" (token t·S + s, ViViT). axis "time": each spatial position attends over its T frames; axis
"space": each frame over its S tokens, with an optional shared class token (cls_qkv (B, 3C))
prepended to every frame. The torch op returns (out, cls_out) — cls_out (B, T, C) is the class
query's output per frame, or an empty (B, 0, C) tensor without a class token; the Python function
returns `out` alone when there is no class token. Backends today: "reference".
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
from .self_attention import _triton_backward as _sa_triton_backward
from .self_attention import _triton_forward as _sa_triton_forward

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
# When each attended sequence is a contiguous run of tokens — the time axis of layout "st"
# (TimeSformer's temporal attention: token s·T + t) and the space axis of layout "ts" (ViViT's
# spatial attention: token t·S + s) — the op is self_attention on the (B·groups, length, 3C) view of
# qkv: the FlashAttention kernels read it and write token layout with no copy. The other
# combinations and the shared class token run on the reference for now.

def _contiguous_runs(qkv, frames, axis, cls_qkv, layout):
    """(groups, length) of the sequences when they are contiguous token runs, else None."""
    if cls_qkv is not None:
        return None
    s = qkv.shape[1] // frames
    if axis == "time" and layout == "st":
        return s, frames
    if axis == "space" and layout == "ts":
        return frames, s
    return None


def _triton_reasons(qkv, frames, num_heads, axis, cls_qkv=None, layout="st", *_):
    why = triton_reasons(qkv, cls_qkv) + head_dim_reasons(qkv.shape[-1] // 3 // num_heads)
    if _contiguous_runs(qkv, frames, axis, cls_qkv, layout) is None:
        why.append(f"the fused kernel covers axis 'time' with layout 'st' and axis 'space' with layout 'ts', "
                   f"without a class token (got axis {axis!r}, layout {layout!r}, "
                   f"cls_qkv {'given' if cls_qkv is not None else 'None'})")
    return why


def _runs_view(t, frames, axis, layout, channels):
    groups, length = _contiguous_runs(t, frames, axis, None, layout)
    return t.contiguous().view(t.shape[0] * groups, length, channels)


def _triton_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    b, n, c3 = qkv.shape
    out, _ = _sa_triton_forward(_runs_view(qkv, frames, axis, layout, c3), num_heads, scale)
    return out.view(b, n, c3 // 3), _empty_cls(qkv)


def _triton_backward(dout, dcls_out, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    # v1: the forward saves no logsumexp for this op, so the backward recomputes it (one extra forward).
    c3 = qkv.shape[-1]
    x = _runs_view(qkv, frames, axis, layout, c3)
    out, lse = _sa_triton_forward(x, num_heads, scale)
    dx = _sa_triton_backward(_runs_view(dout, frames, axis, layout, c3 // 3), x, out, lse, num_heads, scale)
    return dx.view(qkv.shape), None


backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, reasons=_triton_reasons)
