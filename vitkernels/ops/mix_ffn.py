"""vitkernels.mix_ffn: SegFormer / PVTv2 Mix-FFN, fc2(GELU(dwconv3×3(act(fc1(x))))), act = ReLU if extra_relu.

fc1 (and the ReLU) are F.linear; the rest runs one of two ways ($VITKERNELS_MIX_FFN_KERNEL):

* fused: the private op `_mix_ffn_fwd(h, ...)` = GELU(dwconv(h)) · fc2ᵀ + b in one Triton kernel
  (vitkernels/triton/mix_ffn.py: the dwconv output never reaches HBM). Its backward recomputes
  g = GELU(dwconv(h)) through `_dwconv_fwd`, then fc2's matmuls and `_dwconv_bwd` (exact gradients;
  g is not saved). "auto" takes it where the backend choice runs dwconv's Triton kernel.
* composite: the dwconv op's `_dwconv_fwd(h, ..., "gelu")` (its own backend choice) then F.linear,
  autograd through both.

The choice is made in the CompositeImplicitAutograd body (at trace time under torch.compile /
export). The residual add stays in the block.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _env, backends
from ..backends import BackendUnavailableError
from ._checks import FLOAT_DTYPES, check_hw, check_same, check_tensor, describe
from ._common import autocast_inputs, call_private, call_public, fresh, private_op
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .dwconv import OP as DWCONV  # and its private forward _dwconv_fwd, which the composite calls

OP = "mix_ffn"


def _parts(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, *_):
    # The dwconv runs on the hidden activations, which share x's device and dtype: a backend runs
    # mix_ffn where it runs this dwconv (backends.COMPOSITES).
    return [(DWCONV, (x, hw, dw_weight, dw_bias, "gelu"))]


SPEC = define(
    OpSpec(
        number=8,
        name=OP,
        schema=(
            "mix_ffn(Tensor x, int[2] hw, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, Tensor? dw_bias, "
            "Tensor fc2_weight, Tensor? fc2_bias, bool extra_relu=False) -> Tensor"
        ),
        samples=lambda s: (
            s(s.b, 4 * 5, s.c),
            [4, 5],
            s(2 * s.c, s.c),
            s(2 * s.c),
            s(2 * s.c, 1, 3, 3),
            s(2 * s.c),
            s(s.c, 2 * s.c),
            s(s.c),
            True,
        ),
        parts=_parts,
        bench=BenchSpec(
            cases="vitkernels.bench.cases:mix_ffn_cases",
            baseline="vitkernels.bench.baselines:mix_ffn_composition",
            sdpa=False,
            composite_label="linear+dwconv",
        ),
        triton_modules=("mix_ffn",),
    )
)


def validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias) -> None:
    """Checks the arguments of `mix_ffn` (and with them those of its dwconv on fc1's output).

    Valid arguments pass in a few inline comparisons (this runs on every call: host time); anything
    they do not accept goes through `_validate`, whose checks raise the errors."""
    if (
        isinstance(x, Tensor)
        and isinstance(fc1_weight, Tensor)
        and isinstance(dw_weight, Tensor)
        and isinstance(fc2_weight, Tensor)
        and type(hw) in (list, tuple)
        and len(hw) == 2
    ):
        h, w = hw
        xs, w1s, dws, w2s = x.shape, fc1_weight.shape, dw_weight.shape, fc2_weight.shape
        dt, dev = x.dtype, x.device
        if (
            type(h) is int
            and type(w) is int
            and h >= 1
            and w >= 1
            and len(xs) == 3
            and len(w1s) == 2
            and len(dws) == 4
            and len(w2s) == 2
            and xs[1] == h * w
            and dt in FLOAT_DTYPES
            and fc1_weight.dtype == dt
            and dw_weight.dtype == dt
            and fc2_weight.dtype == dt
            and fc1_weight.device == dev
            and dw_weight.device == dev
            and fc2_weight.device == dev
            and w1s[1] == xs[2]
            and w2s[1] == w1s[0]
            and dws == (w1s[0], 1, dws[3], dws[3])
            and dws[3] % 2 == 1
            and _bias_ok(fc1_bias, w1s[0], dt, dev)
            and _bias_ok(dw_bias, w1s[0], dt, dev)
            and _bias_ok(fc2_bias, w2s[0], dt, dev)
        ):
            return
    _validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)


def _bias_ok(b, n, dtype, device) -> bool:
    return b is None or (isinstance(b, Tensor) and b.dtype == dtype and b.device == device and b.shape == (n,))


def _validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias) -> None:
    """`validate`, check by check: raises the error that names the first bad argument."""
    check_tensor(OP, "x", x, ndim=3)
    check_hw(OP, x, "x", hw)
    check_tensor(OP, "fc1_weight", fc1_weight, ndim=2)
    check_tensor(OP, "fc2_weight", fc2_weight, ndim=2)
    params = {
        "fc1_weight": fc1_weight,
        "fc1_bias": fc1_bias,
        "dw_weight": dw_weight,
        "dw_bias": dw_bias,
        "fc2_weight": fc2_weight,
        "fc2_bias": fc2_bias,
    }
    check_same(OP, "x", x, **params)
    c, hidden = x.shape[-1], fc1_weight.shape[0]
    if fc1_weight.shape[1] != c:
        raise ValueError(f"vitkernels.mix_ffn: fc1_weight must be (hidden, C) with C = {c}, got {describe(fc1_weight)}")
    if fc2_weight.shape[1] != hidden:
        raise ValueError(
            f"vitkernels.mix_ffn: fc2_weight must be (C_out, hidden) with hidden = {hidden}, got {describe(fc2_weight)}"
        )
    check_tensor(OP, "dw_weight", dw_weight, ndim=4)
    k = dw_weight.shape[-1]
    if tuple(dw_weight.shape) != (hidden, 1, k, k) or k % 2 == 0:
        raise ValueError(
            f"vitkernels.mix_ffn: dw_weight must be (hidden, 1, k, k) with hidden = {hidden} and k odd, "
            f"got {describe(dw_weight)}"
        )
    for name, b, n in (
        ("fc1_bias", fc1_bias, hidden),
        ("dw_bias", dw_bias, hidden),
        ("fc2_bias", fc2_bias, fc2_weight.shape[0]),
    ):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"vitkernels.mix_ffn: {name} must be ({n},), got {describe(b)}")


# ----------------------------------------------------------------------------- fused or composite

KERNELS = ("auto", "composite", "fused")


def _kernel_choice(value: str) -> str:
    choice = value.lower()
    if choice not in KERNELS:
        raise ValueError(f"VITKERNELS_MIX_FFN_KERNEL must be one of {KERNELS}, got {choice!r}")
    return choice


def kernel_choice() -> str:
    """$VITKERNELS_MIX_FFN_KERNEL: "auto" (default), "composite" or "fused" (read on every call)."""
    return _env.checked("VITKERNELS_MIX_FFN_KERNEL", _kernel_choice)


def _dwconv_kernel(h, hw, dw_weight, dw_bias):
    """The dwconv kernel the backend choice runs on these arguments (raises like the op would)."""
    return backends.select(DWCONV, h, hw, dw_weight, dw_bias, "gelu")


def uses_fused(x, hw, dw_weight, dw_bias) -> bool:
    """Whether a mix_ffn call on these arguments takes the fused path: "fused" always, "composite"
    never, "auto" where the backend choice runs dwconv's Triton kernel (CUDA tensors, or the
    forced "triton" backend under TRITON_INTERPRET=1). x stands in for h (same device and dtype)."""
    choice = kernel_choice()
    if choice != "auto":
        return choice == "fused"
    try:
        return _dwconv_kernel(x, hw, dw_weight, dw_bias).backend == "triton"
    except BackendUnavailableError:  # the composite's dwconv call raises it, with its reasons
        return False


@composite(OP)
def _mix_ffn(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, extra_relu=False):
    x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias = autocast_inputs(
        x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias
    )
    validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
    y = F.linear(x, fc1_weight, fc1_bias)
    if extra_relu:
        y = F.relu(y)
    if uses_fused(x, hw, dw_weight, dw_bias):
        return call_private("_mix_ffn_fwd", y, list(hw), dw_weight, dw_bias, fc2_weight, fc2_bias)
    # The composite: the dwconv op's private forward, as `dwconv(y, hw, dw_weight, dw_bias, "gelu")`
    # would call it. Its checks are implied by mix_ffn's (y = fc1(x) has x's dtype and device, H·W tokens
    # and dw_weight's channels) and y is in the autocast dtype already, so its public op (a second
    # argument check, autocast pass and fast-path test) is skipped.
    y = call_private("_dwconv_fwd", y, list(hw), dw_weight, dw_bias, "gelu")
    return F.linear(y, fc2_weight, fc2_bias)


def mix_ffn(
    x: Tensor,
    hw,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    dw_weight: Tensor,
    dw_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    extra_relu: bool = False,
) -> Tensor:
    """Mix-FFN on token layout x (B, H·W, C) -> (B, H·W, C_out)."""
    return call_public(
        OP, _mix_ffn, x, list(hw), fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, extra_relu
    )


# ----------------------------------------------------------------------------- the fused path


def _fused_forward(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias):
    """The fused Triton kernel, or, where the backend choice runs another dwconv kernel at run time
    (a graph traced for "triton" run under another choice), that kernel then F.linear."""
    if kernel_choice() == "fused":
        why = backends.not_supported_reasons("dwconv", "triton", h, hw, dw_weight, dw_bias, "gelu")
        if why:
            raise BackendUnavailableError(
                "vitkernels.mix_ffn: VITKERNELS_MIX_FFN_KERNEL=fused needs the Triton kernel: " + "; ".join(why)
            )
        use_triton = True
    else:
        kernel = _dwconv_kernel(h, hw, dw_weight, dw_bias)
        use_triton = kernel.backend == "triton"
    if use_triton:
        from ..triton import mix_ffn as tk

        return tk.mix_ffn_forward(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias)
    return fresh(F.linear(kernel.forward(h, hw, dw_weight, dw_bias, "gelu"), fc2_weight, fc2_bias))


@private_op("vitkernels::_mix_ffn_fwd")
def _mix_ffn_fwd(
    h: Tensor,
    hw: list[int],
    dw_weight: Tensor,
    dw_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
) -> Tensor:
    return backends.without_autocast(_fused_forward)(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias)


@_mix_ffn_fwd.register_fake
def _(h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias):
    return h.new_empty((h.shape[0], h.shape[1], fc2_weight.shape[0]))


def _setup_context(ctx, inputs, output):
    h, hw, dw_weight, dw_bias, fc2_weight, fc2_bias = inputs
    ctx.save_for_backward(h, dw_weight, dw_bias, fc2_weight)
    ctx.hw, ctx.has_fc2_bias = hw, fc2_bias is not None


def _backward(ctx, dy):
    """Exact gradients without the forward's g: g = GELU(dwconv(h)) recomputed for fc2's weight
    gradient, dg = dy · fc2_weight into the dwconv op's backward (dh, ddw_weight, ddw_bias)."""
    h, dw_weight, dw_bias, fc2_weight = ctx.saved_tensors
    need_h, _, need_dw, need_db, need_w2, need_b2 = ctx.needs_input_grad
    dh = ddw = ddb = dw2 = db2 = None
    dy = dy.to(h.dtype)
    if need_w2:
        g = torch.ops.vitkernels._dwconv_fwd(h, ctx.hw, dw_weight, dw_bias, "gelu")
        dw2 = dy.flatten(0, 1).t().mm(g.flatten(0, 1))
    if need_b2 and ctx.has_fc2_bias:
        db2 = dy.sum((0, 1))
    if need_h or need_dw or need_db:
        dh, ddw, ddb = torch.ops.vitkernels._dwconv_bwd(dy.matmul(fc2_weight), h, ctx.hw, dw_weight, dw_bias, "gelu")
        ddb = None if dw_bias is None else ddb
    return dh, None, ddw, ddb, dw2, db2


_mix_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)
