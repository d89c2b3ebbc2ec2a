"""vitkernels.attention: softmax(q·kᵀ·scale + bias)·v on (B, heads, N, D) tensors.

Layers: public op (schema in SPEC below, validation here) -> `_attention_fwd` (returns out and the
float32 row logsumexp) -> `_attention_bwd`. Backends: "triton" (FlashAttention-2 forward and
backward), "cuda" (forward; its backward runs on the "auto" choice) and "reference".

The output is allocated (B, Nq, heads, D) in memory and returned as the (B, heads, Nq, D) view, as
SDPA's flash path does: `out.transpose(1, 2).reshape(B, Nq, C)` is then free.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ._checks import FLOAT_DTYPES, FUSED_MAX_HEAD_DIM, check_same, check_tensor, default_scale, describe
from ._common import autocast_inputs, call_private, call_public, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define

OP = "attention"

SPEC = define(
    OpSpec(
        number=1,
        name=OP,
        schema="attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, float? scale=None) -> Tensor",
        samples=lambda s: (
            s(s.b, s.heads, 5, s.d),
            s(s.b, s.heads, 7, s.d),
            s(s.b, s.heads, 7, s.d),
            s(s.heads, 5, 7),
            None,
        ),
        private=lambda a, scale: (*a[:4], scale),
        inputs=lambda q, k, v, bias, *_: KernelInputs((q, k, v, bias), head_dim=q.shape[-1]),
        batched=(0, 1, 2),
        triton_modules=("attention", "attention_short", "attention_tma"),
        inductor=True,
        bench=BenchSpec(
            cases="vitkernels.bench.cases:attention_cases", baseline="vitkernels.bench.baselines:attention_composition"
        ),
    )
)

# The FlashAttention kernels every attention-like op runs (self_attention, sr_attention and
# space_time_attention too): Triton (triton/attention.py) and CUDA C++ (csrc/kernels/attention.cu).
TRITON_CAPS = Capabilities("fused kernel", backward=True, head_dims=range(1, FUSED_MAX_HEAD_DIM + 1))
CUDA_CAPS = Capabilities(
    "CUDA attention kernel", head_dims=range(8, FUSED_MAX_HEAD_DIM + 1, 8), min_capability=SM80, ext_op="attention_fwd"
)


def validate(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> int:
    """Checks the arguments of `attention`; returns the head dim.

    Valid arguments pass in a few inline comparisons (this runs on every call: host time); anything
    they do not accept goes through `_validate`, whose checks raise the errors."""
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
        qs, ks = q.shape, k.shape
        dt, dev = q.dtype, q.device
        if (
            len(qs) == 4
            and len(ks) == 4
            and dt in FLOAT_DTYPES
            and k.dtype == dt
            and v.dtype == dt
            and k.device == dev
            and v.device == dev
            and v.shape == ks
            and ks[0] == qs[0]
            and ks[1] == qs[1]
            and ks[3] == qs[3]
        ):
            if bias is None:
                return qs[3]
            if (
                isinstance(bias, Tensor)
                and (bias.dtype == dt or bias.dtype == torch.bool)
                and bias.device == dev
                and _broadcasts(bias.shape, (qs[0], qs[1], qs[2], ks[2]))
            ):
                return qs[3]
    return _validate(q, k, v, bias)


def _broadcasts(shape, target) -> bool:
    """`shape` broadcasts to exactly the 4-D `target` (torch.broadcast_shapes took ~20 µs per call)."""
    n = len(shape)
    if n > 4:
        return False
    for s, t in zip(shape, target[4 - n :]):
        if s != 1 and s != t:
            return False
    return True


def _validate(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> int:
    """`validate`, check by check: raises the error that names the first bad argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4)
    check_same(OP, "q", q, k=k, v=v)
    b, h, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"vitkernels.attention: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"vitkernels.attention: k must be (B, heads, Nk, D) = ({b}, {h}, Nk, {d}) to match q "
            f"{tuple(q.shape)}, got k {tuple(k.shape)}"
        )
    if bias is not None and bias.dtype == torch.bool:  # a keep-mask: any dtype of q, same device
        if bias.device != q.device:
            raise ValueError(
                f"vitkernels.attention: bias must be on the device of q ({q.device}), got {describe(bias)}"
            )
    elif bias is not None:
        check_tensor(OP, "bias", bias)
        check_same(OP, "q", q, bias=bias)
    if bias is not None:
        target = (b, h, q.shape[2], k.shape[2])
        if not _broadcasts(bias.shape, target):
            raise ValueError(
                f"vitkernels.attention: bias must broadcast to (B, heads, Nq, Nk) = {target}, got {describe(bias)}"
            )
    return d


@composite(OP)
def _attention(q, k, v, bias=None, scale=None):
    q, k, v, bias = autocast_inputs(q, k, v, bias)
    d = validate(q, k, v, bias)
    return call_private("_attention_fwd", q, k, v, bias, default_scale(scale, d))[0]


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """softmax(q·kᵀ·scale + bias)·v. q (B, heads, Nq, D); k, v (B, heads, Nk, D); bias broadcastable to
    (B, heads, Nq, Nk), added before the softmax. Same result as
    `F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)`; rows whose every score is
    -inf give 0. Differentiable in q, k, v and bias."""
    return call_public(OP, _attention, q, k, v, bias, scale)


# ----------------------------------------------------------------------------- private ops


def new_out(q: Tensor) -> Tensor:
    """(B, heads, Nq, D) output stored as (B, Nq, heads, D)."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def new_lse(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@private_op("vitkernels::_attention_fwd")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    if q.numel() == 0 or k.shape[2] == 0:  # no rows, or no keys: every row is "fully masked"
        return new_out(q).zero_(), new_lse(q).fill_(float("inf"))
    return backends.select(OP, q, k, v, bias).forward(q, k, v, bias, scale)


@_attention_fwd.register_fake
def _(q, k, v, bias, scale):
    return new_out(q), new_lse(q)


@torch.library.custom_op("vitkernels::_attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.shape[2] == 0:
        dbias = torch.zeros_like(bias) if bias_grad else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    kernel = backends.select(OP, q, k, v, bias, backward=True)
    dq, dk, dv, dbias = kernel.backward(dout, q, k, v, bias, out, lse, scale, bias_grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), (dbias.contiguous() if bias_grad else q.new_empty(0))


@_attention_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, scale, bias_grad):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_grad else q.new_empty(0)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        dbias,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkernels._attention_bwd(dout, q, k, v, bias, out, lse, ctx.scale, bias_grad)
    return dq, dk, dv, (dbias if bias_grad else None), None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- kernels


def _reference_forward(q, k, v, bias, scale):
    o, lse = ref.attention_with_lse(q, k, v, bias, scale)
    out = new_out(q)
    out.copy_(o)
    return out, lse


def _reference_backward(dout, q, k, v, bias, out, lse, scale, bias_grad):
    diff = (0, 1, 2, 3) if bias_grad else (0, 1, 2)
    grads = reference_vjp(lambda *a: ref.attention(*a, scale), (q, k, v, bias), diff, (dout,))
    return grads[0], grads[1], grads[2], grads[3]


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def expand_bias(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The bias as a (B, heads, Nq, Nk) view with 0 strides on broadcast dims (no copy)."""
    if bias is None:
        return None
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def reduce_dbias(dbias: Optional[Tensor], bias: Tensor) -> Tensor:
    """Kernel dbias (float32, broadcast dims of size 1) -> the gradient in bias's own shape and dtype."""
    return dbias.sum_to_size(bias.shape).to(bias.dtype)


def _triton_forward(q, k, v, bias, scale):
    from ..triton import attention as tk

    out = new_out(q)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    lse = tk.attention_forward(q, k, v, expand_bias(bias, q, k), scale, out)
    return out, lse


def _triton_backward(dout, q, k, v, bias, out, lse, scale, bias_grad):
    from ..triton import attention as tk

    q, k, v, dout = (last_dim_contiguous(t) for t in (q, k, v, dout))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias = tk.attention_backward(dout, q, k, v, expand_bias(bias, q, k), out, lse, scale, dq, dk, dv, bias_grad)
    return dq, dk, dv, (reduce_dbias(dbias, bias) if bias_grad else None)


def cuda_supports(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query of the CUDA attention kernel, the one adapter to it (called once the
    declared capabilities pass, so the extension is loaded)."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("attention", head_dim, dtype=dtype, device=device)


def cuda_head_dim_reasons(d: int, dtype: torch.dtype, device: torch.device) -> list:
    """The op-specific check of the ops on the CUDA attention kernel: what the extension says."""
    return [] if cuda_supports(d, dtype, device) else [f"head dim {d} is not built into the CUDA attention kernel"]


def _cuda_check(q, k, v, bias, *_):
    return cuda_head_dim_reasons(q.shape[-1], q.dtype, q.device)


def cuda_kernel_version() -> int:
    """The C++ op's `version` argument from VITKERNELS_ATTN_CUDA_KERNEL: "auto" -> 0 (the newest
    fp16 / bf16 kernel: 32 query rows per warp where the padded head dim is ≤ 64, so each K / V
    fragment feeds four MMAs instead of two), "v1" -> 1 (16 rows per warp)."""
    return backends.cuda_kernel_version("VITKERNELS_ATTN_CUDA_KERNEL")


def _cuda_has_version_arg() -> bool:
    """An extension built before the kernel versions has no `version` argument: it runs v1 only."""
    return "version" in (backends.ext_op_args("attention_fwd") or ())


def _cuda_forward(q, k, v, bias, scale):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    # "v1" passes version=1; "auto" keeps the schema's default (the newest kernel), so the call also
    # runs on an extension built before the versions (which has v1 only).
    extra = {"version": 1} if cuda_kernel_version() == 1 and _cuda_has_version_arg() else {}
    return tuple(torch.ops.vitkernels_C.attention_fwd(q, k, v, expand_bias(bias, q, k), scale, **extra))


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)
# Forward only: the backward of a forced "cuda" forward runs on the "auto" choice.
backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
