"""SegFormer / PVTv2 Mix-FFN: fc2(GELU(dwconv3×3(act(fc1(x))))), act = ReLU when extra_relu."""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .dwconv import dwconv


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
    y = F.linear(x, fc1_weight, fc1_bias)
    if extra_relu:
        y = F.relu(y)
    y = dwconv(y, hw, dw_weight, dw_bias, activation="gelu")
    return F.linear(y, fc2_weight, fc2_bias)
