"""Argument checks shared by the op files, and the head-dim limit of the fused kernels.

Every message names the op, the argument and what it got, so a user can fix the call site.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Head dims the fused attention kernels are built and tested for (the Triton kernels mask any D <= 128;
# the CUDA C++ ones take D % 8 == 0 up to it).
FUSED_MAX_HEAD_DIM = 128


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    op: str, name: str, t, ndim: Optional[int] = None, packed: Optional[str] = None, like: Optional[tuple] = None
) -> None:
    """A float tensor argument [of `ndim` dims]. `packed`: its layout as a packed projection, e.g.
    "(B, N, 3C)", whose last dim must divide by 3. `like`: (ref_name, ref), whose dtype and device it must
    share (`check_same`)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"vitkernels.{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"vitkernels.{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference "
            f"backend), got {describe(t)}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"vitkernels.{op}: {name} must be {ndim}-D, got {describe(t)}")
    if packed is not None and t.shape[-1] % 3:
        raise ValueError(
            f"vitkernels.{op}: {name} must be {packed}, its last dim {t.shape[-1]} is not divisible by 3 "
            f"({name} shape {tuple(t.shape)})"
        )
    if like is not None:
        check_same(op, like[0], like[1], **{name: t})


def check_same(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    """All given tensors share ref's dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(
                f"vitkernels.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {describe(t)}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"vitkernels.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {describe(t)}"
            )


def check_int(op: str, name: str, value, minimum: int = 1) -> int:
    """An int argument (not a bool, not a float) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vitkernels.{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"vitkernels.{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_heads(op: str, name: str, channels: int, num_heads: int, what: str = "C", t: Optional[Tensor] = None) -> int:
    """Head dim D = channels / num_heads, with a clear error when it does not divide."""
    check_int(op, "num_heads", num_heads)
    if channels % num_heads:
        where = f"{name} shape {tuple(t.shape)}" if t is not None else name
        raise ValueError(
            f"vitkernels.{op}: {what} = {channels} (from {where}) is not divisible by num_heads = {num_heads}"
        )
    return channels // num_heads


def check_hw(op: str, x: Tensor, name: str, hw) -> tuple[int, int]:
    if len(hw) != 2 or any(int(s) < 1 for s in hw):
        raise ValueError(f"vitkernels.{op}: hw must be (H, W) with H, W >= 1, got {tuple(hw)}")
    h, w = int(hw[0]), int(hw[1])
    if x.shape[1] != h * w:
        raise ValueError(
            f"vitkernels.{op}: {name} has {x.shape[1]} tokens but hw = ({h}, {w}) needs H*W = {h * w} "
            f"({name} {describe(x)})"
        )
    return h, w


def default_scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)
