"""Depthwise k×k convolution (zero padding k//2, stride 1) on token layout, with a fused activation."""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._util import compute_dtype, up


def apply_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    if activation == "relu":
        return F.relu(y)
    raise ValueError(f"unknown activation {activation!r}")


def dwconv(x: Tensor, hw, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    b, n, c = x.shape
    h, w = hw
    k = weight.shape[-1]
    ct = compute_dtype(x.dtype)
    img = x.to(ct).transpose(1, 2).reshape(b, c, h, w)
    y = F.conv2d(img, weight.to(ct), up(bias, ct), stride=1, padding=k // 2, groups=c)
    y = apply_activation(y, activation)
    return y.reshape(b, c, n).transpose(1, 2).to(x.dtype)
