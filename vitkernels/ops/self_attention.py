"""vitkernels.self_attention: ViT/DeiT attention between the qkv and proj linears, (B, N, 3C) -> (B, N, C).

The fused path reads q, k and v as strided views of the packed projection (channel s·C + h·D + d)
and writes the output straight into token layout, so no permute/contiguous copy is made either way;
its backward writes dq, dk, dv into one packed (B, N, 3C) gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, KernelInputs
from ._checks import check_heads, check_int, check_tensor, default_scale
from ._common import autocast_inputs, call_private, call_public, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .attention import CUDA_CAPS, TRITON_CAPS, cuda_head_dim_reasons, last_dim_contiguous

OP = "self_attention"

SPEC = define(
    OpSpec(
        number=2,
        name=OP,
        schema="self_attention(Tensor qkv, int num_heads, float? scale=None) -> Tensor",
        samples=lambda s: (s(s.b, 9, 3 * s.c), s.heads, None),
        private=lambda a, scale: (*a[:2], scale),
        inputs=lambda qkv, num_heads, *_: KernelInputs((qkv,), head_dim=qkv.shape[-1] // 3 // num_heads),
        triton_modules=("attention", "attention_short", "attention_tma"),
        inductor=True,
        bench=BenchSpec(
            cases="vitkernels.bench.cases:self_attention_cases",
            baseline="vitkernels.bench.baselines:self_attention_composition",
        ),
    )
)


def validate(qkv: Tensor, num_heads: int) -> int:
    check_tensor(OP, "qkv", qkv, ndim=3, packed="(B, N, 3C)")
    return check_heads(OP, "qkv", qkv.shape[-1] // 3, num_heads, t=qkv)


@composite(OP)
def _self_attention(qkv, num_heads, scale=None):
    (qkv,) = autocast_inputs(qkv)
    d = validate(qkv, num_heads)
    return call_private("_self_attention_fwd", qkv, num_heads, default_scale(scale, d))[0]


def self_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """Packed qkv (B, N, 3C) from the qkv linear -> attention output (B, N, C) ready for proj."""
    check_int(OP, "num_heads", num_heads)
    return call_public(OP, _self_attention, qkv, num_heads, scale)


# ----------------------------------------------------------------------------- packed-layout views


def heads_view(x: Tensor, num_heads: int, parts: int) -> list:
    """(B, N, parts·C) with last-dim stride 1 -> `parts` (B, heads, N, D) strided views, no copy."""
    b, n, pc = x.shape
    d = pc // parts // num_heads
    return list(x.unflatten(-1, (parts, num_heads, d)).permute(2, 0, 3, 1, 4).unbind(0))


# ----------------------------------------------------------------------------- private ops


@private_op("vitkernels::_self_attention_fwd")
def _self_attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    b, n, _ = qkv.shape
    if qkv.numel() == 0:
        return qkv.new_zeros(b, n, qkv.shape[-1] // 3), qkv.new_zeros(b, num_heads, n, dtype=torch.float32)
    return backends.select(OP, qkv, num_heads).forward(qkv, num_heads, scale)


@_self_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3), qkv.new_empty(b, num_heads, n, dtype=torch.float32)


@torch.library.custom_op("vitkernels::_self_attention_bwd", mutates_args=())
def _self_attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
    if qkv.numel() == 0:
        return torch.zeros_like(qkv, memory_format=torch.contiguous_format)
    kernel = backends.select(OP, qkv, num_heads, backward=True)
    return kernel.backward(dout, qkv, out, lse, num_heads, scale).contiguous()


@_self_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.vitkernels._self_attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


_self_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernels


def _reference_forward(qkv, num_heads, scale):
    out, lse = ref.self_attention_with_lse(qkv, num_heads, scale)
    return fresh(out), lse


def _reference_backward(dout, qkv, out, lse, num_heads, scale):
    return reference_vjp(lambda x: ref.self_attention(x, num_heads, scale), (qkv,), (0,), (dout,))[0]


def _triton_forward(qkv, num_heads, scale):
    from ..triton import attention as tk

    qkv = last_dim_contiguous(qkv)
    b, n, c3 = qkv.shape
    out = qkv.new_empty(b, n, c3 // 3)
    q, k, v = heads_view(qkv, num_heads, 3)
    lse = tk.attention_forward(q, k, v, None, scale, heads_view(out, num_heads, 1)[0])
    return out, lse


def _triton_backward(dout, qkv, out, lse, num_heads, scale):
    from ..triton import attention as tk

    qkv, dout = last_dim_contiguous(qkv), last_dim_contiguous(dout)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = heads_view(qkv, num_heads, 3)
    dq, dk, dv = heads_view(dqkv, num_heads, 3)
    (o,), (do,) = heads_view(out, num_heads, 1), heads_view(dout, num_heads, 1)
    tk.attention_backward(do, q, k, v, None, o, lse, scale, dq, dk, dv, False)
    return dqkv


def _cuda_check(qkv, num_heads, *_):
    return cuda_head_dim_reasons(qkv.shape[-1] // 3 // num_heads, qkv.dtype, qkv.device)


def _cuda_forward(qkv, num_heads, scale):
    # The CUDA kernel writes (B, N, heads, D) memory, which is token layout (B, N, C).
    q, k, v = heads_view(last_dim_contiguous(qkv), num_heads, 3)
    out, lse = torch.ops.vitkernels_C.attention_fwd(q, k, v, None, scale)
    b, n, c3 = qkv.shape
    return out.transpose(1, 2).reshape(b, n, c3 // 3), lse


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)
backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
