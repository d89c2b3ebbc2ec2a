"""vitkernels.mix_ffn: SegFormer / PVTv2 Mix-FFN, fc2(GELU(dwconv3×3(act(fc1(x))))), act = ReLU if extra_relu.

A composite of F.linear and the `dwconv` op (conv + GELU fused there); the residual add stays in the
block. Its gradients are the composition's (autograd through linear and dwconv).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._common import (
    autocast_inputs,
    call_public,
    check_hw,
    check_same,
    check_tensor,
    describe,
)
from ._library import composite
from ._spec import BenchSpec, OpSpec, define
from .dwconv import dwconv

OP = "mix_ffn"


def _parts(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, *_):
    # The dwconv runs on the hidden activations, which share x's device and dtype: a backend runs
    # mix_ffn where it runs this dwconv (backends.COMPOSITES).
    return [("dwconv", (x, hw, dw_weight, dw_bias, "gelu"))]


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
    )
)


def validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias) -> None:
    check_tensor(OP, "x", x, ndim=3)
    check_hw(OP, x, "x", hw)
    check_tensor(OP, "fc1_weight", fc1_weight, ndim=2)
    check_tensor(OP, "fc2_weight", fc2_weight, ndim=2)
    check_same(
        OP,
        "x",
        x,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        dw_weight=dw_weight,
        dw_bias=dw_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
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


@composite(OP)
def _mix_ffn(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, extra_relu=False):
    x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias = autocast_inputs(
        x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias
    )
    validate(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
    y = F.linear(x, fc1_weight, fc1_bias)
    if extra_relu:
        y = F.relu(y)
    y = dwconv(y, hw, dw_weight, dw_bias, "gelu")
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
