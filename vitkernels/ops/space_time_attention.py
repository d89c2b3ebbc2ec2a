"""vitkernels.space_time_attention: divided space-time attention (TimeSformer / ViViT) without rearranges.

qkv (B, S·T, 3C) holds T = frames frames of S patch tokens, layout "st" (token s·T + t, TimeSformer)
or "ts" (token t·S + s, ViViT). axis "time": each spatial position attends over its T frames; axis
"space": each frame over its S tokens, with an optional shared class token (cls_qkv (B, 3C))
prepended to every frame. The torch op returns (out, cls_out) — cls_out (B, T, C) is the class
query's output per frame, or an empty (B, 0, C) tensor without a class token; the Python function
returns `out` alone when there is no class token. Backends: "triton" (every axis, layout and the
class token: the FlashAttention kernels on strided views of qkv), "cuda" (forward: the CUDA C++
attention kernel with a group dim and the class token as prefix rows; its backward runs on the
"auto" choice) and "reference".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, KernelInputs
from ._checks import FLOAT_DTYPES, check_heads, check_int, check_tensor, default_scale, describe
from ._common import autocast_inputs, call_private, call_public, empty_if_none, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .attention import CUDA_CAPS as _CUDA_ATTENTION_CAPS
from .attention import TRITON_CAPS, last_dim_contiguous

OP = "space_time_attention"


def _inputs(qkv, frames, num_heads, axis, cls_qkv=None, *_):
    b, n = qkv.shape[:2]
    groups = n // frames if axis == "time" else frames
    return KernelInputs(
        (qkv, cls_qkv),
        head_dim=qkv.shape[-1] // 3 // num_heads,
        sizes={"sequences": b * groups * num_heads, "tokens": n},
    )


SPEC = define(
    OpSpec(
        number=6,
        name=OP,
        schema=(
            "space_time_attention(Tensor qkv, int frames, int num_heads, str axis, Tensor? cls_qkv=None, "
            'str layout="st", float? scale=None) -> (Tensor, Tensor)'
        ),
        samples=lambda s: (s(s.b, 4 * 3, 3 * s.c), 3, s.heads, "space", s(s.b, 3 * s.c), "ts", None),
        private=lambda a, scale: (*a[:6], scale),
        inputs=_inputs,
        batched=(0, 4),
        triton_modules=("attention", "attention_short", "attention_tma"),
        bench=BenchSpec(
            cases="vitkernels.bench.cases:space_time_attention_cases",
            baseline="vitkernels.bench.baselines:space_time_attention_composition",
        ),
    )
)


def validate(qkv, frames, num_heads, axis, cls_qkv, layout) -> int:
    """Checks the arguments of `space_time_attention`; returns the head dim.

    Valid arguments pass in a few inline comparisons (this runs on every call: host time); anything
    they do not accept goes through `_validate`, whose checks raise the errors."""
    if isinstance(qkv, Tensor) and type(frames) is int and type(num_heads) is int and frames >= 1 and num_heads >= 1:
        shape = qkv.shape
        if len(shape) == 3 and qkv.dtype in FLOAT_DTYPES and (axis == "space" or axis == "time"):
            c3 = shape[2]
            c = c3 // 3
            if (
                c3 % 3 == 0
                and c % num_heads == 0
                and shape[1] % frames == 0
                and (layout == "st" or layout == "ts")
                and (
                    cls_qkv is None
                    or (
                        axis == "space"
                        and isinstance(cls_qkv, Tensor)
                        and cls_qkv.dtype == qkv.dtype
                        and cls_qkv.device == qkv.device
                        and cls_qkv.shape == (shape[0], c3)
                    )
                )
            ):
                return c // num_heads
    return _validate(qkv, frames, num_heads, axis, cls_qkv, layout)


def _validate(qkv, frames, num_heads, axis, cls_qkv, layout) -> int:
    """`validate`, check by check: raises the error that names the first bad argument."""
    check_tensor(OP, "qkv", qkv, ndim=3, packed="(B, S*T, 3C)")
    d = check_heads(OP, "qkv", qkv.shape[-1] // 3, num_heads, t=qkv)
    check_int(OP, "frames", frames)
    if qkv.shape[1] % frames:
        raise ValueError(
            f"vitkernels.space_time_attention: frames must be a positive int dividing the token count "
            f"{qkv.shape[1]} (S*T), got frames = {frames!r} (qkv shape {tuple(qkv.shape)})"
        )
    if axis not in ("time", "space"):
        raise ValueError(f"vitkernels.space_time_attention: axis must be 'time' or 'space', got {axis!r}")
    if layout not in ("st", "ts"):
        raise ValueError(f"vitkernels.space_time_attention: layout must be 'st' or 'ts', got {layout!r}")
    if cls_qkv is not None:
        if axis != "space":
            raise ValueError(
                "vitkernels.space_time_attention: cls_qkv is only valid with axis 'space', "
                f"got axis {axis!r} and cls_qkv {describe(cls_qkv)}"
            )
        check_tensor(OP, "cls_qkv", cls_qkv, ndim=2, like=("qkv", qkv))
        if cls_qkv.shape != (qkv.shape[0], qkv.shape[2]):
            raise ValueError(
                f"vitkernels.space_time_attention: cls_qkv must be (B, 3C) = "
                f"{(qkv.shape[0], qkv.shape[2])}, got {describe(cls_qkv)}"
            )
    return d


@composite(OP)
def _space_time_attention(qkv, frames, num_heads, axis, cls_qkv=None, layout="st", scale=None):
    qkv, cls_qkv = autocast_inputs(qkv, cls_qkv)
    d = validate(qkv, frames, num_heads, axis, cls_qkv, layout)
    out, cls_out, _, _ = call_private(
        "_space_time_attention_fwd", qkv, frames, num_heads, axis, cls_qkv, layout, default_scale(scale, d)
    )
    return out, cls_out


def space_time_attention(
    qkv: Tensor,
    frames: int,
    num_heads: int,
    axis: str,
    cls_qkv: Optional[Tensor] = None,
    layout: str = "st",
    scale: Optional[float] = None,
):
    """Divided space-time attention; returns `out` (B, S·T, C), or `(out, cls_out)` with a class token."""
    if not (type(frames) is int and type(num_heads) is int and frames >= 1 and num_heads >= 1):
        check_int(OP, "frames", frames)  # the torch op would take a bool or a float
        check_int(OP, "num_heads", num_heads)
    out, cls_out = call_public(OP, _space_time_attention, qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    return out if cls_qkv is None else (out, cls_out)


def _empty_cls(qkv: Tensor) -> Tensor:
    return qkv.new_empty(qkv.shape[0], 0, qkv.shape[2] // 3)


def _lse_shapes(qkv, frames, num_heads, axis, cls_qkv):
    """lse (B, groups, heads, length) of the patch queries and cls_lse (B, T or 0, heads, 1)."""
    b, n = qkv.shape[:2]
    groups, length = (n // frames, frames) if axis == "time" else (frames, n // frames)
    return (b, groups, num_heads, length), (b, 0 if cls_qkv is None else frames, num_heads, 1)


# The private forward returns (out, cls_out, lse, cls_lse): the float32 logsumexp of every query
# row is saved for the backward, which then needs no second forward.
@private_op("vitkernels::_space_time_attention_fwd")
def _space_time_attention_fwd(
    qkv: Tensor, frames: int, num_heads: int, axis: str, cls_qkv: Optional[Tensor], layout: str, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    return backends.select(OP, *args).forward(*args)


@_space_time_attention_fwd.register_fake
def _(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    b, n, c3 = qkv.shape
    cls_out = _empty_cls(qkv) if cls_qkv is None else qkv.new_empty(b, frames, c3 // 3)
    lse, cls_lse = (
        qkv.new_empty(shape, dtype=torch.float32) for shape in _lse_shapes(qkv, frames, num_heads, axis, cls_qkv)
    )
    return qkv.new_empty(b, n, c3 // 3), cls_out, lse, cls_lse


@torch.library.custom_op("vitkernels::_space_time_attention_bwd", mutates_args=())
def _space_time_attention_bwd(
    dout: Tensor,
    dcls_out: Tensor,
    qkv: Tensor,
    cls_qkv: Optional[Tensor],
    out: Tensor,
    cls_out: Tensor,
    lse: Tensor,
    cls_lse: Tensor,
    frames: int,
    num_heads: int,
    axis: str,
    layout: str,
    scale: float,
) -> tuple[Tensor, Tensor]:
    args = (qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    kernel = backends.select(OP, *args, backward=True)
    dqkv, dcls = kernel.backward(dout, dcls_out, (out, cls_out, lse, cls_lse), *args)
    return dqkv.contiguous(), empty_if_none(dcls, qkv)


@_space_time_attention_bwd.register_fake
def _(dout, dcls_out, qkv, cls_qkv, out, cls_out, lse, cls_lse, frames, num_heads, axis, layout, scale):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        qkv.new_empty(0) if cls_qkv is None else torch.empty_like(cls_qkv, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    qkv, frames, num_heads, axis, cls_qkv, layout, scale = inputs
    ctx.save_for_backward(qkv, cls_qkv, *output)
    ctx.config = (frames, num_heads, axis, layout, scale)


def _backward(ctx, dout, dcls_out, _dlse, _dcls_lse):
    qkv, cls_qkv, *saved = ctx.saved_tensors
    frames, num_heads, axis, layout, scale = ctx.config
    dqkv, dcls = torch.ops.vitkernels._space_time_attention_bwd(
        dout, dcls_out, qkv, cls_qkv, *saved, frames, num_heads, axis, layout, scale
    )
    return dqkv, None, None, None, (None if cls_qkv is None else dcls), None, None


_space_time_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    out, cls_out, lse, cls_lse = ref.space_time_attention_with_lse(qkv, frames, num_heads, axis, cls_qkv, layout, scale)
    cls_out = _empty_cls(qkv) if cls_out is None else fresh(cls_out)
    no_cls = qkv.new_empty(_lse_shapes(qkv, frames, num_heads, axis, None)[1], dtype=torch.float32)
    cls_lse = no_cls if cls_lse is None else fresh(cls_lse.to(torch.float32))
    return fresh(out), cls_out, fresh(lse.to(torch.float32)), cls_lse


def _reference_backward(dout, dcls_out, _saved, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    def f(x, cls):
        out, cls_out = ref.space_time_attention(x, frames, num_heads, axis, cls, layout, scale)
        return out if cls is None else (out, cls_out)

    grads = (dout,) if cls_qkv is None else (dout, dcls_out)
    dqkv, dcls = reference_vjp(f, (qkv, cls_qkv), (0, 1), grads)
    return dqkv, dcls


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)


# ----------------------------------------------------------------------------- fused (Triton) path
# Every (axis, layout) pair is a set of sequences at fixed strides in the token buffer, so the
# FlashAttention kernels read q, k, v as 5-D (B, groups, heads, length, D) views of qkv and write
# out / dqkv through the same views of token-layout buffers: no rearrange copies.
# The shared class token (space axis) is not in the buffer. Its key and value are a "prefix" row
# that starts every frame's online softmax; its query's output per frame (cls_out) is a second,
# one-row launch against the same keys. In the backward the class query's share of dK / dV is an
# extra query row of the key-side kernel, and the prefix row's dK / dV come back as fp32 sums.


def _seq_view(t, frames, axis, layout, parts):
    """(B, groups, length, parts, C') view of a token buffer t (B, S·T, parts·C') whose sequences
    are those of (axis, layout): groups = S for the time axis, T for the space axis."""
    b, n, width = t.shape
    s = n // frames
    grid = t.view(b, s, frames, width) if layout == "st" else t.view(b, frames, s, width).transpose(1, 2)
    seqs = grid if axis == "time" else grid.transpose(1, 2)  # (B, groups, length, width)
    return seqs.unflatten(-1, (parts, -1))


def _heads(seqs, part, num_heads):
    """The (B, groups, heads, length, D) view of one part (q, k or v) of _seq_view's result."""
    return seqs[:, :, :, part].unflatten(-1, (num_heads, -1)).transpose(2, 3)


def _views(t, frames, num_heads, axis, layout, parts=3):
    seqs = _seq_view(last_dim_contiguous(t), frames, axis, layout, parts)
    return [_heads(seqs, i, num_heads) for i in range(parts)]


def _cls_rows(cls_qkv, frames, num_heads):
    """The class token's q, k, v as (B, T, heads, D) views, stride 0 over the T frames."""
    b, c3 = cls_qkv.shape
    x = last_dim_contiguous(cls_qkv).view(b, 1, 3, num_heads, c3 // 3 // num_heads)
    return x.expand(b, frames, -1, -1, -1).unbind(2)


def _triton_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    from ..triton import attention as tk

    b, n, c3 = qkv.shape
    q, k, v = _views(qkv, frames, num_heads, axis, layout)
    out = qkv.new_empty(b, n, c3 // 3)
    (o,) = _views(out, frames, num_heads, axis, layout, 1)
    if cls_qkv is None:
        lse = tk.attention_forward(q, k, v, None, scale, o)
        no_cls = qkv.new_empty(_lse_shapes(qkv, frames, num_heads, axis, None)[1], dtype=torch.float32)
        return out, _empty_cls(qkv), lse, no_cls
    # The class query runs as one more query row of each frame's launch (its out and lse stored
    # to cls_out and cls_lse), against the same keys and the class key as prefix row.
    cq, ck, cv = _cls_rows(cls_qkv, frames, num_heads)
    cls_out = qkv.new_empty(b, frames, c3 // 3)
    cls_lse = qkv.new_empty(b, frames, num_heads, 1, dtype=torch.float32)
    extra = (cq, cls_out.view(b, frames, num_heads, -1), cls_lse.view(b, frames, num_heads))
    lse = tk.attention_forward(q, k, v, None, scale, o, prefix=(ck, cv), extra_q=extra)
    return out, cls_out, lse, cls_lse


def _triton_backward(dout, dcls_out, saved, qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    from ..triton import attention as tk

    out, cls_out, lse, cls_lse = saved
    q, k, v = _views(qkv, frames, num_heads, axis, layout)
    (o,) = _views(out, frames, num_heads, axis, layout, 1)
    (do,) = _views(dout.to(qkv.dtype), frames, num_heads, axis, layout, 1)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _views(dqkv, frames, num_heads, axis, layout)
    if cls_qkv is None:
        tk.attention_backward(do, q, k, v, None, o, lse, scale, dq, dk, dv, False)
        return dqkv, None
    cq, ck, cv = _cls_rows(cls_qkv, frames, num_heads)
    b, t, h, d = cq.shape
    dco = (torch.zeros_like(cls_out) if dcls_out is None else dcls_out.to(qkv.dtype)).contiguous()
    dco4 = dco.view(b, t, h, d)
    cls_delta = (cls_out.float() * dco.float()).view(b, t, h, d).sum(-1)
    # Patch queries: dq, dk, dv; the class query as an extra query row: its share of dk / dv, of the
    # prefix row's dk / dv, and its own dq (one more row of the dQ kernel).
    d_pre = [torch.empty(b, t, h, d, device=qkv.device, dtype=torch.float32) for _ in range(2)]
    dcq = torch.empty(b, t, h, d, device=qkv.device, dtype=qkv.dtype)
    tk.attention_backward(
        do,
        q,
        k,
        v,
        None,
        o,
        lse,
        scale,
        dq,
        dk,
        dv,
        False,
        prefix=(ck, cv),
        dprefix=d_pre,
        extra_q=(cq, dco4, cls_lse[..., 0], cls_delta, dcq),
    )
    dcls = torch.cat(
        [
            dcq.float().sum(1).flatten(1),
            d_pre[0].sum(1).flatten(1),
            d_pre[1].sum(1).flatten(1),
        ],
        1,
    )
    return dqkv, dcls.to(cls_qkv.dtype)


backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)

# The CUDA attention kernel with a group dim (csrc/torch/space_time_attention.cpp), 32-bit indexing.
CUDA_CAPS = replace(_CUDA_ATTENTION_CAPS, ext_op="space_time_attention_fwd", int32=True)


def cuda_supports(d: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query for this op's CUDA kernel (the attention kernel with a group dim and
    prefix rows), the one adapter to it."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("space_time_attention", d, dtype=dtype, device=device)


def _cuda_check(qkv, frames, num_heads, *_):
    d = qkv.shape[-1] // 3 // num_heads
    if not cuda_supports(d, qkv.dtype, qkv.device):
        return [f"head dim {d} is not built into the CUDA attention kernel"]
    return []


def _cuda_forward(qkv, frames, num_heads, axis, cls_qkv, layout, scale):
    # One launch: every (batch, group, head) sequence read with strides from qkv, the class token as
    # a prefix key/value and a prefix query (csrc/torch/space_time_attention.cpp). The lse layouts
    # are the Triton forward's, so the backward runs on whichever backend "auto" picks.
    return tuple(torch.ops.vitkernels_C.space_time_attention_fwd(qkv, frames, num_heads, axis, cls_qkv, layout, scale))


backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
