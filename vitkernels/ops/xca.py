"""vitkernels.xca: XCiT cross-covariance attention, qkv (B, N, 3C) x temperature (heads, 1, 1) -> (B, N, C).

Per head, with q, k, v as (D, N): q̂ = q / max(‖q‖₂ over N, 1e-12), same for k;
A = softmax_row(τ_h · q̂ · k̂ᵀ) (D×D, no D^-1/2); out[n, h·D+i] = Σ_j A[i,j]·v[j,n].
Backends: "triton" (vitkernels/triton/xca.py: two passes over the tokens, fused forward and
backward, head dim ≤ 64), "cuda" (csrc/kernels/xca.cu: the same two passes, forward; its backward
runs on the "auto" choice; head dim % 8 == 0, ≤ 64) and "reference".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ._checks import check_heads, check_int, check_tensor, describe
from ._common import autocast_inputs, call_private, call_public, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .attention import last_dim_contiguous

OP = "xca"


def _inputs(qkv, num_heads, temperature, *_):
    b, n, c3 = qkv.shape
    return KernelInputs(
        (qkv, temperature), head_dim=c3 // 3 // num_heads, sizes={"tokens": n, "batch_x_heads": b * num_heads}
    )


SPEC = define(
    OpSpec(
        number=5,
        name=OP,
        schema="xca(Tensor qkv, int num_heads, Tensor temperature) -> Tensor",
        samples=lambda s: (s(s.b, 9, 3 * s.c), s.heads, s(s.heads, 1, 1)),
        private=lambda a, scale: tuple(a),
        inputs=_inputs,
        triton_modules=("xca",),
        bench=BenchSpec(
            cases="vitkernels.bench.cases:xca_cases",
            baseline="vitkernels.bench.baselines:xca_composition",
            no_flex="xca attends over channels (D×D scores, normalised q/k): not expressible as FlexAttention",
        ),
    )
)

# Head dims up to vitkernels.triton.xca.MAX_HEAD_DIM (= 64; tests/ops/test_ops_api.py checks they agree).
TRITON_CAPS = Capabilities(
    "Triton xca kernel", backward=True, head_dims=range(1, 65), head_dim_note="its D×D tiles stay in registers"
)
CUDA_CAPS = Capabilities(
    "CUDA xca kernel", head_dims=range(8, 65, 8), min_capability=SM80, ext_op="xca_fwd", int32=True
)


def validate(qkv: Tensor, num_heads: int, temperature: Tensor) -> int:
    check_tensor(OP, "qkv", qkv, ndim=3, packed="(B, N, 3C)")
    d = check_heads(OP, "qkv", qkv.shape[-1] // 3, num_heads, t=qkv)
    check_tensor(OP, "temperature", temperature, like=("qkv", qkv))
    if tuple(temperature.shape) not in ((num_heads, 1, 1), (num_heads,)):
        raise ValueError(
            f"vitkernels.xca: temperature must be (heads, 1, 1) or (heads,) with heads = {num_heads}, "
            f"got {describe(temperature)}"
        )
    return d


@composite(OP)
def _xca(qkv, num_heads, temperature):
    qkv, temperature = autocast_inputs(qkv, temperature)
    validate(qkv, num_heads, temperature)
    return call_private("_xca_fwd", qkv, num_heads, temperature)


def xca(qkv: Tensor, num_heads: int, temperature: Tensor) -> Tensor:
    """XCiT cross-covariance attention on the packed qkv projection (B, N, 3C) -> (B, N, C)."""
    check_int(OP, "num_heads", num_heads)
    return call_public(OP, _xca, qkv, num_heads, temperature)


@private_op("vitkernels::_xca_fwd")
def _xca_fwd(qkv: Tensor, num_heads: int, temperature: Tensor) -> Tensor:
    return backends.select(OP, qkv, num_heads, temperature).forward(qkv, num_heads, temperature)


@_xca_fwd.register_fake
def _(qkv, num_heads, temperature):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3)


@torch.library.custom_op("vitkernels::_xca_bwd", mutates_args=())
def _xca_bwd(dout: Tensor, qkv: Tensor, num_heads: int, temperature: Tensor) -> tuple[Tensor, Tensor]:
    kernel = backends.select(OP, qkv, num_heads, temperature, backward=True)
    dqkv, dtemp = kernel.backward(dout, qkv, num_heads, temperature)
    return dqkv.contiguous(), dtemp.contiguous()


@_xca_bwd.register_fake
def _(dout, qkv, num_heads, temperature):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        torch.empty_like(temperature, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    qkv, num_heads, temperature = inputs
    ctx.save_for_backward(qkv, temperature)
    ctx.num_heads = num_heads


def _backward(ctx, dout):
    qkv, temperature = ctx.saved_tensors
    dqkv, dtemp = torch.ops.vitkernels._xca_bwd(dout, qkv, ctx.num_heads, temperature)
    return dqkv, None, dtemp


_xca_fwd.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(qkv, num_heads, temperature):
    return fresh(ref.xca(qkv, num_heads, temperature))


def _reference_backward(dout, qkv, num_heads, temperature):
    dqkv, dtemp = reference_vjp(lambda x, t: ref.xca(x, num_heads, t), (qkv, temperature), (0, 1), (dout,))
    return dqkv, dtemp


backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)


def _triton_forward(qkv, num_heads, temperature):
    from ..triton import xca as tk

    return tk.xca_forward(last_dim_contiguous(qkv), num_heads, temperature)


def _triton_backward(dout, qkv, num_heads, temperature):
    from ..triton import xca as tk

    return tk.xca_backward(dout, last_dim_contiguous(qkv), num_heads, temperature)


backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)


def cuda_supports(d: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query of the CUDA xca kernel, the one adapter to it."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("xca", d, dtype=dtype, device=device)


def _cuda_check(qkv, num_heads, temperature, *_):
    d = qkv.shape[-1] // 3 // num_heads
    if not cuda_supports(d, qkv.dtype, qkv.device):
        return [f"head dim {d} is not supported by the CUDA xca kernel (it needs D % 8 == 0 and D <= 64)"]
    return []


def _cuda_forward(qkv, num_heads, temperature):
    return torch.ops.vitkernels_C.xca_fwd(qkv, num_heads, temperature)


backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
