"""vitkernels.dwconv: depthwise k×k conv (zero pad k//2, stride 1) on token layout with a fused activation.

x (B, H·W, C), weight (C, 1, k, k) as nn.Conv2d(C, C, k, groups=C), k odd; activation None, "gelu"
(exact erf) or "relu". Backends: "triton" (fused forward: conv + bias + activation in one pass over
token layout; backward: dz/dweight/dbias reduce kernel + a flipped-kernel conv for dx, see
vitkernels/triton/dwconv.py), "cuda" (forward only, k in 1/3/5/7, csrc/kernels/dwconv.cu; its backward
runs on the "auto" choice) and "reference".
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .. import reference as ref
from ..backends import REFERENCE, SM80, Capabilities, KernelInputs
from ._checks import FLOAT_DTYPES, check_hw, check_same, check_tensor, describe
from ._common import autocast_inputs, call_private, call_public, empty_if_none, fresh, private_op, reference_vjp
from ._library import composite
from ._spec import BenchSpec, OpSpec, define

OP = "dwconv"
ACTIVATIONS = (None, "gelu", "relu")

SPEC = define(
    OpSpec(
        number=7,
        name=OP,
        schema="dwconv(Tensor x, int[2] hw, Tensor weight, Tensor? bias=None, str? activation=None) -> Tensor",
        samples=lambda s: (s(s.b, 4 * 5, s.c), [4, 5], s(s.c, 1, 3, 3), s(s.c), "gelu"),
        private=lambda a, scale: tuple(a),
        inputs=lambda x, hw, weight, bias, *_: KernelInputs((x, weight, bias)),
        triton_modules=("dwconv",),
        inductor=True,
        bench=BenchSpec(
            cases="vitkernels.bench.cases:dwconv_cases",
            baseline="vitkernels.bench.baselines:dwconv_composition",
            sdpa=False,
        ),
    )
)


def validate(x, hw, weight, bias, activation) -> None:
    """Checks the arguments of `dwconv`.

    Valid arguments pass in a few inline comparisons (this runs on every call: host time); anything
    they do not accept goes through `_validate`, whose checks raise the errors."""
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and type(hw) in (list, tuple) and len(hw) == 2:
        h, w = hw
        xs, ws = x.shape, weight.shape
        dt, dev = x.dtype, x.device
        if (
            type(h) is int
            and type(w) is int
            and h >= 1
            and w >= 1
            and len(xs) == 3
            and len(ws) == 4
            and xs[1] == h * w
            and dt in FLOAT_DTYPES
            and weight.dtype == dt
            and weight.device == dev
            and ws == (xs[2], 1, ws[3], ws[3])
            and ws[3] % 2 == 1
            and (activation is None or activation == "gelu" or activation == "relu")
            and (
                bias is None
                or (isinstance(bias, Tensor) and bias.dtype == dt and bias.device == dev and bias.shape == (xs[2],))
            )
        ):
            return
    _validate(x, hw, weight, bias, activation)


def _validate(x, hw, weight, bias, activation) -> None:
    """`validate`, check by check: raises the error that names the first bad argument."""
    check_tensor(OP, "x", x, ndim=3)
    check_hw(OP, x, "x", hw)
    check_tensor(OP, "weight", weight, ndim=4)
    check_same(OP, "x", x, weight=weight)
    c = x.shape[-1]
    k = weight.shape[-1]
    if weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != k or k % 2 == 0:
        raise ValueError(
            f"vitkernels.dwconv: weight must be (C, 1, k, k) with C = {c} and k odd, got {describe(weight)}"
        )
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, like=("x", x))
        if bias.shape[0] != c:
            raise ValueError(f"vitkernels.dwconv: bias must be (C,) = ({c},), got {describe(bias)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"vitkernels.dwconv: activation must be one of {ACTIVATIONS}, got {activation!r}")


@composite(OP)
def _dwconv(x, hw, weight, bias=None, activation=None):
    x, weight, bias = autocast_inputs(x, weight, bias)
    validate(x, hw, weight, bias, activation)
    return call_private("_dwconv_fwd", x, list(hw), weight, bias, activation)


def dwconv(x: Tensor, hw, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """Depthwise conv on token layout: x (B, H·W, C) -> (B, H·W, C), activation None/"gelu"/"relu" fused."""
    return call_public(OP, _dwconv, x, list(hw), weight, bias, activation)


@private_op("vitkernels::_dwconv_fwd")
def _dwconv_fwd(x: Tensor, hw: list[int], weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    return backends.select(OP, x, hw, weight, bias, activation).forward(x, hw, weight, bias, activation)


@_dwconv_fwd.register_fake
def _(x, hw, weight, bias, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("vitkernels::_dwconv_bwd", mutates_args=())
def _dwconv_bwd(
    dout: Tensor, x: Tensor, hw: list[int], weight: Tensor, bias: Optional[Tensor], activation: Optional[str]
) -> tuple[Tensor, Tensor, Tensor]:
    kernel = backends.select(OP, x, hw, weight, bias, activation, backward=True)
    dx, dw, db = kernel.backward(dout, x, hw, weight, bias, activation)
    return dx.contiguous(), dw.contiguous(), empty_if_none(db, x)


@_dwconv_bwd.register_fake
def _(dout, x, hw, weight, bias, activation):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        x.new_empty(0) if bias is None else torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output):
    x, hw, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.hw, ctx.activation = hw, activation


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.vitkernels._dwconv_bwd(dout, x, ctx.hw, weight, bias, ctx.activation)
    return dx, None, dw, (None if bias is None else db), None


_dwconv_fwd.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(x, hw, weight, bias, activation):
    return fresh(ref.dwconv(x, hw, weight, bias, activation))


def _reference_backward(dout, x, hw, weight, bias, activation):
    f = lambda a, w, b: ref.dwconv(a, hw, w, b, activation)  # noqa: E731
    dx, dw, db = reference_vjp(f, (x, weight, bias), (0, 1, 2), (dout,))
    return dx, dw, db


def _triton_forward(x, hw, weight, bias, activation):
    from ..triton import dwconv as tk

    return tk.dwconv_forward(x, hw, weight, bias, activation)


def _triton_backward(dout, x, hw, weight, bias, activation):
    from ..triton import dwconv as tk

    return tk.dwconv_backward(dout, x, hw, weight, bias, activation)


TRITON_CAPS = Capabilities("Triton dwconv kernel", backward=True)
CUDA_CAPS = Capabilities("CUDA dwconv kernel", min_capability=SM80, ext_op="dwconv_fwd")

backends.register_kernel(OP, "reference", forward=_reference_forward, backward=_reference_backward, caps=REFERENCE)
backends.register_kernel(OP, "triton", forward=_triton_forward, backward=_triton_backward, caps=TRITON_CAPS)


# Kernel sizes compiled into csrc/kernels/dwconv.cu (dwconv_forward_supports_k; the extension has no
# query for it yet).
CUDA_KERNEL_SIZES = (1, 3, 5, 7)
_CUDA_ACT = {None: 0, "gelu": 1, "relu": 2}


def cuda_supports(k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The C++ capability query of the CUDA dwconv kernel, the one adapter to it."""
    from .. import _ext

    return _ext.load_cuda_ext().supports("dwconv", k, dtype=dtype, device=device)


def _cuda_check(x, hw, weight, bias, activation, *_):
    k = weight.shape[-1]
    if not cuda_supports(k, x.dtype, x.device):
        return [f"kernel size k = {k} is not built into the CUDA dwconv kernel (k in {CUDA_KERNEL_SIZES})"]
    return []


def _cuda_forward(x, hw, weight, bias, activation):
    # Forward only: the backward of a forced "cuda" forward runs on the "auto" choice.
    return torch.ops.vitkernels_C.dwconv_fwd(x, [int(hw[0]), int(hw[1])], weight, bias, _CUDA_ACT[activation])


backends.register_kernel(OP, "cuda", forward=_cuda_forward, caps=CUDA_CAPS, check=_cuda_check)
