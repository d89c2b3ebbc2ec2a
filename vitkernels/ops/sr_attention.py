"""vitkernels.sr_attention: PVT spatial-reduction attention core, q (B, N, C) x kv (B, M, 2C) -> (B, N, C).

The fused path reads q, k, v as strided views of the token-layout projections and writes token
layout, like self_attention. The Triton backend runs the N ≫ M kernels of triton/sr_attention.py
(all M keys and values on chip, queries streamed) while they fit on chip; beyond, the general
FlashAttention forward of triton/attention.py and the split backward of triton/sr_attention.py
(queries split over programs, keys streamed). VITKERNELS_SR_KERNEL picks other kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _env, backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ._checks import FUSED_MAX_HEAD_DIM, check_heads, check_int, check_same, check_tensor, default_scale
from ._common import autocast_inputs, call_private, call_public, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .attention import TRITON_CAPS, last_dim_contiguous
from .self_attention import heads_view

OP = "sr_attention"

SPEC = define(
    OpSpec(
        number=4,
        name=OP,
        schema="sr_attention(Tensor q, Tensor kv, int num_heads, float? scale=None) -> Tensor",
        samples=lambda s: (s(s.b, 20, s.c), s(s.b, 4, 2 * s.c), s.heads, None),
        private=lambda a, scale: (*a[:3], scale),
        inputs=lambda q, kv, num_heads, *_: KernelInputs((q, kv), head_dim=q.shape[-1] // num_heads),
        batched=(0, 1),
        triton_modules=("attention", "attention_short", "attention_tma", "sr_attention"),
        bench=BenchSpec(
            cases="vitkernels.bench.cases:sr_attention_cases",
            baseline="vitkernels.bench.baselines:sr_attention_composition",
        ),
    )
)

# csrc/kernels/sr_attention.cu: all M keys and values of a head in shared memory (checked by C++).
CUDA_CAPS = Capabilities(
    "CUDA sr_attention kernel",
    head_dims=range(8, FUSED_MAX_HEAD_DIM + 1, 8),
    min_capability=SM80,
    ext_op="sr_attention_fwd",
)


def validate(q: Tensor, kv: Tensor, num_heads: int) -> int:
    check_tensor(OP, "q", q, ndim=3)
    check_tensor(OP, "kv", kv, ndim=3)
    check_same(OP, "q", q, kv=kv)
    if kv.shape[0] != q.shape[0] or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(
            f"vitkernels.sr_attention: kv must be (B, M, 2C) = ({q.shape[0]}, M, {2 * q.shape[-1]}) "
            f"for q {tuple(q.shape)}, got kv {tuple(kv.shape)}"
        )
    return check_heads(OP, "q", q.shape[-1], num_heads, t=q)


@composite(OP)
def _sr_attention(q, kv, num_heads, scale=None):
    q, kv = autocast_inputs(q, kv)
    d = validate(q, kv, num_heads)
    return call_private("_sr_attention_fwd", q, kv, num_heads, default_scale(scale, d))[0]


def sr_attention(q: Tensor, kv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """Queries (B, N, C) of the full-resolution map against keys/values (B, M, 2C) of the reduced map."""
    check_int(OP, "num_heads", num_heads)
    return call_public(OP, _sr_attention, q, kv, num_heads, scale)


@private_op("vitkernels::_sr_attention_fwd")
def _sr_attention_fwd(q: Tensor, kv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    b, n, c = q.shape
    if q.numel() == 0 or kv.shape[1] == 0:
        return q.new_zeros(b, n, c), q.new_full((b, num_heads, n), float("inf"), dtype=torch.float32)
    return backends.select(OP, q, kv, num_heads).forward(q, kv, num_heads, scale)


@_sr_attention_fwd.register_fake
def _(q, kv, num_heads, scale):
    b, n, c = q.shape
    return q.new_empty(b, n, c), q.new_empty(b, num_heads, n, dtype=torch.float32)


@torch.library.custom_op("vitkernels::_sr_attention_bwd", mutates_args=())
def _sr_attention_bwd(
    dout: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    if q.numel() == 0 or kv.shape[1] == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), torch.zeros_like(
            kv, memory_format=torch.contiguous_format
        )
    kernel = backends.select(OP, q, kv, num_heads, backward=True)
    dq, dkv = kernel.backward(dout, q, kv, out, lse, num_heads, scale)
    return dq.contiguous(), dkv.contiguous()


@_sr_attention_bwd.register_fake
def _(dout, q, kv, out, lse, num_heads, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(kv, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, kv, num_heads, scale = inputs
    ctx.save_for_backward(q, kv, *output)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, dout, _dlse):
    q, kv, out, lse = ctx.saved_tensors
    dq, dkv = torch.ops.vitkernels._sr_attention_bwd(dout, q, kv, out, lse, ctx.num_heads, ctx.scale)
    return dq, dkv, None, None


_sr_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernels


def _reference_forward(q, kv, num_heads, scale):
    out, lse = ref.sr_attention_with_lse(q, kv, num_heads, scale)
    return fresh(out), lse


def _reference_backward(dout, q, kv, out, lse, num_heads, scale):
    dq, dkv = reference_vjp(lambda a, b: ref.sr_attention(a, b, num_heads, scale), (q, kv), (0, 1), (dout,))
    return dq, dkv


SR_KERNELS = ("auto", "general", "split")


def _sr_kernel() -> str:
    """``VITKERNELS_SR_KERNEL``, a developer switch for side-by-side benchmarks of the Triton kernels:
    "auto": the N ≫ M forward and backward where they fit on chip; beyond, the general forward
    and the split backward. "general": the general FlashAttention forward and backward everywhere.
    "split": the split backward everywhere (the forward as "auto")."""
    value = _env.get("VITKERNELS_SR_KERNEL")
    if value not in SR_KERNELS:
        raise ValueError(f"VITKERNELS_SR_KERNEL={value!r}: expected one of {', '.join(SR_KERNELS)}")
    return value


def _triton_forward(q, kv, num_heads, scale):
    from ..triton import attention as general
    from ..triton import sr_attention as specialised

    q, kv = last_dim_contiguous(q), last_dim_contiguous(kv)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    (qh,), (kh, vh) = heads_view(q, num_heads, 1), heads_view(kv, num_heads, 2)
    (oh,) = heads_view(out, num_heads, 1)
    if _sr_kernel() != "general" and specialised.supports_forward(kv.shape[1], qh.shape[-1]):
        return out, specialised.sr_attention_forward(qh, kh, vh, scale, oh)
    return out, general.attention_forward(qh, kh, vh, None, scale, oh)


def _triton_backward(dout, q, kv, out, lse, num_heads, scale):
    from ..triton import attention as general
    from ..triton import sr_attention as specialised

    dout = dout.to(q.dtype)
    q, kv, dout, out = (last_dim_contiguous(t) for t in (q, kv, dout, out))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
    (qh,), (kh, vh) = heads_view(q, num_heads, 1), heads_view(kv, num_heads, 2)
    (dqh,), (dkh, dvh) = heads_view(dq, num_heads, 1), heads_view(dkv, num_heads, 2)
    (o,), (do,) = heads_view(out, num_heads, 1), heads_view(dout, num_heads, 1)
    m, d, kernel = kv.shape[1], qh.shape[-1], _sr_kernel()
    if kernel == "auto" and specialised.supports_backward(m, d):
        specialised.sr_attention_backward(do, qh, kh, vh, o, lse, scale, dqh, dkh, dvh)
    elif kernel != "general" and specialised.supports_split_backward(m, d):
        specialised.sr_attention_split_backward(do, qh, kh, vh, o, lse, scale, dqh, dkh, dvh)
    else:
        general.attention_backward(do, qh, kh, vh, None, o, lse, scale, dqh, dkh, dvh, False)
    return dq, dkv


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)


def cuda_supports(m: int, d: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query of the CUDA sr_attention kernel, the one adapter to it (it answers for
    `device`: K/V of M keys must fit its shared memory)."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("sr_attention", m, d, dtype=dtype, device=device)


def _cuda_check(q, kv, num_heads, *_):
    m, d = kv.shape[1], q.shape[-1] // num_heads
    if not cuda_supports(m, d, q.dtype, q.device):
        return [
            f"M = {m} keys / head dim {d} is not supported by the CUDA sr_attention kernel (needs 1 <= M <= 256, "
            f"head dim % 8 == 0, 8 <= head dim <= 128, and all keys and values in shared memory)"
        ]
    return []


def _cuda_forward(q, kv, num_heads, scale):
    return torch.ops.vitkernels_C.sr_attention_fwd(q, kv, num_heads, scale)


# Forward only: the backward of a forced "cuda" forward runs on the "auto" choice (Triton).
backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
